"""The ``file`` protocol driver: a host file accessed with positional I/O.

Every blocking call runs in a worker thread under one shared
``trio.CapacityLimiter`` so a busy copy never stalls the event loop and the
number of threads stays bounded however many nodes are open.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from typing import TypeVar

import trio

from blockd.block.node import BlockNode, Status
from blockd.errors import BlockIOError, ImageError

T = TypeVar("T")

#: Shared by every file node: bounds the worker threads doing disk I/O.
IO_LIMITER = trio.CapacityLimiter(16)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int

    def call(fd: int, mode: int, offset: int, length: int) -> int:
        if fn(fd, mode, offset, length) != 0:
            return ctypes.get_errno()
        return 0

    return call


_fallocate = _load_fallocate()


async def run_io(fn: Callable[[], T]) -> T:
    """Run one blocking call in a worker thread; OSError becomes BlockIOError."""
    try:
        return await trio.to_thread.run_sync(fn, limiter=IO_LIMITER)
    except OSError as exc:
        raise BlockIOError(exc.errno or errno.EIO) from exc


def _pread_full(fd: int, offset: int, length: int) -> bytes:
    """pread until ``length`` bytes; past EOF the file reads as zeros."""
    chunks: list[bytes] = []
    got = 0
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got < length:
        chunks.append(bytes(length - got))
    return b"".join(chunks)


def _pwrite_full(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _zero_fill(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(length, _ZERO_CHUNK))
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        _pwrite_full(fd, offset + done, zeros[:n])
        done += n


class FileNode(BlockNode):
    """A host file; growable, because format drivers allocate past its end."""

    driver = "file"
    growable = True

    def __init__(self, node_name: str, filename: str, fd: int, *, read_only: bool) -> None:
        super().__init__(node_name, read_only=read_only)
        self._filename = filename
        self._fd = fd
        self._size = os.fstat(fd).st_size

    @classmethod
    async def open(cls, node_name: str, filename: str, *, read_only: bool) -> FileNode:
        fd = await cls._open_fd(filename, read_only)
        return cls(node_name, filename, fd, read_only=read_only)

    @staticmethod
    async def _open_fd(filename: str, read_only: bool) -> int:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = await trio.to_thread.run_sync(os.open, filename, flags, limiter=IO_LIMITER)
        except OSError as exc:
            raise ImageError(
                f"Could not open '{filename}': {os.strerror(exc.errno or errno.EIO)}"
            ) from exc
        try:
            if not os.path.isfile(filename):
                raise ImageError(f"Could not open '{filename}': Not a regular file")
        except ImageError:
            os.close(fd)
            raise
        return fd

    @property
    def size(self) -> int:
        return self._size

    @property
    def filename(self) -> str:
        return self._filename

    @property
    def fd(self) -> int:
        return self._fd

    async def _do_read(self, offset: int, length: int) -> bytes:
        fd = self._fd
        return await run_io(lambda: _pread_full(fd, offset, length))

    async def _do_write(self, offset: int, data: bytes) -> None:
        fd = self._fd
        await run_io(lambda: _pwrite_full(fd, offset, data))
        self._size = max(self._size, offset + len(data))

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        fd = self._fd

        def zero() -> None:
            fallocate = _fallocate
            if fallocate is not None and fallocate(fd, _FALLOC_FL_ZERO_RANGE, offset, length) == 0:
                return
            _zero_fill(fd, offset, length)

        await run_io(zero)
        self._size = max(self._size, offset + length)

    async def _do_discard(self, offset: int, length: int) -> None:
        fd = self._fd
        end = min(offset + length, self._size)
        if end <= offset or _fallocate is None:
            return
        fallocate = _fallocate

        def punch() -> None:
            # discard is advisory: a file system without hole punching just keeps the data
            fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, end - offset)

        await run_io(punch)

    async def _do_block_status(self, offset: int, length: int) -> tuple[Status, int]:
        fd = self._fd
        end = offset + length

        def probe() -> tuple[Status, int]:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to EOF
                    return Status.ZERO, length
                return Status.DATA, length  # no SEEK_DATA support: assume data
            if data > offset:
                return Status.ZERO, min(data, end) - offset
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            return Status.DATA, min(hole, end) - offset

        return await run_io(probe)

    async def _do_flush(self) -> None:
        fd = self._fd
        await run_io(lambda: os.fdatasync(fd))

    async def _do_truncate(self, size: int) -> None:
        fd = self._fd
        await run_io(lambda: os.ftruncate(fd, size))
        self._size = size

    async def _do_reopen(self, read_only: bool) -> None:
        new_fd = await self._open_fd(self._filename, read_only)
        old, self._fd = self._fd, new_fd
        os.close(old)

    async def _do_close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    async def refresh_size(self) -> int:
        """Re-read the file length (someone else may have changed the file)."""
        fd = self._fd
        self._size = await run_io(lambda: os.fstat(fd).st_size)
        return self._size
