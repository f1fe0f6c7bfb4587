"""A simulated power supply for file nodes: what a disk keeps when the power goes.

A kill cannot test durability (the page cache survives the process), so the
power-loss tests put images on :class:`VolatileFile` nodes instead: each
remembers the writes no *completed* flush covers, and when the power goes
they are undone, then (if asked) a random subset replayed, as a disk may
persist any of them.  One :class:`Power` may feed several files (a chain of
images on one disk); every write, flush and truncate of any of them counts
as one I/O point, so a test can cut the power at each point in turn.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass

import trio

from blockd.block.drivers.file import FileNode
from blockd.block.node import BlockNode
from blockd.errors import BlockIOError


class PowerLoss(BlockIOError):
    """What a dead disk answers: an I/O error, as the layers above see it."""

    def __init__(self) -> None:
        super().__init__(errno.EIO)


class Power:
    """Goes off at the ``crash_at``-th I/O point (never when negative) for good;
    a ``flaky`` supply fails that one operation only and then works again."""

    def __init__(self, crash_at: int = -1, *, flaky: bool = False) -> None:
        self.crash_at = crash_at
        self.flaky = flaky
        self.ops = 0
        self.lost = False

    def tick(self) -> None:
        if self.lost:
            raise PowerLoss
        self.ops += 1
        if self.ops == self.crash_at:
            self.lost = not self.flaky
            raise PowerLoss


@dataclass
class _Unflushed:
    offset: int
    old: bytes
    new: bytes
    #: a flush covers only writes that had finished when it began
    done: bool = False


class VolatileFile(BlockNode):
    """A file node whose writes persist only once a flush that began after them completes."""

    driver = "file"
    growable = True

    def __init__(self, inner: FileNode, power: Power) -> None:
        super().__init__(inner.node_name, read_only=inner.read_only)
        self.inner = inner
        self.power = power
        self.unflushed: list[_Unflushed] = []

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def filename(self) -> str:
        return self.inner.filename

    async def _do_read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def _do_write(self, offset: int, data: bytes) -> None:
        self.power.tick()
        old = await self.inner.read(offset, len(data))
        if self.power.lost:  # it went while the old bytes were read
            raise PowerLoss
        entry = _Unflushed(offset, old, bytes(data))
        self.unflushed.append(entry)
        await self.inner.write(offset, data)
        entry.done = True

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        await self._do_write(offset, bytes(length))

    async def _do_discard(self, offset: int, length: int) -> None:
        """A punched hole reads as zeros: a write of zeros, lost like one."""
        end = min(offset + length, self.size)
        if end > offset:
            await self._do_write(offset, bytes(end - offset))

    async def _do_flush(self) -> None:
        self.power.tick()
        covered = [e for e in self.unflushed if e.done]
        await trio.lowlevel.checkpoint()  # a flush takes time: others may run meanwhile
        if self.power.lost:
            raise PowerLoss
        self.unflushed = [e for e in self.unflushed if not any(e is c for c in covered)]

    async def _do_truncate(self, size: int) -> None:
        self.power.tick()
        await self.inner.truncate(size)

    async def _do_reopen(self, read_only: bool) -> None:
        await self.inner.reopen(read_only=read_only)

    async def lose_power(self, keep_some: random.Random | None) -> None:
        """Undo what no completed flush covers, keep a random half of it if
        ``keep_some`` is given, and release the file (the process is gone)."""
        for entry in reversed(self.unflushed):
            await self.inner.write(entry.offset, entry.old)
        if keep_some is not None:
            for entry in self.unflushed:
                if keep_some.random() < 0.5:
                    await self.inner.write(entry.offset, entry.new)
        self.unflushed = []
        await self.inner.close()
