"""Keeping a second image in step with a node's writes: an active commit's write hook.

Installed on the active node (:meth:`BlockNode.set_write_hook`), it sees every
request that changes the node, whoever sends it (an export, a job), and
feeds the job's :class:`~blockd.block.dirty.DirtyBitmap`:

* **background** (``blocking`` False): a write marks its chunks dirty once it
  is in place; the job copies them later.  A write that cannot wait
  (:meth:`BlockNode.direct_io`, the NBD fast path) is admitted at once unless
  something overlapping holds its range.
* **write-blocking**: a plain or zero write is also made on the target before
  it is acknowledged (a write that cannot wait, in the same worker call, where
  the target can overwrite the range in place; otherwise on the async path);
  the chunks it covers whole become clean, those it covers in part keep
  their state (clean ones stay equal in both images, dirty ones are still
  copied).  So the dirty set only shrinks, whatever the write rate.
  Discards (whose result the target need not read the same way) and bulk copies
  into the node (no bytes at hand) mark their chunks dirty instead.

Every write holds its range in :class:`~blockd.block.ranges.RangeLocks` from
before it starts until it is done (mirror included); the job holds the
ranges it copies in write-blocking mode, and the whole node for the last
copy before READY in background mode, so a copy never writes older data
over a newer mirrored write, and two overlapping writes reach both images
in the same order.

A failed mirror write leaves the guest's write successful (it is in the
node the guest reads), marks its chunks dirty (the copy retries them) and
is reported to the job, whose ``on-error`` policy decides; a failed flush of
the target likewise.  The guest's FLUSH (and so a FUA write) flushes the
target too once the node is flushed, so what it acknowledged is durable in
both images.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from blockd.block.dirty import DirtyBitmap
from blockd.block.node import Admission, BlockNode, WriteKind
from blockd.block.ranges import RangeLocks
from blockd.errors import BlockIOError

log = logging.getLogger(__name__)

#: Larger than any node: a lock on [0, WHOLE) holds every range.
WHOLE = 1 << 63


class WriteMirror:
    """The hook: ``changed(cleared)`` after the dirty set changed (``cleared``:
    dirty bytes a mirrored write made clean); ``failed(error)`` when a write
    or flush of the target failed."""

    def __init__(
        self,
        target: BlockNode,
        dirty: DirtyBitmap,
        changed: Callable[[int], None],
        failed: Callable[[BlockIOError], None],
    ) -> None:
        self.target = target
        self.dirty = dirty
        self.locks = RangeLocks()
        #: write-blocking mode in effect: guest writes are mirrored
        self.blocking = False
        self._changed = changed
        self._failed = failed

    def _mark(self, offset: int, length: int) -> None:
        self.dirty.mark(offset, length)
        self._changed(0)

    def admit(self, offset: int, length: int) -> Admission | None:
        entry = self.locks.try_lock(offset, length)
        if entry is None:
            return None
        if not self.blocking:

            def marked(ok: bool | None) -> None:
                self.locks.unlock(entry)
                if ok is not None:
                    self._mark(offset, length)

            return Admission(marked)
        # write-blocking: only where base's bytes can be overwritten in place
        # too, from cached metadata; the async path does the rest
        also = self.target.direct_io(offset, length, True)
        if also is None:
            self.locks.unlock(entry)
            return None

        def mirrored(ok: bool | None) -> None:
            also.release()
            self.locks.unlock(entry)
            if ok is None:
                return
            if not ok or not also.ok:
                self._mark(offset, length)
                if ok and also.error is not None:
                    self._report(offset, length, also.error)
                return
            self._changed(self.dirty.clear_inside(offset, length))

        return Admission(mirrored, also)

    @asynccontextmanager
    async def guard(
        self, kind: WriteKind, offset: int, length: int, data: bytes | None
    ) -> AsyncIterator[None]:
        entry = await self.locks.lock(offset, length)
        try:
            try:
                yield
            except BaseException:
                # what failed may have changed part of the range
                self._mark(offset, length)
                raise
            mirrored = kind is WriteKind.ZEROES or (kind is WriteKind.DATA and data is not None)
            if self.blocking and mirrored:
                await self._mirror(kind, offset, length, data)
            else:
                self._mark(offset, length)
        finally:
            self.locks.unlock(entry)

    async def _mirror(self, kind: WriteKind, offset: int, length: int, data: bytes | None) -> None:
        try:
            if data is not None and kind is WriteKind.DATA:
                await self.target.write(offset, data)
            else:
                await self.target.write_zeroes(offset, length)
        except BlockIOError as err:
            self._mark(offset, length)
            self._report(offset, length, err)
            return
        except BaseException:
            self._mark(offset, length)
            raise
        self._changed(self.dirty.clear_inside(offset, length))

    def _report(self, offset: int, length: int, err: BlockIOError) -> None:
        log.warning(
            "mirroring a write of %d bytes at %d to %s failed: %s",
            length, offset, self.target.node_name, err.desc,
        )  # fmt: skip
        self._failed(err)

    async def flushed(self) -> None:
        if not self.blocking:
            return
        try:
            await self.target.flush()
        except BlockIOError as err:
            log.warning("flushing %s after its source failed: %s", self.target.node_name, err.desc)
            self._failed(err)

    async def drain(self) -> None:
        """Wait until no write that went through the hook is in flight."""
        async with self.locks.holding(0, WHOLE):
            pass
