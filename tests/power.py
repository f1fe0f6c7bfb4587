"""A simulated power supply for file nodes: what a disk keeps when the power goes.

A kill cannot test durability (the page cache survives the process), so the
power-loss tests put images on :class:`VolatileFile` nodes instead: each
remembers the writes no *completed* flush covers, and when the power goes
they are undone, then (if asked) a random subset replayed, as a disk may
persist any of them.  :class:`VolatileHostFile` does the same on a real host
file node, so that the paths only a host file takes (a commit's file-to-file
bulk copy) meet the power loss too.  One :class:`Power` may feed several files (a chain of
images on one disk); every write, flush and truncate of any of them counts
as one I/O point, so a test can cut the power at each point in turn.
"""

from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass

import pytest
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


class _Volatile:
    """What both volatile files share: the flush that makes finished writes
    persist, and the power loss that undoes the others."""

    power: Power
    unflushed: list[_Unflushed]

    async def _do_flush(self) -> None:
        self.power.tick()
        covered = [e for e in self.unflushed if e.done]
        await trio.lowlevel.checkpoint()  # a flush takes time: others may run meanwhile
        if self.power.lost:
            raise PowerLoss
        self.unflushed = [e for e in self.unflushed if not any(e is c for c in covered)]

    async def _put(self, offset: int, data: bytes) -> None:
        """Write ``data`` as the disk holds it after the power loss."""
        raise NotImplementedError

    async def _release(self) -> None:
        raise NotImplementedError

    async def lose_power(self, keep_some: random.Random | None) -> None:
        """Undo what no completed flush covers, keep a random half of it if
        ``keep_some`` is given, and release the file (the process is gone)."""
        for entry in reversed(self.unflushed):
            await self._put(entry.offset, entry.old)
        if keep_some is not None:
            for entry in self.unflushed:
                if keep_some.random() < 0.5:
                    await self._put(entry.offset, entry.new)
        self.unflushed = []
        await self._release()


class VolatileFile(_Volatile, BlockNode):
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

    async def _do_truncate(self, size: int) -> None:
        self.power.tick()
        await self.inner.truncate(size)

    async def _do_reopen(self, read_only: bool) -> None:
        await self.inner.reopen(read_only=read_only)

    async def _put(self, offset: int, data: bytes) -> None:
        await self.inner.write(offset, data)

    async def _release(self) -> None:
        await self.inner.close()


class VolatileHostFile(_Volatile, FileNode):
    """A host file node whose writes persist as on :class:`VolatileFile`: one I/O
    point per write, copy, zero write, discard, flush and truncate.

    Being a :class:`FileNode`, it is what the bulk-copy path copies between
    (``copy_file_range``, a batch's new L2 tables and entries in one call
    each), which refuses any other node.
    """

    power: Power
    unflushed: list[_Unflushed]

    @classmethod
    async def volatile(
        cls, node_name: str, filename: str, power: Power, *, read_only: bool
    ) -> VolatileHostFile:
        node = await cls.open(node_name, filename, read_only=read_only)
        assert isinstance(node, VolatileHostFile)
        node.power = power
        node.unflushed = []
        return node

    def _begin(self, offset: int, length: int) -> _Unflushed:
        """Count the I/O point and remember what the range held before it."""
        self.power.tick()
        old = os.pread(self.fd, length, offset)
        entry = _Unflushed(offset, old + bytes(length - len(old)), b"")
        self.unflushed.append(entry)
        return entry

    def _end(self, entry: _Unflushed) -> None:
        entry.new = os.pread(self.fd, len(entry.old), entry.offset)
        entry.done = True

    async def _do_write(self, offset: int, data: bytes) -> None:
        entry = self._begin(offset, len(data))
        await super()._do_write(offset, data)
        self._end(entry)

    async def _do_write_many(self, writes: list[tuple[int, bytes]]) -> None:
        for offset, data in writes:
            await self._do_write(offset, data)

    async def copy_many(self, copies: list[tuple[int, FileNode, int, int]]) -> None:
        for copy in copies:
            entry = self._begin(copy[0], copy[3])
            await super().copy_many([copy])
            self._end(entry)

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        entry = self._begin(offset, length)
        await super()._do_write_zeroes(offset, length)
        self._end(entry)

    async def _do_discard(self, offset: int, length: int) -> None:
        length = min(offset + length, self.size) - offset
        if length > 0:
            entry = self._begin(offset, length)
            await super()._do_discard(offset, length)
            self._end(entry)

    async def _do_truncate(self, size: int) -> None:
        self.power.tick()
        await super()._do_truncate(size)

    async def _put(self, offset: int, data: bytes) -> None:
        # (an unfinished write's new bytes are unknown: empty, so never kept)
        os.pwrite(self.fd, data, offset)

    async def _release(self) -> None:
        self.power = Power()  # the file is released as it is now (its close flushes)
        await self.close()


def count_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors of every fdatasync made from now on (by any thread),
    until ``monkeypatch.undo()``: what a batch costs in syncs is its speed
    on a real disk."""
    made: list[int] = []
    fdatasync = os.fdatasync

    def counted(fd: int) -> None:
        made.append(fd)
        fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    return made
