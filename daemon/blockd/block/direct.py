"""Requests resolved to host-file positions without waiting, for batched I/O.

A thread round trip costs far more than copying 4 KiB in the page cache, so
a server with many small requests queued resolves each one to where its bytes
lie in a host file (:meth:`BlockNode.direct_io`, answered from cached
metadata only) and then moves all of them in one worker-thread call
(:func:`start_direct`), or reads what the page cache holds on the event loop
(:func:`read_cached`).  A request that cannot be resolved that way (metadata
not cached, allocation needed, backing data...) takes the node's ordinary
async path instead.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

import outcome

from blockd.block import listio, workers
from blockd.errors import BlockIOError


@dataclass(slots=True)
class DirectIO:
    """One request's bytes in a host file, held until :meth:`release`.

    ``pieces`` are (host offset, length) in request order and cover it
    exactly.  While held, the host clusters cannot be freed or reused and the
    descriptor ``fd`` stays open; :meth:`release` must be called once, after
    the I/O is done.
    """

    fd: int
    pieces: list[tuple[int, int]]
    _release: Callable[[], None] | None = None
    #: a write: where the same bytes go too, in the same worker call (a node's
    #: write hook mirrors it: see :class:`blockd.block.node.Admission`)
    also: DirectIO | None = None
    #: set by the worker call: whether this request's I/O was all done, or its error
    ok: bool = False
    error: BlockIOError | None = None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


#: One request of a :func:`start_direct` batch: where, which way, and the bytes
#: (the source of a write, the destination of a read).
DirectJob = tuple[DirectIO, bool, memoryview]

#: Each request's error or None, in order (one failing does not stop the others).
DirectResult = list[BlockIOError | None]


def _direct_all(jobs: list[DirectJob]) -> DirectResult:
    """Run a batch, the writes' mirrors (``also``) with it; each request's
    error (a mirror's outcome is only in its ``ok``)."""
    mirrors: list[DirectJob] = [
        (io.also, True, buf) for io, write, buf in jobs if write and io.also is not None
    ]
    errors = _run_all(jobs + mirrors)
    for (io, _write, _buf), error in zip(jobs + mirrors, errors, strict=True):
        io.ok, io.error = error is None, error
    return errors[: len(jobs)]


def _run_all(jobs: list[DirectJob]) -> DirectResult:
    """Run a batch; plain calls finish what list I/O left (or was refused) and
    report the errors.

    A batch of writes goes through list I/O, so the worker gives the
    interpreter lock up once rather than once per request.  glibc runs one
    descriptor's requests one after the other, which costs writes nothing
    (buffered writes to a file take its inode lock in turn anyway) but would
    cost reads the worker threads' parallelism: they keep the plain calls.
    """
    done: list[int] | None = None
    if all(write for _io, write, _buf in jobs):
        ops: list[listio.Op] = []
        for io, _write, buf in jobs:
            pos = 0
            for host, n in io.pieces:
                ops.append((io.fd, True, host, buf, pos, n))
                pos += n
        if len(ops) > 1:
            done = listio.transfer(ops)
    errors: DirectResult = []
    index = 0
    for io, write, buf in jobs:
        pos = 0
        first = index
        index += len(io.pieces)
        try:
            for k, (host, n) in enumerate(io.pieces, first):
                got = max(done[k], 0) if done is not None else 0
                if got < n:
                    rest = buf[pos + got : pos + n]
                    if write:
                        pwrite_full(io.fd, host + got, rest)
                    else:
                        preadv_full(io.fd, host + got, rest)
                pos += n
        except OSError as exc:
            errors.append(BlockIOError(exc.errno or errno.EIO))
        else:
            errors.append(None)
    return errors


def start_direct(
    jobs: list[DirectJob], done: Callable[[outcome.Outcome[DirectResult]], object]
) -> None:
    """Start many resolved requests in one worker-thread call; ``done`` gets the
    outcome on the event loop (a callback, with :func:`workers.submit`'s rules).

    A callback rather than an awaited call: a server with many small
    requests in flight then needs no task, and no task switch, per batch.
    """
    workers.submit(lambda: _direct_all(jobs), done)


_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def read_cached(io: DirectIO, buf: memoryview) -> bool:
    """Fill ``buf`` from ``io`` if the page cache holds all of it; False if not.

    ``RWF_NOWAIT`` makes the kernel refuse (EAGAIN, or a short count) instead
    of waiting for the disk, so this may run on the event loop: a small read
    of cached data costs a few microseconds, far less than a thread round
    trip.  On False the caller reads through :func:`start_direct`.
    """
    if _RWF_NOWAIT is None:
        return False
    pos = 0
    try:
        for host, n in io.pieces:
            if os.preadv(io.fd, [buf[pos : pos + n]], host, _RWF_NOWAIT) != n:
                return False
            pos += n
    except OSError:
        return False
    return True


def preadv_full(fd: int, offset: int, view: memoryview) -> None:
    """Fill ``view`` from ``offset``; past EOF the file reads as zeros."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            view[got:] = bytes(len(view) - got)
            return
        got += n


def pwrite_full(fd: int, offset: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
