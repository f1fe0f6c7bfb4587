"""What a sequence of writes would allocate in the image, worked out without writing.

A commit plan asks this of base before the copy starts.  The writes are
played, in the order given, on a copy of the L2 entries they touch, making
the decisions the writing code makes: an allocating write takes a new
cluster unless the old one is a normal cluster of this image
(``allocation.py``); a zero write writes partial clusters as data unless they
read as zeros already and gives whole clusters the zero flag, or on version 2
leaves them unallocated, or without another way to hide a backing file
writes real zeros (``zeroing.py``); a new L2 table is a cluster the first
time an L1 entry needs one (``mapping.py``); growing the virtual size takes
a new L1 table and frees the old (``resize.py``).

New clusters come first from the free clusters inside the file, as the
allocator takes the first free run, and only then from the end of the file;
clusters freed on the way (the old L1 table, data a zero write replaced) are
punched out of the file and become free again.  The growth is the change in
the space the file takes: a free cluster the file system still holds costs
nothing to fill, a punched one or a new one at the end costs a cluster, and
a freed one gives a cluster back, so a commit that frees more than it adds
makes the file smaller (negative growth).  At the end, a cluster in a range no refcount
block covers takes a block first, placed at that same spot (so it counts
itself), and a full refcount table is replaced by a bigger one there, the
same arithmetic ``refcount.py`` grows it by.

Not modelled, each costing at most its own clusters: the host clusters a
compressed cluster shares with others (freeing one is counted as freeing
nothing), and a multi-cluster L1 table fitting in a hole (it is taken from
the end).  What a data write replaces (a zero-allocated, compressed or
shared cluster) is freed at the flush that ends the writes, as a plain
write frees it at the next flush: a bulk copy (freeing at once) or a flush
forced on the way (65,536 entries waiting) may reuse it sooner, so the
growth is then overstated by at most those clusters, never understated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import trio

from blockd.block.drivers.qcow2.mapping import FREEABLE, Mapping
from blockd.block.drivers.qcow2.refcount import Refcounts, table_growth
from blockd.block.drivers.qcow2.tables import (
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
    ClusterKind,
    classify,
)
from blockd.block.node import BlockNode, PlannedWrite, Status, WriteForecast

#: The entry a cluster written during the forecast gets: a normal cluster of
#: this image (no host offset is chosen, only that it is one).
_WRITTEN = OFLAG_COPIED | (OFFSET_MASK & ~0xFFFF)
#: The entries the writes can leave (position 0: unchanged).
_CODES = (-1, _WRITTEN, OFLAG_ZERO, 0)


#: The smallest cluster whose hole punched in the file gives space back: file
#: systems free whole blocks (4 KiB), so smaller clusters are taken as staying
#: allocated when freed.
PUNCH_GRANULE = 4096


class _HostFile:
    """The host clusters as the allocator hands them out: free clusters inside
    the file first, then the end; and what that does to the space the file takes.

    A free cluster is either still allocated in the file system (freed by a
    writer that did not punch it) or a hole (punched): filling the first costs
    no space, filling the second does.  Which of them the allocator meets
    first is not modelled: the allocated ones are taken first, so a mix errs
    towards less growth by at most their number.  Clusters freed on the way
    are punched (``refcount.py``), giving their space back.
    """

    def __init__(self, end: int, allocated: int, punched: int, refs: Refcounts) -> None:
        self.end = end
        #: free clusters inside the file, still allocated / punched out
        self.allocated = allocated
        self.punched = punched
        self.punch_frees = refs.cluster_size >= PUNCH_GRANULE
        #: the space the file takes, in clusters, beyond what ``end`` says
        self.space = 0
        #: the most clusters the file took beyond its start at any moment
        self.start = end
        self.peak = 0
        self.block_entries = refs.block_entries
        self.cluster_size = refs.cluster_size
        self.table_entries = len(refs.table)
        self.blocks = {i for i, e in enumerate(refs.table) if e}
        #: clusters taken, by what for
        self.taken = {"data": 0, "l2": 0, "l1": 0, "refblock": 0, "reftable": 0}

    def take(self, what: str, n: int = 1) -> None:
        """``n`` clusters for ``what``; several must be contiguous, so they come from the end."""
        self.taken[what] += n
        if n == 1:
            if not self.allocated and not self.punched:
                self._cover()  # growing the refcount table frees the old one: a hole
            if self.allocated:
                self.allocated -= 1
            elif self.punched:
                self.punched -= 1
                self.space += 1
            else:
                self.end += 1
        else:
            for _ in range(n):
                self._cover()
                self.end += 1
        self.peak = max(self.peak, self.growth)

    @property
    def growth(self) -> int:
        """Clusters the file takes beyond what it took at the start."""
        return self.end - self.start + self.space

    def give(self, n: int) -> None:
        """``n`` clusters freed, and punched out of the file where that frees space."""
        if self.punch_frees:
            self.punched += n
            self.space -= n
        else:
            self.allocated += n

    def _cover(self) -> None:
        """Make a counter exist for the cluster at the end: a new block, the
        table grown first if it has no entry for it; each lands at the end."""
        be = self.block_entries
        while True:
            rt_index = self.end // be
            if rt_index >= self.table_entries:
                old_entries = self.table_entries
                nblocks, table_clusters = table_growth(
                    old_entries, rt_index, be, self.cluster_size
                )
                self.end = max(self.end, old_entries * be + nblocks + table_clusters)
                self.taken["refblock"] += nblocks
                self.taken["reftable"] += table_clusters
                self.blocks.update(range(old_entries, old_entries + nblocks))
                self.table_entries = table_clusters * self.cluster_size // 8
                # the old table, freed once the header names the new one
                self.give(-(-old_entries * 8 // self.cluster_size))
            elif rt_index not in self.blocks:
                self.blocks.add(rt_index)  # at the end, counting itself
                self.taken["refblock"] += 1
                self.end += 1
            else:
                return


async def _data_bytes(file: BlockNode, offset: int, length: int) -> int:
    """How much of a range of the host file the file system holds (not holes)."""
    held, end = 0, min(offset + length, file.size)
    while offset < end:
        status, n = await file.block_status(offset, end - offset)
        if status is Status.DATA:
            held += n
        offset += n
    return held


class Forecast:
    """One forecast over an image's mapping and counters (read, never changed)."""

    def __init__(
        self,
        mapping: Mapping,
        host: _HostFile,
        has_backing: Callable[[], bool],
        backing_size: Callable[[], int | None],
    ) -> None:
        self.mapping = mapping
        self.host = host
        self.header = mapping.header
        self.has_backing = has_backing
        self.backing_size = backing_size
        self.cs = mapping.cluster_size
        self.n_l2 = mapping.l2_entries
        self.size = self.header.size
        self.l1_size = len(mapping.l1)
        #: entries the writes so far changed, a byte per cluster of each L2
        #: table touched (an index into _CODES; 0: unchanged)
        self._changed: dict[int, bytearray] = {}
        #: L1 indices given a table by the writes so far
        self._new_tables: set[int] = set()
        #: what data writes replaced, freed only at the flush that ends the writes
        self._replaced: list[int] = []

    @classmethod
    async def start(
        cls,
        mapping: Mapping,
        refs: Refcounts,
        has_backing: Callable[[], bool],
        backing_size: Callable[[], int | None],
        lock: trio.Lock,
    ) -> Forecast:
        """A forecast from the image as it is now: its file's end and its free
        clusters, told apart by whether the file system still holds them."""
        cs = mapping.cluster_size
        end = -(-mapping.file.size // cs)
        allocated = punched = 0
        async with lock:
            for first, n in await refs.free_runs_below(end):
                held = n
                if cs >= PUNCH_GRANULE:
                    held = min(n, -(-await _data_bytes(mapping.file, first * cs, n * cs) // cs))
                allocated += held
                punched += n - held
        return cls(mapping, _HostFile(end, allocated, punched, refs), has_backing, backing_size)

    async def run(
        self, size: int, writes: AsyncIterator[PlannedWrite], lock: trio.Lock
    ) -> WriteForecast:
        """Grow to ``size`` (if bigger), make ``writes``: what that takes."""
        cs, host = self.cs, self.host
        start = host.start
        if size > self.size:
            await self._grow(size, lock)
        async for offset, length, zero in writes:
            if length <= 0:
                continue
            async with lock:
                if zero:
                    await self._zero(offset, length)
                else:
                    await self._write(offset, offset + length)
        for entry in self._replaced:
            self._free(entry)
        taken = host.taken
        grown = (host.end - start) * cs
        return WriteForecast(
            cluster_size=cs,
            clusters=taken["data"],
            data=taken["data"] * cs,
            l2_tables=taken["l2"] * cs,
            refcount_blocks=taken["refblock"] * cs,
            refcount_table=taken["reftable"] * cs,
            l1_table=taken["l1"] * cs,
            reused=sum(taken.values()) * cs - grown,
            growth=host.growth * cs,
            peak=host.peak * cs,
            file_growth=grown,
            upper_bound=False,
        )

    # -- the decisions of the writing code --------------------------------------------

    async def _entries_of(self, first: int, last_excl: int) -> list[int]:
        """The entries of guest clusters [first, last_excl), the writes so far applied."""
        out = list(await self.mapping.entries(first, last_excl - first))
        n_l2 = self.n_l2
        c = first
        while c < last_excl:
            l1_index, i = divmod(c, n_l2)
            n = min(last_excl - c, n_l2 - i)
            changes = self._changed.get(l1_index)
            if changes is not None and changes[i : i + n].count(0) != n:
                for j, code in enumerate(changes[i : i + n]):
                    if code:
                        out[c - first + j] = _CODES[code]
            c += n
        return out

    def _set(self, cluster: int, entry: int) -> None:
        l1_index, i = divmod(cluster, self.n_l2)
        changes = self._changed.get(l1_index)
        if changes is None:
            changes = self._changed[l1_index] = bytearray(self.n_l2)
        changes[i] = _CODES.index(entry)

    def _has_table(self, l1_index: int) -> bool:
        if l1_index in self._new_tables:
            return True
        l1 = self.mapping.l1
        return l1_index < len(l1) and bool(l1[l1_index] & OFFSET_MASK)

    def _ensure_l2(self, l1_index: int) -> None:
        if not self._has_table(l1_index):
            self._new_tables.add(l1_index)
            self.host.take("l2")

    def _free(self, entry: int) -> None:
        """Give back what an entry held; a compressed cluster's host cluster may
        hold others too, so freeing one counts as nothing."""
        if classify(entry) in (ClusterKind.NORMAL, ClusterKind.ZERO_ALLOC):
            self.host.give(1)

    async def _grow(self, size: int, lock: trio.Lock) -> None:
        need = -(-size // (self.cs * self.n_l2))
        if need > self.l1_size:
            old = -(-self.l1_size * 8 // self.cs) if self.l1_size else 0
            self.host.take("l1", -(-need * 8 // self.cs))
            self.host.give(old)
        old_size = self.size
        self.size = size
        zero_end = -(-old_size // self.cs) * self.cs
        backing = self.backing_size()
        if backing is not None:
            zero_end = max(zero_end, backing)
        elif self.header.backing_file:
            zero_end = size
        zero_end = min(zero_end, size)
        if zero_end > old_size:
            async with lock:
                await self._zero(old_size, zero_end - old_size)

    async def _write(self, offset: int, end: int) -> None:
        """An allocating write (``Allocator.plan``), or one in place."""
        cs = self.cs
        first, last = offset // cs, (end - 1) // cs
        for l1_index in range(first // self.n_l2, last // self.n_l2 + 1):
            self._ensure_l2(l1_index)
        for i, entry in enumerate(await self._entries_of(first, last + 1)):
            if classify(entry) is ClusterKind.NORMAL and entry & OFLAG_COPIED:
                continue
            self.host.take("data")
            self._set(first + i, _WRITTEN)
            if classify(entry) in FREEABLE:
                # the writing code drops it once the new entry is durable:
                # at the next flush (allocation.py's complete)
                self._replaced.append(entry)

    async def _zero(self, offset: int, length: int) -> None:
        """``Zeroing.zero``: partial clusters as data unless they read as zeros,
        whole clusters by their entry."""
        cs = self.cs
        end = offset + length
        first = -(-offset // cs)
        last_excl = -(-self.size // cs) if end >= self.size else end // cs
        last_excl = max(first, last_excl)
        for lo, hi in ((offset, min(end, first * cs)), (max(offset, last_excl * cs), end)):
            if hi > lo and not await self._reads_as_zero(lo // cs):
                await self._write(lo, hi)
        if last_excl <= first:
            return
        if self.header.version >= 3:
            await self._replace(first, last_excl, OFLAG_ZERO)
        elif not self.has_backing():
            await self._replace(first, last_excl, 0)
        else:
            await self._write(first * cs, min(last_excl * cs, self.size))

    async def _reads_as_zero(self, cluster: int) -> bool:
        kind = classify((await self._entries_of(cluster, cluster + 1))[0])
        if kind in (ClusterKind.ZERO_PLAIN, ClusterKind.ZERO_ALLOC):
            return True
        return kind is ClusterKind.UNALLOCATED and not self.has_backing()

    async def _replace(self, first: int, last_excl: int, new_entry: int) -> None:
        """``Zeroing._replace_entries``: which entries change, the tables they
        need, and what they held."""
        has_backing = self.has_backing()
        changed: list[int] = []
        freed: list[int] = []
        for i, entry in enumerate(await self._entries_of(first, last_excl)):
            c = first + i
            if entry == new_entry:
                continue
            if entry == 0 and new_entry == OFLAG_ZERO and not has_backing:
                continue
            if new_entry == 0 and not self._has_table(c // self.n_l2):
                continue
            changed.append(c)
            if classify(entry) in FREEABLE:
                freed.append(entry)
        for l1_index in sorted({c // self.n_l2 for c in changed}):
            self._ensure_l2(l1_index)
        for c in changed:
            self._set(c, new_entry)
        for entry in freed:
            self._free(entry)
