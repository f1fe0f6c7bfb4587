"""The ``file`` protocol driver: a host file accessed with positional I/O.

Every blocking call runs in one of the shared worker threads of
:mod:`blockd.block.workers`, so a busy copy never stalls the event loop and
the number of threads stays bounded however many nodes are open.  The one
exception is :func:`blockd.block.direct.read_cached` of this file's bytes,
which only copies what the page cache already holds and is refused by the
kernel rather than wait for the disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import TypeVar

import trio

from blockd.block import workers
from blockd.block.direct import preadv_full, pwrite_full
from blockd.block.node import BlockNode, Status
from blockd.errors import BlockIOError, ImageError

T = TypeVar("T")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20
SECTOR_SIZE = 512

# QEMU's image locking (file-posix.c): OFD read locks on byte 100+p for each
# permission p held and on byte 200+p for each permission not shared with others.
_PERM_CONSISTENT_READ = 0
_PERM_WRITE = 1
_PERM_RESIZE = 3
_PERM_NAMES = {
    0: "consistent read",
    1: "write",
    2: "write unchanged",
    3: "resize",
    4: "change children",
}
_LOCK_BASE_PERM = 100
_LOCK_BASE_SHARED = 200
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux


def _flock(fd: int, cmd: int, kind: int, start: int, length: int = 1) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    return int(_FLOCK.unpack(res)[0])


def _perms(read_only: bool, force_share: bool) -> tuple[list[int], list[int]]:
    """(held, unshared) permissions for a node in this mode, as QSD takes them."""
    held = [_PERM_CONSISTENT_READ] if read_only else [_PERM_CONSISTENT_READ, _PERM_WRITE,
                                                         _PERM_RESIZE]
    return held, [] if force_share else [_PERM_WRITE, _PERM_RESIZE]


def lock_image(fd: int, read_only: bool, force_share: bool = False) -> None:
    """Take QEMU-compatible locks so qemu tools and blockd keep off each other's images."""
    _lock(fd, *_perms(read_only, force_share))


def _lock(fd: int, held: list[int], unshared: list[int]) -> None:
    for p in held:
        _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_BASE_PERM + p)
    for p in unshared:
        _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_BASE_SHARED + p)
    try:
        for p in held:
            if _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _LOCK_BASE_SHARED + p) != fcntl.F_UNLCK:
                raise ImageError(f'Failed to get "{_PERM_NAMES[p]}" lock')
        for p in unshared:
            if _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _LOCK_BASE_PERM + p) != fcntl.F_UNLCK:
                raise ImageError(f'Failed to get shared "{_PERM_NAMES[p]}" lock')
    except BaseException:
        unlock_image(fd)
        raise


def unlock_image(fd: int) -> None:
    _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, _LOCK_BASE_PERM, 200)


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

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def call(fd: int, offset: int, length: int) -> None:
        # only a hint (start writeback now); a failure shows at the next flush
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    return call


_start_writeback = _load_sync_file_range()


async def run_io(fn: Callable[[], T]) -> T:
    """Run one blocking call in a worker thread; OSError becomes BlockIOError."""
    try:
        return await workers.run(fn)
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


_COPY_FALLBACK_ERRNOS = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF)
_COPY_BUFFER = 1 << 20


def _copy_full(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    """Copy ``length`` bytes between two files, in the kernel where it can.

    ``copy_file_range`` moves the bytes page cache to page cache without a
    round trip through user space; where it is refused (other file systems,
    old kernels) a buffered loop does the same.  Past the source's end the
    bytes read as zeros, as :func:`_pread_full` makes them.
    """
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(
                src_fd, dst_fd, length - done, src_offset + done, dst_offset + done
            )
        except OSError as exc:
            if exc.errno not in _COPY_FALLBACK_ERRNOS:
                raise
            break
        if n == 0:
            break  # end of the source: the rest is zeros (buffered path below)
        done += n
    while done < length:
        n = min(_COPY_BUFFER, length - done)
        pwrite_full(dst_fd, dst_offset + done, _pread_full(src_fd, src_offset + done, n))
        done += n


def _zero_fill(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(length, _ZERO_CHUNK))
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        pwrite_full(fd, offset + done, zeros[:n])
        done += n


class _FlushRun:
    """One fdatasync in progress; it covers the flush calls numbered up to ``covers``."""

    def __init__(self, covers: int) -> None:
        self.covers = covers
        self.done = trio.Event()
        self.error: BlockIOError | None = None
        self.aborted = False


class FileNode(BlockNode):
    """A host file; growable, because format drivers allocate past its end."""

    driver = "file"
    growable = True

    def __init__(
        self,
        node_name: str,
        filename: str,
        fd: int,
        *,
        read_only: bool,
        locking: bool = True,
        force_share: bool = False,
    ) -> None:
        super().__init__(node_name, read_only=read_only)
        self._filename = filename
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self.locking = locking
        self.force_share = force_share
        self._inflight = 0
        self._idle = trio.Event()
        self._draining = 0  # tasks waiting for _idle
        self._writeback_busy = False
        self._writeback_next: tuple[int, int] | None = None
        self._flush_calls = 0
        self._flush_run: _FlushRun | None = None

    @classmethod
    async def open(
        cls,
        node_name: str,
        filename: str,
        *,
        read_only: bool,
        locking: bool = True,
        force_share: bool = False,
    ) -> FileNode:
        """Open and (unless ``locking`` is off) lock the file the way QEMU does.

        ``force_share`` (read-only only) shares every permission, so the image
        can be inspected while another process writes it, as ``qemu-img -U``.
        """
        if force_share and not read_only:
            raise ImageError("force-share=on can only be used with read-only images")
        fd = await cls._open_fd(filename, read_only)
        if locking:
            try:
                await run_io(lambda: lock_image(fd, read_only, force_share))
            except BaseException:
                os.close(fd)
                raise
        return cls(node_name, filename, fd, read_only=read_only, locking=locking,
                   force_share=force_share)

    @staticmethod
    async def _open_fd(filename: str, read_only: bool) -> int:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = await workers.run(lambda: os.open(filename, flags))
        except OSError as exc:
            raise ImageError(
                f"Could not open '{filename}': {os.strerror(exc.errno or errno.EIO)}"
            ) from exc
        if not os.path.isfile(filename):
            os.close(fd)
            raise ImageError(f"Could not open '{filename}': Not a regular file")
        return fd

    @property
    def size(self) -> int:
        """The file's length rounded up to whole 512-byte sectors, as QEMU
        counts every node: the tail past the end reads as zeros, and a write
        there grows the file only as far as the write goes."""
        return -(-self._size // SECTOR_SIZE) * SECTOR_SIZE

    @property
    def filename(self) -> str:
        return self._filename

    @property
    def fd(self) -> int:
        return self._fd

    async def free_space(self) -> int | None:
        try:
            st = await run_io(lambda: os.statvfs(self._filename))
        except BlockIOError:
            return None
        return st.f_bavail * st.f_frsize

    async def _do_read(self, offset: int, length: int) -> bytes:
        fd = self._fd
        return await self._io(lambda: _pread_full(fd, offset, length))

    async def _do_readinto(self, offset: int, view: memoryview) -> None:
        fd = self._fd
        await self._io(lambda: preadv_full(fd, offset, view))

    async def _do_write(self, offset: int, data: bytes) -> None:
        fd = self._fd
        await self._io(lambda: pwrite_full(fd, offset, data))
        self._size = max(self._size, offset + len(data))

    async def _do_write_many(self, writes: list[tuple[int, bytes]]) -> None:
        if not writes:
            return
        fd = self._fd

        def write_all() -> None:
            for offset, data in writes:
                pwrite_full(fd, offset, data)

        await self._io(write_all)
        self._size = max(self._size, *(offset + len(data) for offset, data in writes))

    async def copy_from(self, offset: int, src: FileNode, src_offset: int, length: int) -> None:
        """Write ``length`` bytes of ``src`` (from ``src_offset``) at ``offset``.

        One worker-thread call; the bytes never enter Python (copy_file_range).
        """
        await self.copy_many([(offset, src, src_offset, length)])

    async def copy_many(self, copies: list[tuple[int, FileNode, int, int]]) -> None:
        """Several :meth:`copy_from` s, (offset, src, src_offset, length), in one worker call.

        A thread round trip costs more than copying a MiB in the page cache,
        so callers batch what they can.
        """
        for offset, src, src_offset, length in copies:
            self._check_request(offset, length)
            src._check_open()
            if src_offset < 0:
                raise BlockIOError(errno.EINVAL)
        self._check_writable()
        jobs = [(src._fd, src_off, off, n) for off, src, src_off, n in copies if n]
        if not jobs:
            return
        dst_fd = self._fd
        sources = list({id(src): src for _o, src, _s, n in copies if n}.values())

        def copy_all() -> None:
            for src_fd, src_off, off, n in jobs:
                _copy_full(src_fd, src_off, dst_fd, off, n)

        # every descriptor must stay open while the worker uses it
        for src in sources:
            src._inflight += 1
        try:
            await self._io(copy_all)
        finally:
            for src in sources:
                src.release_fd()
        lo = min(off for _f, _s, off, _n in jobs)
        hi = max(off + n for _f, _s, off, n in jobs)
        self._size = max(self._size, hi)
        self.start_writeback(lo, hi - lo)

    def start_writeback(self, offset: int, length: int) -> None:
        """Let the disk start on dirty pages of the range now, without waiting.

        Bulk copies end in a flush; started early, the write-out overlaps with
        the copying that follows instead of all happening in that flush.  One
        background thread call at a time (it may block while the device queue
        is full); ranges asked for meanwhile are merged and sent next.  Only a
        hint: errors surface at the next flush as they would anyway.
        """
        if _start_writeback is None or self.closed or length <= 0:
            return
        lo, hi = offset, offset + length
        if self._writeback_next is not None:
            lo, hi = min(lo, self._writeback_next[0]), max(hi, self._writeback_next[1])
        self._writeback_next = (lo, hi)
        if not self._writeback_busy:
            self._writeback_kick()

    def _writeback_kick(self) -> None:
        job, self._writeback_next = self._writeback_next, None
        if job is None or _start_writeback is None or self._fd < 0:
            return
        start_writeback, fd, (lo, hi) = _start_writeback, self._fd, job
        token = trio.lowlevel.current_trio_token()
        self._writeback_busy = True
        self._inflight += 1  # the descriptor stays open until the call is back

        def done() -> None:
            self._writeback_busy = False
            self.release_fd()
            if not self.closed:
                self._writeback_kick()

        def deliver(_outcome: object) -> None:
            # if the loop is gone, so is everybody who would wait for this
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done)

        trio.lowlevel.start_thread_soon(lambda: start_writeback(fd, lo, hi - lo), deliver)

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        fd = self._fd

        def zero() -> None:
            fallocate = _fallocate
            if fallocate is not None and fallocate(fd, _FALLOC_FL_ZERO_RANGE, offset, length) == 0:
                return
            _zero_fill(fd, offset, length)

        await self._io(zero)
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

        await self._io(punch)

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

        return await self._io(probe)

    async def _do_flush(self) -> None:
        # Group commit: one fdatasync covers every write completed before it
        # started, so callers that arrive while one runs share the next one
        # instead of queueing a sync each (parallel allocating writes all flush).
        self._flush_calls += 1
        mine = self._flush_calls
        while (run := self._flush_run) is not None:
            await run.done.wait()
            if not run.aborted and run.covers >= mine:
                if run.error is not None:
                    raise BlockIOError(run.error.errno, str(run.error)) from run.error
                return
        run = _FlushRun(self._flush_calls)
        self._flush_run = run
        fd = self._fd
        try:
            await self._io(lambda: os.fdatasync(fd))
        except BlockIOError as exc:
            # the error is reported once per descriptor: later syncs would pass
            run.error = exc
            raise
        except BaseException:
            run.aborted = True  # cancelled before it ran: the waiters try again
            raise
        finally:
            self._flush_run = None
            run.done.set()

    async def _do_truncate(self, size: int) -> None:
        fd = self._fd
        await self._io(lambda: os.ftruncate(fd, size))
        self._size = size

    async def _do_reopen(self, read_only: bool) -> None:
        new_fd = await self._open_fd(self._filename, read_only)
        old = self._fd
        if self.locking:
            # our old descriptor's locks would conflict with the new one's
            await run_io(lambda: unlock_image(old))
            try:
                if self.force_share and not read_only:
                    raise ImageError("force-share=on can only be used with read-only images")
                await run_io(lambda: lock_image(new_fd, read_only, self.force_share))
            except BaseException:
                os.close(new_fd)
                await run_io(lambda: lock_image(old, self.read_only, self.force_share))
                raise
        self._fd = new_fd
        # I/O that captured the old descriptor must finish before it is closed:
        # a closed number can be reused by an unrelated file at once
        await self._drain()
        os.close(old)

    async def _do_close(self) -> None:
        await self._drain()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    async def _io(self, fn: Callable[[], T]) -> T:
        """run_io, counted, so the descriptor is never closed under a running call."""
        self._inflight += 1
        try:
            return await run_io(fn)
        finally:
            self.release_fd()

    def hold_fd(self) -> int:
        """The descriptor, kept open until :meth:`release_fd`, for I/O run by
        :func:`blockd.block.direct.start_direct` rather than through this node's own calls."""
        self._check_open()
        self._inflight += 1
        return self._fd

    def release_fd(self) -> None:
        self._inflight -= 1
        if not self._inflight and self._draining:
            self._idle.set()
            self._idle = trio.Event()

    async def _drain(self) -> None:
        with trio.CancelScope(shield=True):
            while self._inflight:
                self._draining += 1
                try:
                    await self._idle.wait()
                finally:
                    self._draining -= 1

    async def refresh_size(self) -> int:
        """Re-read the file length (someone else may have changed the file)."""
        fd = self._fd
        self._size = await run_io(lambda: os.fstat(fd).st_size)
        return self.size


# -- creating a file (blockdev-create's ``file`` driver) --------------------------------

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_NOCOW_FL = 0x00800000
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
_FS_XFLAG_EXTSIZE = 0x00000800
_FSXATTR = struct.Struct("=IIIII8s")  # xflags, extsize, nextents, projid, cowextsize, pad
_WRITE_CHUNK = 65536


def _set_nocow(fd: int) -> None:
    """Ask btrfs-like file systems not to copy on write; advisory, as in QEMU."""
    with contextlib.suppress(OSError):
        flags = struct.unpack("=i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 4))[0]
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("=i", flags | _FS_NOCOW_FL))


def _set_extent_size_hint(fd: int, hint: int) -> None:
    """XFS's extent size hint; a file system without it just ignores the wish."""
    with contextlib.suppress(OSError):
        raw = fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
        xflags, _extsize, nextents, projid, cowextsize, pad = _FSXATTR.unpack(raw)
        fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, _FSXATTR.pack(
            xflags | _FS_XFLAG_EXTSIZE, hint, nextents, projid, cowextsize, pad))


def _allocate_first_block(fd: int, size: int) -> None:
    """QEMU writes zeros over the start of a new file (so that the file
    system allocates its first block now); a file shorter than a sector
    thereby becomes a sector long, and blockd's must be the same file."""
    os.pwrite(fd, bytes(SECTOR_SIZE if size < 4096 else 4096), 0)


def grow_file(fd: int, size: int, preallocation: str) -> None:
    """Make the file ``size`` bytes long the way QEMU's file driver does for
    each preallocation mode (the new area reads as zeros in every mode).

    ``falloc`` reserves the blocks, ``full`` writes zeros, ``off`` only sets
    the length.  A failure puts the old length back and raises
    :class:`BlockIOError` with QEMU's words.
    """
    if preallocation not in ("off", "falloc", "full"):
        raise BlockIOError(errno.ENOTSUP, f"Unsupported preallocation mode: {preallocation}")
    current = os.fstat(fd).st_size
    if size >= 1 << 63:
        size -= 1 << 64  # QEMU's off_t: past INT64_MAX a length is negative
    if preallocation != "off" and size < current:
        raise BlockIOError(errno.ENOTSUP, "Cannot use preallocation for shrinking files")
    try:
        if preallocation == "falloc":
            if size > current:
                os.posix_fallocate(fd, current, size - current)
                if current == 0:
                    _allocate_first_block(fd, size)
        elif preallocation == "full":
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                raise BlockIOError(exc.errno or errno.EIO,
                                   f"Could not resize file: {os.strerror(exc.errno or 5)}"
                                   ) from exc
            pos = current
            zeros = bytes(_WRITE_CHUNK)
            while pos < size:
                pos += os.pwrite(fd, zeros[: min(_WRITE_CHUNK, size - pos)], pos)
            os.fsync(fd)
        else:
            os.ftruncate(fd, size)
            if current == 0 and size > 0:
                _allocate_first_block(fd, size)
    except BlockIOError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, current)
        raise
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, current)
        what = {
            "falloc": "Could not preallocate new data",
            "full": "Could not write zeros for preallocation",
        }.get(preallocation, "Could not resize file")
        code = exc.errno or errno.EIO
        raise BlockIOError(code, f"{what}: {os.strerror(code)}") from exc


def _create_file(filename: str, size: int, preallocation: str, nocow: bool,
                 extent_size_hint: int) -> None:
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        code = exc.errno or errno.EIO
        raise BlockIOError(code, f"Could not create '{filename}': {os.strerror(code)}") from exc
    try:
        # write and resize, sharing all but resizing: the length is ours to set
        _lock(fd, [_PERM_WRITE, _PERM_RESIZE], [_PERM_RESIZE])
        try:
            os.ftruncate(fd, 0)
            if nocow:
                _set_nocow(fd)
            _set_extent_size_hint(fd, extent_size_hint)
            grow_file(fd, size, preallocation)
        finally:
            unlock_image(fd)
    finally:
        os.close(fd)


async def create_file(filename: str, size: int, *, preallocation: str = "off",
                      nocow: bool = False, extent_size_hint: int = 1 << 20) -> None:
    """Create (or empty) ``filename`` and give it ``size`` bytes, as QEMU's
    ``file`` driver does for blockdev-create: under QEMU's image locks, so a
    file another process (or node) has open for writing is refused untouched."""
    await workers.run(
        lambda: _create_file(filename, size, preallocation, nocow, extent_size_hint))
