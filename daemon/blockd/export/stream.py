"""A READ bigger than :data:`blockd.export.client.STREAM_ABOVE`, read and sent
a piece at a time, so a client that stops reading such a reply holds two
pieces, not 32 MiB.
"""

from __future__ import annotations

import logging

import outcome
import trio

from blockd.block.chain import sparse_extents
from blockd.block.direct import DirectIO, DirectResult, read_cached, start_direct
from blockd.errors import BlockdError, BlockIOError
from blockd.export import protocol as p
from blockd.export import replies as r
from blockd.export.client import STREAM_ABOVE, Client, cost, refusal, release, reply
from blockd.export.errors import nbd_error
from blockd.export.exports import Export

log = logging.getLogger(__name__)

#: The data one piece of such a READ carries.
PIECE = STREAM_ABOVE // 2
#: Room for the headers a piece starts with (an OFFSET_HOLE chunk's 32 bytes at most).
_HEAD_ROOM = 32


class ReplyCut(Exception):
    """A reply's header and part of its data went out, and the rest cannot be read."""


def start_stream(client: Client, request: p.Request) -> None:
    """Queue a big READ (holding its slot and two pieces' bytes) for the writer's :func:`stream`."""
    assert client.export is not None
    refused = refusal(client, client.export, request)
    if refused is not None:
        reply(client, [refused], [request])
        return
    try:
        client.outbox.send_nowait(request)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        release(client, [request], cost(request))


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


async def stream(client: Client, request: p.Request) -> None:
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
        await _stream_failed(client, request, err, cut=False)
        return
    pieces = r.read_reply_pieces(request.handle, offset, extents, structured, df, PIECE)
    buffers = (bytearray(PIECE + _HEAD_ROOM), bytearray(PIECE + _HEAD_ROOM))
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
            await _stream_failed(client, request, frame, cut)
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


async def _stream_failed(client: Client, request: p.Request, err: Exception, cut: bool) -> None:
    """A streamed READ failed; ``cut`` when its frame is already half sent."""
    if not isinstance(err, BlockdError | OSError):
        log.error("NBD read failed unexpectedly", exc_info=err)
    if cut:
        log.warning("NBD read failed after part of its reply was sent: %s", err)
        raise ReplyCut from err
    reply = r.error_reply(request.handle, client.structured, nbd_error(err), str(err))
    await client.stream.send_all(reply)
