"""The ``raw`` format driver: the guest sees a window (``offset``, ``size``) of its file."""

from __future__ import annotations

import errno

from blockd.block.node import BlockNode, Status
from blockd.block.permissions import Role
from blockd.errors import BlockError, BlockIOError, ImageError

SECTOR_SIZE = 512


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
        # QEMU's checks, in its order, against the file's length in whole sectors
        real = file.size
        if offset > real:
            raise ImageError(
                f"Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )
        if size is not None and real - offset < size:
            # (QEMU's text has the two spaces before "actual")
            raise ImageError(
                f"The sum of offset ({offset}) and size ({size}) has to be smaller "
                f"or equal to the  actual size of the containing file ({real})"
            )
        if size is not None and size % SECTOR_SIZE:
            raise ImageError(f"Specified size is not multiple of {SECTOR_SIZE}")
        self._offset = offset
        if offset or size is not None:
            self.file_role = Role.DATA  # a window: not the file's data as a whole
        self._fixed_size = size

    @property
    def size(self) -> int:
        """Whole sectors, as QEMU counts every node: an ``offset`` that is not
        a multiple of 512 leaves a partial last sector, which reads as zeros."""
        if self._fixed_size is not None:
            return self._fixed_size
        return -(-max(0, self._file.size - self._offset) // SECTOR_SIZE) * SECTOR_SIZE

    def _check_inside_file(self, offset: int, length: int) -> None:
        """Refuse to write past the file's last sector from a rounded-up tail.

        QSD 7.2 aborts on such a write (an assertion: the raw node may not
        resize its file); it would grow the file past what the node showed.
        """
        if self._offset + offset + length > self._file.size:
            raise BlockIOError(
                errno.EIO,
                f"Request {offset}+{length} is beyond the end of the file under "
                f"'{self.node_name}' ({self._file.size} bytes)",
            )

    async def _do_read(self, offset: int, length: int) -> bytes:
        self._file.debug_event("read_aio")
        return await self._file.read(self._offset + offset, length)

    async def _do_write(self, offset: int, data: bytes) -> None:
        self._check_inside_file(offset, len(data))
        self._file.debug_event("write_aio")
        await self._file.write(self._offset + offset, data)

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        self._check_inside_file(offset, length)
        await self._file.write_zeroes(self._offset + offset, length)

    async def _do_discard(self, offset: int, length: int) -> None:
        await self._file.discard(self._offset + offset, length)

    async def _do_block_status(self, offset: int, length: int) -> tuple[Status, int]:
        return await self._file.block_status(self._offset + offset, length)

    async def _do_truncate(self, size: int) -> None:
        if self._offset or self._fixed_size is not None:
            raise BlockError("Cannot resize a raw node with 'offset' or 'size' options")
        await self._file.truncate(size)
