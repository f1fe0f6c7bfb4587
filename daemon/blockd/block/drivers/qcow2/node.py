"""The qcow2 format node: guest view over a ``file`` child, with optional backing.

Metadata policy (see DESIGN.md "crash safety"):

* L2/L1 writes are write-through; refcount changes are written back at the
  next flush (refcount.py), each with the entries it counts: data, flush,
  counters, flush, L2/L1 entries.  A removed reference is flushed before the
  counter it held is decremented (and that decrement is written at once).
  A crash therefore leaves at most leaked clusters, and a kill leaks only if
  it lands in one of those flushes.
* Every change of metadata for one image happens under ``_lock`` and inside a
  shielded cancel scope, so cancellation never leaves a half-made update.
* Lazy refcounts are never used: counters are always kept exact, so the dirty
  bit is never set by us.  An image that already has the dirty bit set needs a
  refcount rebuild first; it is opened read-only fine but refused read-write.
* Autoclear bits (bitmaps) are not maintained, so they are cleared on the
  first read-write open, before any other write.
* Images with internal snapshots are opened read-only only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import struct
from array import array
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import trio

from blockd.block.direct import DirectIO
from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2 import snapshots as snap
from blockd.block.drivers.qcow2.compress import decompress_cluster
from blockd.block.drivers.qcow2.overlap import MetadataMap, MetaKind, OverlapError
from blockd.block.drivers.qcow2.refcount import Refcounts
from blockd.block.drivers.qcow2.tables import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    ClusterKind,
    L2Cache,
    classify,
    compressed_range,
    decode_table,
    encode_entries,
    host_clusters_of_range,
    zero_table,
)
from blockd.block.node import BlockNode, HostExtents, Status
from blockd.block.permissions import Role
from blockd.errors import BlockError, BlockIOError, ImageError
from blockd.events import BlockImageCorrupted

log = logging.getLogger(__name__)

#: one mapped piece of a guest range: (kind, guest offset, length, L2 entry)
Extent = tuple[ClusterKind, int, int, int]

_STATUS = {
    ClusterKind.NORMAL: Status.DATA,
    ClusterKind.COMPRESSED: Status.DATA,
    ClusterKind.ZERO_PLAIN: Status.ZERO,
    ClusterKind.ZERO_ALLOC: Status.ZERO,
    ClusterKind.UNALLOCATED: Status.UNALLOCATED,
}
_FREEABLE = (ClusterKind.NORMAL, ClusterKind.ZERO_ALLOC, ClusterKind.COMPRESSED)
#: Uncommitted L2 entries (see Qcow2Node._defer_entries) that make a write commit them.
#: A commit flushes everything written so far; at 8192 a 1 GiB sequential write
#: through NBD stalled mid-way on a 512 MiB fdatasync that QSD never does.  What
#: it bounds is how many clusters a crash can leak (leaks only, never corruption);
#: memory is bounded by the kept-tables limit.
_COMMIT_ENTRIES = 65536


class Qcow2Node(BlockNode):
    driver = "qcow2"
    file_role = Role.STORAGE

    def __init__(
        self,
        node_name: str,
        file: BlockNode,
        header: hdr.Header,
        header_extent: int,
        *,
        read_only: bool,
        l2_cache_bytes: int = 4 << 20,
    ) -> None:
        super().__init__(node_name, read_only=read_only, file=file)
        self.header = header
        self._header_extent = header_extent
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = self.cluster_size // 8
        self._l1: array[int] = zero_table(0)
        self._l2 = L2Cache(l2_cache_bytes, self.cluster_size)
        self._meta = MetadataMap(self.cluster_bits)
        self._refs = Refcounts(file, header, self._meta)
        self._lock = trio.Lock()
        self._corrupt = False
        self._corruption_logged = False
        #: the internal snapshots (read at open; images with any are read-only)
        self.snapshots: list[snap.Snapshot] = []
        self._inflated: tuple[int, bytes] | None = None
        self._pinned: dict[int, int] = {}  # host cluster -> in-flight data I/Os
        self._allocating: list[tuple[int, int]] = []  # guest cluster spans being allocated
        self._allocation_done = trio.Event()
        self._unpinned = trio.Event()
        self._unpin_waiters = 0
        #: guest cluster -> (entry, token, L2 table offset), see _defer_entries
        self._uncommitted: dict[int, tuple[int, int, int]] = {}
        self._commit_tokens = itertools.count()

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
        extent = _header_extent(header)
        node = cls(
            node_name, file, header, extent, read_only=read_only, l2_cache_bytes=l2_cache_bytes
        )
        await node._load()
        if not read_only:
            await node._prepare_read_write()
        return node

    async def _load(self) -> None:
        h = self.header
        try:
            if h.l1_size:
                self._l1 = decode_table(await self._file.read(h.l1_table_offset, h.l1_size * 8))
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
            self._meta.add(h.snapshots_offset, length, MetaKind.SNAPSHOTS)
        self._meta.add(0, self.cluster_size, MetaKind.HEADER)
        if h.l1_size:
            self._meta.add(h.l1_table_offset, h.l1_size * 8, MetaKind.L1)
        self._refs.register_metadata()
        for entry in self._l1:
            off = entry & OFFSET_MASK
            if off:
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
        if h.incompatible_features & hdr.INCOMPAT_DIRTY:
            return (
                "qcow2: Image is dirty (lazy refcounts were not written back); "
                "repair it with 'qemu-img check -r all' before opening it read/write"
            )
        if h.nb_snapshots:
            return (
                f"qcow2: Images with internal snapshots ({h.nb_snapshots}) can only "
                "be opened read-only"
            )
        return None

    async def _prepare_read_write(self) -> None:
        refusal = self.read_write_refusal()
        if refusal is not None:
            raise ImageError(refusal)
        h = self.header
        if h.version == 3 and h.autoclear_features:
            # we keep no bitmaps (or anything else autoclear protects) up to date
            self._meta.check(hdr.OFF_AUTOCLEAR, 8, MetaKind.HEADER)
            await self._file.write(hdr.OFF_AUTOCLEAR, bytes(8))
            await self._refs.flush()
            h.autoclear_features = 0

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
        h = self.header
        data: dict[str, Any] = {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "compression-type": "zstd" if h.compression_type == hdr.COMPRESSION_ZSTD else "zlib",
        }
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)
        data["refcount-bits"] = h.refcount_bits
        if h.version >= 3:
            data["corrupt"] = self.corrupt
            data["extended-l2"] = bool(h.incompatible_features & hdr.INCOMPAT_EXTL2)
        info: dict[str, Any] = {
            "cluster-size": self.cluster_size,
            "dirty-flag": bool(h.incompatible_features & hdr.INCOMPAT_DIRTY),
            "format-specific": {"type": "qcow2", "data": data},
        }
        if self.snapshots:
            info["snapshots"] = [s.info() for s in self.snapshots]
        if h.backing_file:
            info["backing-filename"] = h.backing_file
            info["full-backing-filename"] = self.full_backing_filename
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
        return info

    # -- mapping --------------------------------------------------------------------

    async def _l2_table(self, l1_index: int) -> tuple[int, array[int]] | None:
        if l1_index >= len(self._l1):
            return None
        off = self._l1[l1_index] & OFFSET_MASK
        if not off:
            return None
        if off & (self.cluster_size - 1):
            await self._mark_corrupt(
                f"L2 table offset {off:#x} unaligned (L1 index: {_c_hex(l1_index)})"
            )
        table = self._l2.get(off)
        if table is None:
            self._file.debug_event("l2_load")
            table = self._l2.put(off, decode_table(await self._file.read(off, self.cluster_size)))
        return off, table

    async def _entries(self, first: int, count: int) -> list[int]:
        """L2 entries of ``count`` consecutive guest clusters from cluster ``first``."""
        out: list[int] = []
        c = first
        end = first + count
        while c < end:
            l1_index, l2_index = divmod(c, self.l2_entries)
            n = min(end - c, self.l2_entries - l2_index)
            loaded = await self._l2_table(l1_index)
            if loaded is None:
                out.extend([0] * n)
            else:
                out.extend(loaded[1][l2_index : l2_index + n])
            c += n
        return out

    def _entry_fault(
        self, entry: int, kind: ClusterKind, cluster: int, *, read: bool = True
    ) -> str | None:
        """What makes an L2 entry corrupt, in QEMU's words (``read``: its contents are needed).

        Bit 0 is the zero flag only from version 3 on; a version 2 image
        with it set is corrupt once something reads that cluster (QEMU fails
        the I/O; overwriting the whole cluster is fine).
        """
        zero = kind in (ClusterKind.ZERO_PLAIN, ClusterKind.ZERO_ALLOC)
        if kind is ClusterKind.NORMAL or zero:
            unaligned = entry & OFFSET_MASK & (self.cluster_size - 1)
            if not unaligned and not (read and zero and self.header.version < 3):
                return None
            l1_index, l2_index = divmod(cluster, self.l2_entries)
            l2_offset = self._l1[l1_index] & OFFSET_MASK
            where = f"(L2 offset: {l2_offset:#x}, L2 index: {_c_hex(l2_index)})"
            if unaligned:
                return f"Cluster allocation offset {entry & OFFSET_MASK:#x} unaligned {where}"
            return f"Zero cluster entry found in pre-v3 image {where}"
        return None

    async def _map(self, offset: int, length: int, *, read: bool = True) -> list[Extent]:
        """The range's extents; ``read=False`` for a caller that only overwrites them."""
        cs = self.cluster_size
        first = offset // cs
        last = (offset + length - 1) // cs
        entries = await self._entries(first, last - first + 1)
        extents: list[Extent] = []
        end = offset + length
        count = len(entries)
        i = 0
        while i < count:
            entry = entries[i]
            kind = classify(entry)
            fault = self._entry_fault(entry, kind, first + i, read=read)
            if fault:
                await self._mark_corrupt(fault)
            # Extend the extent over the entries that continue it, comparing
            # raw entries only: clusters contiguous on the host (same flags,
            # next offset), or the same unallocated / plain-zero entry.
            j = i + 1
            if kind is ClusterKind.NORMAL:
                following = entry + cs
                while j < count and entries[j] == following:
                    following += cs
                    j += 1
            elif kind in (ClusterKind.UNALLOCATED, ClusterKind.ZERO_PLAIN):
                while j < count and entries[j] == entry:
                    j += 1
            lo = max(offset, (first + i) * cs)
            hi = min(end, (first + j) * cs)
            if extents and kind is not ClusterKind.NORMAL:
                pk, pg, pn, pe = extents[-1]
                if pk is kind and kind is not ClusterKind.COMPRESSED:
                    extents[-1] = (pk, pg, pn + hi - lo, pe)
                    i = j
                    continue
            extents.append((kind, lo, hi - lo, entry))
            i = j
        return extents

    # -- reading --------------------------------------------------------------------

    async def _read_backing(self, offset: int, length: int) -> bytes:
        backing = self.backing
        if backing is None:
            return bytes(length)
        self._file.debug_event("read_backing_aio")
        if offset >= backing.size:
            return bytes(length)
        n = min(length, backing.size - offset)
        data = await backing.read(offset, n)
        return data if n == length else data + bytes(length - n)

    async def _read_compressed(self, entry: int) -> bytes:
        self._file.debug_event("read_compressed")
        # sequential small reads hit the same cluster many times: keep the last one
        if self._inflated is not None and self._inflated[0] == entry:
            return self._inflated[1]
        host, nbytes = compressed_range(entry, self.cluster_bits)
        raw = await self._file.read(host, nbytes)
        data = decompress_cluster(raw, self.cluster_size, self.header.compression_type)
        self._inflated = (entry, data)
        return data

    async def _read_extent(self, ext: Extent) -> bytes:
        kind, goff, n, entry = ext
        if kind is ClusterKind.NORMAL:
            host = (entry & OFFSET_MASK) + goff % self.cluster_size
            self._file.debug_event("read_aio")
            return await self._file.read(host, n)
        if kind is ClusterKind.UNALLOCATED:
            return await self._read_backing(goff, n)
        if kind is ClusterKind.COMPRESSED:
            within = goff % self.cluster_size
            return (await self._read_compressed(entry))[within : within + n]
        return bytes(n)

    # -- in-flight data I/O ---------------------------------------------------------
    #
    # Data I/O to clusters already mapped runs outside the metadata lock, so
    # readers and in-place writers proceed in parallel.  While such I/O is in
    # flight its host clusters are pinned: dropping the last reference to a
    # pinned cluster waits, so the cluster cannot be reallocated (and filled
    # with someone else's data) under the I/O's feet.

    def _host_clusters(self, extents: list[Extent]) -> list[int]:
        out: list[int] = []
        for kind, goff, n, entry in extents:
            if kind is ClusterKind.NORMAL:
                host = (entry & OFFSET_MASK) + goff % self.cluster_size
                out.extend(host_clusters_of_range(host, n, self.cluster_bits))
            elif kind is ClusterKind.COMPRESSED:
                host, nbytes = compressed_range(entry, self.cluster_bits)
                out.extend(host_clusters_of_range(host, nbytes, self.cluster_bits))
        return out

    def _pin(self, clusters: list[int]) -> None:
        for c in clusters:
            self._pinned[c] = self._pinned.get(c, 0) + 1

    def _unpin(self, clusters: list[int]) -> None:
        for c in clusters:
            left = self._pinned[c] - 1
            if left:
                self._pinned[c] = left
            else:
                del self._pinned[c]
        if self._unpin_waiters:  # an Event per unpin would cost more than the pin
            self._unpinned.set()
            self._unpinned = trio.Event()

    async def _wait_unpinned(self, clusters: list[int]) -> None:
        while any(c in self._pinned for c in clusters):
            self._unpin_waiters += 1
            try:
                await self._unpinned.wait()
            finally:
                self._unpin_waiters -= 1

    async def _do_read(self, offset: int, length: int) -> bytes:
        # map under the lock (a consistent view of L2), copy data outside it
        async with self._lock:
            extents = await self._map(offset, length)
            pinned = self._host_clusters(extents)
            self._pin(pinned)
        try:
            parts = [await self._read_extent(ext) for ext in extents]
        finally:
            self._unpin(pinned)
        return b"".join(parts)

    async def _do_readinto(self, offset: int, view: memoryview) -> None:
        async with self._lock:
            extents = await self._map(offset, len(view))
            pinned = self._host_clusters(extents)
            self._pin(pinned)
        try:
            for ext in extents:
                kind, goff, n, entry = ext
                part = view[goff - offset : goff - offset + n]
                if kind is ClusterKind.NORMAL:
                    host = (entry & OFFSET_MASK) + goff % self.cluster_size
                    self._file.debug_event("read_aio")
                    await self._file.readinto(host, part)
                elif kind is ClusterKind.UNALLOCATED:
                    backing = self.backing
                    if backing is not None:
                        self._file.debug_event("read_backing_aio")
                    m = 0 if backing is None else max(0, min(n, backing.size - goff))
                    if backing is not None and m:
                        await backing.readinto(goff, part[:m])
                    if m < n:
                        part[m:] = bytes(n - m)
                else:
                    part[:] = await self._read_extent(ext)
        finally:
            self._unpin(pinned)

    def _do_direct_io(self, offset: int, length: int, write: bool) -> DirectIO | None:
        # Answered from memory in one go (no await), so the mapping cannot
        # change half-way; no lock is needed for that.  The pins then keep
        # the clusters from being freed until the caller's I/O is done,
        # exactly as for a mapped read or in-place write.  Called for every
        # small request, so the common case (one cluster) has a path of its own.
        file = self.file
        if (
            type(file) is not FileNode
            or self.closed
            or file.closed
            or length <= 0
            or offset + length > self.header.size
        ):
            return None
        bits = self.cluster_bits
        first = offset >> bits
        last = (offset + length - 1) >> bits
        if write and (
            self.read_only
            or self.corrupt
            or self.detect_zeroes != "off"
            # an allocation or a metadata change may be on its way to these
            # clusters: the ordinary path waits for it, so it must decide
            or self._lock.locked()
            or (self._allocating and self._allocating_overlaps(first, last))
        ):
            return None
        n_l2 = self.l2_entries
        l1_index = first // n_l2
        if l1_index != last // n_l2 or l1_index >= len(self._l1):
            return None  # across two L2 tables (rare): the ordinary path
        table = self._l2.get(self._l1[l1_index] & OFFSET_MASK)
        if table is None:
            return None
        need = OFLAG_COPIED if write else 0
        bad = OFLAG_COMPRESSED | OFLAG_ZERO | (self.cluster_size - 1)
        if first == last:
            entry = table[first - l1_index * n_l2]
            host = entry & OFFSET_MASK
            if not host or entry & bad or entry & need != need:
                return None
            start = host + (offset & (self.cluster_size - 1))
            if write and self._meta.kind_at(start) is not None:
                return None  # the ordinary path marks the image corrupt
            return self._held(file, [(start, length)], [host >> bits])
        base = l1_index * n_l2
        pieces: list[tuple[int, int]] = []
        clusters: list[int] = []
        end = offset + length
        for c in range(first, last + 1):
            entry = table[c - base]
            host = entry & OFFSET_MASK
            if not host or entry & bad or entry & need != need:
                return None
            lo = offset if c == first else c << bits
            hi = end if c == last else (c + 1) << bits
            start = host + lo - (c << bits)
            if pieces and pieces[-1][0] + pieces[-1][1] == start:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + hi - lo)
            else:
                pieces.append((start, hi - lo))
            clusters.append(host >> bits)
        if write:
            try:
                for start, n in pieces:
                    self._meta.check(start, n, None)
            except OverlapError:
                return None  # the ordinary path marks the image corrupt
        return self._held(file, pieces, clusters)

    def _held(self, file: FileNode, pieces: list[tuple[int, int]], clusters: list[int]) -> DirectIO:
        """``pieces`` of ``file`` as a :class:`DirectIO`, their clusters pinned until released."""
        self._pin(clusters)
        fd = file.hold_fd()

        def release() -> None:
            file.release_fd()
            self._unpin(clusters)

        return DirectIO(fd, pieces, release)

    async def _do_block_status(self, offset: int, length: int) -> tuple[Status, int]:
        # Walk the L2 entries from offset and stop at the first change, so a
        # question about a huge range costs as much as its first extent.
        cs = self.cluster_size
        end = offset + length
        span = cs * self.l2_entries
        limit = min(end, offset + 16 * span)  # callers loop; bound the work per question
        status: Status | None = None
        pos = offset
        async with self._lock:
            while pos < limit:
                chunk_end = min(limit, (pos // span + 1) * span)
                l1_index = pos // span
                loaded = await self._l2_table(l1_index)
                if loaded is None:
                    if status is None:
                        status = Status.UNALLOCATED
                    elif status is not Status.UNALLOCATED:
                        return status, pos - offset
                else:
                    table = loaded[1]
                    skip = l1_index * self.l2_entries
                    first = pos // cs
                    for i, entry in enumerate(
                        table[first - skip : (chunk_end - 1) // cs - skip + 1], first
                    ):
                        kind = classify(entry)
                        fault = self._entry_fault(entry, kind, i)
                        if fault:
                            await self._mark_corrupt(fault)
                        st = _STATUS[kind]
                        if status is None:
                            status = st
                        elif st is not status:
                            return status, max(offset, i * cs) - offset
                pos = chunk_end
        assert status is not None
        return status, limit - offset

    # -- metadata helpers (callers hold the lock, shielded) -------------------------

    def _has_backing(self) -> bool:
        """Whether unallocated clusters show something other than zeros to anyone.

        The header counts too: qemu-img opening this file later will follow it
        even when this node was opened with ``backing: null``.
        """
        return self.backing is not None or bool(self.header.backing_file)

    async def _ensure_l2(self, l1_index: int) -> None:
        entry = self._l1[l1_index]
        off = entry & OFFSET_MASK
        if off and entry & OFLAG_COPIED:
            return
        if off:
            raise BlockIOError(
                errno.ENOTSUP,
                f"qcow2: L2 table at {off:#x} is shared (internal snapshot); "
                "writing to it is not supported",
            )
        new = await self._refs.allocate(1)
        self._meta.check(new, self.cluster_size, None)
        self._file.debug_event("l2_alloc_write")
        self._file.debug_event("l2_update")
        await self._file.write(new, bytes(self.cluster_size))
        await self._refs.flush()  # table content and its refcount before the L1 pointer
        self._meta.add(new, self.cluster_size, MetaKind.L2)
        self._l2.drop(new)
        self._l2.put(new, zero_table(self.l2_entries))
        await self._write_l1_entry(l1_index, new | OFLAG_COPIED)

    async def _write_l1_entry(self, l1_index: int, entry: int) -> None:
        pos = self.header.l1_table_offset + l1_index * 8
        self._meta.check(pos, 8, MetaKind.L1)
        self._file.debug_event("l1_update")
        await self._file.write(pos, struct.pack(">Q", entry))
        self._l1[l1_index] = entry

    async def _set_entries(self, updates: dict[int, int]) -> None:
        """Write new L2 entries (tables must exist) through to the file.

        Only the updated entries are written (one write per run of adjacent
        ones): a neighbour may hold an allocation not yet committed, whose
        entry must not reach the disk before its data (see :meth:`_defer_entries`).
        """
        by_table: dict[int, list[int]] = {}
        for c in updates:
            by_table.setdefault(c // self.l2_entries, []).append(c)
            self._forget_uncommitted(c)
        for l1_index, clusters in sorted(by_table.items()):
            loaded = await self._l2_table(l1_index)
            assert loaded is not None, "L2 table must have been allocated"
            off, table = loaded
            for c in clusters:
                table[c % self.l2_entries] = updates[c]
            try:
                await self._write_entries(off, table, sorted(c % self.l2_entries for c in clusters))
            except BaseException:
                self._l2.drop(off)  # the cache must never be ahead of the disk
                raise

    async def _write_entries(self, off: int, table: array[int], indices: list[int]) -> None:
        """Write the table's entries at ``indices`` (ascending), a run per write."""
        i = 0
        while i < len(indices):
            j = i + 1
            while j < len(indices) and indices[j] == indices[j - 1] + 1:
                j += 1
            lo, hi = indices[i], indices[j - 1] + 1
            self._meta.check(off + lo * 8, (hi - lo) * 8, MetaKind.L2)
            self._file.debug_event("l2_update")
            await self._file.write(off + lo * 8, encode_entries(table[lo:hi]))
            i = j

    # -- L2 entries committed in batches ---------------------------------------------
    #
    # An allocating write's new L2 entries may only reach the disk after its
    # data and refcounts are durable (a flush).  Rather than flush once per
    # write, the entries are set in the cached table at once (so reads see
    # the data) and recorded here as uncommitted; the next flush (a client's
    # FLUSH or FUA, closing or reopening the node), or the write that makes
    # the backlog too big, flushes once for everything recorded and then
    # writes those entries.  A crash before that leaves only leaked clusters,
    # and loses only writes no flush has covered, as the NBD and qcow2
    # contracts allow (QEMU's writeback metadata cache does the same).  Each
    # record carries a token, so an entry that was changed meanwhile
    # (discarded and even allocated anew) is never committed with a stale
    # meaning.

    def _forget_uncommitted(self, cluster: int) -> None:
        record = self._uncommitted.pop(cluster, None)
        if record is not None:
            self._l2.unkeep(record[2])
            # Its host cluster stays held (since _plan_allocation): nothing on
            # disk will point at it, so its counter never needs writing, and
            # the decrement that frees it cancels the increment in memory.

    def _defer_entries(self, updates: dict[int, int]) -> bool:
        """Set new entries in the cached tables, to be committed later.

        True when the backlog has grown enough that the caller should
        :meth:`_commit` now (the tables holding it cannot be evicted).
        """
        for c, entry in updates.items():
            l1_index, index = divmod(c, self.l2_entries)
            off = self._l1[l1_index] & OFFSET_MASK
            table = self._l2.get(off)
            assert table is not None, "the allocation has just loaded the table"
            self._forget_uncommitted(c)
            table[index] = entry
            self._l2.keep(off)
            self._uncommitted[c] = (entry, next(self._commit_tokens), off)
        return (
            len(self._uncommitted) >= _COMMIT_ENTRIES
            or self._l2.kept_tables() > self._l2.capacity // 2
        )

    async def _commit(self) -> bool:
        """Flush, then write the uncommitted entries (not flushed again); any written?

        The entries written are exactly those recorded when the refcounts
        to write back are chosen: their counters go out in that write-back
        and nobody else's do, so a crash at any point leaves no counted
        cluster unreferenced for longer than the flush before the entries.
        """
        if not self._uncommitted and not self._refs.unwritten():
            return False  # no flush either (QEMU flushes only to order metadata it writes)
        batch: dict[int, tuple[int, int, int]] = {}

        def take() -> None:
            batch.update(self._uncommitted)
            bits = self.cluster_bits
            self._refs.release((e & OFFSET_MASK) >> bits for e, _t, _o in batch.values())

        with trio.CancelScope(shield=True):
            try:
                await self._refs.flush(take)  # their data and refcounts before the entries
            except OverlapError as exc:
                await self._mark_corrupt(str(exc), exc.offset, exc.size)
            if not batch:
                return False
            async with self._lock:
                by_table: dict[int, list[int]] = {}
                for c, record in batch.items():
                    if self._uncommitted.get(c) == record:
                        by_table.setdefault(record[2], []).append(c)
                for off, clusters in by_table.items():
                    table = self._l2.get(off)
                    assert table is not None, "uncommitted tables stay cached"
                    await self._write_entries(
                        off, table, sorted(c % self.l2_entries for c in clusters)
                    )
                    for c in clusters:
                        self._forget_uncommitted(c)
        return True

    async def _release(self, entries: list[int]) -> None:
        """Drop the references the (already durable) old entries held."""
        self._inflated = None  # its host bytes may be reused from now on
        clusters: list[int] = []
        for entry in entries:
            kind = classify(entry)
            if kind is ClusterKind.COMPRESSED:
                host, nbytes = compressed_range(entry, self.cluster_bits)
                clusters.extend(host_clusters_of_range(host, nbytes, self.cluster_bits))
            elif kind in _FREEABLE:
                clusters.append((entry & OFFSET_MASK) >> self.cluster_bits)
        if clusters:
            await self._wait_unpinned(clusters)
            self._file.debug_event("cluster_free")
            await self._refs.change(clusters, -1)
            # at once, not at the next flush: until then a crash would leak them
            await self._refs.write_back()

    async def _cluster_content(self, cluster: int, entry: int) -> bytearray:
        """Current guest view of a whole cluster (for copy-on-write)."""
        kind = classify(entry)
        goff = cluster * self.cluster_size
        return bytearray(await self._read_extent((kind, goff, self.cluster_size, entry)))

    # -- allocating writes in flight ------------------------------------------------
    #
    # An allocating write claims its clusters and writes their refcounts under
    # the lock, then writes the data and flushes *outside* it, and takes the
    # lock again to point L2 at the new clusters.  Meanwhile its guest clusters
    # are marked: any other change to them (write, zero, discard) waits, so
    # updates of one cluster never cross; readers see the old mapping.  This
    # lets one request's flush overlap with the next request's data.

    def _allocating_overlaps(self, first: int, last: int) -> bool:
        return any(a <= last and first <= b for a, b in self._allocating)

    async def _acquire_range(self, first: int, last: int) -> None:
        """Take the lock once no allocating write is in flight on clusters first..last."""
        while True:
            while self._allocating_overlaps(first, last):
                await self._allocation_done.wait()
            await self._lock.acquire()
            if not self._allocating_overlaps(first, last):
                return
            self._lock.release()

    @contextlib.asynccontextmanager
    async def _range_locked(self, first: int, last: int) -> AsyncIterator[None]:
        await self._acquire_range(first, last)
        try:
            yield
        finally:
            self._lock.release()

    def _end_allocating(self, span: tuple[int, int]) -> None:
        self._allocating.remove(span)
        self._allocation_done.set()
        self._allocation_done = trio.Event()

    async def _metadata_update(self, op: str, offset: int, arg: _Payload | int) -> None:
        if self.corrupt:
            raise BlockIOError(errno.EIO, "qcow2: Image is corrupt; writes are refused")
        length = arg.length if isinstance(arg, _Payload) else arg
        span = (offset // self.cluster_size, (offset + length - 1) // self.cluster_size)
        in_place: list[tuple[int, int, int]] | None = None
        alloc: _Allocation | None = None
        await self._acquire_range(*span)
        try:
            with trio.CancelScope(shield=True):
                try:
                    if op == "write":
                        assert isinstance(arg, _Payload)
                        in_place = await self._in_place_plan(offset, arg.length)
                        if in_place is None:
                            alloc = await self._plan_allocation(arg)
                            self._allocating.append(span)
                    elif op == "zero":
                        assert isinstance(arg, int)
                        await self._zero_locked(offset, arg)
                    else:
                        assert isinstance(arg, int)
                        await self._discard_locked(offset, arg)
                except OverlapError as exc:
                    await self._mark_corrupt(str(exc), exc.offset, exc.size)
        finally:
            self._lock.release()
        if in_place is not None:
            assert isinstance(arg, _Payload)
            await self._write_in_place(arg, in_place)
        elif alloc is not None:
            assert isinstance(arg, _Payload)
            with trio.CancelScope(shield=True):
                try:
                    await self._complete_allocation(arg, alloc)
                finally:
                    self._end_allocating(span)

    async def _complete_allocation(self, payload: _Payload, alloc: _Allocation) -> None:
        """Data into the claimed clusters (no lock), then L2 (locked).

        New clusters that replace nothing that must be freed get their
        entries committed in the background (:meth:`_defer_entries`); when
        old clusters are to be freed, their unreference must be durable
        first, so that write flushes and writes L2 itself.
        """
        updates, old = self._allocation_result(alloc)
        claimed = self._allocated_clusters(alloc)
        try:
            await self._fill_allocation(payload, alloc)
            if old:
                self._refs.release(claimed)
                await self._refs.flush()  # data and refcounts durable before the L2 entries
        except BaseException:
            # nothing points at the new clusters yet: give them back (or leak them)
            async with self._lock:
                self._refs.release(claimed)
                with contextlib.suppress(BlockIOError, OverlapError):
                    await self._refs.change(claimed, -1)
            raise
        if not old:
            async with self._lock:
                # still held: the commit that writes their entries writes their counters
                backlog = self._defer_entries(updates) if updates else False
            if backlog:
                await self._commit()
            return
        async with self._lock:
            try:
                await self._finish_allocation(updates, old, flushed=True)
            except OverlapError as exc:
                await self._mark_corrupt(str(exc), exc.offset, exc.size)

    async def _in_place_plan(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """(guest, host, length) pieces if every cluster can be overwritten in place.

        The clusters are pinned before the lock is released; the caller writes
        them outside the lock and unpins.
        """
        extents = await self._map(offset, length, read=False)
        plan: list[tuple[int, int, int]] = []
        for kind, goff, n, entry in extents:
            if kind is not ClusterKind.NORMAL or not entry & OFLAG_COPIED:
                return None
            plan.append((goff, (entry & OFFSET_MASK) + goff % self.cluster_size, n))
        for _g, host, n in plan:
            self._meta.check(host, n, None)
        self._pin(self._host_clusters(extents))
        return plan

    async def _write_in_place(self, payload: _Payload, plan: list[tuple[int, int, int]]) -> None:
        clusters = [c for _g, host, n in plan
                    for c in host_clusters_of_range(host, n, self.cluster_bits)]
        try:
            for goff, host, n in plan:
                self._file.debug_event("write_aio")
                await payload.put(self._file, host, goff, n)
        finally:
            self._unpin(clusters)

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

    # -- writing --------------------------------------------------------------------

    async def _do_write(self, offset: int, data: bytes) -> None:
        await self._metadata_update("write", offset, _BytesPayload(offset, data))

    async def _do_map_data(self, offset: int, length: int) -> HostExtents | None:
        if not isinstance(self.file, FileNode):
            return None
        cs = self.cluster_size
        async with self._lock:
            extents = await self._map(offset, length)
            if any(kind is not ClusterKind.NORMAL for kind, _g, _n, _e in extents):
                return None
            pinned = self._host_clusters(extents)
            self._pin(pinned)
        pieces = [(g, (e & OFFSET_MASK) + g % cs, n) for _k, g, n, e in extents]
        return HostExtents(self.file, pieces, lambda: self._unpin(pinned))

    async def _do_write_many_from_host(self, writes: list[tuple[int, int, HostExtents]]) -> bool:
        file = self.file
        if not isinstance(file, FileNode) or any(
            not isinstance(src.file, FileNode) or src.file is file for _o, _n, src in writes
        ):
            return False
        cs = self.cluster_size
        # ranges sharing a cluster would both see it unallocated before either
        # points L2 at its copy: such batches go range by range
        for (o1, n1, _s1), (o2, _n2, _s2) in itertools.pairwise(writes):
            if (o1 + n1 - 1) // cs >= o2 // cs:
                return False
        if self.corrupt:
            raise BlockIOError(errno.EIO, "qcow2: Image is corrupt; writes are refused")
        copies: list[tuple[int, FileNode, int, int]] = []
        payloads = [_HostPayload(o, n, src, copies) for o, n, src in writes]
        pinned: list[int] = []
        span = (writes[0][0] // cs, (writes[-1][0] + writes[-1][1] - 1) // cs)
        async with self._range_locked(*span):
            with trio.CancelScope(shield=True):
                try:
                    plans: list[list[tuple[int, int, int]]] = []
                    for p in payloads:
                        plan = await self._in_place_plan(p.offset, p.length)
                        if plan is None:
                            break
                        plans.append(plan)
                        pinned.extend(c for _g, host, n in plan
                                      for c in host_clusters_of_range(host, n, self.cluster_bits))
                    if len(plans) < len(payloads):
                        # allocating: everything under the lock, one flush for the batch
                        self._unpin(pinned)
                        pinned = []
                        updates: dict[int, int] = {}
                        old: list[int] = []
                        for p in payloads:
                            more, freed = await self._write_payload_data(p)
                            updates.update(more)
                            old.extend(freed)
                            if copies:
                                await file.copy_many(copies)
                                copies.clear()
                        await self._finish_allocation(updates, old)
                    else:
                        for p, plan in zip(payloads, plans, strict=True):
                            for goff, host, n in plan:
                                await p.put(file, host, goff, n)
                except OverlapError as exc:
                    self._unpin(pinned)
                    pinned = []
                    await self._mark_corrupt(str(exc), exc.offset, exc.size)
                except BaseException:
                    self._unpin(pinned)
                    raise
        if pinned:
            # all in place: the data goes outside the lock, in one worker call
            try:
                await file.copy_many(copies)
            finally:
                self._unpin(pinned)
        return True

    async def _do_write_from_host(self, offset: int, length: int, src: HostExtents) -> bool:
        if (
            not isinstance(self.file, FileNode)
            or not isinstance(src.file, FileNode)
            or src.file is self.file
        ):
            return False
        await self._metadata_update("write", offset, _HostPayload(offset, length, src))
        return True

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        await self._metadata_update("zero", offset, length)

    async def _do_discard(self, offset: int, length: int) -> None:
        await self._metadata_update("discard", offset, length)

    async def _write_locked(self, offset: int, data: bytes) -> None:
        await self._write_payload_locked(_BytesPayload(offset, data))

    async def _write_payload_locked(self, payload: _Payload) -> None:
        await self._finish_allocation(*await self._write_payload_data(payload))

    async def _write_payload_data(self, payload: _Payload) -> tuple[dict[int, int], list[int]]:
        """First half of an allocating write: data into place (in place or new
        clusters, whose refcounts are written).  Returns the L2 updates and the
        old entries to free, for :meth:`_finish_allocation`.
        """
        alloc = await self._plan_allocation(payload)
        await self._fill_allocation(payload, alloc)
        return self._allocation_result(alloc)

    async def _plan_allocation(self, payload: _Payload) -> _Allocation:
        """Claim the new clusters a write needs (counted, held back from write-backs
        until the write's pointers are on their way); nothing is written."""
        cs = self.cluster_size
        offset = payload.offset
        end = offset + payload.length
        first, last = offset // cs, (end - 1) // cs
        for l1_index in range(first // self.l2_entries, last // self.l2_entries + 1):
            await self._ensure_l2(l1_index)
        entries = await self._entries(first, last - first + 1)

        fresh: list[tuple[int, int]] = []  # (guest cluster, old entry) needing a new cluster
        in_place: list[tuple[int, int, int]] = []  # (guest, host, length), coalesced
        for i, entry in enumerate(entries):
            c = first + i
            kind = classify(entry)
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            # a partial write copies the rest of the cluster, so it reads the entry
            fault = self._entry_fault(entry, kind, c, read=hi - lo < cs)
            if fault:
                await self._mark_corrupt(fault)
            if kind is ClusterKind.NORMAL and entry & OFLAG_COPIED:
                host = (entry & OFFSET_MASK) + lo - c * cs
                self._meta.check(host, hi - lo, None)
                if in_place and in_place[-1][0] + in_place[-1][2] == lo and (
                    in_place[-1][1] + in_place[-1][2] == host
                ):
                    g, h, n = in_place[-1]
                    in_place[-1] = (g, h, n + hi - lo)
                else:
                    in_place.append((lo, host, hi - lo))
            else:
                fresh.append((c, entry))
        alloc = _Allocation(in_place, [])
        done = 0
        while done < len(fresh):
            run_off, count = await self._refs.allocate_run(len(fresh) - done)
            # counters written back only once the data is in (_finish_allocation, _defer)
            self._refs.hold(range(run_off >> self.cluster_bits,
                                  (run_off >> self.cluster_bits) + count))
            alloc.runs.append((run_off, fresh[done : done + count]))
            self._meta.check(run_off, count * cs, None)
            done += count
        return alloc

    async def _fill_allocation(self, payload: _Payload, alloc: _Allocation) -> None:
        for lo, host, n in alloc.in_place:
            self._file.debug_event("write_aio")
            await payload.put(self._file, host, lo, n)
        for run_off, batch in alloc.runs:
            await self._fill_run(payload, run_off, batch)

    def _allocated_clusters(self, alloc: _Allocation) -> list[int]:
        return [(run_off >> self.cluster_bits) + i
                for run_off, batch in alloc.runs for i in range(len(batch))]

    def _allocation_result(self, alloc: _Allocation) -> tuple[dict[int, int], list[int]]:
        cs = self.cluster_size
        updates = {c: (run_off + i * cs) | OFLAG_COPIED
                   for run_off, batch in alloc.runs for i, (c, _e) in enumerate(batch)}
        old = [e for _r, batch in alloc.runs for _c, e in batch if classify(e) in _FREEABLE]
        return updates, old

    async def _finish_allocation(
        self, updates: dict[int, int], old: list[int], *, flushed: bool = False
    ) -> None:
        """Second half: make the new clusters reachable, then free what they replace."""
        if not updates:
            return
        self._refs.release((e & OFFSET_MASK) >> self.cluster_bits for e in updates.values())
        if not flushed:
            await self._refs.flush()  # data and refcounts durable before the L2 entries
        await self._set_entries(updates)
        if old:
            await self._refs.flush()  # the unreference is durable before the decrement
            await self._release(old)

    async def _fill_run(
        self, payload: _Payload, run_off: int, batch: list[tuple[int, int]]
    ) -> None:
        """Write the new contents of ``batch``'s guest clusters into the host run.

        Whole clusters that follow each other in the guest go out in one
        request; a partial cluster is completed from what the guest sees now.
        """
        cs = self.cluster_size
        offset, end = payload.offset, payload.offset + payload.length
        buffered = isinstance(payload, _BytesPayload)
        pending: list[bytes] = []  # buffered: the whole run, written at once
        cow = False

        def whole(c: int) -> bool:
            return min(end, (c + 1) * cs) - max(offset, c * cs) == cs

        i = 0
        while i < len(batch):
            c, entry = batch[i]
            host = run_off + i * cs
            if whole(c):
                j = i + 1
                while j < len(batch) and batch[j][0] == c + (j - i) and whole(batch[j][0]):
                    j += 1
                if isinstance(payload, _BytesPayload):
                    pending.append(payload.get_now(c * cs, (j - i) * cs))
                else:
                    await payload.put(self._file, host, c * cs, (j - i) * cs)
                i = j
                continue
            # partial cluster: copy the rest from what the guest sees now
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            cow = await self._copy_on_write_event(c, entry, lo, hi) or cow
            content = await self._cluster_content(c, entry)
            content[lo - c * cs : hi - c * cs] = await payload.get(lo, hi - lo)
            if buffered:
                pending.append(bytes(content))
            else:
                await self._file.write(host, bytes(content))
            i += 1
        if pending:
            self._file.debug_event("write_aio")
            if cow:
                self._file.debug_event("cow_write")
            await self._file.write(run_off, pending[0] if len(pending) == 1 else b"".join(pending))

    async def _copy_on_write_event(self, cluster: int, entry: int, lo: int, hi: int) -> bool:
        """Raise the blkdebug event of QEMU's copy-on-write for a partial cluster
        written at [lo, hi): ``cluster_alloc_space`` where the rest reads as
        zeros (QEMU zeroes the cluster first), else ``cow_read``.  True in the
        second case."""
        if not self._file.hears_debug_events:
            return False  # spare the backing chain's block status
        kind = classify(entry)
        zero = kind in (ClusterKind.ZERO_PLAIN, ClusterKind.ZERO_ALLOC)
        if kind is ClusterKind.UNALLOCATED:
            start, end = cluster * self.cluster_size, (cluster + 1) * self.cluster_size
            zero = all([await self._zeros_below(a, b) for a, b in ((start, lo), (hi, end))])
        self._file.debug_event("cluster_alloc_space" if zero else "cow_read")
        return not zero

    async def _zeros_below(self, start: int, end: int) -> bool:
        """Whether the backing chain shows only zeros in [start, end) (as far as
        block status tells at once; a mixed answer counts as data)."""
        layer = self.backing
        while layer is not None and start < min(end, layer.size):
            want = min(end, layer.size) - start
            status, n = await layer.block_status(start, want)
            if status is Status.DATA or n < want:
                return False
            if status is Status.ZERO:
                return True
            layer = layer.backing
        return True

    def _full_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """Guest clusters wholly inside the range (the image's end counts as a boundary)."""
        cs = self.cluster_size
        end = offset + length
        first = -(-offset // cs)
        last_excl = -(-self.size // cs) if end >= self.size else end // cs
        return first, max(first, last_excl)

    async def _replace_entries(self, first: int, last_excl: int, new_entry: int) -> None:
        """Point whole clusters at ``new_entry`` (zero/unallocated), freeing what they held."""
        if last_excl <= first:
            return
        entries = await self._entries(first, last_excl - first)
        updates: dict[int, int] = {}
        old: list[int] = []
        for i, entry in enumerate(entries):
            if entry == new_entry:
                continue
            if entry == 0 and new_entry == OFLAG_ZERO and not self._has_backing():
                continue  # already reads as zeros; no need for an L2 table
            c = first + i
            if new_entry == 0 and c // self.l2_entries >= len(self._l1):
                continue
            if new_entry == 0 and not self._l1[c // self.l2_entries] & OFFSET_MASK:
                continue
            updates[c] = new_entry
            if classify(entry) in _FREEABLE:
                old.append(entry)
        if not updates:
            return
        for l1_index in sorted({c // self.l2_entries for c in updates}):
            await self._ensure_l2(l1_index)
        await self._set_entries(updates)
        if old:
            await self._refs.flush()
            await self._release(old)

    async def _reads_as_zero_here(self, cluster: int) -> bool:
        kind = classify((await self._entries(cluster, 1))[0])
        if kind in (ClusterKind.ZERO_PLAIN, ClusterKind.ZERO_ALLOC):
            return True
        return kind is ClusterKind.UNALLOCATED and not self._has_backing()

    async def _zero_locked(self, offset: int, length: int) -> None:
        cs = self.cluster_size
        end = offset + length
        first, last_excl = self._full_clusters(offset, length)
        # partial head/tail clusters: zeros as data unless they already read as zero
        pieces = [(offset, min(end, first * cs)), (max(offset, last_excl * cs), end)]
        for lo, hi in pieces:
            if hi > lo and not await self._reads_as_zero_here(lo // cs):
                await self._write_locked(lo, bytes(hi - lo))
        if last_excl <= first:
            return
        if self.header.version >= 3:
            await self._replace_entries(first, last_excl, OFLAG_ZERO)
        elif not self._has_backing():
            await self._replace_entries(first, last_excl, 0)
        else:  # v2 with a backing file has no other way to hide it than real zeros
            lo, hi = first * cs, min(last_excl * cs, self.size)
            step = 256 * cs
            for pos in range(lo, hi, step):
                await self._write_locked(pos, bytes(min(step, hi - pos)))

    async def _discard_locked(self, offset: int, length: int) -> None:
        # Partial clusters are left alone (discard is advisory), as QEMU does.
        first, last_excl = self._full_clusters(offset, length)
        # with a backing file, a zero entry keeps the backing data from showing through
        hide = self.header.version >= 3 and self._has_backing()
        new_entry = OFLAG_ZERO if hide else 0
        await self._replace_entries(first, last_excl, new_entry)

    async def _do_flush(self) -> None:
        await self._commit()
        self._flush_to_disk_event()
        await self._file.flush()  # the entries it wrote

    # -- resizing -------------------------------------------------------------------

    async def _do_truncate(self, size: int) -> None:
        if size % 512:
            raise BlockError("The new size must be a multiple of 512")
        if self.corrupt:
            raise BlockIOError(errno.EIO, "qcow2: Image is corrupt; writes are refused")
        async with self._range_locked(0, 1 << 63):  # no allocating write in flight
            with trio.CancelScope(shield=True):
                try:
                    await self._grow_locked(size)
                except OverlapError as exc:
                    await self._mark_corrupt(str(exc), exc.offset, exc.size)

    async def _grow_locked(self, size: int) -> None:
        cs = self.cluster_size
        h = self.header
        old_size = h.size
        need = -(-size // (cs * self.l2_entries))
        if need * 8 > hdr.MAX_L1_BYTES:
            raise BlockError(f"qcow2: virtual size {size} needs an L1 table larger than "
                             f"{hdr.MAX_L1_BYTES} bytes; use bigger clusters")
        if need > h.l1_size:
            nclusters = -(-need * 8 // cs)
            self._file.debug_event("l1_grow_alloc_table")
            new = await self._refs.allocate(nclusters)
            self._meta.check(new, nclusters * cs, None)
            table = array("Q", self._l1)
            table.extend(zero_table(need - len(self._l1)))
            raw = encode_entries(table)
            self._file.debug_event("l1_grow_write_table")
            await self._file.write(new, raw + bytes(nclusters * cs - len(raw)))
            await self._refs.flush()
            self._meta.check(hdr.OFF_L1, 12, MetaKind.HEADER)
            self._file.debug_event("l1_grow_activate_table")
            await self._file.write(hdr.OFF_L1, struct.pack(">IQ", need, new))
            await self._refs.flush()
            old_off, old_n = h.l1_table_offset, h.l1_size
            h.l1_size, h.l1_table_offset = need, new
            self._l1 = table
            if old_n:
                self._meta.remove(old_off, old_n * 8)
            self._meta.add(new, need * 8, MetaKind.L1)
            if old_n:
                await self._refs.change(
                    host_clusters_of_range(old_off, old_n * 8, self.cluster_bits), -1
                )
                await self._refs.write_back()
        self._meta.check(hdr.OFF_SIZE, 8, MetaKind.HEADER)
        await self._file.write(hdr.OFF_SIZE, struct.pack(">Q", size))
        await self._refs.flush()
        h.size = size
        # the new area must read as zeros: neither stale bytes in the old last
        # cluster nor a longer backing file may show through
        zero_end = -(-old_size // cs) * cs
        if self.backing is not None:
            zero_end = max(zero_end, self.backing.size)
        elif self.header.backing_file:
            zero_end = size  # backing not open: its size is unknown, be safe
        zero_end = min(zero_end, size)
        if zero_end > old_size:
            await self._zero_locked(old_size, zero_end - old_size)

    # -- backing --------------------------------------------------------------------

    async def _do_change_backing(
        self,
        backing: BlockNode | None,
        backing_string: str | None,
        backing_format: str | None,
    ) -> None:
        self._check_writable()
        if backing_string and not backing_format:
            raise BlockError("backing format must be specified")
        async with self._lock:
            with trio.CancelScope(shield=True):
                new = hdr.with_backing(self.header, backing_string, backing_format)
                if backing_string and await self._repoint_backing(new, backing_string):
                    self.backing = backing
                    return
                raw = hdr.serialize(new)
                extent = max(len(raw), self._header_extent)
                self._meta.check(0, extent, MetaKind.HEADER)
                # one write covering the whole old extent, so no stale name bytes remain
                await self._file.write(0, raw + bytes(extent - len(raw)))
                await self._refs.flush()
                parsed = hdr.parse_fixed(raw)
                new.backing_file_offset = parsed.backing_file_offset
                new.backing_file_size = parsed.backing_file_size
                for field in dataclasses.fields(hdr.Header):
                    setattr(self.header, field.name, getattr(new, field.name))
                self._header_extent = len(raw)
                self.backing = backing

    async def _repoint_backing(self, new: hdr.Header, name: str) -> bool:
        """Change the backing name with one sector-sized pointer write, if possible.

        The new name goes to free bytes of cluster 0 first (flushed); then the
        12 bytes that locate it (offset and length, in the first sector) are
        rewritten at once.  A crash before that write leaves the old name in
        force, after it the new one: never a torn header, even on power loss.
        Returns False when the layout does not allow it (the extensions change,
        or there is no end marker or no room), for the caller's full rewrite.
        """
        if new.extensions != self.header.extensions:
            return False
        raw = name.encode("utf-8", "surrogateescape")
        cs = self.cluster_size
        ext_end = self.header.header_length
        for ext in self.header.extensions:
            ext_end += 8 + len(ext.data) + (-len(ext.data) % 8)
        ext_end += 8
        old_start = self.header.backing_file_offset
        old_end = old_start + self.header.backing_file_size
        if old_start and old_start < ext_end:
            return False
        above_old = max(ext_end, old_end) + (-max(ext_end, old_end) % 8)
        if above_old + len(raw) <= cs:
            start = above_old
        elif not old_start or ext_end + len(raw) <= old_start:
            start = ext_end
        else:
            return False
        cluster0 = await self._file.read(0, min(cs, self._file.size))
        if cluster0[ext_end - 8 : ext_end] != bytes(8):
            return False  # no end-of-extensions marker: name bytes could pass for one
        self._meta.check(0, max(ext_end, start + len(raw)), MetaKind.HEADER)
        await self._file.write(start, raw)
        await self._refs.flush()
        await self._file.write(8, struct.pack(">QI", start, len(raw)))
        await self._refs.flush()
        self.header.backing_file = name
        self.header.backing_file_offset = start
        self.header.backing_file_size = len(raw)
        self._header_extent = max(ext_end, start + len(raw))
        return True

    # -- open mode ------------------------------------------------------------------

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


@dataclasses.dataclass
class _Allocation:
    """What an allocating write claimed: in-place pieces (guest, host, length) and
    new host runs with the (guest cluster, old entry) pairs they replace."""

    in_place: list[tuple[int, int, int]]
    runs: list[tuple[int, list[tuple[int, int]]]]


class _Payload:
    """The bytes a write puts at guest ``[offset, offset + length)``."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length

    async def put(self, file: BlockNode, host: int, guest: int, n: int) -> None:
        """Write the payload's bytes for guest ``[guest, guest + n)`` to ``file`` at ``host``."""
        raise NotImplementedError

    async def get(self, guest: int, n: int) -> bytes:
        raise NotImplementedError


class _BytesPayload(_Payload):
    def __init__(self, offset: int, data: bytes) -> None:
        super().__init__(offset, len(data))
        self.data = data

    def get_now(self, guest: int, n: int) -> bytes:
        lo = guest - self.offset
        if lo == 0 and n == len(self.data):
            return self.data
        return self.data[lo : lo + n]

    async def put(self, file: BlockNode, host: int, guest: int, n: int) -> None:
        await file.write(host, self.get_now(guest, n))

    async def get(self, guest: int, n: int) -> bytes:
        return self.get_now(guest, n)


class _HostPayload(_Payload):
    """Bytes that sit in another image's host file (``HostExtents``): copied file to file."""

    def __init__(
        self,
        offset: int,
        length: int,
        src: HostExtents,
        collect: list[tuple[int, FileNode, int, int]] | None = None,
    ) -> None:
        super().__init__(offset, length)
        assert isinstance(src.file, FileNode)
        self.file: FileNode = src.file
        self.pieces = src.pieces
        #: with a list, put() only records the copies for one copy_many later
        self.collect = collect

    def _parts(self, guest: int, n: int) -> list[tuple[int, int, int]]:
        """(position in the request, source host offset, length) covering guest [guest, +n)."""
        out: list[tuple[int, int, int]] = []
        end = guest + n
        for g, h, m in self.pieces:
            lo, hi = max(g, guest), min(g + m, end)
            if lo < hi:
                out.append((lo - guest, h + lo - g, hi - lo))
        if sum(p[2] for p in out) != n:
            raise BlockIOError(errno.EIO, "qcow2: copy source does not cover the request")
        return out

    async def put(self, file: BlockNode, host: int, guest: int, n: int) -> None:
        assert isinstance(file, FileNode)
        copies = [
            (host + pos, self.file, src_host, m) for pos, src_host, m in self._parts(guest, n)
        ]
        if self.collect is not None:
            self.collect.extend(copies)
        else:
            await file.copy_many(copies)

    async def get(self, guest: int, n: int) -> bytes:
        parts = [await self.file.read(h, m) for _p, h, m in self._parts(guest, n)]
        return b"".join(parts)


def _c_hex(n: int) -> str:
    """``n`` as C's ``%#x`` prints it (no prefix for zero), as in QEMU's messages."""
    return f"{n:#x}" if n else "0"


def _header_extent(h: hdr.Header) -> int:
    """Bytes of cluster 0 the header currently uses (fields, extensions, name)."""
    pos = h.header_length
    for ext in h.extensions:
        pos += 8 + len(ext.data) + (-len(ext.data) % 8)
    pos += 8
    if h.backing_file_offset:
        pos = max(pos, h.backing_file_offset + h.backing_file_size)
    return pos
