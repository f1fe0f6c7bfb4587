"""The qcow2 format node: guest view over a ``file`` child, with optional backing.

:class:`Qcow2Node` is a facade: it opens and validates the image, answers
what the block layer asks of a node, and hands each operation to the part
of the driver that owns it (see this package's ``__init__``).

Metadata policy (the crash-safety rows of ``daemon/blockd/block/README.md``):

* Order on disk: data, flush, the counters of exactly the entries about to
  be written (refcount.py), flush, the L2/L1 entries.  A new allocation's L2
  entries wait in the cached tables for the next flush (writeback.py), and
  so do their counters and the references of the entries they replace;
  entries of zero writes and discards are written at once after a flush,
  as are new L2 tables and L1 entries.  A removed reference is flushed
  before the counter it held is decremented (and that decrement is written
  at once).  A crash therefore leaves at most leaked clusters,
  and loses only writes no flush has covered.
* Every change of metadata for one image happens under the metadata lock
  (inflight.py) and inside a shielded cancel scope, so cancellation never
  leaves a half-made update.
* Lazy refcounts are never used: counters are always kept exact, so the dirty
  bit is never set by us.  An image that already has the dirty bit set gets
  its counters rebuilt (repair.py) when it is opened or reopened read-write,
  before any other write but the autoclear bits; read-only it is only read.
* Autoclear bits (bitmaps) are not maintained, so they are cleared on the
  first read-write open, before any other write.
* Internal snapshots share clusters and L2 tables with the active view
  (refcount above 1, no COPIED flag): a write copies what it touches of
  them first (allocation.py for data, mapping.py for L2 tables) and then
  drops the active view's reference, so every snapshot keeps its content
  and refcounts stay exact.  The snapshot table and the snapshots' L1
  tables are never written (no snapshot is created, applied or deleted).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, NoReturn

import trio

from blockd.block.direct import DirectIO
from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2 import snapshots as snap
from blockd.block.drivers.qcow2.allocation import Allocator
from blockd.block.drivers.qcow2.backing import BackingName
from blockd.block.drivers.qcow2.direct_path import DirectPath
from blockd.block.drivers.qcow2.forecast import Forecast
from blockd.block.drivers.qcow2.image_info import format_info
from blockd.block.drivers.qcow2.inflight import InFlight
from blockd.block.drivers.qcow2.mapping import Mapping
from blockd.block.drivers.qcow2.overlap import CorruptMetadata, MetadataMap, MetaKind
from blockd.block.drivers.qcow2.payload import BytesPayload, HostPayload
from blockd.block.drivers.qcow2.reading import Reader
from blockd.block.drivers.qcow2.refcount import Refcounts
from blockd.block.drivers.qcow2.repair import count_references, plan_repair, rebuild_refcounts
from blockd.block.drivers.qcow2.resize import Resizer
from blockd.block.drivers.qcow2.tables import (
    OFFSET_MASK,
    ClusterKind,
    decode_table,
    host_clusters_of_range,
)
from blockd.block.drivers.qcow2.writeback import L2Writeback
from blockd.block.drivers.qcow2.writes import Writes
from blockd.block.drivers.qcow2.zeroing import Zeroing
from blockd.block.node import BlockNode, HostExtents, PlannedWrite, Status, WriteForecast
from blockd.block.permissions import Role
from blockd.errors import BlockError, BlockIOError, ImageError
from blockd.events import BlockImageCorrupted

log = logging.getLogger(__name__)


class Qcow2Node(BlockNode):
    driver = "qcow2"
    file_role = Role.STORAGE
    supports_backing = True

    def __init__(
        self,
        node_name: str,
        file: BlockNode,
        header: hdr.Header,
        *,
        read_only: bool,
        l2_cache_bytes: int = 4 << 20,
    ) -> None:
        super().__init__(node_name, read_only=read_only, file=file)
        self.header = header
        self._corrupt = False
        self._corruption_logged = False
        #: the internal snapshots (read at open; never changed by us)
        self.snapshots: list[snap.Snapshot] = []
        self._snapshot_table_bytes = 0
        self._meta = MetadataMap(header.cluster_bits)
        self._refs = Refcounts(file, header, self._meta)
        self._inflight = InFlight()
        self._mapping = Mapping(
            file, header, self._meta, self._refs, self._mark_corrupt, l2_cache_bytes
        )
        self._reader = Reader(self._mapping, self._inflight, lambda: self.backing)
        self._writeback = L2Writeback(
            self._mapping, self._refs, self._inflight, self._reader.forget_inflated,
            self._mark_corrupt,
        )
        allocator = Allocator(
            self._mapping,
            self._refs,
            self._inflight,
            self._writeback,
            self._reader,
            self._mark_corrupt,
        )
        zeroing = Zeroing(self._mapping, self._refs, self._writeback, allocator, self._has_backing)
        self._writes = Writes(
            self.cluster_size, self._inflight, allocator, zeroing, self._mark_corrupt
        )
        self._resizer = Resizer(self._mapping, self._refs, zeroing, lambda: self.backing)
        self._direct = DirectPath(self._mapping, self._inflight)
        self._backing_name = BackingName(file, header, self._meta, self._refs)

    # -- opening --------------------------------------------------------------------

    @classmethod
    async def open(
        cls, node_name: str, file: BlockNode, *, read_only: bool, l2_cache_bytes: int = 4 << 20
    ) -> Qcow2Node:
        """Parse and validate the image; nothing is written unless opened read-write."""
        file_size = file.size
        try:
            head = await file.read(0, min(file_size, hdr.V3_HEADER_LENGTH))
        except BlockIOError as exc:
            raise BlockIOError(exc.errno, f"Could not read qcow2 header: {exc}") from exc
        fixed = hdr.parse_fixed(head)
        if not hdr.MIN_CLUSTER_BITS <= fixed.cluster_bits <= hdr.MAX_CLUSTER_BITS:
            raise ImageError(f"Unsupported cluster size: 2^{fixed.cluster_bits}")
        cluster0 = await file.read(0, min(file_size, 1 << fixed.cluster_bits))
        header = hdr.parse(cluster0, file_size)
        node = cls(node_name, file, header, read_only=read_only, l2_cache_bytes=l2_cache_bytes)
        await node._load()
        if not read_only:
            await node._prepare_read_write()
        return node

    async def _load(self) -> None:
        h = self.header
        mapping = self._mapping
        try:
            if h.l1_size:
                mapping.l1 = decode_table(await self._file.read(h.l1_table_offset, h.l1_size * 8))
        except BlockIOError as exc:
            raise BlockIOError(exc.errno, f"Could not read L1 table: {exc}") from exc
        try:
            await self._refs.load()
        except BlockIOError as exc:
            raise BlockIOError(
                exc.errno, f"Could not initialize refcount handling: {exc}"
            ) from exc
        if h.nb_snapshots:
            self.snapshots, length = await self._read_snapshot_table()
            self._snapshot_table_bytes = length
            self._meta.add(h.snapshots_offset, length, MetaKind.SNAPSHOTS)
            for sn in self.snapshots:
                # QEMU's limits for a snapshot's L1 table; one past them (or
                # past the file) is no cluster a write of ours could reach
                size = sn.l1_size * 8
                if (
                    size <= hdr.MAX_L1_BYTES
                    and not sn.l1_table_offset & (self.cluster_size - 1)
                    and sn.l1_table_offset + size <= self._file.size
                ):
                    self._meta.add(sn.l1_table_offset, size, MetaKind.INACTIVE_L1)
        self._meta.add(0, self.cluster_size, MetaKind.HEADER)
        if h.l1_size:
            self._meta.add(h.l1_table_offset, h.l1_size * 8, MetaKind.L1)
        self._refs.register_metadata()
        for entry in mapping.l1:
            off = entry & OFFSET_MASK
            if off and not off & (self.cluster_size - 1):  # unaligned: as refcount blocks
                self._meta.add(off, self.cluster_size, MetaKind.L2)

    async def _read_snapshot_table(self) -> tuple[list[snap.Snapshot], int]:
        """Walk the snapshot table, reading it in windows (bytes past EOF read as zeros)."""
        base = self.header.snapshots_offset
        file_size = self._file.size
        window_start, window = 0, b""

        async def take(offset: int, n: int) -> bytes:
            nonlocal window_start, window
            if not window_start <= offset or offset + n > window_start + len(window):
                want = max(n, 64 << 10)
                have = max(0, min(want, file_size - offset))
                data = await self._file.read(offset, have) if have else b""
                window_start, window = offset, data + bytes(want - have)
            return window[offset - window_start : offset - window_start + n]

        walker = snap.walk(self.header.nb_snapshots, self.header.size)
        try:
            pos, n = next(walker)
            while True:
                pos, n = walker.send(await take(base + pos, n))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def read_write_refusal(self) -> str | None:
        """Why this image cannot be opened read-write, in QEMU's words (None: it can)."""
        h = self.header
        if h.incompatible_features & hdr.INCOMPAT_CORRUPT:
            return "qcow2: Image is corrupt; cannot be opened read/write"
        return None

    async def _prepare_read_write(self) -> None:
        refusal = self.read_write_refusal()
        if refusal is not None:
            raise ImageError(refusal)
        if self.snapshots:
            await self._refuse_shared_l1()
        h = self.header
        repair = None
        if h.incompatible_features & hdr.INCOMPAT_DIRTY:
            # planned before anything is written: an image that cannot be is left alone
            counts = await count_references(
                self._file, h, self._mapping.l1, self.snapshots, self._snapshot_table_bytes
            )
            repair = await plan_repair(self._file, h, self._mapping, self._meta, counts)
        if h.version == 3 and h.autoclear_features:
            # we keep no bitmaps (or anything else autoclear protects) up to date
            self._meta.check(hdr.OFF_AUTOCLEAR, 8, MetaKind.HEADER)
            await self._file.write(hdr.OFF_AUTOCLEAR, bytes(8))
            await self._refs.flush()
            h.autoclear_features = 0
        if repair is not None:
            # counters may be too low: no allocation before they are rebuilt
            async with self._inflight.lock:
                with trio.CancelScope(shield=True):
                    await rebuild_refcounts(
                        self._file, h, self._mapping, self._refs, self._meta, repair
                    )
            log.info("qcow2: repaired the refcounts of dirty image '%s'", self.filename)

    async def _refuse_shared_l1(self) -> None:
        """Refuse a read-write open when a snapshot shares the active L1 table.

        QEMU gives every snapshot an L1 table of its own, so the active one
        always has refcount 1 and no snapshot entry points into it; writing
        L1 entries in place would otherwise change the snapshot as well.
        """
        h = self.header
        bits = h.cluster_bits
        active = host_clusters_of_range(h.l1_table_offset, h.l1_size * 8, bits)
        if not active:
            return
        shared = False
        for sn in self.snapshots:
            if sn.l1_size:
                theirs = host_clusters_of_range(sn.l1_table_offset, sn.l1_size * 8, bits)
                shared = shared or (theirs.start < active.stop and active.start < theirs.stop)
        try:
            for cluster in active:
                shared = shared or await self._refs.get(cluster) != 1
        except CorruptMetadata as err:
            # QEMU opens it and marks it corrupt at the first allocation; no
            # write is made here, the open is refused before any
            raise ImageError(f"qcow2: {err}; cannot be opened read/write") from err
        if shared:
            raise ImageError(
                "qcow2: the active L1 table is shared with an internal snapshot; "
                "cannot be opened read/write"
            )

    # -- what the node shows --------------------------------------------------------

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def backing_file(self) -> str | None:
        """The backing name recorded in the header (what ``backing-filename`` shows)."""
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    def check_backing_name(self, backing: str, backing_format: str) -> None:
        if "\0" in backing:
            # the header's name ends at a NUL: the overlay would name another file
            raise BlockError("Backing file name must not contain a NUL character")
        if len(backing.encode("utf-8", "surrogateescape")) > hdr.MAX_BACKING_NAME:
            raise BlockError(
                f"Backing file name too long: {len(backing.encode())} bytes "
                f"(qcow2 allows at most {hdr.MAX_BACKING_NAME})"
            )
        try:
            hdr.serialize(hdr.with_backing(self.header, backing, backing_format))
        except ImageError as err:
            raise BlockError(
                f"Backing file name too long for the header of '{self.node_name}' "
                f"(it must fit in one {self.cluster_size}-byte cluster)"
            ) from err

    @property
    def corrupt(self) -> bool:
        return self._corrupt or bool(self.header.incompatible_features & hdr.INCOMPAT_CORRUPT)

    @property
    def full_backing_filename(self) -> str | None:
        """The header's backing name resolved the way opening resolves it."""
        name = self.header.backing_file
        if not name or os.path.isabs(name) or name.startswith("json:"):
            return name
        return os.path.join(os.path.dirname(self.filename), name)

    def _format_info(self) -> dict[str, Any]:
        return format_info(self.header, self.snapshots, self.corrupt, self.full_backing_filename)

    def _has_backing(self) -> bool:
        """Whether unallocated clusters show something other than zeros to anyone.

        The header counts too: qemu-img opening this file later will follow it
        even when this node was opened with ``backing: null``.
        """
        return self.backing is not None or bool(self.header.backing_file)

    # -- corruption -----------------------------------------------------------------

    async def _mark_corrupt(
        self, reason: str, offset: int | None = None, size: int | None = None
    ) -> NoReturn:
        """Fail the I/O that met corruption, and stop the image from being written.

        As QEMU: a read-write node is marked corrupt (version 3 also on disk,
        incompatible bit 1, so no later open writes to it either) and takes
        no more writes; a read-only node only reports it.  The reason goes
        to the log once per node in QEMU's words; the request fails with
        plain EIO, which is all QEMU tells a client or a job.
        """
        if not self._corruption_logged:
            self._corruption_logged = True
            self.events.emit(
                BlockImageCorrupted(self.node_name, reason, not self.read_only, offset, size)
            )
            if self.read_only:
                log.error("qcow2: Image is corrupt: %s; further non-fatal corruption "
                          "events will be suppressed", reason)
            else:
                log.error("qcow2: Marking image as corrupt: %s; further corruption "
                          "events will be suppressed", reason)
        if not self.read_only:
            self._corrupt = True
            h = self.header
            if h.version == 3 and not h.incompatible_features & hdr.INCOMPAT_CORRUPT:
                h.incompatible_features |= hdr.INCOMPAT_CORRUPT
                with trio.CancelScope(shield=True):
                    await self._file.write(
                        hdr.OFF_INCOMPAT, struct.pack(">Q", h.incompatible_features)
                    )
                    await self._file.flush()
        raise BlockIOError(errno.EIO)

    def _refuse_if_corrupt(self) -> None:
        if self.corrupt:
            raise BlockIOError(errno.EIO, "qcow2: Image is corrupt; writes are refused")

    # -- reading --------------------------------------------------------------------

    async def _do_read(self, offset: int, length: int) -> bytes:
        return await self._reader.read(offset, length)

    async def _do_readinto(self, offset: int, view: memoryview) -> None:
        await self._reader.readinto(offset, view)

    async def _do_block_status(self, offset: int, length: int) -> tuple[Status, int]:
        async with self._inflight.lock:
            return await self._mapping.block_status(offset, length)

    async def _do_block_status_runs(
        self, offset: int, length: int
    ) -> list[tuple[Status, int]] | None:
        mapping = self._mapping
        piece = 16 * mapping.cluster_size * mapping.l2_entries  # tables per hold of the lock
        runs: list[tuple[Status, int]] = []
        end = offset + length
        while offset < end:
            n = min(end, (offset // piece + 1) * piece) - offset
            async with self._inflight.lock:
                more = await mapping.status_runs(offset, n)
            if more is None:
                return None
            if runs and runs[-1][0] is more[0][0]:
                runs[-1] = (more[0][0], runs[-1][1] + more[0][1])
                more = more[1:]
            runs += more
            offset += n
        return runs

    async def _do_map_data(self, ranges: list[tuple[int, int]]) -> list[HostExtents | None]:
        if not isinstance(self.file, FileNode):
            return [None] * len(ranges)
        mapping = self._mapping
        out: list[HostExtents | None] = []
        async with self._inflight.lock:
            for offset, length in ranges:
                extents = await mapping.map(offset, length) if length else []
                if not extents or any(k is not ClusterKind.NORMAL for k, _g, _n, _e in extents):
                    out.append(None)
                    continue
                pinned = mapping.host_clusters(extents)
                self._inflight.pin(pinned)
                pieces = [(g, mapping.host_offset(e, g), n) for _k, g, n, e in extents]
                out.append(HostExtents(self.file, pieces, partial(self._inflight.unpin, pinned)))
        return out

    def _do_direct_io(self, offset: int, length: int, write: bool) -> DirectIO | None:
        file = self.file
        if (
            type(file) is not FileNode
            or self.closed
            or file.closed
            or length <= 0
            or offset + length > self.header.size
            or (write and (self.read_only or self.corrupt or self.detect_zeroes != "off"))
        ):
            return None
        return self._direct.resolve(file, offset, length, write)

    # -- what writes would cost -----------------------------------------------------

    async def forecast_writes(
        self, size: int, writes: AsyncIterator[PlannedWrite]
    ) -> WriteForecast:
        self._check_open()
        forecast = await Forecast.start(
            self._mapping,
            self._refs,
            self._has_backing,
            lambda: self.backing.size if self.backing is not None else None,
            self._inflight.lock,
        )
        return await forecast.run(size, writes, self._inflight.lock)

    # -- writing --------------------------------------------------------------------

    async def _do_write(self, offset: int, data: bytes) -> None:
        self._refuse_if_corrupt()
        await self._writes.write(BytesPayload(offset, data))

    async def _do_write_from_host(self, offset: int, length: int, src: HostExtents) -> bool:
        if (
            not isinstance(self.file, FileNode)
            or not isinstance(src.file, FileNode)
            or src.file is self.file
        ):
            return False
        self._refuse_if_corrupt()
        await self._writes.write(HostPayload(offset, length, src))
        return True

    async def _do_write_many_from_host(self, writes: list[tuple[int, int, HostExtents]]) -> bool:
        file = self.file
        if (
            not isinstance(file, FileNode)
            or any(not isinstance(src.file, FileNode) or src.file is file for _o, _n, src in writes)
            or not self._writes.batchable(writes)
        ):
            return False
        self._refuse_if_corrupt()
        await self._writes.write_many_from_host(file, writes)
        return True

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        self._refuse_if_corrupt()
        await self._writes.write_zeroes(offset, length)

    async def _do_discard(self, offset: int, length: int) -> None:
        self._refuse_if_corrupt()
        await self._writes.discard(offset, length)

    async def _do_flush(self) -> None:
        await self._writeback.commit()
        self._flush_to_disk_event()
        await self._file.flush()  # the entries it wrote

    async def _do_truncate(self, size: int) -> None:
        if size % 512:
            raise BlockError("The new size must be a multiple of 512")
        if self.snapshots and self.header.version < 3:
            # a v2 snapshot entry need not record its disk size: growing
            # the image would change what the snapshot seems to hold
            raise BlockIOError(errno.ENOTSUP, "Can't resize a v2 image which has snapshots")
        self._refuse_if_corrupt()
        # over every cluster: no allocating write may be in flight
        await self._writes.update(0, 1 << 63, lambda: self._resizer.grow(size))

    # -- backing and open mode ------------------------------------------------------

    async def _do_change_backing(
        self,
        backing: BlockNode | None,
        backing_string: str | None,
        backing_format: str | None,
    ) -> None:
        self._check_writable()
        if backing_string and not backing_format:
            raise BlockError("backing format must be specified")
        async with self._inflight.lock:
            with trio.CancelScope(shield=True):
                await self._backing_name.change(backing_string, backing_format)
                self.backing = backing

    async def _do_close(self) -> None:
        # what bench/commit_sparse.py reports: a walk's cost in tables read from disk
        log.debug("qcow2 '%s': %d L2 tables read", self.filename, self._mapping.l2_reads)

    async def _do_reopen(self, read_only: bool) -> None:
        if not read_only:
            refusal = self.read_write_refusal()
            if refusal is not None or self._corrupt:
                raise ImageError(refusal or "qcow2: Image is corrupt; cannot be opened read/write")
        await self._file.reopen(read_only=read_only)
        if not read_only:
            try:
                await self._prepare_read_write()
            except BaseException:
                await self._file.reopen(read_only=True)
                raise
        # QEMU starts new metadata caches at every reopen: the next request
        # reads its tables from the file again, where blkdebug's read rules
        # (armed by the reopen's own flush) can fail it
        self._mapping.l2.forget()
        self._refs.forget_clean()
