"""Seed images for the qcow2 metadata fuzzer, made by qemu-img/qemu-io, and
their mutation.

The seeds are small (1-2 MiB guests) and cover what the format can hold:
versions 2 and 3; 512-byte, 4 KiB and 64 KiB clusters; data, zero (``write
-z``) and compressed (deflate and zstd) clusters; a backing file with its
format extension; an internal snapshot (shared, COW-ed clusters); lazy
refcounts; refcount widths 1 and 64; a persistent bitmap (bitmaps extension,
autoclear bit, bitmap directory).

:class:`Layout` reads a seed's metadata (header fields, extensions, backing
name, L1/L2 tables, refcount table/blocks, snapshot table) so the mutator can
aim at real structures; :class:`Mutator` changes one to three of them by bit
flips and boundary values (0, 1, all ones, just past the end of the file,
unaligned, pointing at other metadata) or sprays random bytes.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tests.images import create, qemu_img, qemu_io

KiB = 1 << 10
MiB = 1 << 20

#: (name, byte offset, width) of every fixed header field; version 3 adds the rest
V2_FIELDS = [
    ("magic", 0, 4),
    ("version", 4, 4),
    ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4),
    ("cluster_bits", 20, 4),
    ("size", 24, 8),
    ("crypt_method", 32, 4),
    ("l1_size", 36, 4),
    ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8),
    ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4),
    ("snapshots_offset", 64, 8),
]
V3_FIELDS = [
    ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8),
    ("refcount_order", 96, 4),
    ("header_length", 100, 4),
    ("compression_type", 104, 1),
]


def _pattern_raw(path: Path, size: int) -> Path:
    """A raw file of compressible, position-dependent data (convert -c compresses it)."""
    blocks = []
    for i in range(size // (64 * KiB)):
        blocks.append(bytes([(i * 7 + 1) & 0xFF]) * (32 * KiB) + bytes(range(256)) * 128)
    path.write_bytes(b"".join(blocks))
    return path


def _compressed(d: Path, name: str, size: int, options: str) -> Path:
    raw = _pattern_raw(d / f"{name}.raw", size)
    out = d / f"{name}.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", options, str(raw), str(out))
    raw.unlink()
    return out


def build(d: Path) -> list[Path]:
    """Make the seed images in ``d`` (a backing file sits beside them)."""
    d.mkdir(parents=True, exist_ok=True)
    seeds: list[Path] = []

    # v3, 64 KiB clusters: compressed, then normal data, zeros over both, holes
    img = _compressed(d, "v3-64k", 2 * MiB, "compat=1.1,cluster_size=65536")
    qemu_io(img, "write -P 0x5a 256k 192k", "write -z 512k 64k", "write -z 1M 128k",
            "discard 1536k 64k")
    seeds.append(img)

    # v2, 4 KiB clusters: compressed and normal clusters; zeros are real zeros
    img = _compressed(d, "v2-4k", MiB, "compat=0.10,cluster_size=4096")
    qemu_io(img, "write -P 0x33 8k 20k", "write -z 64k 8k", "write -P 0x44 900k 4k")
    seeds.append(img)

    # v3, 512-byte clusters (L2 tables of 64 entries, many refcount blocks)
    img = create(d / "v3-512.qcow2", "1M", options="compat=1.1,cluster_size=512")
    qemu_io(img, "write -P 0x61 0 12k", "write -z 12k 4k", "write -P 0x62 200k 3k",
            "write -P 0x63 600k 1k")
    seeds.append(img)

    # a backing file, and a v3 overlay with its backing format extension
    back = create(d / "backing.qcow2", "2M", options="cluster_size=65536")
    qemu_io(back, "write -P 0x71 0 2M")
    img = create(d / "overlay.qcow2", "2M", backing="backing.qcow2",
                 options="cluster_size=4096")
    qemu_io(img, "write -P 0x72 4k 8k", "write -z 64k 64k", "write -P 0x73 1M 4k")
    seeds.append(img)

    # v2 overlay on the same backing file
    img = create(d / "overlay-v2.qcow2", "2M", backing="backing.qcow2",
                 options="compat=0.10,cluster_size=65536")
    qemu_io(img, "write -P 0x74 100k 100k")
    seeds.append(img)

    # an internal snapshot: shared L2 table and clusters (refcount 2), COW after it
    img = create(d / "snapshot.qcow2", "1M", options="cluster_size=4096")
    qemu_io(img, "write -P 0x81 0 64k", "write -z 64k 8k")
    qemu_img("snapshot", "-c", "snap1", str(img))
    qemu_io(img, "write -P 0x82 4k 4k", "write -P 0x83 512k 4k")
    seeds.append(img)

    # lazy refcounts (compatible bit), 1-bit refcounts
    img = create(d / "lazy-rc1.qcow2", "1M",
                 options="cluster_size=4096,lazy_refcounts=on,refcount_bits=1")
    qemu_io(img, "write -P 0x91 0 16k", "write -z 16k 4k", "write -P 0x92 700k 4k")
    seeds.append(img)

    # 64-bit refcounts
    img = create(d / "rc64.qcow2", "1M", options="cluster_size=4096,refcount_bits=64")
    qemu_io(img, "write -P 0xa1 4k 12k", "write -P 0xa2 512k 4k")
    seeds.append(img)

    # zstd-compressed clusters (compression type field, incompatible bit 3)
    img = _compressed(d, "zstd", MiB, "cluster_size=4096,compression_type=zstd")
    qemu_io(img, "write -P 0xb1 64k 4k")
    seeds.append(img)

    # a persistent dirty bitmap: bitmaps extension, autoclear bit, bitmap directory
    img = create(d / "bitmap.qcow2", "1M", options="cluster_size=4096")
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write -P 0xc1 0 8k")
    seeds.append(img)
    return seeds


@dataclass
class Layout:
    """Where a seed's metadata lies: targets for the mutator, as (offset, width)."""

    file_size: int
    cluster_size: int
    version: int
    refcount_bits: int
    header_fields: list[tuple[str, int, int]]
    extensions: list[tuple[int, int]] = field(default_factory=list)  # (offset, data length)
    backing_name: tuple[int, int] | None = None
    l1: list[int] = field(default_factory=list)  # entry offsets
    l2: list[int] = field(default_factory=list)  # offsets of nonzero entries
    l2_all: list[int] = field(default_factory=list)  # every entry's offset
    reftable: list[int] = field(default_factory=list)
    refblock: list[int] = field(default_factory=list)  # offsets of nonzero counters
    snapshot_fields: list[tuple[int, int]] = field(default_factory=list)
    metadata: list[int] = field(default_factory=list)  # host offsets of metadata clusters

    @classmethod
    def of(cls, data: bytes) -> Layout:
        (_magic, version, bf_off, bf_size, cbits, _size, _crypt, l1_size, l1_off, rt_off,
         rt_clusters, nb_snap, snap_off) = struct.unpack_from(">IIQIIQIIQQIIQ", data)
        cs = 1 << cbits
        fields = list(V2_FIELDS)
        header_length, rorder = 72, 4
        if version == 3:
            rorder, header_length = struct.unpack_from(">II", data, 96)
            fields += V3_FIELDS
        layout = cls(len(data), cs, version, 1 << rorder, fields)
        layout.metadata = [0, l1_off, rt_off]
        pos = header_length
        limit = bf_off or cs
        while pos + 8 <= limit:
            kind, length = struct.unpack_from(">II", data, pos)
            if kind == 0:
                layout.extensions.append((pos, 0))  # the end marker
                break
            layout.extensions.append((pos, length))
            pos += 8 + ((length + 7) & ~7)
        if bf_off:
            layout.backing_name = (bf_off, bf_size)
        for i in range(l1_size):
            layout.l1.append(l1_off + 8 * i)
            l2_off = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00
            if l2_off:
                layout.metadata.append(l2_off)
                for j in range(cs // 8):
                    at = l2_off + 8 * j
                    layout.l2_all.append(at)
                    if data[at : at + 8] != bytes(8):
                        layout.l2.append(at)
        width = layout.refcount_bits
        for i in range(rt_clusters * cs // 8):
            at = rt_off + 8 * i
            if at + 8 > len(data):
                break
            layout.reftable.append(at)
            block = struct.unpack_from(">Q", data, at)[0] & ~0x1FF
            if block and block + cs <= len(data):
                layout.metadata.append(block)
                step = max(1, width // 8)
                for k in range(0, cs, step):
                    if data[block + k : block + k + step] != bytes(step):
                        layout.refblock.append(block + k)
        if nb_snap:
            layout.metadata.append(snap_off)
            # the first entry's fixed part: l1 offset, l1 size, id/name sizes, extra size
            layout.snapshot_fields = [(snap_off, 8), (snap_off + 8, 4), (snap_off + 12, 2),
                                      (snap_off + 14, 2), (snap_off + 36, 4)]
            snap_l1, snap_l1_size = struct.unpack_from(">QI", data, snap_off)
            layout.snapshot_fields += [(snap_l1 + 8 * i, 8) for i in range(snap_l1_size)]
        return layout


@dataclass
class Seed:
    path: Path
    data: bytes
    layout: Layout
    has_backing: bool


def load(paths: list[Path]) -> list[Seed]:
    out = []
    for path in paths:
        data = path.read_bytes()
        layout = Layout.of(data)
        out.append(Seed(path, data, layout, layout.backing_name is not None))
    return out


class Mutator:
    """Structure-aware mutations of one seed's bytes; every choice from ``rng``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def mutate(self, seed: Seed) -> tuple[bytearray, list[str]]:
        data = bytearray(seed.data)
        rng = self.rng
        notes = []
        for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3))):
            notes.append(self._one(seed.layout, data))
        return data, notes

    def _one(self, lay: Layout, data: bytearray) -> str:
        rng = self.rng
        targets: list[tuple[str, list[tuple[int, int]]]] = [
            ("header", [(off, w) for _n, off, w in lay.header_fields]),
            ("l1", [(o, 8) for o in lay.l1]),
            ("l2", [(o, 8) for o in lay.l2] or [(o, 8) for o in lay.l2_all]),
            ("l2-any", [(o, 8) for o in lay.l2_all]),
            ("reftable", [(o, 8) for o in lay.reftable[:4]]),
            ("refblock", [(o, max(1, lay.refcount_bits // 8)) for o in lay.refblock]),
            ("extension", [(o, 4) for o, _n in lay.extensions]
             + [(o + 4, 4) for o, _n in lay.extensions]),
            # the first words of each extension's data (bitmap directory, format name)
            ("extension-data", [(o + 8 + k, 8) for o, n in lay.extensions
                                for k in range(0, min(n, 24), 8)]),
            ("snapshot", lay.snapshot_fields),
        ]
        if lay.backing_name is not None:
            targets.append(("backing-name", [(8, 8), (16, 4)]))
        targets = [(kind, spots) for kind, spots in targets if spots]
        if rng.random() < 0.08:
            return self._noise(lay, data)
        kind, spots = rng.choice(targets)
        off, width = rng.choice(spots)
        if off + width > len(data):
            return f"{kind}@{off:#x}: past the end, unchanged"
        old = int.from_bytes(data[off : off + width], "big")
        new = self._value(lay, kind, old, width)
        data[off : off + width] = new.to_bytes(width, "big")
        if kind == "header":
            kind += "." + next(n for n, o, _w in lay.header_fields if o == off)
        return f"{kind}@{off:#x}: {old:#x} -> {new:#x}"

    def _noise(self, lay: Layout, data: bytearray) -> str:
        rng = self.rng
        base = rng.choice(lay.metadata)
        base = min(base, max(0, len(data) - 1))
        start = base + rng.randrange(lay.cluster_size)
        start = min(start, len(data) - 1)
        n = rng.choice((1, 2, 4, 8, 16))
        for i in range(start, min(len(data), start + n)):
            data[i] = rng.randrange(256)
        return f"noise@{start:#x}+{n}"

    def _value(self, lay: Layout, kind: str, old: int, width: int) -> int:
        rng = self.rng
        top = (1 << (8 * width)) - 1
        cs = lay.cluster_size
        end = -(-lay.file_size // cs) * cs
        pointers = [m for m in lay.metadata if m]
        choice = rng.randrange(16)
        if choice < 4:
            value = old ^ (1 << rng.randrange(8 * width))
        elif choice == 4:
            value = 0
        elif choice == 5:
            value = 1
        elif choice == 6:
            value = top
        elif choice == 7:
            value = old + rng.choice((1, -1, 8, -8, 512, cs, -cs))
        elif choice == 8:  # just past the end of the file
            value = (old & ~0x00FFFFFFFFFFFFFF) | rng.choice((end, end + cs, lay.file_size))
        elif choice == 9:  # unaligned
            value = old + rng.choice((1, 512, cs // 2, 7))
        elif choice == 10 and pointers:  # into other metadata, flags kept
            value = (old & ~0x00FFFFFFFFFFFFFF) | rng.choice(pointers)
        elif choice == 11 and kind in ("l2", "l2-any"):
            value = old ^ rng.choice((1 << 62, 1 << 63, 1, (1 << 62) | (1 << 63)))
        elif choice == 12:
            value = rng.randrange(top + 1)
        elif choice == 13:
            value = 1 << rng.randrange(8 * width)
        elif choice == 14:
            value = top >> rng.randrange(1, 8 * width)
        else:
            value = old ^ rng.randrange(1, 256)
        return value & top


def backing_pointer(data: bytes) -> int:
    """The mutant's backing name offset (0: no backing file in its header)."""
    return int(struct.unpack_from(">Q", data, 8)[0]) if len(data) >= 16 else 0


def header_size(data: bytes) -> int:
    return int(struct.unpack_from(">Q", data, 24)[0]) if len(data) >= 32 else 0
