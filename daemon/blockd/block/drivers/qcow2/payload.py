"""What a write puts into the image: bytes in memory, or bytes in another host file.

The allocation code handles both alike: it asks a payload to put a guest
range at a host offset, or for its bytes (to complete a partial cluster).
Bytes from another image's file are copied file to file (``copy_file_range``)
and never pass through Python.
"""

from __future__ import annotations

import errno

from blockd.block.drivers.file import FileNode
from blockd.block.node import BlockNode, HostExtents
from blockd.errors import BlockIOError


class Payload:
    """The bytes a write puts at guest ``[offset, offset + length)``."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length

    async def put(self, file: BlockNode, host: int, guest: int, n: int) -> None:
        """Write the payload's bytes for guest ``[guest, guest + n)`` to ``file`` at ``host``."""
        raise NotImplementedError

    async def get(self, guest: int, n: int) -> bytes:
        raise NotImplementedError


class BytesPayload(Payload):
    def __init__(self, offset: int, data: bytes) -> None:
        super().__init__(offset, len(data))
        self.data = data

    def get_now(self, guest: int, n: int) -> bytes:
        lo = guest - self.offset
        if lo == 0 and n == len(self.data):
            return self.data
        return self.data[lo : lo + n]

    async def put(self, file: BlockNode, host: int, guest: int, n: int) -> None:
        await file.write(host, self.get_now(guest, n))

    async def get(self, guest: int, n: int) -> bytes:
        return self.get_now(guest, n)


#: one file-to-file copy: (destination offset, source file, source offset, length)
Copy = tuple[int, FileNode, int, int]


class HostPayload(Payload):
    """Bytes that sit in another image's host file (``HostExtents``): copied file to file."""

    def __init__(
        self,
        offset: int,
        length: int,
        src: HostExtents,
        collect: list[Copy] | None = None,
    ) -> None:
        super().__init__(offset, length)
        assert isinstance(src.file, FileNode)
        self.file: FileNode = src.file
        self.pieces = src.pieces
        #: with a list, put() only records the copies for one copy_many later
        self.collect = collect

    def _parts(self, guest: int, n: int) -> list[tuple[int, int, int]]:
        """(position in the request, source host offset, length) covering guest [guest, +n)."""
        out: list[tuple[int, int, int]] = []
        end = guest + n
        for g, h, m in self.pieces:
            lo, hi = max(g, guest), min(g + m, end)
            if lo < hi:
                out.append((lo - guest, h + lo - g, hi - lo))
        if sum(p[2] for p in out) != n:
            raise BlockIOError(errno.EIO, "qcow2: copy source does not cover the request")
        return out

    async def put(self, file: BlockNode, host: int, guest: int, n: int) -> None:
        assert isinstance(file, FileNode)
        copies = [
            (host + pos, self.file, src_host, m) for pos, src_host, m in self._parts(guest, n)
        ]
        if self.collect is not None:
            self.collect.extend(copies)
        else:
            await file.copy_many(copies)

    async def get(self, guest: int, n: int) -> bytes:
        parts = [await self.file.read(h, m) for _p, h, m in self._parts(guest, n)]
        return b"".join(parts)
