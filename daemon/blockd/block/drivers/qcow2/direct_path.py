"""The NBD fast path: a small request resolved to host pieces from cached L2 alone.

Answered from memory in one go (no await), so the mapping cannot change
half-way; no lock is needed for that.  The pins then keep the clusters from
being freed until the caller's I/O is done, exactly as for a mapped read or
in-place write.  Called for every small request, so the common case (one
cluster) has a path of its own.  Anything else (a table not cached,
allocation needed, compressed or zero clusters, backing data) answers None
and takes the node's ordinary path.
"""

from __future__ import annotations

from blockd.block.direct import DirectIO
from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.inflight import InFlight
from blockd.block.drivers.qcow2.mapping import Mapping, host_offset
from blockd.block.drivers.qcow2.overlap import OverlapError
from blockd.block.drivers.qcow2.tables import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
)


class DirectPath:
    def __init__(self, mapping: Mapping, inflight: InFlight) -> None:
        self.mapping = mapping
        self.meta = mapping.meta
        self.inflight = inflight

    def resolve(self, file: FileNode, offset: int, length: int, write: bool) -> DirectIO | None:
        """``file``'s pieces holding guest ``[offset, offset + length)``, pinned; or None.

        The caller has checked that the range lies inside the image and, for
        a write, that the node takes plain writes.
        """
        mapping = self.mapping
        bits = mapping.cluster_bits
        cs = mapping.cluster_size
        first = offset >> bits
        last = (offset + length - 1) >> bits
        # an allocation or a metadata change may be on its way to these
        # clusters: the ordinary path waits for it, so it must decide
        if write and (self.inflight.lock.locked() or self.inflight.allocating(first, last)):
            return None
        n_l2 = mapping.l2_entries
        l1_index = first // n_l2
        if l1_index != last // n_l2 or l1_index >= len(mapping.l1):
            return None  # across two L2 tables (rare): the ordinary path
        table = mapping.l2.get(mapping.l1[l1_index] & OFFSET_MASK)
        if table is None:
            return None
        need = OFLAG_COPIED if write else 0
        bad = OFLAG_COMPRESSED | OFLAG_ZERO | (cs - 1)
        if first == last:
            entry = table[first - l1_index * n_l2]
            if not entry & OFFSET_MASK or entry & bad or entry & need != need:
                return None
            start = host_offset(entry, offset, cs)
            if write and self.meta.kind_at(start) is not None:
                return None  # the ordinary path marks the image corrupt
            return self._held(file, [(start, length)], [start >> bits])
        base = l1_index * n_l2
        pieces: list[tuple[int, int]] = []
        clusters: list[int] = []
        end = offset + length
        for c in range(first, last + 1):
            entry = table[c - base]
            if not entry & OFFSET_MASK or entry & bad or entry & need != need:
                return None
            lo = offset if c == first else c << bits
            hi = end if c == last else (c + 1) << bits
            start = host_offset(entry, lo, cs)
            if pieces and pieces[-1][0] + pieces[-1][1] == start:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + hi - lo)
            else:
                pieces.append((start, hi - lo))
            clusters.append(start >> bits)
        if write:
            try:
                for start, n in pieces:
                    self.meta.check(start, n, None)
            except OverlapError:
                return None  # the ordinary path marks the image corrupt
        return self._held(file, pieces, clusters)

    def _held(self, file: FileNode, pieces: list[tuple[int, int]], clusters: list[int]) -> DirectIO:
        """``pieces`` of ``file`` as a :class:`DirectIO`, their clusters pinned until released."""
        self.inflight.pin(clusters)
        fd = file.hold_fd()
        inflight = self.inflight

        def release() -> None:
            file.release_fd()
            inflight.unpin(clusters)

        return DirectIO(fd, pieces, release)
