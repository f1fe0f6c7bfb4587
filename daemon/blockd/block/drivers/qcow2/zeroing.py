"""Zero writes and discards: whole clusters get a new entry, partial ones data.

A whole cluster is pointed at the zero flag (version 3) or left unallocated,
and the cluster it held is freed: the new entry is written at once after a
flush, and the decrement follows the flush that made it durable.  Partial
clusters of a zero write are written as zeros unless they read as zeros
already; those of a discard are left alone (discard is advisory), as QEMU
does.
"""

from __future__ import annotations

from collections.abc import Callable

from blockd.block.drivers.qcow2.allocation import Allocator
from blockd.block.drivers.qcow2.mapping import FREEABLE, Mapping
from blockd.block.drivers.qcow2.payload import BytesPayload
from blockd.block.drivers.qcow2.refcount import Refcounts
from blockd.block.drivers.qcow2.tables import OFFSET_MASK, OFLAG_ZERO, ClusterKind, classify
from blockd.block.drivers.qcow2.writeback import L2Writeback


class Zeroing:
    """Callers hold the lock, shielded, with no allocating write on the range."""

    def __init__(
        self,
        mapping: Mapping,
        refs: Refcounts,
        writeback: L2Writeback,
        allocator: Allocator,
        has_backing: Callable[[], bool],
    ) -> None:
        self.mapping = mapping
        self.header = mapping.header
        self.refs = refs
        self.writeback = writeback
        self.allocator = allocator
        #: whether unallocated clusters show something other than zeros to anyone
        self.has_backing = has_backing

    async def zero(self, offset: int, length: int) -> None:
        cs = self.mapping.cluster_size
        end = offset + length
        first, last_excl = self._full_clusters(offset, length)
        # partial head/tail clusters: zeros as data unless they already read as zero
        pieces = [(offset, min(end, first * cs)), (max(offset, last_excl * cs), end)]
        for lo, hi in pieces:
            if hi > lo and not await self._reads_as_zero_here(lo // cs):
                await self.allocator.write(BytesPayload(lo, bytes(hi - lo)))
        if last_excl <= first:
            return
        if self.header.version >= 3:
            await self._replace_entries(first, last_excl, OFLAG_ZERO)
        elif not self.has_backing():
            await self._replace_entries(first, last_excl, 0)
        else:  # v2 with a backing file has no other way to hide it than real zeros
            lo, hi = first * cs, min(last_excl * cs, self.header.size)
            step = 256 * cs
            for pos in range(lo, hi, step):
                await self.allocator.write(BytesPayload(pos, bytes(min(step, hi - pos))))

    async def discard(self, offset: int, length: int) -> None:
        first, last_excl = self._full_clusters(offset, length)
        # with a backing file, a zero entry keeps the backing data from showing through
        hide = self.header.version >= 3 and self.has_backing()
        new_entry = OFLAG_ZERO if hide else 0
        await self._replace_entries(first, last_excl, new_entry)

    def _full_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """Guest clusters wholly inside the range (the image's end counts as a boundary)."""
        cs = self.mapping.cluster_size
        size = self.header.size
        end = offset + length
        first = -(-offset // cs)
        last_excl = -(-size // cs) if end >= size else end // cs
        return first, max(first, last_excl)

    async def _replace_entries(self, first: int, last_excl: int, new_entry: int) -> None:
        """Point whole clusters at ``new_entry`` (zero/unallocated), freeing what they held."""
        if last_excl <= first:
            return
        mapping = self.mapping
        entries = await mapping.entries(first, last_excl - first)
        n_l2, l1 = mapping.l2_entries, mapping.l1
        updates: dict[int, int] = {}
        old: list[int] = []
        for i, entry in enumerate(entries):
            if entry == new_entry:
                continue
            if entry == 0 and new_entry == OFLAG_ZERO and not self.has_backing():
                continue  # already reads as zeros; no need for an L2 table
            c = first + i
            if new_entry == 0 and c // n_l2 >= len(l1):
                continue
            if new_entry == 0 and not l1[c // n_l2] & OFFSET_MASK:
                continue
            updates[c] = new_entry
            if classify(entry) in FREEABLE:
                old.append(entry)
        if not updates:
            return
        for l1_index in sorted({c // n_l2 for c in updates}):
            await mapping.ensure_l2(l1_index)
        old += await self.writeback.write_now(updates)
        if old:
            await self.refs.flush()
            await self.writeback.release(old)

    async def _reads_as_zero_here(self, cluster: int) -> bool:
        kind = classify((await self.mapping.entries(cluster, 1))[0])
        if kind in (ClusterKind.ZERO_PLAIN, ClusterKind.ZERO_ALLOC):
            return True
        return kind is ClusterKind.UNALLOCATED and not self.has_backing()
