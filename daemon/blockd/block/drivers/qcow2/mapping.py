"""Guest clusters to host clusters: the L1 table, cached L2 tables, the extents
of a guest range, block status, and the one formula for a host offset.

Callers hold the image's metadata lock while they ask (``inflight.py``),
so the answers are a consistent view of L2.  New L2 tables (empty, or
copies of tables shared with internal snapshots) and L1 entries are written
here, at once: an L1 entry is only written after its table is durable, and
a replaced table's refcount drops only once the new entry is, so a crash
leaves at most a leaked table.  L2 entries themselves go out through
``writeback.py``.
"""

from __future__ import annotations

import contextlib
import struct
from array import array

from blockd.block.drivers.qcow2.header import Header
from blockd.block.drivers.qcow2.overlap import MarkCorrupt, MetadataMap, MetaKind, OverlapError
from blockd.block.drivers.qcow2.refcount import Refcounts
from blockd.block.drivers.qcow2.scan import DATA, UNALLOCATED, ZERO
from blockd.block.drivers.qcow2.scan import classify as classify_entries
from blockd.block.drivers.qcow2.scan import runs as code_runs
from blockd.block.drivers.qcow2.tables import (
    OFFSET_MASK,
    OFLAG_COPIED,
    ClusterKind,
    L2Cache,
    classify,
    compressed_range,
    decode_table,
    encode_entries,
    host_clusters_of_range,
    zero_table,
)
from blockd.block.node import BlockNode, Status
from blockd.errors import BlockIOError

#: one mapped piece of a guest range: (kind, guest offset, length, L2 entry)
Extent = tuple[ClusterKind, int, int, int]

STATUS = {
    ClusterKind.NORMAL: Status.DATA,
    ClusterKind.COMPRESSED: Status.DATA,
    ClusterKind.ZERO_PLAIN: Status.ZERO,
    ClusterKind.ZERO_ALLOC: Status.ZERO,
    ClusterKind.UNALLOCATED: Status.UNALLOCATED,
}
CODE_STATUS = {DATA: Status.DATA, ZERO: Status.ZERO, UNALLOCATED: Status.UNALLOCATED}
STATUS_CODE = {status: code for code, status in CODE_STATUS.items()}
#: kinds of entry that hold a reference to host clusters
FREEABLE = (ClusterKind.NORMAL, ClusterKind.ZERO_ALLOC, ClusterKind.COMPRESSED)


def host_offset(entry: int, guest: int, cluster_size: int) -> int:
    """Where guest byte ``guest`` lies in the host file, its cluster's L2 entry being
    ``entry`` (a normal cluster: the host cluster plus the offset within it)."""
    return (entry & OFFSET_MASK) + (guest & (cluster_size - 1))


def referenced_clusters(entry: int, cluster_bits: int) -> list[int] | range:
    """The host clusters an L2 entry holds a reference to (none for unallocated
    or plain zero entries; a compressed stream may span two)."""
    kind = classify(entry)
    if kind is ClusterKind.COMPRESSED:
        host, nbytes = compressed_range(entry, cluster_bits)
        return host_clusters_of_range(host, nbytes, cluster_bits)
    if kind in FREEABLE:
        return [(entry & OFFSET_MASK) >> cluster_bits]
    return []


def c_hex(n: int) -> str:
    """``n`` as C's ``%#x`` prints it (no prefix for zero), as in QEMU's messages."""
    return f"{n:#x}" if n else "0"


class Mapping:
    def __init__(
        self,
        file: BlockNode,
        header: Header,
        meta: MetadataMap,
        refs: Refcounts,
        mark_corrupt: MarkCorrupt,
        l2_cache_bytes: int,
    ) -> None:
        self.file = file
        self.header = header
        self.meta = meta
        self.refs = refs
        self.mark_corrupt = mark_corrupt
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = self.cluster_size // 8
        self.l1: array[int] = zero_table(0)
        self.l2 = L2Cache(l2_cache_bytes, self.cluster_size)
        #: L2 tables read from disk so far (the cache missed)
        self.l2_reads = 0

    def host_offset(self, entry: int, guest: int) -> int:
        return host_offset(entry, guest, self.cluster_size)

    # -- looking up -----------------------------------------------------------------

    async def l2_table(self, l1_index: int) -> tuple[int, array[int]] | None:
        """(offset, entries) of the L2 table for L1 index ``l1_index``; None if it has none."""
        if l1_index >= len(self.l1):
            return None
        off = self.l1[l1_index] & OFFSET_MASK
        if not off:
            return None
        if off & (self.cluster_size - 1):
            await self.mark_corrupt(
                f"L2 table offset {off:#x} unaligned (L1 index: {c_hex(l1_index)})"
            )
        table = self.l2.get(off)
        if table is None:
            self.file.debug_event("l2_load")
            self.l2_reads += 1
            table = self.l2.put(off, decode_table(await self.file.read(off, self.cluster_size)))
        return off, table

    def shares_a_table(self, offset: int, length: int) -> bool:
        """Whether an L2 table of the guest range is shared with an internal
        snapshot (its L1 entry lacks COPIED): no cluster under it can be
        written in place, and a write copies the table before looking
        anything up in it, as QEMU's does (the table is read only then)."""
        span = self.cluster_size * self.l2_entries
        last = min((offset + length - 1) // span, len(self.l1) - 1)
        return any(
            e & OFFSET_MASK and not e & OFLAG_COPIED
            for e in self.l1[offset // span : last + 1]
        )

    async def entries(self, first: int, count: int) -> list[int]:
        """L2 entries of ``count`` consecutive guest clusters from cluster ``first``."""
        out: list[int] = []
        c = first
        end = first + count
        while c < end:
            l1_index, l2_index = divmod(c, self.l2_entries)
            n = min(end - c, self.l2_entries - l2_index)
            loaded = await self.l2_table(l1_index)
            if loaded is None:
                out.extend([0] * n)
            else:
                out.extend(loaded[1][l2_index : l2_index + n])
            c += n
        return out

    def entry_fault(
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
            l2_offset = self.l1[l1_index] & OFFSET_MASK
            where = f"(L2 offset: {l2_offset:#x}, L2 index: {c_hex(l2_index)})"
            if unaligned:
                return f"Cluster allocation offset {entry & OFFSET_MASK:#x} unaligned {where}"
            return f"Zero cluster entry found in pre-v3 image {where}"
        return None

    async def map(self, offset: int, length: int, *, read: bool = True) -> list[Extent]:
        """The range's extents; ``read=False`` for a caller that only overwrites them."""
        cs = self.cluster_size
        first = offset // cs
        last = (offset + length - 1) // cs
        entries = await self.entries(first, last - first + 1)
        extents: list[Extent] = []
        end = offset + length
        count = len(entries)
        i = 0
        while i < count:
            entry = entries[i]
            kind = classify(entry)
            fault = self.entry_fault(entry, kind, first + i, read=read)
            if fault:
                await self.mark_corrupt(fault)
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

    def host_clusters(self, extents: list[Extent]) -> list[int]:
        """The host clusters holding the extents' data (what a data I/O pins)."""
        bits = self.cluster_bits
        out: list[int] = []
        for kind, goff, n, entry in extents:
            if kind is ClusterKind.NORMAL:
                out.extend(host_clusters_of_range(self.host_offset(entry, goff), n, bits))
            elif kind is ClusterKind.COMPRESSED:
                host, nbytes = compressed_range(entry, bits)
                out.extend(host_clusters_of_range(host, nbytes, bits))
        return out

    def _classify(self, table: array[int], first: int, last: int) -> tuple[bytes, bool]:
        return classify_entries(table, first, last, self.cluster_bits, self.header.version)

    async def block_status(self, offset: int, length: int) -> tuple[Status, int]:
        """Status of the range's start and how far it goes on.

        Walks the L2 entries from ``offset`` and stops at the first change,
        so a question about a huge range costs as much as its first extent.
        A table slice is classified whole (``scan.py``); one holding an entry
        a read calls corrupt is walked entry by entry instead, which meets
        that entry (or stops before it) exactly where QEMU's walk does.
        """
        cs = self.cluster_size
        end = offset + length
        span = cs * self.l2_entries
        limit = min(end, offset + 16 * span)  # callers loop; bound the work per question
        status: Status | None = None
        pos = offset
        while pos < limit:
            chunk_end = min(limit, (pos // span + 1) * span)
            l1_index = pos // span
            loaded = await self.l2_table(l1_index)
            if loaded is None:
                if status is None:
                    status = Status.UNALLOCATED
                elif status is not Status.UNALLOCATED:
                    return status, pos - offset
            else:
                table = loaded[1]
                skip = l1_index * self.l2_entries
                first = pos // cs - skip
                last = (chunk_end - 1) // cs - skip + 1
                codes, faulty = self._classify(table, first, last)
                if faulty:
                    for i, entry in enumerate(table[first:last], first + skip):
                        kind = classify(entry)
                        fault = self.entry_fault(entry, kind, i)
                        if fault:
                            await self.mark_corrupt(fault)
                        st = STATUS[kind]
                        if status is None:
                            status = st
                        elif st is not status:
                            return status, max(offset, i * cs) - offset
                else:
                    if status is None:
                        status = CODE_STATUS[codes[:1]]
                    same = len(codes) - len(codes.lstrip(STATUS_CODE[status]))
                    if same < len(codes):
                        return status, max(offset, (first + skip + same) * cs) - offset
            pos = chunk_end
        assert status is not None
        return status, limit - offset

    async def status_runs(self, offset: int, length: int) -> list[tuple[Status, int]] | None:
        """Every run of equal status in the range: (status, length), in order.

        None where the range meets an L2 table or entry that a read calls
        corrupt: :meth:`block_status` then walks it, and marks the image
        corrupt exactly where QEMU's walk would.  The caller bounds the
        range (the work is one pass over its tables).
        """
        cs = self.cluster_size
        span = cs * self.l2_entries
        end = offset + length
        out: list[tuple[Status, int]] = []

        def add(status: Status, n: int) -> None:
            if out and out[-1][0] is status:
                out[-1] = (status, out[-1][1] + n)
            else:
                out.append((status, n))

        pos = offset
        while pos < end:
            l1_index = pos // span
            chunk_end = min(end, (l1_index + 1) * span)
            if l1_index < len(self.l1) and self.l1[l1_index] & OFFSET_MASK & (cs - 1):
                return None
            loaded = await self.l2_table(l1_index)
            if loaded is None:
                add(Status.UNALLOCATED, chunk_end - pos)
            else:
                skip = l1_index * self.l2_entries
                first = pos // cs - skip
                codes, faulty = self._classify(loaded[1], first, (chunk_end - 1) // cs - skip + 1)
                if faulty:
                    return None
                start = (first + skip) * cs
                for code, a, b in code_runs(codes):
                    lo, hi = max(pos, start + a * cs), min(chunk_end, start + b * cs)
                    add(CODE_STATUS[code], hi - lo)
            pos = chunk_end
        return out

    # -- changing the tables (callers hold the lock, shielded) ----------------------

    async def ensure_l2(self, l1_index: int) -> None:
        """Give L1 index ``l1_index`` an L2 table only the active view uses.

        No table yet: a new, zeroed one.  A table whose L1 entry lacks
        COPIED is shared with an internal snapshot (its refcount is above 1):
        it is copied to a new table, which takes its place, and only then is
        the active view's reference to the old one dropped, so the snapshot
        keeps it as it was.  The copied entries point at the same clusters,
        whose refcounts do not change: each counts the tables that reach it
        through some L1 table, and the new table stands in for the old one
        in the active L1.  Those entries lack COPIED (their clusters are
        shared too), so a write to any of them copies its cluster as well.
        """
        entry = self.l1[l1_index]
        old = entry & OFFSET_MASK
        if old and entry & OFLAG_COPIED:
            return
        if not old:
            await self._new_tables([l1_index])
            return
        new = await self.refs.allocate(1)
        try:
            self.meta.check(new, self.cluster_size, None)
            # the new table's counter first, then the old table read: QEMU's
            # order, so blkdebug rules meet the same requests
            await self.refs.flush()
            self.file.debug_event("l2_alloc_cow_read")
            loaded = await self.l2_table(l1_index)
            assert loaded is not None
            # a table without COPIED is never written, so the cache matches the disk
            table = array("Q", loaded[1])
            self.file.debug_event("l2_alloc_write")
            self.file.debug_event("l2_update")
            await self.file.write(new, encode_entries(table))
            await self.file.flush()  # the table before the L1 pointer
        except BaseException:
            # nothing points at the new table: give it back (a failure here leaks it)
            with contextlib.suppress(BlockIOError, OverlapError):
                await self.refs.change([new >> self.cluster_bits], -1)
            raise
        self.meta.add(new, self.cluster_size, MetaKind.L2)
        self.l2.drop(new)
        self.l2.put(new, table)
        await self._write_l1_entry(l1_index, new | OFLAG_COPIED)
        # the snapshot's now, not the active view's: no longer checked
        # as active metadata, and the cache need not keep it
        self.meta.remove(old, self.cluster_size)
        self.l2.drop(old)
        await self.refs.flush()  # the new L1 entry is durable before the decrement
        self.file.debug_event("cluster_free")
        await self.refs.change([old >> self.cluster_bits], -1)
        await self.refs.write_back()  # at once: a crash until then leaks the old table

    async def ensure_l2_many(self, l1_indexes: list[int]) -> None:
        """:meth:`ensure_l2` for several L1 indexes (ascending), the missing
        tables made together (:meth:`_new_tables`)."""
        missing = [i for i in l1_indexes if not self.l1[i] & OFFSET_MASK]
        if missing:
            await self._new_tables(missing)
        for l1_index in l1_indexes:
            await self.ensure_l2(l1_index)

    async def _new_tables(self, l1_indexes: list[int]) -> None:
        """Give each of these L1 indexes, which have none, a new zeroed table.

        A bulk copy into a sparse image meets a new table every 512 MiB (64
        KiB clusters), and one by one each costs three fdatasyncs: a 1 TiB
        commit of scattered clusters spent most of its time in them.  So the
        tables share them: all are counted and the counters flushed, all are
        written and flushed, then the L1 entries go out together.  Each table
        is still durable before an L1 entry points at it, so a crash leaves
        at most leaked tables.
        """
        cs = self.cluster_size
        news: list[int] = []
        try:
            for _ in l1_indexes:
                news.append(await self.refs.allocate(1))
                self.meta.check(news[-1], cs, None)
            await self.refs.flush()
            for _ in news:
                self.file.debug_event("l2_alloc_write")
                self.file.debug_event("l2_update")
            empty = bytes(cs)
            await self.file.write_many([(new, empty) for new in news])
            await self.file.flush()  # the tables before the L1 pointers
        except BaseException:
            # nothing points at the new tables: give them back, at once (their
            # counters may be on disk already; a failure here leaks them)
            with contextlib.suppress(BlockIOError, OverlapError):
                await self.refs.change([new >> self.cluster_bits for new in news], -1)
                await self.refs.write_back()
            raise
        writes = []
        for l1_index, new in zip(l1_indexes, news, strict=True):
            self.meta.add(new, cs, MetaKind.L2)
            self.l2.drop(new)
            self.l2.put(new, zero_table(self.l2_entries))
            writes.append(self._l1_entry_write(l1_index, new | OFLAG_COPIED))
        await self.file.write_many(writes)
        for l1_index, new in zip(l1_indexes, news, strict=True):
            self.l1[l1_index] = new | OFLAG_COPIED

    def _l1_entry_write(self, l1_index: int, entry: int) -> tuple[int, bytes]:
        """Where and what to write for an L1 entry (checked, its event raised)."""
        pos = self.header.l1_table_offset + l1_index * 8
        self.meta.check(pos, 8, MetaKind.L1)
        self.file.debug_event("l1_update")
        return pos, struct.pack(">Q", entry)

    async def _write_l1_entry(self, l1_index: int, entry: int) -> None:
        await self.file.write(*self._l1_entry_write(l1_index, entry))
        self.l1[l1_index] = entry
