"""L2 entries classified a table slice at a time, at C speed: what each entry
holds, as one byte per entry, and whether any of them is one a read would call
corrupt (:meth:`Mapping.entry_fault` with ``read=True``).

A loop over the entries in Python costs about a microsecond an entry, and a
sparse 1 TiB image has 16M of them.  Here a slice is cut into byte planes
(every 8th byte: the same 8 bits of every entry), each plane mapped to one
flag per entry with ``bytes.translate``, and the planes combined as big
integers, one byte lane per entry: a few dozen passes in C per table.  (numpy
would do the same as fast, but importing it adds 14 MiB to the daemon's
resident memory, a third of what it uses.)
"""

from __future__ import annotations

import re
import sys
from array import array

#: the codes :func:`classify` gives an entry
UNALLOCATED, ZERO, DATA = b"U", b"Z", b"D"

_RUNS = re.compile(rb"U+|Z+|D+")


def _table(flag: int) -> bytes:
    """A translate table giving 1 for a byte with any bit of ``flag`` set, else 0."""
    return bytes(1 if i & flag else 0 for i in range(256))


_ANY = _table(0xFF)
_BIT0 = _table(0x01)  # entry bit 0: the zero flag
_ABOVE_BIT8 = _table(0xFE)  # entry bits 9..15: the lowest bits of the host offset
_BIT6 = _table(0x40)  # entry bit 62 (in the top byte): compressed
#: by n: byte 1's bits 1..n-1 (host offset bits 9..n+7), for clusters of 2^(n+8)
_LOW_BITS = [_table(((1 << n) - 1) & 0xFE) for n in range(9)]
#: by n: byte 2's bits 0..n-1 (host offset bits 16..n+15), for clusters of 2^(n+16)
_HIGH_BITS = [_table((1 << n) - 1) for n in range(6)]
#: lane value compressed << 2 | zero flag << 1 | has a host offset -> code,
#: as tables.classify decides (compressed first, then the zero flag)
_CODE = bytes(
    (DATA if i & 4 else ZERO if i & 2 else DATA if i & 1 else UNALLOCATED)[0] for i in range(256)
)


def classify(
    entries: array[int], first: int, last: int, cluster_bits: int, version: int
) -> tuple[bytes, bool]:
    """Codes of ``entries[first:last]`` and whether any of them is corrupt to a reader.

    An entry is corrupt to a reader where :meth:`Mapping.entry_fault` says
    so: a normal or zero entry whose host offset is not cluster-aligned, or
    (version 2) any zero entry.
    """
    raw = memoryview(entries)[first:last].tobytes()
    count = last - first
    little = sys.byteorder == "little"

    def plane(bit: int) -> bytes:
        """Byte ``bit // 8`` of every entry (the entry's bits bit..bit+7)."""
        k = bit // 8
        return raw[(k if little else 7 - k) :: 8]

    def lanes(data: bytes) -> int:
        return int.from_bytes(data, "little")

    offset = lanes(plane(8).translate(_ABOVE_BIT8))
    for bit in range(16, 56, 8):
        offset |= lanes(plane(bit))
    has_offset = lanes(offset.to_bytes(count, "little").translate(_ANY))
    compressed = lanes(plane(56).translate(_BIT6))
    zero = lanes(plane(0).translate(_BIT0))
    kinds = (compressed << 2) | (zero << 1) | has_offset
    codes = kinds.to_bytes(count, "little").translate(_CODE)

    # host offset bits 9 .. cluster_bits-1 set: not aligned to a cluster
    unaligned = lanes(plane(8).translate(_LOW_BITS[min(cluster_bits, 16) - 8]))
    if cluster_bits > 16:
        unaligned |= lanes(plane(16).translate(_HIGH_BITS[cluster_bits - 16]))
    if version < 3:
        unaligned |= zero
    return codes, bool(unaligned & ~compressed)


def runs(codes: bytes) -> list[tuple[bytes, int, int]]:
    """(code, first, end) of each run of equal codes, in order."""
    return [(codes[m.start() : m.start() + 1], m.start(), m.end()) for m in _RUNS.finditer(codes)]
