"""The internal snapshot table: decoding, with the limits QEMU enforces at open.

Entries are variable-sized (a fixed 40-byte part, extra data, id, name, each
entry 8-aligned), so the table's length is only known once it is walked.
The walk is sans-I/O: :func:`walk` yields the byte ranges it needs and is
sent their contents, and the caller does the reading.  blockd never writes the table (it
creates, applies and deletes no snapshot; writes copy what they share with one, see
``mapping.py``); it reports it, as ``query-named-block-nodes`` and ``qemu-img info`` do.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Generator
from typing import Any

from blockd.errors import ImageError

ENTRY = struct.Struct(">QIHHIIQII")
ENTRY_SIZE = ENTRY.size  # 40
MAX_EXTRA_DATA = 1024
MAX_TABLE_BYTES = 1024 * 65536
#: extra data QEMU understands: vm_state_size_large, disk_size, icount
_EXTRA_VM_STATE, _EXTRA_DISK_SIZE, _EXTRA_ICOUNT = 8, 16, 24

#: one read the walk needs: (offset from the table's start, byte count)
Need = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int
    icount: int | None  # None when the entry predates the field

    def info(self) -> dict[str, Any]:
        """The entry as a QAPI ``SnapshotInfo``."""
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            out["icount"] = self.icount
        return out


def _c_string(raw: bytes) -> str:
    """QEMU keeps ids and names as C strings: they end at the first NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def walk(count: int, disk_size: int) -> Generator[Need, bytes, tuple[list[Snapshot], int]]:
    """Walk ``count`` entries; yields the reads it needs, returns (entries, table length).

    Bytes past the end of the file must be fed as zeros (QEMU reads them so).
    """
    snapshots: list[Snapshot] = []
    pos = 0
    for i in range(count):
        pos = (pos + 7) & ~7
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock,
         vm_state, extra_size) = ENTRY.unpack((yield (pos, ENTRY_SIZE)))
        pos += ENTRY_SIZE
        if extra_size > MAX_EXTRA_DATA:
            raise ImageError(f"Too much extra metadata in snapshot table entry {i}")
        known = min(extra_size, _EXTRA_ICOUNT)
        extra = (yield (pos, known)) if known else b""
        if extra_size >= _EXTRA_VM_STATE:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        size = disk_size
        if extra_size >= _EXTRA_DISK_SIZE:
            size = struct.unpack_from(">Q", extra, 8)[0]
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_size >= _EXTRA_ICOUNT else None
        if icount == (1 << 64) - 1:
            icount = None  # QEMU's "no icount" value
        pos += extra_size
        ident = _c_string((yield (pos, id_size)) if id_size else b"")
        pos += id_size
        name = _c_string((yield (pos, name_size)) if name_size else b"")
        pos += name_size
        if pos > MAX_TABLE_BYTES:
            raise ImageError("Snapshot table is too big")
        snapshots.append(Snapshot(ident, name, l1_offset, l1_size, vm_state, date_sec,
                                  date_nsec, vm_clock, size, icount))
    return snapshots, pos
