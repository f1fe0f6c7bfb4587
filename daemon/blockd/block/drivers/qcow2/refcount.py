"""Refcount table and blocks (any width 1..64 bits) and cluster allocation.

Allocation follows the crash-safe rule "refcount before reference", with
counter changes written back at the next flush, as QEMU's refcount cache
does: :meth:`Refcounts.change` only updates the cached block, and
:meth:`Refcounts.flush` (which every flush of the image goes through) writes
the changed counters, then flushes.  Whoever points at a new cluster flushes
first, so its counter is durable before the pointer is written; a crash
before that flush leaves the cluster unreferenced *and* uncounted (no leak).
A decrement is only made after the unreference is durable, so a late one
costs at most a leak.  Every new refcount block / refcount table is written
and flushed before the entry or header field that points at it.

Placement policy: a missing refcount block goes to the first free cluster;
if that cluster lies in the range the block itself covers, the block counts
itself, otherwise its counter lives in an existing block (created first if
needed).  A full refcount table is replaced by a bigger one placed, together
with the blocks describing it, at the start of the first range the old table
could not cover (all free by definition), so that area describes itself.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable

import trio

from blockd.block.drivers.qcow2.header import OFF_REFTABLE, Header
from blockd.block.drivers.qcow2.overlap import CorruptMetadata, MetadataMap, MetaKind
from blockd.block.drivers.qcow2.tables import (
    decode_table,
    encode_entries,
    zero_table,
)
from blockd.block.node import BlockNode
from blockd.errors import BlockIOError

REFTABLE_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


def get_refcount(buf: bytes | bytearray, index: int, bits: int) -> int:
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(buf[index * width : (index + 1) * width], "big")
    bit = index * bits
    return (buf[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1)


def set_refcount(buf: bytearray, index: int, bits: int, value: int) -> tuple[int, int]:
    """Store one counter; returns the byte span that changed (for a minimal write)."""
    if bits >= 8:
        width = bits // 8
        buf[index * width : (index + 1) * width] = value.to_bytes(width, "big")
        return index * width, (index + 1) * width
    bit = index * bits
    mask = ((1 << bits) - 1) << (bit & 7)
    byte = bit >> 3
    buf[byte] = (buf[byte] & ~mask) | ((value << (bit & 7)) & mask)
    return byte, byte + 1


def table_growth(old_entries: int, rt_index: int, block_entries: int, cluster_size: int
                 ) -> tuple[int, int]:
    """How a full refcount table grows to cover ``rt_index``: (new refcount
    blocks, clusters of the new table), both placed at the start of the first
    range the old table could not cover, and counted by those new blocks.

    The one formula for growing (:meth:`Refcounts._grow_table`) and for
    predicting the growth (``forecast.py``).
    """
    be, cs = block_entries, cluster_size
    want = max(rt_index + 1, (old_entries * 3 + 1) // 2)
    nblocks = 1
    while True:
        table_clusters = -(-want * 8 // cs)
        span = nblocks + table_clusters
        need_blocks = -(-span // be)
        need_entries = old_entries + (span - 1) // be + 1
        if need_blocks <= nblocks and need_entries <= want:
            return nblocks, table_clusters
        nblocks = max(nblocks, need_blocks)
        want = max(want, need_entries)


class Refcounts:
    """Counters for every host cluster, with a bounded block cache written back at each flush."""

    def __init__(
        self, file: BlockNode, header: Header, meta: MetadataMap, cache_bytes: int = 2 << 20
    ) -> None:
        self.file = file
        self.header = header
        self.meta = meta
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.bits = header.refcount_bits
        self.max_refcount = (1 << self.bits) - 1
        self.block_entries = self.cluster_size * 8 // self.bits
        self.table: array[int] = zero_table(0)
        self._cache: OrderedDict[int, bytearray] = OrderedDict()
        self._cache_blocks = max(2, cache_bytes // self.cluster_size)
        self.free_hint = 0
        #: cached blocks with counters not yet written:
        #: block offset -> (its first cluster, indices of the changed counters)
        self._dirty: dict[int, tuple[int, set[int]]] = {}
        self._held: set[int] = set()  # see hold()
        #: clusters whose counter a decrement took to 0, to punch out of the file
        self._freed: set[int] = set()
        self._writeback = trio.Lock()

    async def load(self) -> None:
        h = self.header
        nbytes = h.refcount_table_clusters << self.cluster_bits
        self.file.debug_event("reftable_load")
        raw = await self.file.read(h.refcount_table_offset, nbytes)
        self.table = decode_table(raw)

    def register_metadata(self) -> None:
        h = self.header
        self.meta.add(
            h.refcount_table_offset,
            h.refcount_table_clusters << self.cluster_bits,
            MetaKind.REFTABLE,
        )
        for entry in self.table:
            off = entry & REFTABLE_OFFSET_MASK
            # an unaligned block is corrupt, and refused when first used; as a
            # range it could cover the header and fail the header's own writes
            if off and not off & (self.cluster_size - 1):
                self.meta.add(off, self.cluster_size, MetaKind.REFBLOCK)

    def replace_table(self, table: array[int]) -> None:
        """Start over from a new refcount table whose blocks are on disk already
        (a rebuild): nothing cached or pending from the old one survives."""
        self.table = table
        self._cache.clear()
        self._dirty.clear()
        self._held.clear()
        self._freed.clear()
        self.free_hint = 0

    # -- blocks ---------------------------------------------------------------------

    async def _block(
        self, rt_index: int, *, for_update: bool = False
    ) -> tuple[int, bytearray] | None:
        """The refcount block of a table entry (None: no block), cached.

        ``for_update``: QEMU raises blkdebug's ``refblock_load`` only on the way
        to changing counters; looking counters up (allocation's search for free
        clusters, a refcount query) reads the block under no event.
        """
        if rt_index >= len(self.table):
            return None
        off = self.table[rt_index] & REFTABLE_OFFSET_MASK
        if not off:
            return None
        if off & (self.cluster_size - 1):
            index = f"{rt_index:#x}" if rt_index else "0"  # C's %#x
            raise CorruptMetadata(f"Refblock offset {off:#x} unaligned (reftable index: {index})")
        if for_update:
            self.file.debug_event("refblock_load")  # cached or not, as in QEMU
        buf = self._cache.get(off)
        if buf is None:
            loaded = bytearray(await self.file.read(off, self.cluster_size))
            buf = self._cache.get(off)  # someone may have loaded it meanwhile
            if buf is None:
                buf = self._remember(off, loaded)
        else:
            self._cache.move_to_end(off)
        return off, buf

    def _remember(self, off: int, buf: bytearray) -> bytearray:
        self._cache[off] = buf
        self._cache.move_to_end(off)
        # a block with unwritten counters stays until written back (the cache
        # may run over its budget until the next flush)
        while len(self._cache) > self._cache_blocks:
            victim = next((o for o in self._cache if o not in self._dirty), None)
            if victim is None:
                break
            del self._cache[victim]
        return buf

    def forget_clean(self) -> None:
        """Drop every cached block with nothing left to write, as if evicted."""
        for off in [o for o in self._cache if o not in self._dirty]:
            del self._cache[off]

    def hold(self, clusters: Iterable[int]) -> None:
        """Keep these clusters' new counters out of write-backs for now.

        For clusters whose data is still being written by a request that
        will make its own pointers (later, after a flush): written back by
        somebody else's flush meanwhile, they would be counted on disk long
        before anything points at them, which a crash turns into leaks.
        """
        self._held.update(clusters)

    def release(self, clusters: Iterable[int]) -> None:
        """End :meth:`hold`: the next write-back writes their counters."""
        self._held.difference_update(clusters)

    async def write_back(self, on_snapshot: Callable[[], None] | None = None) -> None:
        """Write the changed counters (but held ones) to the file, not flushed.

        ``on_snapshot`` is called right before the counters to write are
        chosen (nothing changes in between), so a caller can note which
        pointers it will write and release their clusters' counters.
        One write-back at a time, holding the lock until its writes are
        done: a later one then neither overtakes it with older values nor
        returns (to a caller about to flush) before those writes are issued.
        """
        with trio.CancelScope(shield=True):
            async with self._writeback:
                if on_snapshot is not None:
                    on_snapshot()
                pending: list[tuple[int, int, bytes]] = []
                written: list[tuple[int, int, set[int]]] = []
                for off, (first, indices) in sorted(self._dirty.items()):
                    ready = {i for i in indices if first + i not in self._held}
                    if not ready:
                        continue
                    indices -= ready
                    written.append((off, first, ready))
                    buf = self._cache[off]
                    for lo, hi in self._byte_runs(sorted(ready)):
                        pending.append((off + lo, lo, bytes(buf[lo:hi])))
                self._dirty = {off: v for off, v in self._dirty.items() if v[1]}
                try:
                    block = None
                    for pos, lo, data in pending:
                        self.meta.check(pos, len(data), MetaKind.REFBLOCK)
                        if pos - lo != block:  # once per block written, as QEMU's cache
                            block = pos - lo
                            self.file.debug_event("refblock_update_part")
                        await self.file.write(pos, data)
                except BaseException:
                    for off, first, ready in written:  # still to be written
                        self._mark_dirty(off, first, ready)
                    raise

    def _byte_runs(self, indices: list[int]) -> list[tuple[int, int]]:
        """Byte spans of the block holding these counters, adjacent ones merged."""
        runs: list[tuple[int, int]] = []
        for i in indices:
            lo = i * self.bits // 8
            hi = ((i + 1) * self.bits + 7) // 8
            if runs and lo <= runs[-1][1]:
                runs[-1] = (runs[-1][0], max(hi, runs[-1][1]))
            else:
                runs.append((lo, hi))
        return runs

    async def flush(self, on_snapshot: Callable[[], None] | None = None) -> None:
        """Changed counters to the file, then everything to stable storage.

        With counters to write, the file is flushed first as well: the data
        then goes out while no counter claims it, and the counters' own flush
        (the time a crash leaves them counting clusters nothing points at
        yet) has little left to write.  ``on_snapshot`` as for :meth:`write_back`.
        """
        if self._dirty:
            await self.file.flush()
        await self.write_back(on_snapshot)
        await self.file.flush()

    def unwritten(self) -> bool:
        """Whether a write-back would write anything (changed counters not held)."""
        return any(first + i not in self._held
                   for first, indices in self._dirty.values() for i in indices)

    def _mark_dirty(self, off: int, first: int, indices: Iterable[int]) -> None:
        entry = self._dirty.get(off)
        if entry is None:
            self._dirty[off] = (first, set(indices))
        else:
            entry[1].update(indices)

    async def get(self, cluster: int) -> int:
        blk = await self._block(cluster // self.block_entries)
        if blk is None:
            return 0
        return get_refcount(blk[1], cluster % self.block_entries, self.bits)

    async def change(self, clusters: Iterable[int], delta: int) -> None:
        """Add ``delta`` to each cluster's counter (a cluster may appear repeatedly).

        Only the cache changes; :meth:`flush` writes the counters.
        """
        by_block: dict[int, list[int]] = {}
        for c in clusters:
            by_block.setdefault(c // self.block_entries, []).append(c)
        for rt_index, members in sorted(by_block.items()):
            self.file.debug_event("refblock_alloc")
            blk = await self._block(rt_index, for_update=True)
            if blk is None:
                raise BlockIOError(
                    errno.EIO, f"qcow2: no refcount block covers cluster {members[0]}"
                )
            off, buf = blk
            # validate everything before touching the cached block
            values: dict[int, int] = {}
            for c in members:
                i = c % self.block_entries
                value = values.get(i, get_refcount(buf, i, self.bits)) + delta
                if value < 0 or value > self.max_refcount:
                    raise BlockIOError(
                        errno.EIO if value < 0 else errno.ERANGE,
                        f"qcow2: refcount of cluster {c} would become {value}",
                    )
                values[i] = value
            for i, value in values.items():
                set_refcount(buf, i, self.bits, value)
                cluster = rt_index * self.block_entries + i
                if value == 0:
                    self.free_hint = min(self.free_hint, cluster)
                    self._held.discard(cluster)  # free again: a 0 may be written any time
                    self._freed.add(cluster)
                else:
                    self._freed.discard(cluster)
            self._mark_dirty(off, rt_index * self.block_entries, values)

    async def free_runs_below(self, end: int) -> list[tuple[int, int]]:
        """The runs of clusters in ``[1, end)`` with no reference, as (first
        cluster, count): the holes the allocator fills before the file grows.
        Ranges without a refcount block are not counted (using them takes a new
        block first).
        """
        runs: list[tuple[int, int]] = []
        be = self.block_entries
        typecode = {8: "B", 16: "H", 32: "I", 64: "Q"}.get(self.bits)
        for rt_index in range(min(len(self.table), -(-end // be))):
            blk = await self._block(rt_index)
            if blk is None:
                continue
            base = rt_index * be
            lo, hi = max(1, base) - base, min(end, base + be) - base
            if typecode is not None:
                # a zero counter reads as zero whatever the byte order
                width = self.bits // 8
                if not array(typecode, blk[1][lo * width : hi * width]).count(0):
                    continue  # the common case: a full block, nothing to walk
            for i in range(lo, hi):
                if get_refcount(blk[1], i, self.bits):
                    continue
                if runs and runs[-1][0] + runs[-1][1] == base + i:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((base + i, 1))
            await trio.lowlevel.checkpoint()  # a big image has many blocks to look at
        return runs

    def freed_elsewhere(self, clusters: Iterable[int]) -> None:
        """Clusters a new table no longer counts (a rebuild): punched like freed ones."""
        self._freed.update(clusters)

    async def punch_freed(self) -> None:
        """Give the clusters freed since the last call back to the file system.

        Called under the metadata lock, so no allocation can take one of them
        while it is punched (a cluster counted again since was taken out of the
        set).  Whether the decrement is on disk yet does not matter: nothing
        points at the cluster any more (the unreference is durable before any
        decrement), so a crash costs at most a leaked cluster of zeros.  As
        discard, advisory: a file system that cannot punch keeps the data, an
        error is ignored (QEMU ignores it too).
        """
        freed, self._freed = sorted(self._freed), set()
        runs: list[list[int]] = []
        for c in freed:
            if runs and runs[-1][1] == c:
                runs[-1][1] = c + 1
            else:
                runs.append([c, c + 1])
        for first, end in runs:
            try:
                bits = self.cluster_bits
                await self.file.discard(first << bits, (end - first) << bits)
            except BlockIOError:
                pass

    async def give_back(self, clusters: Iterable[int]) -> None:
        """Uncount clusters claimed for metadata whose write failed before
        anything pointed at them; should even this fail, they are merely leaked."""
        with contextlib.suppress(BlockIOError, CorruptMetadata):
            await self.change(clusters, -1)

    # -- allocation -----------------------------------------------------------------

    async def _find_free_run(self, n: int, *, partial: bool = False) -> tuple[int, int]:
        """First run of ``n`` free clusters; with ``partial`` the first free run, up to n."""
        c = max(self.free_hint, 1)
        start, found = c, 0
        first_free: int | None = None
        while found < n:
            rt_index = c // self.block_entries
            range_end = (rt_index + 1) * self.block_entries
            blk = await self._block(rt_index)
            if blk is None:
                # no counters for this whole range: all of it is free
                if first_free is None:
                    first_free = c
                found += range_end - c
                c = range_end
                continue
            buf = blk[1]
            while c < range_end and found < n:
                if get_refcount(buf, c % self.block_entries, self.bits) == 0:
                    if first_free is None:
                        first_free = c
                    found += 1
                elif partial and found:
                    n = found
                    break
                else:
                    start, found = c + 1, 0
                c += 1
        # invariant: free_hint <= the first free cluster (callers advance it on use)
        if first_free is not None:
            self.free_hint = first_free
        return start, min(found, n)

    async def allocate(self, n: int) -> int:
        """Claim ``n`` contiguous free clusters (refcount 1, written back at the next flush)."""
        return (await self._allocate(n, partial=False))[0]

    async def allocate_run(self, n: int) -> tuple[int, int]:
        """Claim the first free run of up to ``n`` clusters: (host offset, count).

        Data does not need to be contiguous, so holes left by discards are
        reused instead of growing the file.
        """
        return await self._allocate(n, partial=True)

    async def _allocate(self, n: int, *, partial: bool) -> tuple[int, int]:
        self.file.debug_event("cluster_alloc")
        while True:
            start, count = await self._find_free_run(n, partial=partial)
            ready = True
            for rt_index in range(
                start // self.block_entries, (start + count - 1) // self.block_entries + 1
            ):
                if rt_index >= len(self.table):
                    await self._grow_table(rt_index)
                    ready = False
                    break
                if not self.table[rt_index] & REFTABLE_OFFSET_MASK:
                    await self._new_block(rt_index)
                    ready = False
                    break
            if ready:
                await self.change(range(start, start + count), +1)
                # a hold left by the clusters' previous life (freed without
                # ever being pointed at) must not hide their new counters
                self._held.difference_update(range(start, start + count))
                if self.free_hint == start:
                    self.free_hint = start + count
                return start << self.cluster_bits, count

    async def _new_block(self, rt_index: int) -> None:
        """Create the missing refcount block for table index ``rt_index``.

        It goes to the first free cluster, so blocks sit next to the data they
        describe and never split a contiguous run that is being searched for.
        """
        cluster, _n = await self._find_free_run(1)
        home = cluster // self.block_entries
        if home != rt_index and (
            home >= len(self.table) or not self.table[home] & REFTABLE_OFFSET_MASK
        ):
            # the block's own counter would need yet another block: make that first
            if home >= len(self.table):
                await self._grow_table(home)
            else:
                await self._new_block(home)
            return  # the caller restarts its search
        off = cluster << self.cluster_bits
        if self.free_hint == cluster:
            self.free_hint = cluster + 1
        self._held.discard(cluster)  # as in _allocate
        buf = bytearray(self.cluster_size)
        if home == rt_index:
            set_refcount(buf, cluster % self.block_entries, self.bits, 1)  # counts itself
        else:
            await self.change([cluster], +1)
        try:
            self.meta.check(off, self.cluster_size, None)
            self.file.debug_event("refblock_alloc_write")
            await self.file.write(off, bytes(buf))
            await self.flush()
        except BlockIOError:
            # nothing points at the block yet (a full disk refused it)
            if home == rt_index:
                self.free_hint = min(self.free_hint, cluster)
            else:
                await self.give_back([cluster])
            raise
        entry_off = self.header.refcount_table_offset + rt_index * 8
        self.meta.check(entry_off, 8, MetaKind.REFTABLE)
        self.file.debug_event("refblock_alloc_hookup")
        await self.file.write(entry_off, struct.pack(">Q", off))
        await self.flush()
        self.table[rt_index] = off
        self.meta.add(off, self.cluster_size, MetaKind.REFBLOCK)
        self._remember(off, buf)

    async def _grow_table(self, rt_index: int) -> None:
        self.file.debug_event("reftable_grow")
        cs, be = self.cluster_size, self.block_entries
        old_entries = len(self.table)
        area = old_entries * be  # first cluster no counter exists for
        nblocks, table_clusters = table_growth(old_entries, rt_index, be, cs)
        area_end = area + nblocks + table_clusters
        new_entries = table_clusters * cs // 8
        table_off = (area + nblocks) << self.cluster_bits
        # 1. the new refcount blocks, counting the whole new area (themselves + table)
        blocks: list[tuple[int, bytearray]] = []
        for i in range(nblocks):
            buf = bytearray(cs)
            lo, hi = (old_entries + i) * be, (old_entries + i + 1) * be
            for c in range(max(lo, area), min(hi, area_end)):
                set_refcount(buf, c - lo, self.bits, 1)
            blocks.append(((area + i) << self.cluster_bits, buf))
        self.file.debug_event("refblock_alloc_write_blocks")
        for off, buf in blocks:
            self.meta.check(off, cs, None)
            await self.file.write(off, bytes(buf))
        await self.flush()
        # 2. the new table: old entries, the new blocks, zeros
        new_table = array("Q", self.table)
        new_table.extend(off for off, _ in blocks)
        new_table.extend(zero_table(new_entries - len(new_table)))
        self.meta.check(table_off, table_clusters * cs, None)
        self.file.debug_event("refblock_alloc_write_table")
        await self.file.write(table_off, encode_entries(new_table))
        await self.flush()
        # 3. switch the header over in one 12-byte write
        self.meta.check(OFF_REFTABLE, 12, MetaKind.HEADER)
        self.file.debug_event("refblock_alloc_switch_table")
        await self.file.write(OFF_REFTABLE, struct.pack(">QI", table_off, table_clusters))
        await self.flush()
        old_off = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        self.header.refcount_table_offset = table_off
        self.header.refcount_table_clusters = table_clusters
        self.table = new_table
        self.meta.remove(old_off, old_clusters * cs)
        self.meta.add(table_off, table_clusters * cs, MetaKind.REFTABLE)
        for off, buf in blocks:
            self.meta.add(off, cs, MetaKind.REFBLOCK)
            self._remember(off, buf)
        # 4. only now give the old table back (a crash before this merely leaks it)
        first = old_off >> self.cluster_bits
        await self.change(range(first, first + old_clusters), -1)
        await self.write_back()
        await self.punch_freed()
