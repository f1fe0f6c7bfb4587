"""Growing the virtual size (QEMU's order since 5.x).

A bigger L1 table (exact size) is written and flushed, the header is
switched to it (bytes 36..47, one write), the old table is freed, and only
then the size changes.  The new area must read as zeros: neither stale bytes
in the old last cluster nor a longer backing file may show through.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable

from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2.mapping import Mapping
from blockd.block.drivers.qcow2.overlap import MetaKind
from blockd.block.drivers.qcow2.refcount import Refcounts
from blockd.block.drivers.qcow2.tables import encode_entries, host_clusters_of_range, zero_table
from blockd.block.drivers.qcow2.zeroing import Zeroing
from blockd.block.node import BlockNode
from blockd.errors import BlockError, BlockIOError


class Resizer:
    def __init__(
        self,
        mapping: Mapping,
        refs: Refcounts,
        zeroing: Zeroing,
        backing: Callable[[], BlockNode | None],
    ) -> None:
        self.mapping = mapping
        self.file = mapping.file
        self.meta = mapping.meta
        self.header = mapping.header
        self.refs = refs
        self.zeroing = zeroing
        self.backing = backing

    async def grow(self, size: int) -> None:
        """Set the virtual size to ``size`` (callers hold the lock, shielded, with
        no allocating write in flight)."""
        mapping, file, meta, refs = self.mapping, self.file, self.meta, self.refs
        cs = mapping.cluster_size
        h = self.header
        old_size = h.size
        need = -(-size // (cs * mapping.l2_entries))
        if need * 8 > hdr.MAX_L1_BYTES:
            raise BlockError(f"qcow2: virtual size {size} needs an L1 table larger than "
                             f"{hdr.MAX_L1_BYTES} bytes; use bigger clusters")
        if need > h.l1_size:
            nclusters = -(-need * 8 // cs)
            file.debug_event("l1_grow_alloc_table")
            new = await refs.allocate(nclusters)
            table = array("Q", mapping.l1)
            table.extend(zero_table(need - len(mapping.l1)))
            raw = encode_entries(table)
            try:
                meta.check(new, nclusters * cs, None)
                file.debug_event("l1_grow_write_table")
                await file.write(new, raw + bytes(nclusters * cs - len(raw)))
                await refs.flush()
            except BlockIOError:
                # nothing points at the new table yet (a full disk refused it)
                first = new >> mapping.cluster_bits
                await refs.give_back(range(first, first + nclusters))
                raise
            meta.check(hdr.OFF_L1, 12, MetaKind.HEADER)
            file.debug_event("l1_grow_activate_table")
            await file.write(hdr.OFF_L1, struct.pack(">IQ", need, new))
            await refs.flush()
            old_off, old_n = h.l1_table_offset, h.l1_size
            h.l1_size, h.l1_table_offset = need, new
            mapping.l1 = table
            if old_n:
                meta.remove(old_off, old_n * 8)
            meta.add(new, need * 8, MetaKind.L1)
            if old_n:
                await refs.change(
                    host_clusters_of_range(old_off, old_n * 8, mapping.cluster_bits), -1
                )
                await refs.write_back()
                await refs.punch_freed()
        meta.check(hdr.OFF_SIZE, 8, MetaKind.HEADER)
        await file.write(hdr.OFF_SIZE, struct.pack(">Q", size))
        await refs.flush()
        h.size = size
        zero_end = -(-old_size // cs) * cs
        backing = self.backing()
        if backing is not None:
            zero_end = max(zero_end, backing.size)
        elif h.backing_file:
            zero_end = size  # backing not open: its size is unknown, be safe
        zero_end = min(zero_end, size)
        if zero_end > old_size:
            await self.zeroing.zero(old_size, zero_end - old_size)
