"""The node every driver implements: a byte-addressed async view of one image layer.

The public coroutines validate requests once, here, so drivers only ever see
in-range, well-formed requests and read-only nodes can never be written by
accident whatever the driver does.
"""

from __future__ import annotations

import contextlib
import enum
import errno
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import trio

from blockd.block.permissions import Role
from blockd.block.serialise import RangeGate
from blockd.errors import BlockError, BlockIOError, ReadOnlyError
from blockd.events import EventSink, NoEvents

if TYPE_CHECKING:
    from blockd.block.direct import DirectIO


class Status(enum.Enum):
    """What one layer holds for an extent (``block_status``), ignoring backing layers."""

    DATA = "data"
    ZERO = "zero"
    UNALLOCATED = "unallocated"


@dataclass
class HostExtents:
    """Where a layer's own data for a guest range lies in its host file.

    ``pieces`` are (guest offset, host offset, length), consecutive in guest
    order and covering the range exactly.  The host clusters stay pinned (not
    freed or reused) until :meth:`release` is called, which must happen once.
    """

    file: BlockNode
    pieces: list[tuple[int, int, int]]
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class WriteKind(enum.Enum):
    """What a request that changes a node did, as a :class:`WriteHook` is told."""

    DATA = "data"
    ZEROES = "zeroes"
    DISCARD = "discard"
    #: data copied in from another image (a bulk copy): no bytes at hand
    COPY = "copy"


@dataclass
class Admission:
    """A :class:`WriteHook`'s yes to a write that cannot wait: ``done(ok)`` once
    it is over (True: it was all written; False: it failed, and may have
    changed part of the range; None: it never started), and where the same
    bytes must go too (``mirror``, written in the same worker call)."""

    done: Callable[[bool | None], None]
    mirror: DirectIO | None = None


class WriteHook(Protocol):
    """What a job that must act on a node's writes before they are acknowledged
    installs on it (:meth:`BlockNode.set_write_hook`): an active commit in
    write-blocking mode writes each one to base too.  Every request that
    changes the node goes through it, whoever sends it."""

    def admit(self, offset: int, length: int) -> Admission | None:
        """A write that cannot wait (:meth:`BlockNode.direct_io`) may go
        ahead; None sends it on the node's async path (through :meth:`guard`)."""

    def guard(
        self, kind: WriteKind, offset: int, length: int, data: bytes | None
    ) -> AbstractAsyncContextManager[None]:
        """Held around the request: entered before it starts, left once it is
        done (with its exception if it failed), before it is acknowledged."""

    async def flushed(self) -> None:
        """The node was flushed; called before the flush is acknowledged."""


#: A write a job will make, as :meth:`BlockNode.forecast_writes` takes them:
#: Where every request must end (as QEMU, whose offsets are int64_t).
MAX_REQUEST_END = (1 << 63) - 1

#: (offset, length, whether it is a zero write).
PlannedWrite = tuple[int, int, bool]


@dataclass(frozen=True)
class WriteForecast:
    """What a sequence of writes would add to a node's host file, in bytes.

    ``growth`` is the change in the space the file takes: the new clusters
    (data and each kind of metadata) less the free clusters inside the file
    that the allocator fills first (``reused``) where the file system still
    holds them, less what the writes free (punched); ``peak``, what the file
    system must find at the worst moment.  ``upper_bound``: the format gives no
    way to tell (a raw image), so every data byte is counted as new.
    """

    cluster_size: int
    #: guest clusters that get a new host cluster
    clusters: int
    data: int
    l2_tables: int
    refcount_blocks: int
    refcount_table: int
    l1_table: int
    reused: int
    growth: int
    #: the most the file takes beyond today at any point of the writes (>= growth)
    peak: int
    #: how much longer the file gets (new clusters at its end)
    file_growth: int
    upper_bound: bool


class _NoGuard:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_GUARD = _NoGuard()


class BlockNode:
    """Base class of every node.

    ``file`` is the protocol child of a format node, ``backing`` the image that
    supplies unallocated extents.  Drivers override the ``_do_*`` hooks.
    """

    driver: ClassVar[str] = ""
    #: Protocol nodes may be written (and read) past their end; the file grows.
    growable: ClassVar[bool] = False
    #: Whether :meth:`debug_event` does anything (blkdebug): a driver may skip
    #: work it does only to tell which event to raise.
    hears_debug_events: ClassVar[bool] = False
    #: The ``file`` edge as QEMU names it, and what the node needs of that child.
    file_edge: ClassVar[str] = "file"
    file_role: Role = Role.FILTERED
    #: Whether the format can have a backing image (QEMU's ``supports_backing``):
    #: only such a node can be made an external snapshot's overlay.
    supports_backing: ClassVar[bool] = False
    #: A filter passes its child's content through (QEMU refuses one as an overlay).
    is_filter: ClassVar[bool] = False

    def __init__(
        self,
        node_name: str,
        *,
        read_only: bool,
        file: BlockNode | None = None,
        backing: BlockNode | None = None,
    ) -> None:
        self.node_name = node_name
        self.read_only = read_only
        self.file = file
        self.backing = backing
        self.closed = False
        #: ``detect-zeroes``: "off", or write all-zero data as zero writes
        #: ("on"; "unmap" also lets the zeroed range be deallocated).
        self.detect_zeroes = "off"
        #: ``discard``: whether discard requests are carried out ("unmap") or,
        #: QEMU's default for a node a client opens, ignored ("ignore").
        self.unmap = True
        #: Where the node reports what clients must hear of (a corrupt image);
        #: the graph connects it to the daemon's event sink.
        self.events: EventSink = NoEvents()
        self._write_observers: list[Callable[[int, int], None]] = []
        self._write_hook: WriteHook | None = None
        #: requests that changed the node, and that count when the last flush
        #: began (QEMU's write_gen / flushed_gen): a flush with nothing new to
        #: make durable raises no ``flush_to_disk`` event
        self._write_gen = 0
        self._flushed_gen = 0
        #: the count the flush in progress makes durable (set as a flush starts;
        #: of two overlapping flushes the later one's, which only blkdebug's
        #: events can tell)
        self._flush_gen = 0
        #: writes in flight and ranges a job holds exclusively (a stream's copy)
        self.range_gate = RangeGate()

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"<{type(self).__name__} {self.node_name!r} {self.filename!r} {mode}>"

    # -- properties drivers provide -------------------------------------------------

    @property
    def size(self) -> int:
        """Virtual size in bytes (for protocol nodes: the current file length)."""
        raise NotImplementedError

    @property
    def _file(self) -> BlockNode:
        """The protocol child of a format node, which always has one."""
        assert self.file is not None
        return self.file

    @property
    def filename(self) -> str:
        """The host file behind this node, as graph lookups by filename see it."""
        return self.file.filename if self.file is not None else ""

    @property
    def backing_file(self) -> str | None:
        """The backing file name the image records (None: none, or no such field)."""
        return None

    @property
    def cluster_size(self) -> int | None:
        """The format's allocation unit, for jobs to size their work by (None: none)."""
        return None

    def read_write_refusal(self) -> str | None:
        """Why this image could not be reopened read-write, in QEMU's words
        (None: it could), so a job refuses up front what it would need later."""
        return None

    def check_backing_name(self, backing: str, backing_format: str) -> None:
        """Refuse (BlockError), before anything changes, a backing name this image
        cannot record; a format that records none refuses every one."""
        raise BlockError(f"Driver '{self.driver}' does not support backing files")

    def image_info(self, actual_size: int) -> dict[str, Any]:
        """QAPI ImageInfo for this node, as ``qemu-img info`` / query-named-block-nodes show it.

        Built here so the command layer never has to know a format's internals.
        ``actual_size`` is the host file's allocated bytes: measuring it blocks,
        so the caller does it for every node it describes in one worker call
        (see :func:`blockd.block.info.allocated_sizes`).
        """
        info: dict[str, Any] = {
            "filename": self.filename,
            "format": self.driver,
            "virtual-size": self.size,
            "actual-size": actual_size,
            "dirty-flag": False,
        }
        info.update(self._format_info())
        return info

    def _format_info(self) -> dict[str, Any]:
        return {}

    # -- what a job will cost ------------------------------------------------------

    async def forecast_writes(
        self, size: int, writes: AsyncIterator[PlannedWrite]
    ) -> WriteForecast:
        """What growing the node to ``size`` bytes (if bigger) and then making
        ``writes``, in that order, would add to its host file; changes nothing.

        A format that keeps an allocation map answers from it (qcow2); the
        rest count every data byte, an upper bound (a byte already there
        costs nothing).
        """
        data = 0
        async for _offset, length, zero in writes:
            if not zero:
                data += length
        return WriteForecast(
            cluster_size=0, clusters=0, data=data, l2_tables=0, refcount_blocks=0,
            refcount_table=0, l1_table=0, reused=0, growth=data, peak=data, file_growth=data,
            upper_bound=True,
        )  # fmt: skip

    async def free_space(self) -> int | None:
        """Bytes the file system holding this node's host file can still give
        (to an unprivileged writer, as ``df`` shows them); None: no host file."""
        return await self.file.free_space() if self.file is not None else None

    # -- who watches writes ------------------------------------------------------

    def add_write_observer(self, observer: Callable[[int, int], None]) -> None:
        """Have ``observer(offset, length)`` called after every request that
        changes what the node reads (write, zeroes, discard), failed ones too.

        Called after the change is in place, never before: a watcher that
        copies the range once told (an active commit) must not copy it while
        the old data is still there and then believe it up to date.
        """
        self._write_observers.append(observer)

    def remove_write_observer(self, observer: Callable[[int, int], None]) -> None:
        self._write_observers.remove(observer)

    def set_write_hook(self, hook: WriteHook | None) -> None:
        """Install (or, with None, remove) the node's one :class:`WriteHook`.

        The hook sees the writes that start from now on: wait for
        :meth:`writes_settled` before relying on it having seen every change."""
        if hook is not None and self._write_hook is not None:
            raise BlockError(f"Node '{self.node_name}' already has a write hook")
        self._write_hook = hook

    async def writes_settled(self) -> None:
        """Until every write in flight now (fast-path ones included) is over."""
        await self.range_gate.settled()

    def _guard(
        self, kind: WriteKind, offset: int, length: int, data: bytes | None = None
    ) -> AbstractAsyncContextManager[None]:
        hook = self._write_hook
        if hook is None:
            return _NO_GUARD
        return hook.guard(kind, offset, length, data)

    @contextlib.asynccontextmanager
    async def _writing(
        self,
        kind: WriteKind,
        offset: int,
        length: int,
        data: bytes | None = None,
        spans: list[tuple[int, int]] | None = None,
    ) -> AsyncIterator[None]:
        """Every write's way in: ordered against a stream's copy (:attr:`range_gate`),
        shown to a mirroring job (the write hook), and told to the write observers
        afterwards (``spans``, if not the whole range), whether it succeeded or not:
        a failed write may have changed part of the range."""
        token = await self.range_gate.begin_write(offset, length)
        try:
            async with self._guard(kind, offset, length, data):
                try:
                    yield
                finally:
                    for start, n in spans or [(offset, length)]:
                        self._written(start, n)
        finally:
            self.range_gate.end_write(token)

    def _written(self, offset: int, length: int) -> None:
        self._write_gen += 1
        for observer in self._write_observers:
            observer(offset, length)

    # -- request validation ---------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise BlockIOError(errno.EBADF, f"Node '{self.node_name}' is closed")

    def _check_request(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0:
            raise BlockIOError(errno.EINVAL)
        if offset + length > MAX_REQUEST_END:
            # a corrupt table may point there; the host's offsets end at 2^63
            raise BlockIOError(
                errno.EIO, f"Request {offset}+{length} is beyond the largest offset"
            )
        if not self.growable and offset + length > self.size:
            # QEMU fails requests past the end of a non-growable node with EIO.
            raise BlockIOError(
                errno.EIO,
                f"Request {offset}+{length} is beyond the end of node "
                f"'{self.node_name}' ({self.size} bytes)",
            )

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"Block node '{self.node_name}' is read-only")

    # -- public interface -----------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Guest view of ``length`` bytes at ``offset``, backing chain included."""
        self._check_request(offset, length)
        if length == 0:
            return b""
        return await self._do_read(offset, length)

    async def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """:meth:`read` into the caller's (writable, byte-format) buffer.

        A reused buffer spares allocating (and page-faulting in) a new object
        for every large request.
        """
        view = memoryview(buf)
        if view.readonly or view.format != "B" or view.ndim != 1:
            raise BlockIOError(errno.EINVAL, "readinto needs a writable byte buffer")
        self._check_request(offset, len(view))
        if len(view):
            await self._do_readinto(offset, view)

    async def write(self, offset: int, data: bytes) -> None:
        self._check_request(offset, len(data))
        self._check_writable()
        if not data:
            return
        data = bytes(data)
        async with self._writing(WriteKind.DATA, offset, len(data), data):
            if self.detect_zeroes != "off" and data.count(0) == len(data):
                await self._do_write_zeroes(offset, len(data))
            else:
                await self._do_write(offset, data)

    async def write_many(self, writes: list[tuple[int, bytes]]) -> None:
        """Several :meth:`write` s, (offset, data), made in order; a host file
        makes them in one thread call, which costs more than small writes do."""
        for offset, data in writes:
            self._check_request(offset, len(data))
        self._check_writable()
        writes = [(offset, bytes(data)) for offset, data in writes if data]
        if self.detect_zeroes != "off":
            for offset, data in writes:
                await self.write(offset, data)
            return
        try:
            await self._do_write_many(writes)
        finally:
            for offset, data in writes:
                self._written(offset, len(data))

    async def map_data(self, ranges: Sequence[tuple[int, int]]) -> list[HostExtents | None]:
        """Host file locations of this layer's data for each (offset, length)
        range, pinned; None for a range that is not plain data of this layer in
        a host file (the caller then reads).  Used to copy between images
        without the bytes entering Python.

        All ranges are mapped at one moment: a caller holding pins must never
        wait for this layer's metadata again, because a writer that frees
        clusters holds that metadata while it waits for their pins to go.
        """
        for offset, length in ranges:
            self._check_request(offset, length)
        return await self._do_map_data(list(ranges))

    async def write_from_host(self, offset: int, length: int, src: HostExtents) -> bool:
        """Write the guest range from ``src`` (as returned by :meth:`map_data` of a
        node of the same range) without reading it into memory.

        Returns False, having changed nothing, when this node cannot take the
        fast path for the range; the caller then reads and :meth:`write` s.
        """
        self._check_request(offset, length)
        self._check_writable()
        if length == 0:
            return True
        async with self._writing(WriteKind.COPY, offset, length):
            return await self._do_write_from_host(offset, length, src)

    async def write_many_from_host(self, writes: list[tuple[int, int, HostExtents]]) -> bool:
        """:meth:`write_from_host` for several ranges, (offset, length, src), in
        ascending order and not overlapping, as one batch (one thread call for
        the data, one metadata update).  False, having changed nothing, when the
        batch cannot be done that way; the caller then writes range by range.
        """
        self._check_writable()
        end = 0
        for offset, length, _src in writes:
            self._check_request(offset, length)
            if offset < end:
                raise BlockIOError(errno.EINVAL, "write_many_from_host: ranges overlap")
            end = offset + length
        writes = [w for w in writes if w[1]]
        if not writes:
            return True
        first = writes[0][0]
        spans = [(offset, length) for offset, length, _src in writes]
        async with self._writing(WriteKind.COPY, first, end - first, spans=spans):
            return await self._do_write_many_from_host(writes)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check_request(offset, length)
        self._check_writable()
        if length:
            async with self._writing(WriteKind.ZEROES, offset, length):
                await self._do_write_zeroes(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        """Advisory: afterwards the range reads as zeros or as the backing image
        (or, on a node opened with ``discard: ignore``, as before)."""
        self._check_request(offset, length)
        self._check_writable()
        if length and self.unmap:
            async with self._writing(WriteKind.DISCARD, offset, length):
                await self._do_discard(offset, length)

    async def block_status(self, offset: int, length: int) -> tuple[Status, int]:
        """Kind of the extent at ``offset`` in this layer only, and its length (<= length)."""
        self._check_open()
        if offset < 0 or length <= 0 or offset >= self.size:
            raise BlockIOError(errno.EINVAL)
        length = min(length, self.size - offset)
        status, n = await self._do_block_status(offset, length)
        return status, max(1, min(n, length))

    async def block_status_runs(
        self, offset: int, length: int
    ) -> list[tuple[Status, int]] | None:
        """Every run of this layer in the range (clipped to its size): (status,
        length), consecutive from ``offset``, neighbours of different status.

        One question for a whole range, where :meth:`block_status` answers
        run by run.  None: this layer must be asked run by run here (a qcow2
        image with an entry it calls corrupt: that walk meets it exactly
        where QEMU's does).  The caller bounds the range.
        """
        self._check_open()
        if offset < 0 or length <= 0 or offset >= self.size:
            raise BlockIOError(errno.EINVAL)
        return await self._do_block_status_runs(offset, min(length, self.size - offset))

    async def flush(self, *, completing: bool = False) -> None:
        """Make what was written durable.

        ``completing``: the flush completes a request this node has already
        counted as written (a FUA write, or any write of a write-through
        export).  QEMU counts a request once it has finished, after that
        flush, so the flush leaves it out: it raises ``flush_to_disk`` (which
        a blkdebug rule may wait for) only if another request finished since
        the last flush.
        """
        self._check_open()
        if not self.read_only:
            gen = self._write_gen - completing
            if self.file is not None:
                self.file.debug_event("flush_to_os")
            await self._flush_up_to(gen)
            self._flushed_gen = gen
            if self._write_hook is not None:
                await self._write_hook.flushed()

    # -- blkdebug events ------------------------------------------------------------

    def debug_event(self, event: str) -> None:
        """QEMU's ``BLKDBG_EVENT``: a driver above says what its next I/O to this
        node is for (a ``BlkdebugEvent`` name).  Only blkdebug nodes listen."""

    async def _flush_up_to(self, gen: int) -> None:
        """The driver's flush, making durable the writes counted up to ``gen``
        (every flush goes through here, so the count is never stale)."""
        self._flush_gen = gen
        await self._do_flush()

    def _flush_to_disk_event(self) -> None:
        """Raised by a flush between making metadata durable and flushing the file,
        and only when something was written since the last flush, as QEMU does."""
        if self.file is not None and self._flush_gen != self._flushed_gen:
            self.file.debug_event("flush_to_disk")

    async def truncate(self, size: int) -> None:
        """Grow the node to ``size`` bytes; shrinking is refused (commit never needs it)."""
        self._check_open()
        self._check_writable()
        if size < self.size:
            raise BlockError("Cannot shrink an image")
        if size != self.size:
            await self._do_truncate(size)

    async def change_backing(
        self,
        backing: BlockNode | None,
        backing_string: str | None,
        backing_format: str | None,
    ) -> None:
        """Point this node at another backing node and record that in the image."""
        self._check_open()
        node = backing
        while node is not None:
            if node is self:
                raise BlockError(
                    f"Making '{backing.node_name if backing else ''}' a backing file of "
                    f"'{self.node_name}' would create a loop"
                )
            node = node.backing
        await self._do_change_backing(backing, backing_string, backing_format)

    async def reopen(self, *, read_only: bool) -> None:
        """Switch the open mode in place so caches (and the graph) survive."""
        self._check_open()
        if read_only == self.read_only:
            return
        # a half-done reopen (locks dropped, descriptor swapped) must not be left behind
        with trio.CancelScope(shield=True):
            if read_only:
                await self._flush_up_to(self._write_gen)
            await self._do_reopen(read_only)
            self.read_only = read_only

    async def close(self) -> None:
        """Release this node's own resources (children are the graph's business)."""
        if self.closed:
            return
        with trio.CancelScope(shield=True):
            try:
                if not self.read_only:
                    await self._flush_up_to(self._write_gen)
            finally:
                self.closed = True
                await self._do_close()

    # -- driver hooks ---------------------------------------------------------------

    async def _do_read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    async def _do_write(self, offset: int, data: bytes) -> None:
        raise BlockIOError(errno.ENOTSUP)

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        await self._do_write(offset, bytes(length))

    async def _do_write_many(self, writes: list[tuple[int, bytes]]) -> None:
        for offset, data in writes:
            await self._do_write(offset, data)

    async def _do_map_data(self, ranges: list[tuple[int, int]]) -> list[HostExtents | None]:
        return [None] * len(ranges)

    async def _do_readinto(self, offset: int, view: memoryview) -> None:
        view[:] = await self._do_read(offset, len(view))

    async def _do_write_from_host(self, offset: int, length: int, src: HostExtents) -> bool:
        return False

    async def _do_write_many_from_host(self, writes: list[tuple[int, int, HostExtents]]) -> bool:
        return False

    async def _do_discard(self, offset: int, length: int) -> None:
        return None

    async def _do_block_status(self, offset: int, length: int) -> tuple[Status, int]:
        return Status.DATA, length

    async def _do_block_status_runs(
        self, offset: int, length: int
    ) -> list[tuple[Status, int]] | None:
        runs: list[tuple[Status, int]] = []
        end = offset + length
        while offset < end:
            status, n = await self.block_status(offset, end - offset)
            if runs and runs[-1][0] is status:
                runs[-1] = (status, runs[-1][1] + n)
            else:
                runs.append((status, n))
            offset += n
        return runs

    async def _do_flush(self) -> None:
        if self.file is not None:
            self._flush_to_disk_event()
            await self.file.flush()

    async def _do_truncate(self, size: int) -> None:
        raise BlockError(f"Driver '{self.driver}' does not support resizing")

    async def _do_change_backing(
        self,
        backing: BlockNode | None,
        backing_string: str | None,
        backing_format: str | None,
    ) -> None:
        raise BlockError(f"Driver '{self.driver}' does not support backing files")

    async def _do_reopen(self, read_only: bool) -> None:
        if self.file is not None:
            await self.file.reopen(read_only=read_only)

    async def _do_close(self) -> None:
        return None

    # -- batched I/O (added after the hooks above so they stay as they are) ---------

    def direct_io(self, offset: int, length: int, write: bool) -> DirectIO | None:
        """Where the range's bytes lie in a host file, decided now without waiting.

        Only for the simple, frequent case: the whole range is this layer's
        own data, already mapped in cached metadata, and (``write``) can be
        overwritten in place.  Everything else (and every node that cannot
        tell) answers None, and the caller uses :meth:`read` / :meth:`write`,
        which see the same bytes.  A write through the result bypasses
        :meth:`write`, so its write observers are told when the caller
        releases the range, which it does once the bytes are in place.

        A write over a range a job holds (:attr:`range_gate`) answers None, so the
        caller's :meth:`write` waits for it; one that goes ahead counts as in
        flight there until it is released, like any other write.
        """
        if write and self.range_gate.blocked(offset, length):
            return None
        admitted: Admission | None = None
        if write and self._write_hook is not None:
            admitted = self._write_hook.admit(offset, length)
            if admitted is None:
                return None
        io = self._do_direct_io(offset, length, write)
        if io is None:
            if admitted is not None:
                admitted.done(None)
            return None
        if admitted is not None:
            io.also = admitted.mirror
        if write:
            done = io._release
            token = self.range_gate.note_write(offset, length)

            def release() -> None:
                try:
                    if done is not None:
                        done()
                finally:
                    self._written(offset, length)
                    if admitted is not None:
                        admitted.done(io.ok)
                    self.range_gate.end_write(token)

            io._release = release
        return io

    def _do_direct_io(self, offset: int, length: int, write: bool) -> DirectIO | None:
        return None
