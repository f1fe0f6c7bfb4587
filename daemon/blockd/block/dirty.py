"""Which parts of a node were written since someone started watching.

An active commit copies a disk that keeps changing; it learns what to copy
again from a :class:`DirtyBitmap` fed by the node's write observers.  One bit
per chunk of ``granularity`` bytes keeps the memory bounded by the disk size
(a 1 TiB disk at 64 KiB granularity needs 2 MiB) however the guest writes,
and finding the next dirty chunk is a C-speed scan for a non-zero byte.
"""

from __future__ import annotations

import re

_NONZERO = re.compile(rb"[^\x00]")
_NOT_FULL = re.compile(rb"[^\xff]")


class DirtyBitmap:
    def __init__(self, size: int, granularity: int) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError("the granularity must be a power of two")
        self.granularity = granularity
        self.size = size
        self._chunks = -(-size // granularity)
        self._bits = bytearray(-(-self._chunks // 8))
        self._count = 0

    @property
    def dirty_bytes(self) -> int:
        """Bytes covered by dirty chunks (the last chunk counts only up to ``size``)."""
        if not self._count:
            return 0
        total = self._count * self.granularity
        last = self._chunks - 1
        if self._bit(last):
            total -= self._chunks * self.granularity - self.size
        return total

    def __bool__(self) -> bool:
        return self._count > 0

    def _bit(self, chunk: int) -> bool:
        return bool(self._bits[chunk >> 3] & (1 << (chunk & 7)))

    def _chunk_range(self, offset: int, length: int) -> tuple[int, int]:
        end = min(offset + length, self.size)
        if offset < 0 or length <= 0 or offset >= end:
            return 0, 0
        return offset // self.granularity, -(-end // self.granularity)

    def mark(self, offset: int, length: int) -> None:
        """Every chunk the range touches becomes dirty."""
        first, last = self._chunk_range(offset, length)
        if first < last:
            self._fill(first, last, True)

    def clear(self, offset: int, length: int) -> None:
        """Chunks the range touches become clean; callers clear whole chunks they copy."""
        first, last = self._chunk_range(offset, length)
        if first < last:
            self._fill(first, last, False)

    def clear_inside(self, offset: int, length: int) -> int:
        """Chunks the range covers whole (the last one up to ``size``) become
        clean; returns the dirty bytes that were cleared.

        A write mirrored into the copy makes the chunks it covers whole equal
        in both images; a chunk it covers in part may still differ elsewhere.
        """
        end = min(offset + length, self.size)
        first = -(-max(offset, 0) // self.granularity)
        last = self._chunks if end == self.size else end // self.granularity
        if first >= last:
            return 0
        before = self.dirty_bytes
        self._fill(first, last, False)
        return before - self.dirty_bytes

    def runs(self, offset: int, end: int, limit: int | None = None) -> list[tuple[int, int]]:
        """The dirty runs within ``[offset, end)`` (chunk-aligned, clipped to it),
        from the start, until they add up to ``limit`` bytes or more."""
        found: list[tuple[int, int]] = []
        pos, total = offset, 0
        while pos < end and (limit is None or total < limit):
            run = self.next_run(pos, end - pos)
            if run is None:
                break
            start, n = run
            if start >= end:
                break
            stop = min(start + n, end)
            found.append((max(start, offset), stop - max(start, offset)))
            total += found[-1][1]
            pos = stop
        return found

    def _fill(self, first: int, last: int, value: bool) -> None:
        lo, hi = first >> 3, (last - 1) >> 3
        bits = self._bits
        before = int.from_bytes(bits[lo : hi + 1], "little").bit_count()
        if lo == hi:
            mask = ((1 << (last - first)) - 1) << (first & 7)
            bits[lo] = bits[lo] | mask if value else bits[lo] & ~mask & 0xFF
        else:
            head = (0xFF << (first & 7)) & 0xFF
            tail = (1 << (((last - 1) & 7) + 1)) - 1
            bits[lo] = bits[lo] | head if value else bits[lo] & ~head & 0xFF
            bits[hi] = bits[hi] | tail if value else bits[hi] & ~tail & 0xFF
            if hi > lo + 1:
                bits[lo + 1 : hi] = (b"\xff" if value else b"\x00") * (hi - lo - 1)
        after = int.from_bytes(bits[lo : hi + 1], "little").bit_count()
        self._count += after - before

    def next_run(self, offset: int, max_length: int) -> tuple[int, int] | None:
        """The first run of dirty chunks at or after ``offset``: (offset, length).

        The run is chunk-aligned (its end clipped to ``size``) and at most
        ``max_length`` bytes long (but always at least one chunk).
        """
        if not self._count or offset >= self.size:
            return None
        chunk = self._find(max(offset, 0) // self.granularity, _NONZERO, True)
        if chunk is None:
            return None
        limit = max(1, max_length // self.granularity)
        end = self._find(chunk + 1, _NOT_FULL, False, stop=min(self._chunks, chunk + limit))
        stop = end if end is not None else min(self._chunks, chunk + limit)
        start = chunk * self.granularity
        return start, min(stop * self.granularity, self.size) - start

    def _find(
        self, chunk: int, pattern: re.Pattern[bytes], want: bool, stop: int | None = None
    ) -> int | None:
        """The first chunk >= ``chunk`` (and < ``stop``) whose bit is ``want``."""
        stop = self._chunks if stop is None else stop
        while chunk < stop:
            if chunk & 7 == 0:
                match = pattern.search(self._bits, chunk >> 3, -(-stop // 8))
                if match is None:
                    return None
                chunk = max(chunk, match.start() << 3)
                if chunk >= stop:
                    return None
            if self._bit(chunk) is want:
                return chunk
            chunk += 1
        return None
