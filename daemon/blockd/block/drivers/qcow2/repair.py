"""Rebuilding the counters of a dirty image before its first write.

The dirty bit (incompatible bit 0) says lazy refcounts were in use and not
written back: counters on disk may be too low, so allocating from them would
hand out clusters still in use.  Before anything else is written, every
reference is counted again -- the header cluster, the active L1 table and
each snapshot's, the L2 tables they name and the host clusters those point at
(a compressed stream by the bytes it covers), the snapshot table -- and a new
refcount structure holding exactly those counts replaces the old one.  The
old table and blocks are not counted: they become free clusters.  Bitmaps
need no counting: a read-write open clears their autoclear bit first, after
which no reader follows the bitmaps extension.

Crash safety comes from never overwriting what the image uses until one
small switch:

1. the new blocks and table are written past the end of the file (and past
   every counted cluster), then flushed;
2. one 12-byte header write (inside the first sector) points at them, flushed;
3. OFLAG_COPIED flags of the active tables that disagree with the new counts
   are corrected (a flag only says whether a cluster is shared), flushed;
4. the dirty bit is cleared, flushed.

The L1/L2 tables keep their offsets throughout, so the image reads the same
after a crash at any point: before 4 it is still dirty (the next read-write
open, ours or QEMU's, counts again), after it it is clean.

An image whose tables cannot be counted (unaligned offsets, references past
the end of the file, counters that would overflow), or whose repair would
write over other metadata (an L1 entry naming the L1 table itself as an L2
table), is not repaired: every write is planned and checked before the first
one, so the open fails and the image stays as it was for
``qemu-img check -r all``.  (QEMU meets the second kind part-way through its
repair, and marks the image corrupt.)
"""

from __future__ import annotations

import dataclasses
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence

from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2.mapping import Mapping, referenced_clusters
from blockd.block.drivers.qcow2.overlap import MetadataMap, MetaKind, OverlapError
from blockd.block.drivers.qcow2.refcount import REFTABLE_OFFSET_MASK, Refcounts, set_refcount
from blockd.block.drivers.qcow2.snapshots import Snapshot
from blockd.block.drivers.qcow2.tables import (
    OFFSET_MASK,
    OFLAG_COPIED,
    ClusterKind,
    classify,
    decode_table,
    encode_entries,
    host_clusters_of_range,
)
from blockd.block.node import BlockNode
from blockd.errors import ImageError

#: QEMU's bound on an L1 table (also a snapshot's)
MAX_L1_BYTES = 32 << 20


class UnrepairableImage(ImageError):
    """The tables of a dirty image are inconsistent in a way a recount cannot settle."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"qcow2: Image is dirty and cannot be repaired on open ({reason}); "
            "repair it with 'qemu-img check -r all'"
        )


class Counts:
    """References per host cluster, for clusters inside the file only."""

    def __init__(self, file_size: int, cluster_bits: int, max_refcount: int) -> None:
        self.cluster_bits = cluster_bits
        self.max_refcount = max_refcount
        nclusters = -(-file_size >> cluster_bits)
        # the narrowest type that holds any valid counter (memory: one per cluster)
        code = "H" if max_refcount < 1 << 16 else "I" if max_refcount < 1 << 32 else "Q"
        self.counts: array[int] = array(code, bytes(nclusters * array(code).itemsize))

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, cluster: int) -> int:
        return self.counts[cluster] if cluster < len(self.counts) else 0

    def add_clusters(self, clusters: Iterable[int], what: str) -> None:
        counts = self.counts
        for c in clusters:
            if c >= len(counts):
                raise UnrepairableImage(
                    f"{what} at {c << self.cluster_bits:#x} lies past the end of the file"
                )
            value = counts[c] + 1
            if value > self.max_refcount:
                raise UnrepairableImage(
                    f"cluster at {c << self.cluster_bits:#x} has more references than "
                    "its refcount width holds"
                )
            counts[c] = value

    def add_range(self, offset: int, length: int, what: str) -> None:
        if length > 0:
            self.add_clusters(host_clusters_of_range(offset, length, self.cluster_bits), what)


async def count_references(
    file: BlockNode,
    header: hdr.Header,
    l1: Sequence[int],
    snapshots: Sequence[Snapshot],
    snapshot_table_bytes: int,
) -> Counts:
    """Every reference the image's tables hold, the refcount structure's own left out."""
    cs = header.cluster_size
    counts = Counts(file.size, header.cluster_bits, (1 << header.refcount_bits) - 1)
    counts.add_range(0, cs, "the header")
    # each L2 table's references to data, read once however many L1 tables share it
    l2_refs: dict[int, array[int]] = {}

    async def l1_table(offset: int, entries: Sequence[int] | None, size: int, what: str) -> None:
        if not size:
            return
        if offset & (cs - 1):
            raise UnrepairableImage(f"{what} offset {offset:#x} unaligned")
        if size * 8 > MAX_L1_BYTES:
            raise UnrepairableImage(f"{what} too large")
        counts.add_range(offset, size * 8, what)
        if entries is None:
            entries = decode_table(await file.read(offset, size * 8))
        for entry in entries:
            l2_off = entry & OFFSET_MASK
            if not l2_off:
                continue
            if l2_off & (cs - 1):
                raise UnrepairableImage(f"L2 table offset {l2_off:#x} unaligned")
            counts.add_range(l2_off, cs, "an L2 table")
            refs = l2_refs.get(l2_off)
            if refs is None:
                refs = l2_refs[l2_off] = await _l2_references(file, header, l2_off)
            counts.add_clusters(refs, "a data cluster")

    await l1_table(header.l1_table_offset, l1, header.l1_size, "L1 table")
    for sn in snapshots:
        await l1_table(sn.l1_table_offset, None, sn.l1_size, f"snapshot {sn.id!r} L1 table")
    if header.nb_snapshots:
        counts.add_range(header.snapshots_offset, snapshot_table_bytes, "the snapshot table")
    return counts


async def _l2_references(file: BlockNode, header: hdr.Header, l2_off: int) -> array[int]:
    """The host clusters one L2 table's entries reference (once per reference)."""
    cs, bits = header.cluster_size, header.cluster_bits
    if l2_off + cs > file.size:
        raise UnrepairableImage(f"L2 table at {l2_off:#x} lies past the end of the file")
    in_file = -(-file.size >> bits)
    out: array[int] = array("Q")
    for entry in decode_table(await file.read(l2_off, cs)):
        if not entry:
            continue
        kind = classify(entry)
        if kind is ClusterKind.COMPRESSED:
            # the sector count may reach a little past the stream (and the file's end)
            out.extend(c for c in referenced_clusters(entry, bits) if c < in_file)
            continue
        if kind in (ClusterKind.NORMAL, ClusterKind.ZERO_ALLOC) and (
            entry & OFFSET_MASK & (cs - 1)
        ):
            raise UnrepairableImage(f"cluster offset {entry & OFFSET_MASK:#x} unaligned")
        out.extend(referenced_clusters(entry, bits))
    return out


@dataclasses.dataclass(frozen=True)
class Structure:
    """A new refcount structure: blocks then table, contiguous from ``offset``."""

    offset: int
    #: refcount table entries (block offsets, 0 where no cluster is counted)
    table: array[int]
    table_clusters: int
    #: the blocks' contents, in the order they are laid out
    blocks: list[bytes]

    def clusters(self) -> int:
        return len(self.blocks) + self.table_clusters

    def image(self, cluster_size: int) -> bytes:
        raw = encode_entries(self.table)
        return b"".join(self.blocks) + raw + bytes(self.table_clusters * cluster_size - len(raw))


def plan_structure(counts: Counts, cluster_size: int, refcount_bits: int) -> Structure:
    """Lay out blocks and table past every counted cluster, counting themselves too."""
    per_block = cluster_size * 8 // refcount_bits
    start = len(counts)
    values = counts.counts
    used = {r for r in range(-(-start // per_block))
            if any(values[r * per_block : (r + 1) * per_block])}
    nblocks, table_clusters = 0, 0
    while True:
        end = start + nblocks + table_clusters
        entries = -(-end // per_block)
        ranges = used | set(range(start // per_block, entries))
        want_blocks = len(ranges)
        want_table = -(-entries * 8 // cluster_size)
        if want_blocks <= nblocks and want_table <= table_clusters:
            break
        nblocks, table_clusters = max(nblocks, want_blocks), max(table_clusters, want_table)
    end = start + nblocks + table_clusters
    entries = table_clusters * cluster_size // 8
    table: array[int] = array("Q", bytes(entries * 8))
    blocks: list[bytes] = []
    for i, r in enumerate(sorted(ranges)):
        table[r] = (start + i) * cluster_size
        first = r * per_block
        own = values[first : first + per_block]
        # the new structure counts itself
        own.extend([1] * (min(first + per_block, end) - max(first, start)))
        blocks.append(_block(own, refcount_bits, cluster_size))
    return Structure(start * cluster_size, table, table_clusters, blocks)


#: array type codes of the refcount widths that are whole bytes
_WHOLE_BYTES = {8: "B", 16: "H", 32: "I", 64: "Q"}


def _block(values: array[int], bits: int, cluster_size: int) -> bytes:
    """One refcount block holding ``values`` from its first counter on."""
    code = _WHOLE_BYTES.get(bits)
    if code is not None:
        counters = array(code, values)
        if sys.byteorder == "little":
            counters.byteswap()
        raw = counters.tobytes()
        return raw + bytes(cluster_size - len(raw))
    buf = bytearray(cluster_size)
    for i, n in enumerate(values):
        if n:
            set_refcount(buf, i, bits, n)
    return bytes(buf)


@dataclasses.dataclass(frozen=True)
class Repair:
    """Everything a rebuild writes, worked out and checked before its first write."""

    counts: Counts
    structure: Structure
    #: OFLAG_COPIED corrections: (file offset, new entry, the table's kind)
    copied_fixes: list[tuple[int, int, MetaKind]]


async def plan_repair(
    file: BlockNode, header: hdr.Header, mapping: Mapping, meta: MetadataMap, counts: Counts
) -> Repair:
    """The rebuild of a dirty image whose references are ``counts``
    (:func:`count_references`); refused if any of its writes would land on
    metadata of another kind."""
    cs = header.cluster_size
    repair = Repair(counts, plan_structure(counts, cs, header.refcount_bits),
                    await _copied_flag_fixes(file, header, mapping, counts))
    try:
        meta.check(repair.structure.offset, repair.structure.clusters() * cs, None)
        meta.check(hdr.OFF_REFTABLE, 12, MetaKind.HEADER)
        for pos, _entry, kind in repair.copied_fixes:
            meta.check(pos, 8, kind)
        meta.check(hdr.OFF_INCOMPAT, 8, MetaKind.HEADER)
    except OverlapError as exc:
        raise UnrepairableImage(str(exc)) from exc
    return repair


async def rebuild_refcounts(
    file: BlockNode,
    header: hdr.Header,
    mapping: Mapping,
    refs: Refcounts,
    meta: MetadataMap,
    repair: Repair,
) -> None:
    """Switch the image to counters that match the counts (planned first by
    :func:`plan_repair`, so an image that cannot be repaired is refused before
    anything is written), then clear the dirty bit, in the order that keeps
    every crash repairable (module docstring).

    The caller holds the metadata lock and shields this from cancellation.
    """
    cs, bits = header.cluster_size, header.cluster_bits
    new = repair.structure
    await file.write(new.offset, new.image(cs))
    await file.flush()
    await file.write(hdr.OFF_REFTABLE, struct.pack(">QI", new.offset + len(new.blocks) * cs,
                                                   new.table_clusters))
    await file.flush()
    old_structure = [(off & REFTABLE_OFFSET_MASK) >> bits for off in refs.table
                     if off & REFTABLE_OFFSET_MASK]
    first = header.refcount_table_offset >> bits
    old_structure += range(first, first + header.refcount_table_clusters)
    for c in old_structure:
        meta.remove(c << bits, cs)
    header.refcount_table_offset = new.offset + len(new.blocks) * cs
    header.refcount_table_clusters = new.table_clusters
    refs.replace_table(new.table)
    refs.register_metadata()
    for pos, entry, kind in repair.copied_fixes:
        await file.write(pos, struct.pack(">Q", entry))
        if kind is MetaKind.L1:
            mapping.l1[(pos - header.l1_table_offset) // 8] = entry
        else:
            mapping.l2.drop(pos & ~(cs - 1))
    if repair.copied_fixes:
        await file.flush()
    incompat = header.incompatible_features & ~hdr.INCOMPAT_DIRTY
    await file.write(hdr.OFF_INCOMPAT, struct.pack(">Q", incompat))
    await file.flush()
    header.incompatible_features = incompat
    refs.freed_elsewhere(c for c in old_structure if not repair.counts[c])
    await refs.punch_freed()


async def _copied_flag_fixes(
    file: BlockNode, header: hdr.Header, mapping: Mapping, counts: Counts
) -> list[tuple[int, int, MetaKind]]:
    """The writes that make OFLAG_COPIED in the active tables say "counted
    exactly once", as QEMU's check does.

    A flag set on a shared cluster would let a write land in place on data a
    snapshot still reads; a missing one only costs a copy, but QEMU's check
    calls it corruption either way.
    """
    cs, bits = header.cluster_size, header.cluster_bits
    fixes: list[tuple[int, int, MetaKind]] = []
    for index, entry in enumerate(mapping.l1):
        l2_off = entry & OFFSET_MASK
        if not l2_off:
            continue
        want = _with_copied(entry, counts[l2_off >> bits] == 1)
        if want != entry:
            fixes.append((header.l1_table_offset + index * 8, want, MetaKind.L1))
        for i, l2_entry in enumerate(decode_table(await file.read(l2_off, cs))):
            if classify(l2_entry) not in (ClusterKind.NORMAL, ClusterKind.ZERO_ALLOC):
                continue
            fixed = _with_copied(l2_entry, counts[(l2_entry & OFFSET_MASK) >> bits] == 1)
            if fixed != l2_entry:
                fixes.append((l2_off + i * 8, fixed, MetaKind.L2))
    return fixes


def _with_copied(entry: int, copied: bool) -> int:
    return entry | OFLAG_COPIED if copied else entry & ~OFLAG_COPIED
