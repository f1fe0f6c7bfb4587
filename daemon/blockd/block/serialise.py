"""Serialising a job's copy against a node's writes, range by range.

A stream job fills a node from its backing chain where the node holds
nothing.  Deciding "holds nothing" and writing must be one step as far as
the node's other writers (the guest, through an export) are concerned: a
guest write landing between the two would be overwritten with older data
from the chain.  QEMU marks its copy-on-read requests serialising for that;
here a job takes an *exclusive* range, which waits for the writes already
in flight over it and makes new ones wait until it is given back.  Writes
never wait for each other (the driver orders them), and reads never wait:
while the node does not hold a range, it reads the chain there, which is
what the job copies.

The task holding an exclusive range writes through it (its own copy);
every other task's write over it waits.

The writes in flight are also what a job that starts watching a node's
writes (an active commit's write hook) must wait for: one already under way
went past the place where the hook looks, and would never tell the job that
it changed the node (:meth:`RangeGate.settled`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator

import trio


class RangeGate:
    """In-flight writes of one node and the exclusive ranges held over it."""

    def __init__(self) -> None:
        self._writes: dict[int, tuple[int, int]] = {}
        self._tokens = itertools.count()
        #: (start, end, holder) of each exclusive range
        self._exclusive: list[tuple[int, int, trio.lowlevel.Task]] = []
        self._changed = trio.Event()
        self._waiting = 0

    def blocked(self, offset: int, length: int) -> bool:
        """Whether a write of the current task over the range must wait now."""
        if not self._exclusive:
            return False
        me = trio.lowlevel.current_task()
        end = offset + length
        return any(s < end and offset < e and t is not me for s, e, t in self._exclusive)

    async def begin_write(self, offset: int, length: int) -> int:
        """Wait until no other task's exclusive range covers the write; a token
        for :meth:`end_write`, which must follow once the write is over."""
        while self.blocked(offset, length):
            await self._wait()
        return self.note_write(offset, length)

    def note_write(self, offset: int, length: int) -> int:
        """:meth:`begin_write` for a write that cannot wait (the NBD fast path's),
        once :meth:`blocked` has said it may go ahead."""
        token = next(self._tokens)
        self._writes[token] = (offset, offset + length)
        return token

    async def settled(self) -> None:
        """Wait until every write in flight now is over; later ones do not count."""
        earlier = set(self._writes)
        while not earlier.isdisjoint(self._writes):
            await self._wait()

    def end_write(self, token: int) -> None:
        del self._writes[token]
        if self._waiting:
            self._notify()

    @contextlib.asynccontextmanager
    async def exclusive(self, offset: int, length: int) -> AsyncIterator[None]:
        """Hold ``[offset, offset + length)``: once entered, no other task's
        write over it is in flight or starts until the block is left."""
        me = trio.lowlevel.current_task()
        end = offset + length
        while any(s < end and offset < e for s, e, _t in self._exclusive):
            await self._wait()
        entry = (offset, end, me)
        # Taken before the wait: new writes queue behind it, so a steady
        # writer cannot keep the job waiting for ever.
        self._exclusive.append(entry)
        try:
            while any(s < end and offset < e for s, e in self._writes.values()):
                await self._wait()
            yield
        finally:
            self._exclusive.remove(entry)
            self._notify()

    async def _wait(self) -> None:
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
