"""Which host clusters hold metadata, so no write can land on the wrong structure.

QEMU calls this the overlap check.  A write that would clobber metadata means
the image's own bookkeeping is inconsistent (e.g. a metadata cluster with
refcount 0 handed out again); the node then marks the image corrupt instead of
making things worse.
"""

from __future__ import annotations

import enum
from typing import NoReturn, Protocol


class MetaKind(enum.Enum):
    HEADER = "qcow2_header"
    L1 = "active L1 table"
    L2 = "active L2 table"
    REFTABLE = "refcount table"
    REFBLOCK = "refcount block"
    SNAPSHOTS = "snapshot table"
    INACTIVE_L1 = "inactive L1 table"


class OverlapError(Exception):
    """A write would overwrite metadata it must not touch.

    ``offset``/``size``: the host range of the refused write, when known
    (QEMU reports them with the corruption event).
    """

    def __init__(
        self, message: str, offset: int | None = None, size: int | None = None
    ) -> None:
        super().__init__(message)
        self.offset = offset
        self.size = size


class CorruptMetadata(OverlapError):
    """Metadata found inconsistent on the way to a write (not an overlap, but
    handled alike: the image is marked corrupt and the write fails)."""


class MarkCorrupt(Protocol):
    """What a part of the driver calls when it meets corrupt metadata.

    The node's answer (:meth:`Qcow2Node._mark_corrupt`): report it once, stop
    writes to the image, and fail the request that met it with EIO.
    """

    async def __call__(
        self, reason: str, offset: int | None = None, size: int | None = None
    ) -> NoReturn: ...


class MetadataMap:
    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self._kinds: dict[int, MetaKind] = {}

    def add(self, host_offset: int, length: int, kind: MetaKind) -> None:
        for c in self._clusters(host_offset, length):
            self._kinds[c] = kind

    def remove(self, host_offset: int, length: int) -> None:
        for c in self._clusters(host_offset, length):
            self._kinds.pop(c, None)

    def kind_at(self, host_offset: int) -> MetaKind | None:
        return self._kinds.get(host_offset >> self.cluster_bits)

    def _clusters(self, offset: int, length: int) -> range:
        if length <= 0:
            return range(0)
        return range(offset >> self.cluster_bits, ((offset + length - 1) >> self.cluster_bits) + 1)

    def check(self, host_offset: int, length: int, kind: MetaKind | None) -> None:
        """Allow the write only if every touched cluster is ``kind`` (None: no metadata)."""
        for c in self._clusters(host_offset, length):
            have = self._kinds.get(c)
            if have is not kind:
                what = have.value if have is not None else "data"
                raise OverlapError(
                    f"Preventing invalid write on metadata (overlaps with {what})",
                    host_offset,
                    length,
                )
