"""The ``raw`` format driver: the guest sees a window (``offset``, ``size``) of its file."""

from __future__ import annotations

from blockd.block.node import BlockNode, Status
from blockd.errors import BlockError, ImageError


class RawNode(BlockNode):
    """A raw image; with no ``size`` option it tracks the file's length."""

    driver = "raw"

    def __init__(
        self,
        node_name: str,
        file: BlockNode,
        *,
        read_only: bool,
        offset: int = 0,
        size: int | None = None,
    ) -> None:
        super().__init__(node_name, read_only=read_only, file=file)
        if offset < 0 or (size is not None and size < 0):
            raise ImageError("offset and size must not be negative")
        end = offset + (size if size is not None else 0)
        if end > file.size:
            raise ImageError(
                f"The sum of offset ({offset}) and size ({size or 0}) has to be smaller "
                f"or equal to the actual size of the containing file ({file.size})"
            )
        self._offset = offset
        self._fixed_size = size

    @property
    def size(self) -> int:
        if self._fixed_size is not None:
            return self._fixed_size
        return max(0, self._file.size - self._offset)

    async def _do_read(self, offset: int, length: int) -> bytes:
        self._file.debug_event("read_aio")
        return await self._file.read(self._offset + offset, length)

    async def _do_write(self, offset: int, data: bytes) -> None:
        self._file.debug_event("write_aio")
        await self._file.write(self._offset + offset, data)

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        await self._file.write_zeroes(self._offset + offset, length)

    async def _do_discard(self, offset: int, length: int) -> None:
        await self._file.discard(self._offset + offset, length)

    async def _do_block_status(self, offset: int, length: int) -> tuple[Status, int]:
        return await self._file.block_status(self._offset + offset, length)

    async def _do_truncate(self, size: int) -> None:
        if self._offset or self._fixed_size is not None:
            raise BlockError("Cannot resize a raw node with 'offset' or 'size' options")
        await self._file.truncate(size)
