"""L1/L2 entries (decoding) and a bounded cache of decoded L2 tables.

A cached table may be ahead of the disk: an allocating write's new entries
are set in it at once and written at the next flush (``writeback.py``).  Such
a table is kept (:meth:`L2Cache.keep`) until they are written; every other
table matches the disk, so evicting it is free.
"""

from __future__ import annotations

import enum
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterable

OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1_RESERVED = 0x7F000000000001FF
SECTOR = 512


class ClusterKind(enum.Enum):
    UNALLOCATED = "unallocated"  # entry 0: falls through to the backing chain
    ZERO_PLAIN = "zero-plain"  # zero flag, no host cluster
    ZERO_ALLOC = "zero-alloc"  # zero flag, host cluster still owned
    NORMAL = "normal"
    COMPRESSED = "compressed"


def classify(entry: int) -> ClusterKind:
    """What a standard (64-bit) L2 entry means for a reader."""
    if entry & OFLAG_COMPRESSED:
        return ClusterKind.COMPRESSED
    if entry & OFLAG_ZERO:
        return ClusterKind.ZERO_ALLOC if entry & OFFSET_MASK else ClusterKind.ZERO_PLAIN
    if entry & OFFSET_MASK:
        return ClusterKind.NORMAL
    return ClusterKind.UNALLOCATED


def compressed_range(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, byte count) of a compressed cluster's deflate stream."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    nsectors = (entry >> x) & ((1 << (cluster_bits - 8)) - 1)
    return offset, (nsectors + 1) * SECTOR - (offset % SECTOR)


def host_clusters_of_range(offset: int, length: int, cluster_bits: int) -> range:
    """Indices of the host clusters a byte range touches (what refcounts count)."""
    return range(offset >> cluster_bits, ((offset + length - 1) >> cluster_bits) + 1)


def decode_table(buf: bytes) -> array[int]:
    """Big-endian u64 table -> compact array (8 bytes/entry, not a list of objects)."""
    table = array("Q")
    table.frombytes(buf[: len(buf) // 8 * 8])
    if sys.byteorder == "little":
        table.byteswap()
    return table


def zero_table(entries: int) -> array[int]:
    return array("Q", bytes(entries * 8))


def encode_entries(entries: Iterable[int]) -> bytes:
    table = array("Q", entries)
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()


class L2Cache:
    """Decoded L2 tables by host offset, least recently used evicted first.

    Bounded by bytes rather than tables so 2 MiB clusters cannot blow memory up.
    A table :meth:`keep` s holds entries not yet on disk; it is neither
    evicted nor dropped until every :meth:`keep` is matched by :meth:`unkeep`
    (the cache may then run over its budget for a moment).
    """

    def __init__(self, budget_bytes: int, cluster_size: int) -> None:
        self.capacity = max(2, budget_bytes // cluster_size)
        self._tables: OrderedDict[int, array[int]] = OrderedDict()
        self._kept: dict[int, int] = {}

    def get(self, offset: int) -> array[int] | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    def put(self, offset: int, table: array[int]) -> array[int]:
        existing = self._tables.get(offset)
        if existing is not None:  # a concurrent loader won: keep one copy
            return existing
        self._tables[offset] = table
        self._evict()
        return table

    def _evict(self) -> None:
        while len(self._tables) > self.capacity:
            victim = next((off for off in self._tables if off not in self._kept), None)
            if victim is None:
                return
            del self._tables[victim]

    def drop(self, offset: int) -> None:
        if offset not in self._kept:
            self._tables.pop(offset, None)

    def forget(self) -> None:
        """Drop every table but the kept ones, as if evicted."""
        for offset in [off for off in self._tables if off not in self._kept]:
            del self._tables[offset]

    def keep(self, offset: int) -> None:
        self._kept[offset] = self._kept.get(offset, 0) + 1

    def unkeep(self, offset: int) -> None:
        left = self._kept[offset] - 1
        if left:
            self._kept[offset] = left
        else:
            del self._kept[offset]
            self._evict()

    def kept_tables(self) -> int:
        return len(self._kept)

    def __len__(self) -> int:
        return len(self._tables)
