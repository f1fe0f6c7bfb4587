"""Exclusive locks on byte ranges of one node, granted in arrival order.

A job that keeps a second image in step with a node's writes must never let
two overlapping operations cross: a guest write mirrored after the job's
older copy of the same range would be overwritten by it in the second image,
and two overlapping guest writes mirrored in the other order would leave
the two images different.  Each such operation holds its range for its whole
duration (for a guest write: the write and its mirror).

A waiting request blocks every later overlapping one, so a big lock (the
whole node) is not starved by a stream of small writes, and
:meth:`RangeLocks.try_lock` never jumps the queue.  The table holds what is
in flight (a handful of entries), so a linear scan is the cheapest lookup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class RangeLock:
    """One entry: ``[start, end)``, granted or waiting."""

    __slots__ = ("end", "released", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.released = trio.Event()


class RangeLocks:
    def __init__(self) -> None:
        self._entries: list[RangeLock] = []

    def __len__(self) -> int:
        return len(self._entries)

    def _first_conflict(self, entry: RangeLock) -> RangeLock | None:
        """The first entry ahead of ``entry`` (or any, if it is not queued) that overlaps it."""
        for other in self._entries:
            if other is entry:
                return None
            if other.start < entry.end and entry.start < other.end:
                return other
        return None

    def try_lock(self, offset: int, length: int) -> RangeLock | None:
        """The range at once, or None if anything overlapping is held or waiting."""
        entry = RangeLock(offset, offset + max(length, 1))
        if self._first_conflict(entry) is not None:
            return None
        self._entries.append(entry)
        return entry

    async def lock(self, offset: int, length: int) -> RangeLock:
        """Wait until every overlapping entry queued before this one is released."""
        entry = RangeLock(offset, offset + max(length, 1))
        self._entries.append(entry)
        try:
            while (ahead := self._first_conflict(entry)) is not None:
                await ahead.released.wait()
        except BaseException:
            self.unlock(entry)
            raise
        return entry

    def unlock(self, entry: RangeLock) -> None:
        self._entries.remove(entry)
        entry.released.set()

    @asynccontextmanager
    async def holding(self, offset: int, length: int) -> AsyncIterator[None]:
        entry = await self.lock(offset, length)
        try:
            yield
        finally:
            self.unlock(entry)
