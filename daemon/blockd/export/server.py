"""The NBD server: the only code that touches NBD client sockets.

One task per client runs the handshake through the sans-I/O
:class:`~blockd.export.protocol.NBDConnection`, then reads requests (at most
:data:`MAX_INFLIGHT` in progress per client, and the bytes its requests and
unsent replies hold within :mod:`blockd.export.budget`'s limits, so a client
that floods us, or stops reading its replies, is slowed down by TCP, not by
our memory).  Plain READs and WRITEs take a fast
path, because a thread round trip and a task each cost more than a 4 KiB copy
in the page cache: the node resolves them to host-file positions from cached
metadata (:meth:`BlockNode.direct_io`); reads of cached data are answered at
once on the loop (``RWF_NOWAIT`` reads, which the kernel refuses rather than
block; up to :data:`_INLINE_BYTES` per receive), the others go, many per
call, to worker threads (see :class:`_Lane`), and each call reports back
through a loop callback, not a waiting task.  Every other request (and any
the node cannot resolve) gets a task of its own and the node's ordinary async
path.
Replies may finish out of order; each is queued whole on the client's outbox
and one writer task sends them, so frames never interleave mid-way; a
request's slot and bytes are given back once its reply has been sent.  A READ
of over :data:`_STREAM_ABOVE` bytes is not read whole: the writer reads and
sends it :data:`_PIECE` bytes at a time (see :meth:`NBDServer._stream`), so
a client that stops reading such a reply holds two pieces, not 32 MiB.

Failure containment: garbage, a broken pipe or a vanished client ends only
that client.  A request that reached the block layer runs to completion even
if its client goes away (its node I/O is shielded), so a write is never cut in
half, and an acknowledged FUA write or FLUSH has been flushed to disk first.
"""

from __future__ import annotations

import collections
import contextlib
import errno as errno_module
import logging
import math
import os
from collections.abc import Callable

import outcome
import trio

from blockd.block.direct import DirectIO
from blockd.block.drivers.file import DirectJob, DirectResult, read_cached, start_direct
from blockd.block.node import BlockNode, Status
from blockd.errors import BlockdError, BlockIOError
from blockd.export import protocol as p
from blockd.export.budget import ALONE_BYTES, ClientBudget, ServerBudget
from blockd.export.exports import Export, ExportRegistry

log = logging.getLogger(__name__)

#: Requests one client may have running or waiting for their replies to be sent
#: (their bytes are bounded by :mod:`blockd.export.budget`).
MAX_INFLIGHT = 32
#: Extents one BLOCK_STATUS reply may carry.
MAX_EXTENTS = 1024
_RECEIVE_SIZE = 256 * 1024
#: Replies queued together are sent in one write, up to about this many bytes.
_COALESCE_BYTES = 256 * 1024
#: A reply at least this big is sent by itself rather than copied into a bigger write.
_SEND_ALONE = 64 * 1024
#: Requests received together go to one worker-thread call, up to about this many bytes.
_BATCH_BYTES = 1024 * 1024
#: Worker-thread calls one client may have running at once for reads...
_READ_CALLS = 2
#: ...and for writes: a file's buffered writes take its inode lock one at a time
#: anyway, so a second call would only queue there, and make batches smaller.
_WRITE_CALLS = 1
#: Bytes of reads served from the page cache on the event loop per receive, at most
#: (the rest go to worker threads), so that one client's big reads hold the loop
#: for a few milliseconds at a time, not for all the replies it may have asked for.
_INLINE_BYTES = 8 * 1024 * 1024
#: A READ longer than this is read and sent a piece at a time by the writer,
#: holding the piece being sent and the next one: at most what any client
#: may always hold (:data:`blockd.export.budget.ALONE_BYTES`).
_STREAM_ABOVE = ALONE_BYTES
#: The data one piece of such a READ carries.
_PIECE = _STREAM_ABOVE // 2
#: Room for the headers a piece starts with (an OFFSET_HOLE chunk's 32 bytes at most).
_HEAD_ROOM = 32

# plain ints: enum operators cost microseconds on the per-request path
_READ = int(p.Cmd.READ)
_WRITE = int(p.Cmd.WRITE)
_FUA = int(p.CmdFlag.FUA)

#: Replies queued together: whole frames, sent in order.
Frames = list[bytes | bytearray]
#: An outbox entry: the frames, the requests they answer (whose slots are
#: given back once sent) and the budget bytes given back then; or a big READ,
#: which the writer reads and sends itself when its turn comes.
Outgoing = tuple[Frames, list[p.Request], int]
Outbox = Outgoing | p.Request


class _ReplyCut(Exception):
    """A reply's header and part of its data went out, and the rest cannot be read."""

_ERRNO_TO_NBD = {
    errno_module.EPERM: p.EPERM,
    errno_module.EROFS: p.EPERM,
    errno_module.EIO: p.EIO,
    errno_module.ENOMEM: p.ENOMEM,
    errno_module.ENOSPC: p.ENOSPC,
    errno_module.EDQUOT: p.ENOSPC,
    errno_module.EFBIG: p.ENOSPC,
    errno_module.EOVERFLOW: p.EOVERFLOW,
    errno_module.ENOTSUP: p.ENOTSUP,
    errno_module.EOPNOTSUPP: p.ENOTSUP,
    errno_module.ESHUTDOWN: p.ESHUTDOWN,
    errno_module.EINVAL: p.EINVAL,
}


def nbd_error(err: BaseException) -> int:
    """The NBD error value for a failure (QEMU maps unknown errno to EINVAL)."""
    if isinstance(err, BlockIOError):
        return _ERRNO_TO_NBD.get(err.errno, p.EINVAL)
    if isinstance(err, OSError) and err.errno is not None:
        return _ERRNO_TO_NBD.get(err.errno, p.EINVAL)
    if isinstance(err, BlockdError) and "read-only" in str(err):
        return p.EPERM
    return p.EIO


async def chain_status(node: BlockNode, offset: int, length: int) -> tuple[int, int, int]:
    """What the whole backing chain holds at ``offset``: (flags, depth, run length).

    ``flags`` are ``base:allocation``'s (0 data, HOLE|ZERO reads as zeros);
    ``depth`` is ``qemu:allocation-depth``'s (0 absent, 1 in ``node``, N
    found N-1 layers down).  A layer shorter than ``offset`` reads as zeros
    from that layer on.
    """
    run = length
    layer: BlockNode | None = node
    depth = 1
    seen: set[int] = set()
    while layer is not None and id(layer) not in seen:
        seen.add(id(layer))
        if offset >= layer.size:
            return p.STATE_HOLE | p.STATE_ZERO, depth, run
        status, n = await layer.block_status(offset, min(run, layer.size - offset))
        run = min(run, n)
        if status is Status.DATA:
            return 0, depth, run
        if status is Status.ZERO:
            return p.STATE_HOLE | p.STATE_ZERO, depth, run
        layer = layer.backing
        depth += 1
    return p.STATE_HOLE | p.STATE_ZERO, 0, run


async def allocation_flags(node: BlockNode, offset: int, length: int) -> tuple[int, int]:
    flags, _depth, run = await chain_status(node, offset, length)
    return flags, run


async def allocation_depth(node: BlockNode, offset: int, length: int) -> tuple[int, int]:
    _flags, depth, run = await chain_status(node, offset, length)
    return depth, run


async def allocation_extents(
    node: BlockNode, offset: int, length: int, max_extents: int, context: str = p.BASE_ALLOCATION
) -> list[tuple[int, int]]:
    probe = allocation_depth if context == p.ALLOCATION_DEPTH else allocation_flags
    extents: list[tuple[int, int]] = []
    end = offset + length
    while offset < end:
        flags, n = await probe(node, offset, min(end - offset, 0xFFFFFFFF))
        extents = p.merge_extents([*extents, (n, flags)])
        offset += n
        if len(extents) >= max_extents:
            break
    return extents


async def sparse_extents(node: BlockNode, offset: int, length: int) -> list[tuple[int, bool]]:
    """How QEMU's sparse read cuts a range: ``(length, reads as zeros)`` runs.

    Adjacent holes are joined only when they come from the same place (one
    layer's zero clusters, or nothing anywhere in the chain), as QEMU's block
    status walk splits them; data runs are never joined.
    """
    out: list[tuple[int, bool]] = []
    last_hole: int | None = None
    end = offset + length
    while offset < end:
        flags, depth, n = await chain_status(node, offset, end - offset)
        if flags & p.STATE_ZERO:
            if last_hole == depth and out:
                out[-1] = (out[-1][0] + n, True)
            else:
                out.append((n, True))
            last_hole = depth
        else:
            out.append((n, False))
            last_hole = None
        offset += n
    return out


async def sparse_read(node: BlockNode, offset: int, length: int) -> list[tuple[int, bytes | None]]:
    """Read a range as QEMU's sparse read does: runs that read as zeros become holes."""
    out: list[tuple[int, bytes | None]] = []
    for n, hole in await sparse_extents(node, offset, length):
        out.append((n, None if hole else await node.read(offset, n)))
        offset += n
    return out


async def _read_direct(io: DirectIO, into: memoryview) -> BlockIOError | None:
    """Read a resolved range in a worker thread; its error, if it failed."""
    finished = trio.Event()
    results: list[outcome.Outcome[DirectResult]] = []

    def done(result: outcome.Outcome[DirectResult]) -> None:
        results.append(result)
        finished.set()

    start_direct([(io, False, into)], done)
    # the thread fills ``into`` and uses ``io`` until it is done, whatever happens here
    with trio.CancelScope(shield=True):
        await finished.wait()
    return results[0].unwrap()[0]


async def _read_piece(export: Export, offset: int, into: memoryview) -> None:
    """Fill ``into`` with the export's bytes at ``offset``, as the fast paths read:
    from the page cache on the loop, else in a worker thread; through the
    node's own read when :meth:`BlockNode.direct_io` cannot resolve the range
    or a pivot holds the export.  The export is entered for this piece only,
    never while a piece is being sent, so a stuck client never holds up a pivot.
    """
    node = export.enter()
    if node is not None:
        try:
            io = node.direct_io(offset, len(into), False)
            if io is not None:
                try:
                    failure = None if read_cached(io, into) else await _read_direct(io, into)
                finally:
                    io.release()
                if failure is not None:
                    raise failure
                return
        finally:
            export.leave()
    async with export.use() as node:
        # once started, node I/O is never cut short by a disconnect
        with trio.CancelScope(shield=True):
            into[:] = await node.read(offset, len(into))


def _cost(request: p.Request) -> int:
    """The budget bytes a request holds: a WRITE's payload or a READ's reply data
    (at most two pieces of a READ sent a piece at a time)."""
    kind = request.type
    if kind == _READ:
        return min(request.length, _STREAM_ABOVE)
    return request.length if kind == _WRITE else 0


def _read_reply(client: _Client, request: p.Request) -> tuple[bytearray, memoryview]:
    """A READ's whole reply, and the part of it the data is to be read into."""
    reply = p.data_reply_buffer(request, client.structured)
    return reply, memoryview(reply)[len(reply) - request.length :]


def _try_admit(client: _Client, cost: int) -> bool:
    """Take a request's slot and ``cost`` bytes if they are free now; False if not."""
    if not client.slots.value or not client.budget.fits(cost):
        return False
    client.slots.acquire_nowait()
    client.budget.take(cost)
    return True


async def _admit(client: _Client, cost: int) -> None:
    """Wait for a request's slot and ``cost`` bytes; given back by :meth:`NBDServer._write`."""
    await client.slots.acquire()
    try:
        await client.budget.acquire(cost)
    except BaseException:
        client.slots.release()
        raise


def _queue(client: _Client, request: p.Request) -> None:
    """Queue a READ or WRITE for a worker-thread call (see :meth:`NBDServer._start_batches`)."""
    (client.writes if request.type == _WRITE else client.reads).pending.append(request)


def _batchable(client: _Client, request: p.Request) -> bool:
    """Whether a request may go through :meth:`NBDServer._submit`: plain reads and
    writes (a FUA write or a write-through export needs its flush)."""
    kind = request.type
    if kind == _READ:
        return 0 < request.length <= _STREAM_ABOVE
    return (
        kind == _WRITE
        and request.length > 0
        and not request.flags & _FUA
        and client.export is not None
        and not client.export.writethrough
    )


async def _send_frames(stream: trio.abc.Stream, frames: Frames) -> None:
    """Send replies in as few writes as possible without copying big ones."""
    small: list[bytes | bytearray] = []
    for frame in frames:
        if len(frame) >= _SEND_ALONE:
            if small:
                await stream.send_all(small[0] if len(small) == 1 else b"".join(small))
                small = []
            await stream.send_all(frame)
        else:
            small.append(frame)
    if small:
        await stream.send_all(small[0] if len(small) == 1 else b"".join(small))


def _has_fast_zeroes(node: BlockNode) -> bool:
    return type(node)._do_write_zeroes is not BlockNode._do_write_zeroes


class _Lane:
    """Requests of one direction waiting for a worker-thread call, and the calls running.

    While ``limit`` calls run, newly received requests accumulate here, so
    under load each call carries many of them instead of each paying its own
    round trip.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending: collections.deque[p.Request] = collections.deque()
        self.running = 0

    @property
    def idle(self) -> bool:
        return not self.pending and not self.running


class _Client:
    def __init__(self, server: NBDServer, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        self.scope = trio.CancelScope()
        self.closed = trio.Event()
        # Unbounded as a channel: what goes in is bounded by the slots and the budget.
        self.outbox, self.outbox_reader = trio.open_memory_channel[Outbox](math.inf)
        self.slots = trio.Semaphore(MAX_INFLIGHT)
        self.budget = ClientBudget(server.budget)
        self.reads = _Lane(_READ_CALLS)
        self.writes = _Lane(_WRITE_CALLS)
        #: set whenever no request waits for or runs in a worker-thread call
        self.batches_done = trio.Event()
        self.batches_done.set()
        self.nursery: trio.Nursery | None = None
        self.export: Export | None = None
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.size = 0
        #: what _dispatch may still read on the loop for the current receive
        self.inline_left = _INLINE_BYTES

    # ClientHandle
    def disconnect(self) -> None:
        self.scope.cancel()

    async def wait_closed(self) -> None:
        await self.closed.wait()


def _refusal(client: _Client, export: Export, request: p.Request) -> bytes | None:
    """The error reply for a request the protocol refuses before any I/O, or None."""
    refusal = p.check_request(
        request, client.size, export.writable, client.structured, client.contexts
    )
    if refusal is None:
        return None
    return p.error_reply(request.handle, client.structured, refusal.error, refusal.message)


class NBDServer:
    def __init__(
        self,
        registry: ExportRegistry,
        listeners: list[trio.SocketListener],
        max_connections: int,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self._registry = registry
        self._listeners = listeners
        self._connections = trio.Semaphore(max_connections) if max_connections > 0 else None
        self._cleanup = cleanup
        self._scope = trio.CancelScope()
        self._clients: set[_Client] = set()
        self._stopped = trio.Event()
        self.budget = ServerBudget()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for listener in self._listeners:
                        nursery.start_soon(self._accept_loop, listener, nursery)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            # Whatever fails here, :meth:`stop` must not wait forever for the end.
            try:
                with trio.CancelScope(shield=True):
                    for listener in self._listeners:
                        with contextlib.suppress(OSError):
                            await listener.aclose()
                if self._cleanup is not None:
                    self._cleanup()
            finally:
                self._stopped.set()

    async def stop(self) -> None:
        """Stop listening and drop every client (their running requests finish first)."""
        for client in list(self._clients):
            client.disconnect()
        self._scope.cancel()
        with trio.CancelScope(shield=True):
            await self._stopped.wait()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            if self._connections is not None:
                await self._connections.acquire()
            try:
                stream = await listener.accept()
            except OSError as err:
                if self._connections is not None:
                    self._connections.release()
                log.error("accepting an NBD connection failed: %s", err)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_client, stream)

    async def _serve_client(self, stream: trio.abc.Stream) -> None:
        client = _Client(self, stream)
        self._clients.add(client)
        try:
            with client.scope:
                await self._session(client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except p.ProtocolError as err:
            log.info("dropping an NBD client: %s", err)
        except Exception:
            log.exception("NBD client failed")
        finally:
            self._clients.discard(client)
            if client.export is not None:
                client.export.clients.discard(client)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            client.budget.close()
            if self._connections is not None:
                self._connections.release()
            client.closed.set()

    async def _session(self, client: _Client) -> None:
        registry = self._registry

        def lookup(name: str) -> p.ExportInfo | None:
            export = registry.by_name(name)
            return export.info() if export is not None else None

        conn = p.NBDConnection(lookup, registry.listing)
        await client.stream.send_all(conn.greeting())
        async with trio.open_nursery() as nursery:
            client.nursery = nursery
            nursery.start_soon(self._write, client)
            try:
                await self._read(client, conn)
            except p.ProtocolError as err:
                log.info("dropping an NBD client: %s", err)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                # Let running requests finish and their replies go out, then stop the writer.
                async with trio.open_nursery() as waiter:
                    waiter.start_soon(self._wait_requests, client)
                with trio.CancelScope(shield=True):
                    # worker-thread calls hold no task: wait for them here
                    while not (client.reads.idle and client.writes.idle):
                        await client.batches_done.wait()
                client.outbox.close()

    async def _wait_requests(self, client: _Client) -> None:
        for _ in range(MAX_INFLIGHT):
            await client.slots.acquire()

    async def _read(self, client: _Client, conn: p.NBDConnection) -> None:
        batch: list[p.Request] = []
        batch_bytes = 0
        #: bytes taken for a WRITE whose payload was still coming (see below)
        prepaid = 0
        try:
            while True:
                data = await client.stream.receive_some(_RECEIVE_SIZE)
                client.inline_left = _INLINE_BYTES
                if not data:
                    return
                events = conn.receive_data(data)
                reply = conn.data_to_send()
                if reply:
                    # handshake replies count too: a client may ask and never read
                    await client.budget.acquire(len(reply))
                    client.outbox.send_nowait(([reply], [], len(reply)))
                for event in events:
                    if isinstance(event, p.Closed):
                        return
                    if isinstance(event, p.Negotiated):
                        export = self._registry.by_name(event.export.name)
                        if export is None:
                            return
                        client.export = export
                        client.structured = event.structured
                        client.contexts = event.contexts
                        client.size = event.export.size
                        export.clients.add(client)
                        continue
                    cost = _cost(event)
                    if prepaid and event.type == _WRITE:
                        cost = prepaid = 0  # (the first WRITE to come whole is that one)
                    if not _try_admit(client, cost):
                        # what is batched holds slots too: start it before waiting
                        if batch:
                            self._dispatch(client, batch)
                            batch, batch_bytes = [], 0
                        await _admit(client, cost)
                    if event.type == _READ and event.length > _STREAM_ABOVE:
                        self._start_stream(client, event)
                        continue
                    if not _batchable(client, event):
                        self._start_request(client, event)
                        continue
                    batch.append(event)
                    batch_bytes += event.length
                    if batch_bytes >= _BATCH_BYTES:
                        self._dispatch(client, batch)
                        batch, batch_bytes = [], 0
                if batch:
                    self._dispatch(client, batch)
                    batch, batch_bytes = [], 0
                due = conn.payload_due
                if due and not prepaid:
                    # A WRITE's payload is counted before it is received, not once
                    # it is whole: else a client holding its replies could still
                    # make us buffer up to 32 MiB more, uncounted.
                    await client.budget.acquire(due)
                    prepaid = due
        finally:
            if batch:
                for request in batch:
                    _queue(client, request)
                self._start_batches(client)

    async def _write(self, client: _Client) -> None:
        """Send the replies, then give back what they held (until then, a client
        that does not read them holds its slots and bytes, and is not read from)."""
        reader = client.outbox_reader
        try:
            async for first in reader:
                entry: Outbox | None = first
                while entry is not None:
                    if isinstance(entry, p.Request):
                        await self._stream(client, entry)
                        self._release(client, [entry], _cost(entry))
                        entry = None
                        continue
                    # Coalesce the replies that are already waiting into one send.
                    sent = [entry]
                    frames = list(entry[0])
                    size = sum(map(len, frames))
                    entry = None
                    while size < _COALESCE_BYTES:
                        try:
                            more = reader.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        if isinstance(more, p.Request):
                            entry = more  # (sent after these)
                            break
                        sent.append(more)
                        frames.extend(more[0])
                        size += sum(map(len, more[0]))
                    await _send_frames(client.stream, frames)
                    for _frames, answered, held in sent:
                        self._release(client, answered, held)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ReplyCut):
            client.scope.cancel()

    def _start_stream(self, client: _Client, request: p.Request) -> None:
        """Queue a big READ (holding its slot and two pieces' bytes) for :meth:`_stream`."""
        assert client.export is not None
        refused = _refusal(client, client.export, request)
        if refused is not None:
            self._reply(client, [refused], [request])
            return
        try:
            client.outbox.send_nowait(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._release(client, [request], _cost(request))

    async def _stream(self, client: _Client, request: p.Request) -> None:
        """Read and send a big READ's reply a piece at a time, the next piece being
        read while the last one goes out.

        The writer does this in its turn, so the reply's frames go out whole
        and in order (other replies of this client wait behind it), and only
        two pieces are ever held.  A failure before anything was sent gets
        the error reply a whole READ would get; between two chunks of a
        structured reply, an error chunk ends the reply.  In the middle of a
        simple reply (or of a ``DF`` chunk) its header has promised data that
        cannot be read: the connection ends, as QEMU 7.2 ends it when its
        sparse read fails, so the client never takes the rest for good data.
        """
        export = client.export
        assert export is not None
        structured = client.structured
        df = structured and bool(request.flags & p.CmdFlag.DF)
        offset, length = request.offset, request.length
        try:
            if structured and not df:
                async with export.use() as node:
                    with trio.CancelScope(shield=True):
                        extents = await sparse_extents(node, offset, length)
            else:
                extents = [(length, False)]
        except Exception as err:
            await self._stream_failed(client, request, err, cut=False)
            return
        pieces = p.read_reply_pieces(request.handle, offset, extents, structured, df, _PIECE)
        buffers = (bytearray(_PIECE + _HEAD_ROOM), bytearray(_PIECE + _HEAD_ROOM))
        filled: list[memoryview | Exception] = []

        async def fill(index: int) -> None:
            head, at, n = pieces[index]
            frame = memoryview(buffers[index % 2])[: len(head) + n]
            frame[: len(head)] = head
            try:
                if n:
                    await _read_piece(export, at, frame[len(head) :])
            except Exception as err:
                filled.append(err)
            else:
                filled.append(frame)

        await fill(0)
        for index in range(len(pieces)):
            frame = filled[index]
            if isinstance(frame, Exception):
                cut = index > 0 and (df or not structured)
                await self._stream_failed(client, request, frame, cut)
                return
            broken: trio.BrokenResourceError | trio.ClosedResourceError | None = None
            async with trio.open_nursery() as nursery:
                if index + 1 < len(pieces):
                    nursery.start_soon(fill, index + 1)
                try:
                    await client.stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                    broken = err  # (raised out here, not inside the nursery's group)
                    nursery.cancel_scope.cancel()
            if broken is not None:
                raise broken

    @staticmethod
    async def _stream_failed(
        client: _Client, request: p.Request, err: Exception, cut: bool
    ) -> None:
        """A streamed READ failed; ``cut`` when its frame is already half sent."""
        if not isinstance(err, BlockdError | OSError):
            log.error("NBD read failed unexpectedly", exc_info=err)
        if cut:
            log.warning("NBD read failed after part of its reply was sent: %s", err)
            raise _ReplyCut from err
        reply = p.error_reply(request.handle, client.structured, nbd_error(err), str(err))
        await client.stream.send_all(reply)

    async def _request(self, client: _Client, request: p.Request) -> None:
        try:
            frames = await self._run(client, request)
        except BaseException:
            self._release(client, [request], _cost(request))
            raise
        self._reply(client, [frames], [request])

    def _start_request(self, client: _Client, request: p.Request) -> None:
        """Run one request (holding a slot) on the node's ordinary async path, in a task."""
        assert client.nursery is not None
        client.nursery.start_soon(self._request, client, request)

    def _enter(
        self, client: _Client, requests: list[p.Request]
    ) -> tuple[Export, BlockNode] | None:
        """The export and its node for requests that cannot wait (given back with
        ``export.leave()``); None while a pivot holds the export, when each
        request goes to the ordinary path, which waits for it."""
        export = client.export
        assert export is not None
        node = export.enter()
        if node is None:
            for request in requests:
                self._start_request(client, request)
            return None
        return export, node

    def _dispatch(self, client: _Client, requests: list[p.Request]) -> None:
        """Answer READs of cached data at once; queue the rest for a worker thread.

        Most reads hit the page cache, and a read that would wait for the disk
        is refused by the kernel (:func:`read_cached`), so these need neither
        a task nor a thread.  For a big read this also spares a copy between
        CPUs: the loop sends the bytes it has just read.
        """
        entered = self._enter(client, requests)
        if entered is None:
            return
        export, node = entered
        frames: Frames = []
        answered: list[p.Request] = []
        try:
            for request in requests:
                if request.type != _READ or request.length > client.inline_left:
                    _queue(client, request)
                    continue
                refused = _refusal(client, export, request)
                if refused is not None:
                    frames.append(refused)
                    answered.append(request)
                    continue
                io = node.direct_io(request.offset, request.length, False)
                if io is None:
                    _queue(client, request)
                    continue
                reply, into = _read_reply(client, request)
                try:
                    cached = read_cached(io, into)
                finally:
                    io.release()
                if cached:
                    frames.append(reply)
                    answered.append(request)
                    client.inline_left -= request.length
                else:
                    _queue(client, request)
        finally:
            export.leave()
        self._reply(client, frames, answered)
        self._start_batches(client)

    def _reply(self, client: _Client, frames: Frames, answered: list[p.Request]) -> None:
        """Queue the replies to the ``answered`` requests; the writer gives back
        their slots and bytes once it has sent them."""
        held = sum(map(_cost, answered))
        if not frames:
            self._release(client, answered, held)
            return
        try:
            client.outbox.send_nowait((frames, answered, held))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._release(client, answered, held)

    @staticmethod
    def _release(client: _Client, answered: list[p.Request], held: int) -> None:
        for _request in answered:
            client.slots.release()
        client.budget.give(held)

    def _start_batches(self, client: _Client) -> None:
        """Start worker-thread calls for queued requests, as many as the lanes allow."""
        for lane in (client.reads, client.writes):
            pending = lane.pending
            while pending and lane.running < lane.limit:
                take = [pending.popleft()]
                size = take[0].length
                while pending and size + pending[0].length <= _BATCH_BYTES:
                    size += pending[0].length
                    take.append(pending.popleft())
                self._submit(client, lane, take)
        if client.reads.idle and client.writes.idle:
            client.batches_done.set()

    def _submit(self, client: _Client, lane: _Lane, requests: list[p.Request]) -> None:
        """Start one worker-thread call for the READs and WRITEs that
        :meth:`BlockNode.direct_io` resolves; hand the others to :meth:`_request`.

        Each request holds its slot until its reply is queued.  Once started,
        the call runs to its end whatever happens to the client, so a write
        is never cut short.
        """
        entered = self._enter(client, requests)
        if entered is None:
            return
        export, node = entered
        frames: Frames = []
        answered: list[p.Request] = []
        jobs: list[DirectJob] = []
        replies: list[tuple[p.Request, bytearray | None]] = []
        try:
            for request in requests:
                refused = _refusal(client, export, request)
                if refused is not None:
                    frames.append(refused)
                    answered.append(request)
                    continue
                write = request.type == _WRITE
                io = node.direct_io(request.offset, request.length, write)
                if io is None:
                    self._start_request(client, request)
                    continue
                if write:
                    jobs.append((io, True, memoryview(request.data)))
                    replies.append((request, None))
                else:
                    reply, into = _read_reply(client, request)
                    jobs.append((io, False, into))
                    replies.append((request, reply))
        except BaseException:
            for io, _write, _buf in jobs:
                io.release()
            export.leave()
            raise
        if not jobs:
            export.leave()
            self._reply(client, frames, answered)
            return
        lane.running += 1
        if client.batches_done.is_set():
            client.batches_done = trio.Event()

        def done(result: outcome.Outcome[DirectResult]) -> None:
            self._finish(client, lane, export, jobs, replies, frames, answered, result)

        start_direct(jobs, done)

    def _finish(
        self,
        client: _Client,
        lane: _Lane,
        export: Export,
        jobs: list[DirectJob],
        replies: list[tuple[p.Request, bytearray | None]],
        frames: Frames,
        answered: list[p.Request],
        result: outcome.Outcome[DirectResult],
    ) -> None:
        """A worker-thread call is over: reply, and start what waited for it.

        Runs as a loop callback, where an exception would take trio down, so
        nothing may escape.
        """
        answered.extend(request for request, _buf in replies)
        try:
            for io, _write, _buf in jobs:
                io.release()
            export.leave()
            try:
                errors: list[BaseException | None] = list(result.unwrap())
            except Exception as failure:
                log.exception("NBD batch failed unexpectedly")
                errors = [failure] * len(replies)
            for (request, buf), err in zip(replies, errors, strict=True):
                if err is not None:
                    frames.append(
                        p.error_reply(request.handle, client.structured, nbd_error(err), str(err))
                    )
                elif buf is not None:
                    frames.append(buf)
                else:
                    frames.append(p.simple_reply(request.handle))
        except Exception:
            log.exception("finishing an NBD batch failed")
        finally:
            lane.running -= 1
            try:
                self._reply(client, frames, answered)
                self._start_batches(client)
            except Exception:
                log.exception("finishing an NBD batch failed")

    async def _run(self, client: _Client, request: p.Request) -> bytes:
        export = client.export
        assert export is not None
        refused = _refusal(client, export, request)
        if refused is not None:
            return refused
        try:
            async with export.use() as node:
                # Once started, node I/O is never cut short by a disconnect.
                with trio.CancelScope(shield=True):
                    reply = await self._execute(client, export, node, request)
        except Exception as err:
            if not isinstance(err, BlockdError | OSError):
                log.exception("NBD request %d failed unexpectedly", request.type)
            return p.error_reply(request.handle, client.structured, nbd_error(err), str(err))
        return reply

    async def _execute(
        self, client: _Client, export: Export, node: BlockNode, request: p.Request
    ) -> bytes:
        kind, offset, length, flags = request.type, request.offset, request.length, request.flags
        handle = request.handle
        fua = bool(flags & p.CmdFlag.FUA) or export.writethrough
        if kind == p.Cmd.READ:
            if not client.structured:
                return p.simple_reply(handle, 0, await node.read(offset, length))
            if flags & p.CmdFlag.DF and length:  # (nothing to read: a NONE chunk, below)
                data = await node.read(offset, length)
                return b"".join(p.read_chunks(handle, offset, [(length, data)], df=True))
            return b"".join(p.read_chunks(handle, offset, await sparse_read(node, offset, length)))
        if kind == p.Cmd.WRITE:
            await node.write(offset, request.data)
            if fua:
                await node.flush()
        elif kind == p.Cmd.FLUSH:
            await node.flush()
        elif kind == p.Cmd.TRIM:
            await node.discard(offset, length)
            if fua:
                await node.flush()
        elif kind == p.Cmd.WRITE_ZEROES:
            if flags & p.CmdFlag.FAST_ZERO and not _has_fast_zeroes(node):
                return p.error_reply(
                    handle, client.structured, p.ENOTSUP, "fast zeroing is not supported"
                )
            await node.write_zeroes(offset, length)
            if fua:
                await node.flush()
        elif kind == p.Cmd.CACHE:
            pass
        elif kind == p.Cmd.BLOCK_STATUS:
            limit = 1 if flags & p.CmdFlag.REQ_ONE else MAX_EXTENTS
            ids = sorted(client.contexts)
            out = []
            for index, context_id in enumerate(ids):
                context = client.contexts[context_id]
                extents = await allocation_extents(node, offset, length, limit, context)
                out.append(
                    p.block_status_chunk(handle, context_id, extents, done=index == len(ids) - 1)
                )
            return b"".join(out)
        return p.simple_reply(handle)


def unix_listener_cleanup(path: str) -> Callable[[], None]:
    """Removes the Unix socket file the server created, once it stops."""

    def remove() -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    return remove
