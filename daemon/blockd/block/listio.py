"""Many reads and writes at scattered file offsets in one call, through glibc's ``lio_listio``.

Why not a loop of ``os.pwrite`` in the worker thread: each call gives the
interpreter lock up and takes it back, and while the event loop holds the
lock each taking back is a thread hand-off that costs several times a 4 KiB
write into the page cache.  Under small random writes that hand-off, not the
disk, set the pace.  ``lio_listio(LIO_WAIT, ...)`` (POSIX list I/O, in glibc
since forever, run by glibc's own I/O threads) takes the whole batch in one
foreign call, so the lock is given up once per batch.

Only where the layout of ``struct aiocb`` is the one declared below (glibc on
64-bit Linux); elsewhere :data:`AVAILABLE` is False and callers keep their
plain loop.  Memory safety rests on one rule: the control blocks and buffers
stay alive until every request has finished, which :func:`transfer` waits
for even if ``lio_listio`` returns early.  The worker threads that call it
block signals (see :mod:`blockd.block.workers`), so it does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform
import sys
from collections.abc import Callable
from typing import Any

_LIO_READ = 0
_LIO_WRITE = 1
_LIO_WAIT = 0
_SIGEV_NONE = 1


class _Sigevent(ctypes.Structure):
    """Linux's ``struct sigevent``: only ``sigev_notify`` is set (no notification)."""

    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("pad", ctypes.c_ubyte * 48),
    ]


class _Aiocb(ctypes.Structure):
    """glibc's ``struct aiocb`` on LP64 (``aiocb64`` is the same there)."""

    _fields_ = [
        ("aio_fildes", ctypes.c_int),
        ("aio_lio_opcode", ctypes.c_int),
        ("aio_reqprio", ctypes.c_int),
        ("aio_buf", ctypes.c_void_p),
        ("aio_nbytes", ctypes.c_size_t),
        ("aio_sigevent", _Sigevent),
        ("next_prio", ctypes.c_void_p),
        ("abs_prio", ctypes.c_int),
        ("policy", ctypes.c_int),
        ("error_code", ctypes.c_int),
        ("return_value", ctypes.c_ssize_t),
        ("aio_offset", ctypes.c_int64),
        ("reserved", ctypes.c_ubyte * 32),
    ]


#: glibc's size of the structure on LP64, checked against ctypes' layout of the one above.
_GLIBC_AIOCB_SIZE = 168


def _load() -> tuple[Any, Any] | None:
    if (
        sys.platform != "linux"
        or ctypes.sizeof(ctypes.c_void_p) != 8
        or platform.libc_ver()[0] != "glibc"
        or ctypes.sizeof(_Aiocb) != _GLIBC_AIOCB_SIZE
    ):
        return None
    # glibc 2.34 moved the AIO functions from librt into libc
    for name in (None, ctypes.util.find_library("rt")):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            listio, suspend = lib.lio_listio, lib.aio_suspend
        except (OSError, AttributeError):
            continue
        listio.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        listio.restype = ctypes.c_int
        suspend.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        suspend.restype = ctypes.c_int
        return listio, suspend
    return None


_functions = _load()
AVAILABLE = _functions is not None

#: One request: (descriptor, write?, file offset, buffer, start and length in
#: the buffer); the buffer holds the bytes to write or receives those read.
Op = tuple[int, bool, int, memoryview, int, int]


def _address(buf: memoryview, held: list[object]) -> int | None:
    """Where ``buf``'s bytes lie in memory, kept valid while ``held`` lives.

    ctypes takes the address of a writable buffer directly; of a read-only
    one only when it views a whole ``bytes`` object (as a received NBD
    payload is), through ``c_char_p``, which points into the object.
    """
    if not buf.contiguous:
        return None
    if not buf.readonly:
        target = (ctypes.c_char * buf.nbytes).from_buffer(buf)
        held.append(target)
        return ctypes.addressof(target)
    whole = buf.obj
    if type(whole) is not bytes or len(whole) != buf.nbytes:
        return None
    pointer = ctypes.c_char_p(whole)
    held.append(pointer)
    return ctypes.cast(pointer, ctypes.c_void_p).value


def transfer(ops: list[Op]) -> list[int] | None:
    """Run every request, in one ``lio_listio`` call; each one's byte count or -errno.

    A count short of the request (end of file, a partial write, a request
    glibc could not queue) is returned as it is: the caller finishes or
    reports it.  None when nothing was started: list I/O is unavailable
    here, or a buffer's address cannot be had.
    """
    if _functions is None or not ops:
        return None
    listio, suspend = _functions
    n = len(ops)
    blocks = (_Aiocb * n)()
    pointers = (ctypes.c_void_p * n)()
    held: list[object] = []
    bases: dict[int, int] = {}
    try:
        for i, (fd, write, offset, buf, start, length) in enumerate(ops):
            base = bases.get(id(buf))
            if base is None:
                found = _address(buf, held)
                if found is None:
                    return None
                base = bases[id(buf)] = found
            block = blocks[i]
            block.aio_fildes = fd
            block.aio_lio_opcode = _LIO_WRITE if write else _LIO_READ
            block.aio_buf = base + start
            block.aio_nbytes = length
            block.aio_offset = offset
            block.aio_sigevent.sigev_notify = _SIGEV_NONE
            pointers[i] = ctypes.addressof(block)
        listio(_LIO_WAIT, pointers, n, None)
        _wait_all(blocks, pointers, suspend)
        return [
            -block.error_code if block.error_code else block.return_value for block in blocks
        ]
    finally:
        del held  # ends the buffer exports


def _wait_all(
    blocks: ctypes.Array[_Aiocb],
    pointers: ctypes.Array[ctypes.c_void_p],
    suspend: Callable[..., int],
) -> None:
    """Return only once no request is in progress: the blocks and buffers are
    freed after this, and glibc's threads must be done with them."""
    while any(block.error_code == errno.EINPROGRESS for block in blocks):
        suspend(pointers, len(blocks), None)
