"""What is in flight on one image: the metadata lock, pinned host clusters,
and guest clusters an allocating write is working on.

Data I/O to clusters already mapped runs outside the metadata lock, so
readers and in-place writers proceed in parallel.  While such I/O is in
flight its host clusters are pinned: dropping the last reference to a pinned
cluster waits, so the cluster cannot be reallocated (and filled with someone
else's data) under the I/O's feet.

An allocating write claims its clusters (their counters) under the lock,
then writes the data *outside* it, and takes the lock again to point the
cached L2 entries at the new clusters.  Meanwhile its guest clusters are
marked allocating: any other change to them (write, zero, discard, grow)
waits, so updates of one cluster never cross; readers see the old mapping.
This lets one request's data overlap with the next request's.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

#: guest clusters first..last (inclusive) of one allocating write
Span = tuple[int, int]


class InFlight:
    def __init__(self) -> None:
        #: every change of the image's metadata happens under this lock
        self.lock = trio.Lock()
        self._pinned: dict[int, int] = {}  # host cluster -> in-flight data I/Os
        self._unpinned = trio.Event()
        self._unpin_waiters = 0
        self._allocating: list[Span] = []
        self._allocation_done = trio.Event()

    # -- pinned host clusters -------------------------------------------------------

    def pin(self, clusters: Iterable[int]) -> None:
        pinned = self._pinned
        for c in clusters:
            pinned[c] = pinned.get(c, 0) + 1

    def unpin(self, clusters: Iterable[int]) -> None:
        pinned = self._pinned
        for c in clusters:
            left = pinned[c] - 1
            if left:
                pinned[c] = left
            else:
                del pinned[c]
        if self._unpin_waiters:  # an Event per unpin would cost more than the pin
            self._unpinned.set()
            self._unpinned = trio.Event()

    async def wait_unpinned(self, clusters: list[int]) -> None:
        while any(c in self._pinned for c in clusters):
            self._unpin_waiters += 1
            try:
                await self._unpinned.wait()
            finally:
                self._unpin_waiters -= 1

    # -- allocating guest clusters --------------------------------------------------

    def allocating(self, first: int, last: int) -> bool:
        """Whether an allocating write is in flight on any of clusters first..last."""
        if not self._allocating:  # the common case, asked for every small write
            return False
        return any(a <= last and first <= b for a, b in self._allocating)

    def begin_allocating(self, span: Span) -> None:
        self._allocating.append(span)

    def end_allocating(self, span: Span) -> None:
        self._allocating.remove(span)
        self._allocation_done.set()
        self._allocation_done = trio.Event()

    async def acquire_range(self, first: int, last: int) -> None:
        """Take the lock once no allocating write is in flight on clusters first..last."""
        while True:
            while self.allocating(first, last):
                await self._allocation_done.wait()
            await self.lock.acquire()
            if not self.allocating(first, last):
                return
            self.lock.release()
