"""``blkdebug``: a filter node that fails chosen requests, for testing error paths.

Jobs need to be tested against ENOSPC and EIO (``on-error`` policies) without
filling real disks.  This is a small subset of QEMU's blkdebug: rules match an
I/O type and optionally a byte range, fail with an errno, once or every time.
Rules can be changed at run time through :meth:`BlkdebugNode.inject`.
"""

from __future__ import annotations

import dataclasses
import errno as errno_module
from typing import Any

from blockd.block.node import BlockNode, Status
from blockd.errors import BlockError, BlockIOError

IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")

#: QEMU blkdebug events, by the kind of request they stand for.
EVENTS = {
    "read_aio": "read",
    "preadv": "read",
    "write_aio": "write",
    "pwritev": "write",
    "pwritev_zero": "write-zeroes",
    "flush_to_disk": "flush",
}


@dataclasses.dataclass
class Rule:
    """Fail requests of ``iotype`` touching [offset, offset+length) (any, if offset is None)."""

    iotype: str = "write"
    errno: int = errno_module.EIO
    offset: int | None = None
    length: int = 1
    once: bool = False

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> Rule:
        """A rule from QEMU's ``inject-error`` options (``event``, ``errno``, ``sector``...).

        QEMU fires rules on events its format drivers raise; blockd's drivers
        raise none, so the data events map to the request types they stand for.
        """
        event = opts.get("event")
        if event not in (None, "none"):
            if event not in EVENTS:
                raise BlockError(f"blkdebug event '{event}' is not supported by blockd")
            opts = {"iotype": EVENTS[event], **opts}
        iotype = str(opts.get("iotype", "write"))
        if iotype not in IOTYPES:
            raise BlockError(f"Parameter 'iotype' does not accept value '{iotype}'")
        err = opts.get("errno", errno_module.EIO)
        if isinstance(err, str):
            code = getattr(errno_module, err.upper(), None)
            if code is None:
                raise BlockError(f"Unknown errno '{err}'")
            err = code
        offset = opts.get("offset")
        if offset is None and opts.get("sector", -1) not in (-1, None):
            offset = int(opts["sector"]) * 512
            opts = {**opts, "length": opts.get("length", 512)}
        return cls(iotype=iotype, errno=int(err),
                   offset=None if offset is None else int(offset),
                   length=int(opts.get("length", 1)), once=bool(opts.get("once", False)))

    def matches(self, iotype: str, offset: int, length: int) -> bool:
        if iotype != self.iotype:
            return False
        if self.offset is None:
            return True
        return offset < self.offset + self.length and self.offset < offset + max(length, 1)


class BlkdebugNode(BlockNode):
    """Passes everything to ``file`` (QEMU's ``image`` child) unless a rule fires."""

    driver = "blkdebug"

    def __init__(self, node_name: str, image: BlockNode, *, read_only: bool,
                 rules: list[Rule] | None = None) -> None:
        super().__init__(node_name, read_only=read_only, file=image)
        self.rules: list[Rule] = list(rules or [])
        self.fired: list[tuple[str, int, int]] = []

    def inject(self, rule: Rule) -> None:
        self.rules.append(rule)

    def clear(self) -> None:
        self.rules.clear()

    def _check(self, iotype: str, offset: int, length: int) -> None:
        for rule in self.rules:
            if rule.matches(iotype, offset, length):
                if rule.once:
                    self.rules.remove(rule)
                self.fired.append((iotype, offset, length))
                raise BlockIOError(rule.errno)

    @property
    def _image(self) -> BlockNode:
        assert self.file is not None
        return self.file

    @property
    def size(self) -> int:
        return self._image.size

    @property
    def growable(self) -> bool:  # type: ignore[override]
        return self._image.growable

    async def _do_read(self, offset: int, length: int) -> bytes:
        self._check("read", offset, length)
        return await self._image.read(offset, length)

    async def _do_write(self, offset: int, data: bytes) -> None:
        self._check("write", offset, len(data))
        await self._image.write(offset, data)

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        self._check("write-zeroes", offset, length)
        await self._image.write_zeroes(offset, length)

    async def _do_discard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        await self._image.discard(offset, length)

    async def _do_block_status(self, offset: int, length: int) -> tuple[Status, int]:
        self._check("block-status", offset, length)
        return await self._image.block_status(offset, length)

    async def _do_flush(self) -> None:
        self._check("flush", 0, 0)
        await self._image.flush()

    async def _do_truncate(self, size: int) -> None:
        await self._image.truncate(size)
