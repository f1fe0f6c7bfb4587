"""Requests resolved to host-file positions without waiting, for batched I/O.

A thread round trip costs far more than copying 4 KiB in the page cache, so
a server with many small requests queued resolves each one to where its bytes
lie in a host file (:meth:`BlockNode.direct_io`, answered from cached
metadata only) and then moves all of them in one worker-thread call
(:func:`blockd.block.drivers.file.start_direct`).  A request that cannot be
resolved that way (metadata not cached, allocation needed, backing data...)
takes the node's ordinary async path instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
