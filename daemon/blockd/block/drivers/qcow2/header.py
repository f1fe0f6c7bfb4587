"""qcow2 header (cluster 0): parsing with open-time validation, and byte-exact rewriting.

A rewrite must keep everything we do not understand (unknown header fields,
unknown extensions, unknown compatible bits), so the parsed form keeps those
as raw bytes and ``serialize`` puts them back unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct

from blockd.errors import ImageError

MAGIC = 0x514649FB
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # what QEMU 7.2 writes (includes compression_type + padding)
MAX_BACKING_NAME = 1023
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
INT64_MAX = (1 << 63) - 1
SNAPSHOT_HEADER_SIZE = 40  # the fixed part of a snapshot table entry

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

# offsets of fields QEMU updates with one small write
OFF_SIZE = 24
OFF_L1 = 36  # l1_size (4) + l1_table_offset (8)
OFF_REFTABLE = 48  # refcount_table_offset (8) + refcount_table_clusters (4)
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")

_FEATURE_NAMES = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
}


@dataclasses.dataclass
class Extension:
    """One header extension, kept as raw bytes so unknown ones survive rewrites."""

    type: int
    data: bytes


@dataclasses.dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_DEFLATE
    #: header bytes 104..header_length verbatim (compression_type, padding, unknown fields)
    tail: bytes = b""
    extensions: list[Extension] = dataclasses.field(default_factory=list)
    backing_file: str | None = None
    #: the extension list ends in an end marker stored in the file (not implied
    #: by the backing name or the end of the cluster or file): free bytes after it
    #: can take a new backing name without rereading cluster 0
    end_marker_stored: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def backing_format(self) -> str | None:
        """The recorded format, as QEMU reads it: a C string (up to the first NUL,
        none if empty), so a name padded or blanked with NULs is not a driver name."""
        ext = self.extension(EXT_BACKING_FORMAT)
        if ext is None:
            return None
        return ext.data.split(b"\0", 1)[0].decode("utf-8", "replace") or None

    def extension(self, ext_type: int) -> Extension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def feature_name(self, kind: int, bit: int) -> str | None:
        """Name of a feature bit, from the image's own table first (it may know newer bits)."""
        table = self.extension(EXT_FEATURE_TABLE)
        if table is not None:
            for i in range(0, len(table.data) - 47, 48):
                if table.data[i] == kind and table.data[i + 1] == bit:
                    return table.data[i + 2 : i + 48].rstrip(b"\0").decode("utf-8", "replace")
        return _FEATURE_NAMES.get((kind, bit))


def _unsupported_incompat_text(table: bytes | None, mask: int) -> str:
    """QEMU's refusal of incompatible bits: names from the image's own table, in
    its order, then whatever bits no entry names."""
    names = []
    if table is not None:
        for i in range(0, len(table) - 47, 48):
            name = table[i + 2 : i + 48].split(b"\0", 1)[0]
            if not name:
                break  # QEMU's table walk ends at an unnamed entry
            bit = table[i + 1]
            if table[i] == 0 and bit < 64 and mask & (1 << bit):
                names.append(name.decode("utf-8", "replace"))
                mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def _known_unsupported_text(mask: int) -> str:
    names = [_FEATURE_NAMES[(0, bit)] for bit in range(64) if mask & (1 << bit)]
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def parse_fixed(buf: bytes) -> Header:
    """Decode the fixed part of the header; ``buf`` holds at least its first 112 bytes."""
    if len(buf) < 4 or struct.unpack_from(">I", buf)[0] != MAGIC:
        raise ImageError("Image is not in qcow2 format")
    if len(buf) < 8:
        raise ImageError("qcow2 header too short (truncated file)")
    version = struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise ImageError(f"Unsupported qcow2 version {version}")
    if len(buf) < V2_HEADER_LENGTH:
        raise ImageError("qcow2 header too short (truncated file)")
    fields = _V2.unpack_from(buf)
    h = Header(*fields[1:])
    h.version = version
    if version == 3:
        if len(buf) < V3_MIN_HEADER_LENGTH:
            raise ImageError("qcow2 header too short (truncated file)")
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
        ) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
        if h.header_length < V3_MIN_HEADER_LENGTH:
            raise ImageError("qcow2 header too short")
    else:
        h.header_length = V2_HEADER_LENGTH
    return h


def parse(buf: bytes, file_size: int) -> Header:
    """Decode and validate cluster 0; anything impossible becomes an ImageError.

    The checks run in the order QEMU runs them when it opens an image, so an
    image with several faults is refused for the same one, in QEMU's words.
    """
    h = parse_fixed(buf)
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(f"Unsupported cluster size: 2^{h.cluster_bits}")
    cs = h.cluster_size
    if h.header_length > cs:
        raise ImageError("qcow2 header exceeds cluster size")
    if len(buf) < h.header_length:
        raise ImageError("qcow2 header too short (truncated file)")
    if h.version == 3:
        h.tail = bytes(buf[V3_MIN_HEADER_LENGTH : h.header_length])
        if h.header_length > V3_MIN_HEADER_LENGTH:
            h.compression_type = buf[V3_MIN_HEADER_LENGTH]
    if h.backing_file_offset > cs:
        raise ImageError("Invalid backing file offset")

    if h.compression_type not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
        raise ImageError(f"qcow2: unknown compression type: {h.compression_type}")
    has_bit = bool(h.incompatible_features & INCOMPAT_COMPRESSION)
    if has_bit != (h.compression_type != COMPRESSION_DEFLATE):
        raise ImageError(
            "qcow2: Compression type incompatible feature bit must "
            + ("not be set" if has_bit else "be set")
        )
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        # only for the feature names: a broken extension area changes nothing here
        with contextlib.suppress(ImageError):
            _parse_extensions(h, buf)
        table = h.extension(EXT_FEATURE_TABLE)
        raise ImageError(
            _unsupported_incompat_text(table.data if table else None, unknown)
        )
    unsupported = h.incompatible_features & (INCOMPAT_DATA_FILE | INCOMPAT_EXTL2)
    if unsupported:  # known to QEMU, not implemented here (README lists it)
        raise ImageError(_known_unsupported_text(unsupported))
    if h.refcount_order > 6:
        raise ImageError("Reference count entry width too large; may not exceed 64 bits")
    if h.version == 2 and h.refcount_order != 4:
        h.refcount_order = 4
    if h.crypt_method not in (0, 1, 2):
        raise ImageError(f"Unsupported encryption method {h.crypt_method}")
    if h.crypt_method != 0:
        raise ImageError(
            f"qcow2: encrypted images are not supported (crypt_method={h.crypt_method})"
        )

    _validate_tables(h, file_size)
    _parse_extensions(h, buf)
    _check_extensions(h)
    if h.backing_file_offset:
        if h.backing_file_size > min(MAX_BACKING_NAME, cs - h.backing_file_offset):
            raise ImageError("Backing file name too long")
        if len(buf) < h.backing_file_offset + h.backing_file_size:
            raise ImageError("qcow2 header too short (truncated file)")
        raw = bytes(buf[h.backing_file_offset : h.backing_file_offset + h.backing_file_size])
        # QEMU keeps the name as a C string: it ends at the first NUL, if any
        h.backing_file = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") or None
    _validate_placement(h, file_size)
    return h


def _parse_extensions(h: Header, buf: bytes) -> None:
    """The extension list from ``header_length`` up to the backing name (or cluster end).

    Bytes past the end of a short file read as zeros, as QEMU reads them.
    """
    limit = h.backing_file_offset if h.backing_file_offset else h.cluster_size
    pos = h.header_length
    h.extensions = []
    h.end_marker_stored = False
    while pos < limit:
        # too little room for an extension's 8-byte header is an error even
        # where the bytes would read as the end marker
        if pos + 8 > limit:
            raise ImageError("Header extension too large")
        if pos + 8 > len(buf):
            return  # zeros: the end marker
        ext_type, length = struct.unpack_from(">II", buf, pos)
        pos += 8
        if length > limit - pos:
            raise ImageError("Header extension too large")
        if ext_type == EXT_END:
            h.end_marker_stored = True
            return
        data = bytes(buf[pos : pos + length])
        h.extensions.append(Extension(ext_type, data + bytes(length - len(data))))
        pos += (length + 7) & ~7


#: what QEMU accepts in the extensions it understands
MAX_BACKING_FORMAT = 15
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 64 << 20


def _check_extensions(h: Header) -> None:
    for ext in h.extensions:
        n = len(ext.data)
        if ext.type == EXT_BACKING_FORMAT and n > MAX_BACKING_FORMAT:
            raise ImageError(
                f"ERROR: ext_backing_format: len={n} too large (>={MAX_BACKING_FORMAT + 1})"
            )
        if ext.type == EXT_CRYPTO and h.crypt_method != 2:
            raise ImageError("CRYPTO header extension only expected with LUKS encryption method")
        if ext.type == EXT_BITMAPS:
            if n != 24:
                raise ImageError("bitmaps_ext: Invalid extension length")
            if not h.autoclear_features & AUTOCLEAR_BITMAPS:
                continue  # stale: QEMU ignores the bitmaps (and drops them on a write)
            nb, reserved, _size, directory = struct.unpack(">IIQQ", ext.data)
            if reserved:
                raise ImageError("bitmaps_ext: Reserved field is not zero")
            if nb > MAX_BITMAPS:
                raise ImageError(
                    f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU "
                    f"supported maximum of {MAX_BITMAPS}"
                )
            if nb == 0:
                raise ImageError("found bitmaps extension with zero bitmaps")
            if directory % h.cluster_size:
                raise ImageError("bitmaps_ext: invalid bitmap directory offset")
            if _size > MAX_BITMAP_DIRECTORY:
                raise ImageError(
                    f"bitmaps_ext: bitmap directory size ({_size}) exceeds the maximum "
                    f"supported size ({MAX_BITMAP_DIRECTORY})"
                )
    if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW and not (
        h.incompatible_features & INCOMPAT_DATA_FILE
    ):
        raise ImageError("data-file-raw requires a data file")


def _qemu_table(name: str, offset: int, entries: int, entry_len: int, max_bytes: int,
                cluster_size: int) -> None:
    """The two checks QEMU makes of every table it is about to load."""
    if entries > max_bytes // entry_len:
        raise ImageError(f"{name} too large")
    # the end must fit in a signed 64-bit offset, even for a table with no entries in use
    if offset % cluster_size or offset > INT64_MAX - entries * entry_len:
        raise ImageError(f"{name} offset invalid")


def _validate_tables(h: Header, file_size: int) -> None:
    cs = h.cluster_size
    if h.refcount_table_clusters == 0:
        raise ImageError("Image does not contain a reference count table")
    _qemu_table("Reference count table", h.refcount_table_offset, h.refcount_table_clusters,
                cs, MAX_REFTABLE_BYTES, cs)
    _qemu_table("Snapshot table", h.snapshots_offset, h.nb_snapshots, SNAPSHOT_HEADER_SIZE,
                SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS, cs)
    _qemu_table("Active L1 table", h.l1_table_offset, h.l1_size, 8, MAX_L1_BYTES, cs)
    l2_entries = cs // 8
    need = -(-h.size // (cs * l2_entries))
    if need > 0x7FFFFFFF:
        raise ImageError("Image is too big")
    if h.l1_size < need:
        raise ImageError("L1 table is too small")


def _validate_table(what: str, offset: int, nbytes: int, cluster_size: int, file_size: int) -> None:
    if offset < cluster_size:
        raise ImageError(f"Invalid {what} offset: {offset:#x} overlaps the image header")
    if offset + nbytes > file_size:
        raise ImageError(f"Invalid {what} offset: {offset:#x} lies beyond the end of the file")


def _validate_placement(h: Header, file_size: int) -> None:
    """Refusals QEMU does not make at open (it fails or corrupts later): README lists them."""
    cs = h.cluster_size
    if h.l1_size:
        _validate_table("L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    rt_bytes = h.refcount_table_clusters * cs
    # QEMU fills the table's clusters completely, but tolerate a short last cluster
    _validate_table("reference count table", h.refcount_table_offset, 8, cs, file_size)
    if h.refcount_table_offset + rt_bytes > file_size + cs:
        raise ImageError(
            f"Invalid reference count table offset: {h.refcount_table_offset:#x} "
            "lies beyond the end of the file"
        )
    if h.l1_size:
        l1 = (h.l1_table_offset, h.l1_table_offset + h.l1_size * 8)
        rt = (h.refcount_table_offset, h.refcount_table_offset + rt_bytes)
        if l1[0] < rt[1] and rt[0] < l1[1]:
            raise ImageError("Invalid L1 table offset: the L1 table overlaps the "
                             "reference count table")


def serialize(h: Header) -> bytes:
    """Header + extensions + backing name, laid out as QEMU lays them out."""
    out = bytearray(
        _V2.pack(
            MAGIC,
            h.version,
            0,
            0,
            h.cluster_bits,
            h.size,
            h.crypt_method,
            h.l1_size,
            h.l1_table_offset,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            h.nb_snapshots,
            h.snapshots_offset,
        )
    )
    if h.version == 3:
        out += _V3.pack(
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
        )
        out += h.tail
    for ext in h.extensions:
        out += struct.pack(">II", ext.type, len(ext.data)) + ext.data
        out += bytes(-len(ext.data) % 8)
    out += bytes(8)  # end of extensions
    if h.backing_file:
        name = h.backing_file.encode("utf-8", "surrogateescape")
        struct.pack_into(">QI", out, 8, len(out), len(name))
        out += name
    if len(out) > h.cluster_size:
        raise ImageError("No space left in the file header")
    return bytes(out)


def with_backing(h: Header, backing_file: str | None, backing_format: str | None) -> Header:
    """A copy of ``h`` naming another backing file (and format), extensions kept in order."""
    new = dataclasses.replace(h, extensions=list(h.extensions))
    if backing_file:
        if len(backing_file.encode("utf-8", "surrogateescape")) > MAX_BACKING_NAME:
            raise ImageError("Backing file name too long")
        new.backing_file = backing_file
    else:
        new.backing_file = None
        new.backing_file_offset = new.backing_file_size = 0
        backing_format = None
    exts = [e for e in new.extensions if e.type != EXT_BACKING_FORMAT]
    if backing_format:
        # QEMU puts the backing format first; keep that so headers stay comparable
        exts.insert(0, Extension(EXT_BACKING_FORMAT, backing_format.encode()))
    new.extensions = exts
    return new
