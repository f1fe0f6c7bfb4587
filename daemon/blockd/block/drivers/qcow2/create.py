"""The bytes of a new qcow2 image, placed exactly where QEMU 7.2 places them.

QEMU makes an image in steps: a bare header and a one-cluster refcount
table with one refcount block, then (opened as an image) the first three
clusters are counted, the full header is written, the L1 table is grown to
the virtual size (and, when asked, L2 tables and data clusters are
preallocated), and the backing name goes into the header last.  Where each
table lands follows from QEMU's allocator (first free cluster from a moving
hint; a missing refcount block goes to the next free cluster; a full
refcount table is replaced by a bigger one behind the last covered range).
:func:`plan_image` replays those steps on an in-memory model and returns
what the file holds at the end, so a blockd image is byte-for-byte the one
``qemu-img create`` / QSD's ``blockdev-create`` writes for the same options.

Nothing here does I/O; ``blockd.block.create`` writes the plan to a file.
"""

from __future__ import annotations

import dataclasses
import struct
from array import array

from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2.refcount import get_refcount, set_refcount
from blockd.block.drivers.qcow2.tables import OFLAG_COPIED, encode_entries
from blockd.errors import BlockError, ImageError

#: QEMU's defaults and limits for a new image
DEFAULT_CLUSTER_SIZE = 65536
MAX_L1_ENTRIES = hdr.MAX_L1_BYTES // 8
MAX_REFTABLE_ENTRIES = hdr.MAX_REFTABLE_BYTES // 8
#: the largest request QEMU's block layer makes (BDRV_REQUEST_MAX_BYTES)
_REQUEST_MAX = ((1 << 31) - 1) // 512 * 512
_INT_MAX = (1 << 31) - 1
#: QEMU writes the feature name table only into clusters bigger than this
_FEATURE_TABLE_MIN_CLUSTER = 4096

#: array type codes of unsigned integers 1, 2, 4 and 8 bytes wide
_TYPECODES = {1: "B", 2: "H", 4: "I", 8: "Q"}

_FEATURES = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


class CreateError(BlockError):
    """A step of the creation failed the way QEMU's does (its text)."""

    def __init__(self, message: str, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value


@dataclasses.dataclass(frozen=True)
class Qcow2CreateOptions:
    """What the image is made of (already validated, see :func:`validate`)."""

    size: int
    version: int = 3
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    preallocation: str = "off"
    zstd: bool = False
    backing_file: str | None = None
    backing_fmt: str | None = None


@dataclasses.dataclass
class Plan:
    """The file at the end: cluster index -> the bytes written from its start
    (the last cluster of the L1 table may be written in part), the file's
    length, and a range to preallocate (falloc/full) before the metadata
    behind it is written."""

    clusters: dict[int, bytearray]
    length: int
    cluster_size: int
    preallocate: tuple[int, int] | None = None


def feature_table() -> bytes:
    out = bytearray()
    for kind, bit, name in _FEATURES:
        out += bytes([kind, bit]) + name.encode().ljust(46, b"\0")
    return bytes(out)


class _Model:
    """The image as QEMU's qcow2 driver sees it while it makes it."""

    def __init__(self, o: Qcow2CreateOptions, file_length: int) -> None:
        self.o = o
        self.cs = cs = o.cluster_size
        self.bits = cs.bit_length() - 1
        self.rbits = o.refcount_bits
        self.block_entries = cs * 8 // o.refcount_bits
        self.l2_entries = cs // 8
        self.mem: dict[int, bytearray] = {}
        self.length = file_length
        self.blocks: dict[int, bytearray] = {}  # refcount blocks by cluster index
        self.l2: dict[int, bytearray] = {}  # L2 tables by cluster index
        self.table: list[int] = []  # refcount table entries (byte offsets)
        self.table_offset = cs
        self.free_index = 0
        self.l1: list[int] = []
        self.l1_offset = 0
        self.size = 0
        self.preallocate: tuple[int, int] | None = None

    # -- the file -------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray) -> None:
        pos = 0
        while pos < len(data):
            c, inner = divmod(offset + pos, self.cs)
            n = min(len(data) - pos, self.cs - inner)
            buf = self.mem.setdefault(c, bytearray())
            if len(buf) < inner:
                buf.extend(bytes(inner - len(buf)))
            buf[inner : inner + n] = data[pos : pos + n]
            pos += n
        self.length = max(self.length, offset + len(data))

    def place(self, cluster: int, buf: bytearray) -> None:
        """A whole-cluster table written at ``cluster``; ``buf`` stays live (later
        changes of its entries are written back by QEMU's caches)."""
        self.mem[cluster] = buf
        self.length = max(self.length, (cluster + 1) * self.cs)

    def sector_length(self) -> int:
        """The file's length as QEMU's block layer reports it (whole sectors)."""
        return -(-self.length // 512) * 512

    # -- refcounts ------------------------------------------------------------------

    def refcount(self, cluster: int) -> int:
        rt = cluster // self.block_entries
        if rt >= len(self.table) or not self.table[rt]:
            return 0
        return get_refcount(self.blocks[self.table[rt] // self.cs],
                            cluster % self.block_entries, self.rbits)

    def alloc_noref(self, n: int) -> int:
        found = 0
        while found < n:
            c = self.free_index
            rt = c // self.block_entries
            if rt >= len(self.table) or not self.table[rt]:
                # no counters for the rest of this range: all free
                step = min(n - found, (rt + 1) * self.block_entries - c)
                self.free_index += step
                found += step
                continue
            run = self._run(self.blocks[self.table[rt] // self.cs], c,
                            (rt + 1) * self.block_entries - c)
            if run is None:  # counters narrower than a byte: one at a time
                self.free_index += 1
                found = found + 1 if self.refcount(c) == 0 else 0
            elif run[0]:
                step = min(n - found, run[1])
                self.free_index += step
                found += step
            else:
                self.free_index += run[1]
                found = 0
        return self.free_index - n

    def _run(self, block: bytearray, cluster: int, limit: int) -> tuple[bool, int] | None:
        """(free?, length) of the run of free or of used clusters from
        ``cluster``, up to ``limit`` (within its block); None for counters
        narrower than a byte."""
        span = self._span(cluster, limit)
        if span is None:
            return None
        seg = bytes(block[span[0] : span[1]])
        width = self.rbits // 8
        zeros = (len(seg) - len(seg.lstrip(b"\0"))) // width
        if zeros:
            return True, zeros
        counters = array(_TYPECODES[width], seg)
        try:
            return False, counters.index(0)
        except ValueError:
            return False, limit

    def _span(self, cluster: int, n: int) -> tuple[int, int] | None:
        """The bytes of a refcount block holding the counters of ``n`` clusters
        from ``cluster`` (all in one block), when they are whole bytes."""
        if self.rbits < 8:
            return None
        width = self.rbits // 8
        i = cluster % self.block_entries
        return i * width, (i + n) * width

    def _all_free(self, block: bytearray, cluster: int, n: int) -> bool:
        span = self._span(cluster, n)
        return span is not None and not any(block[span[0]:span[1]])

    def update(self, first: int, n: int, delta: int) -> bool:
        """Change the counters of ``n`` clusters; False: a refcount block was
        made on the way (QEMU's -EAGAIN), nothing changed, search again."""
        old_rt = -1
        block = bytearray()
        c = first
        while c < first + n:
            rt = c // self.block_entries
            if rt != old_rt:
                got = self.refcount_block(c)
                if got is None:
                    self.free_index = min(self.free_index, first)
                    if c > first:
                        self.update(first, c - first, -delta)
                    return False
                block = got
            old_rt = rt
            i = c % self.block_entries
            run = min(first + n, (rt + 1) * self.block_entries) - c
            span = self._span(c, run) if delta in (1, -1) and run > 1 else None
            if span is not None:
                # a run counted or uncounted at once (a preallocation, and its
                # undoing when a refcount block had to be made): 0 <-> 1
                width = self.rbits // 8
                old, new = (0, 1) if delta == 1 else (1, 0)
                if block[span[0] : span[1]] == old.to_bytes(width, "big") * run:
                    block[span[0] : span[1]] = new.to_bytes(width, "big") * run
                    if new == 0:
                        self.free_index = min(self.free_index, c)
                    c += run
                    continue
            value = get_refcount(block, i, self.rbits) + delta
            if value == 0 and c < self.free_index:
                self.free_index = c
            set_refcount(block, i, self.rbits, value)
            c += 1
        return True

    def alloc(self, n: int) -> int:
        while True:
            c = self.alloc_noref(n)
            if self.update(c, n, +1):
                return c

    def alloc_at(self, first: int, n: int) -> int:
        while True:
            i = 0
            while i < n:
                c = first + i
                rt = c // self.block_entries
                step = min(n - i, (rt + 1) * self.block_entries - c)
                if rt >= len(self.table) or not self.table[rt] or self._all_free(
                        self.blocks[self.table[rt] // self.cs], c, step):
                    i += step
                elif self.refcount(c) == 0:
                    i += 1
                else:
                    break
            if i == 0 or self.update(first, i, +1):
                return i

    def refcount_block(self, cluster: int) -> bytearray | None:
        rt = cluster // self.block_entries
        if rt < len(self.table) and self.table[rt]:
            return self.blocks[self.table[rt] // self.cs]
        new = self.alloc_noref(1)
        buf = bytearray(self.cs)
        if new // self.block_entries == rt:
            set_refcount(buf, new % self.block_entries, self.rbits, 1)  # counts itself
        elif not self.update(new, 1, +1):
            return None
        self.blocks[new] = buf
        self.place(new, buf)
        if rt < len(self.table):
            self.table[rt] = new * self.cs
            self.write(self.table_offset + rt * 8, struct.pack(">Q", new * self.cs))
            return None
        be = self.block_entries
        used = -(-max(cluster + 1, new + 1) // be)
        self.refcount_area(used * be * self.cs, 0, exact=False, index=rt, block=new * self.cs)
        return None

    def metadata_blocks(self, clusters: int, generous: bool) -> int:
        per_table = self.cs // 8
        be = self.block_entries
        table = blocks = n = 0
        while True:
            last = n
            blocks = -(-(clusters + table + blocks) // be)
            table = -(-blocks // per_table)
            n = clusters + blocks + table
            if n == last and generous:
                clusters += -(-table // 2)
                n = 0
                generous = False
                continue
            if n == last:
                return blocks

    def refcount_area(self, start: int, extra: int, *, exact: bool, index: int,
                      block: int) -> int:
        cs, be = self.cs, self.block_entries
        total = self.metadata_blocks(start // cs + extra, not exact)
        if total > MAX_REFTABLE_ENTRIES:
            raise CreateError("File too large", 27)
        area_index = (start // cs) // be
        size = total if exact else total + -(-total // 2)
        per = cs // 8
        size = -(-size // per) * per
        if size > MAX_REFTABLE_ENTRIES:
            raise CreateError("File too large", 27)
        table_clusters = size * 8 // cs
        new = self.table[:size] + [0] * max(0, size - len(self.table))
        if block:
            new[index] = block
        missing = sum(1 for i in range(area_index, total) if not new[i])
        table_offset = start + missing * cs
        end = table_offset + table_clusters * cs
        offset = start
        for i in range(area_index, total):
            if new[i]:
                buf = self.blocks[new[i] // cs]
            else:
                buf = bytearray(cs)
                self.blocks[offset // cs] = buf
                self.place(offset // cs, buf)
                new[i] = offset
                offset += cs
            first = i * be * cs
            if first < end:
                j = (start - first) // cs if first < start else 0
                for k in range(j, min((end - first) // cs, be)):
                    set_refcount(buf, k, self.rbits, 1)
        self.write(table_offset, encode_entries(new))
        self.write(hdr.OFF_REFTABLE, struct.pack(">QI", table_offset, table_clusters))
        old, old_entries = self.table_offset, len(self.table)
        self.table, self.table_offset = new, table_offset
        self.update(old // cs, -(-old_entries * 8 // cs), -1)
        return end

    # -- L1 / L2 --------------------------------------------------------------------

    def grow_l1(self, entries: int) -> None:
        if entries <= len(self.l1):
            return
        if entries > MAX_L1_ENTRIES:
            raise CreateError("Failed to grow the L1 table: File too large", 27)
        first = self.alloc(-(-entries * 8 // self.cs))
        table = self.l1 + [0] * (entries - len(self.l1))
        self.write(first * self.cs, encode_entries(table))
        self.write(hdr.OFF_L1, struct.pack(">IQ", entries, first * self.cs))
        old, old_n = self.l1_offset, len(self.l1)
        self.l1, self.l1_offset = table, first * self.cs
        if old_n:
            self.update(old // self.cs, -(-old_n * 8 // self.cs), -1)

    def l2_table(self, guest: int) -> bytearray:
        index = guest // (self.cs * self.l2_entries)
        if index >= len(self.l1):
            self.grow_l1(index + 1)
        if not self.l1[index]:
            c = self.alloc(1)
            buf = bytearray(self.cs)
            self.l2[c] = buf
            self.place(c, buf)
            self.l1[index] = c * self.cs | OFLAG_COPIED
            self.write(self.l1_offset + index * 8, struct.pack(">Q", self.l1[index]))
        return self.l2[(self.l1[index] & ~OFLAG_COPIED) // self.cs]

    def link(self, guest: int, host: int, n: int) -> None:
        """Point ``n`` guest clusters from ``guest`` at host clusters from ``host``."""
        table = self.l2_table(guest)
        index = (guest // self.cs) % self.l2_entries
        start = host | OFLAG_COPIED
        table[index * 8 : (index + n) * 8] = encode_entries(
            range(start, start + n * self.cs, self.cs))

    # -- preallocation --------------------------------------------------------------

    def _host_range(self, start: int, remaining: int
                    ) -> tuple[int, int, list[tuple[int, int, int]]]:
        """One allocation pass over fresh guest space, as QEMU's
        ``qcow2_alloc_host_offset``: (host offset, bytes done, links to make)."""
        cs = self.cs
        host: int | None = None
        cluster_offset: int | None = None
        links: list[tuple[int, int, int]] = []
        done = 0
        while remaining:
            table_index = (start // cs) % self.l2_entries
            self.l2_table(start)  # looked up (made) before the allocation
            inner = start % cs
            n = -(-(inner + remaining) // cs)
            n = min(n, self.l2_entries - table_index, _REQUEST_MAX // cs)
            if cluster_offset is None:
                first = self.alloc(n)
            else:
                first = cluster_offset // cs
                n = self.alloc_at(first, n)
                if n == 0:
                    break
            nbytes = min(remaining, n * cs - inner)
            links.append((start - inner, first * cs, n))
            if host is None:
                host = first * cs + inner
            cluster_offset = first * cs + inner + nbytes
            start += nbytes
            remaining -= nbytes
            done += nbytes
        assert host is not None
        return host, done, links

    def preallocate_metadata(self, size: int) -> None:
        offset = 0
        host, cur = 0, 0
        while offset < size:
            cur = min(size - offset, _INT_MAX // self.cs * self.cs)
            host, cur, links = self._host_range(offset, cur)
            for guest, first, n in links:
                self.link(guest, first, n)
            offset += cur
        # QEMU extends the file to the end of the last data cluster
        end = -(-(host + cur) // self.cs) * self.cs
        if end > self.sector_length():
            self.length = end

    def preallocate_data(self, size: int) -> None:
        cs = self.cs
        old = self.sector_length()
        last = -1
        for c in range(-(-old // cs) - 1, -1, -1):
            if self.refcount(c):
                last = c
                break
        old = (last + 1) * cs
        data = -(-size // cs)
        l2_tables = -(-data // self.l2_entries) + 1
        start = self.refcount_area(old, data + l2_tables, exact=True, index=0, block=0)
        got = self.alloc_at(start // cs, data)
        assert got == data
        end = start + data * cs
        if end < self.length:
            raise CreateError("Failed to resize underlying file: Cannot use preallocation "
                              "for shrinking files", 95)
        if end > self.length:
            self.preallocate = (self.length, end)
            self.length = end
        guest, host = 0, start
        while data:
            n = min(data, self.l2_entries - (guest // cs) % self.l2_entries)
            self.link(guest, host, n)
            guest += n * cs
            host += n * cs
            data -= n

    # -- the header -----------------------------------------------------------------

    def header_bytes(self, backing: bool) -> bytes:
        o, cs = self.o, self.cs
        h = hdr.Header(
            version=o.version, backing_file_offset=0, backing_file_size=0,
            cluster_bits=self.bits, size=self.size, crypt_method=0, l1_size=len(self.l1),
            l1_table_offset=self.l1_offset, refcount_table_offset=self.table_offset,
            refcount_table_clusters=len(self.table) * 8 // cs, nb_snapshots=0,
            snapshots_offset=0,
        )
        if o.version == 3:
            h.incompatible_features = hdr.INCOMPAT_COMPRESSION if o.zstd else 0
            h.compatible_features = hdr.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0
            h.refcount_order = o.refcount_bits.bit_length() - 1
            h.header_length = hdr.V3_HEADER_LENGTH
            h.tail = bytes([hdr.COMPRESSION_ZSTD if o.zstd else 0]) + bytes(7)
        if backing and o.backing_fmt:
            h.extensions.append(hdr.Extension(hdr.EXT_BACKING_FORMAT,
                                              o.backing_fmt.encode()[:15]))
        if o.version == 3 and cs > _FEATURE_TABLE_MIN_CLUSTER:
            h.extensions.append(hdr.Extension(hdr.EXT_FEATURE_TABLE, feature_table()))
        if backing:
            h.backing_file = o.backing_file
        try:
            raw = bytearray(hdr.serialize(h))
            if backing and o.backing_file == "":
                # QEMU records an empty name: its offset, and a length of 0
                struct.pack_into(">QI", raw, 8, len(raw), 0)
        except ImageError as exc:
            raise CreateError(
                f"Could not assign backing file '{o.backing_file}' with format "
                f"'{o.backing_fmt or '(null)'}': No space left on device", 28) from exc
        return bytes(raw) + bytes(cs - len(raw))


def plan_image(o: Qcow2CreateOptions, file_length: int = 0) -> Plan:
    """Replay QEMU's creation of the image ``o`` on a file ``file_length`` long
    (whose bytes it overwrites only where QEMU writes); a step QEMU would
    fail raises :class:`CreateError` with QEMU's message."""
    m = _Model(o, file_length)
    cs = m.cs
    # the bare header and the refcount table with its one block
    m.write(0, bytes(cs))
    m.table = [2 * cs] + [0] * (cs // 8 - 1)
    m.write(cs, struct.pack(">Q", 2 * cs) + bytes(2 * cs - 8))
    m.blocks[2] = bytearray(cs)
    m.place(2, m.blocks[2])
    # opened as an image: header, table and block count themselves
    m.alloc(3)
    try:
        if not 0 <= o.size < 1 << 63:
            raise CreateError("Image size cannot be negative", 22)
        m.grow_l1(-(-o.size // (cs * m.l2_entries)))
        if o.preallocation == "metadata":
            m.preallocate_metadata(o.size)
        elif o.preallocation in ("falloc", "full"):
            m.preallocate_data(o.size)
    except CreateError as exc:
        raise CreateError(f"Could not resize image: {exc}", exc.errno) from exc
    m.size = o.size
    if o.backing_file is not None and len(o.backing_file.encode()) > hdr.MAX_BACKING_NAME:
        raise CreateError(
            f"Could not assign backing file '{o.backing_file}' with format "
            f"'{o.backing_fmt or '(null)'}': Invalid argument", 22)
    m.write(0, m.header_bytes(o.backing_file is not None))
    return Plan(dict(sorted(m.mem.items())), m.length, cs, m.preallocate)
