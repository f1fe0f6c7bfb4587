"""Active commit: merge the active layer into base while the guest keeps writing to it.

The job copies everything the layers above base hold, and learns of the
guest's writes from a write observer on the active node (a dirty bitmap at
about base's cluster granularity), copying those ranges again until nothing
is left; then base is flushed and the job is READY (what the guest writes
during that flush is copied in READY, as in QEMU).  From then on it keeps
base in sync until the client decides:

* ``block-job-complete``: the pivot.  Every export of the active node is held
  (new requests wait, those in flight finish), what is still dirty is copied,
  base is flushed, and the exports resume on base.  No request is lost or
  reordered, and base never serves a byte it does not hold.
* a soft cancel (``block-job-cancel`` without force, READY only): the same
  final copy with the exports held, so base is a consistent copy of the
  disk, but they stay where they are.
* a forced cancel: nothing changes for the guest; base keeps what was copied,
  which nothing reads through the chain differently from before.

The speed limit applies only before READY (as in QEMU 7.2): afterwards the
job keeps up with the guest at full speed, and neither a lowered speed nor
what was charged to the limit before delays the completion.

A base the client had opened read-only is made read-only again when the job
ends without a pivot, unless something that writes to it was added while the
job held it read-write (a writable export, a writable node on top of it):
those keep working, as they do in QEMU, which never restores the mode.

Before the pivot the guest only ever reads base where nothing above holds the
range, and the job only writes base where something above does, so the copy
is invisible to the guest at every moment.

Copy modes (``__org.blockd_copy-mode``; the job's hook on top is
:class:`~blockd.block.mirror.WriteMirror`):

* ``background`` (QEMU's only mode for commit): writes mark chunks dirty
  and the job copies them again, the dirty runs of a whole window in one
  batch.  The dirty set is never empty for long under a busy guest, so once
  it is small (:data:`HOLD_BYTES`) the job holds every write to top for the
  last copy (a few milliseconds) and goes READY.  A guest that dirties faster
  than the job copies keeps it from READY, as in QEMU.
* ``write-blocking``: every write to top is made on base too before it is
  acknowledged, so the dirty set only shrinks and READY comes after at most
  one pass over it, whatever the guest does; the guest's writes cost a
  second write (and its flushes a second flush).
* ``auto``: background until the dirty set has not shrunk by a tenth over
  :data:`AUTO_WINDOW`, then write-blocking for the rest of the job.  Until
  READY, while the guest is busy (:data:`GUEST_BUSY`), each copy is
  followed by a rest as long (:data:`GUEST_REST`): the guest keeps about
  half of what it does alone, and the job converges either way.

The switch to write-blocking happens between two of the job's copies, never
during one: a copy that held no range lock must not finish after a
mirrored write of the same range.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Unpack

import trio

from blockd.block.dirty import DirtyBitmap
from blockd.block.graph import BlockGraph
from blockd.block.mirror import WHOLE, WriteMirror
from blockd.block.node import BlockNode
from blockd.errors import BlockIOError
from blockd.events import BlockJobReady, EventSink
from blockd.jobs.copy import (
    BLOCKER,
    SCAN,
    WINDOW,
    ChainCopy,
    CopyFailed,
    restore_read_only,
    step_size,
)
from blockd.jobs.job import Job, JobOptions
from blockd.jobs.status import JobStatus

log = logging.getLogger(__name__)


#: How often a READY job looks for new writes to copy (QEMU's mirror: 100 ms).
READY_POLL = 0.1

#: Runs a chunk of the chain scan may hold for the next chunk to be twice as large.
_SCAN_RUNS = 256

#: Background mode: a dirty set this small, or that the job copies in about
#: HOLD_SECONDS at the rate of its recent copies (but never more than
#: HOLD_MAX), is copied with the writes to top held (the guest's writes wait
#: that long, once).  Under a speed limit, never more than one step: the
#: limit holds until READY.
HOLD_BYTES = 4 * 1024 * 1024
HOLD_SECONDS = 0.2
HOLD_MAX = 32 * 1024 * 1024

#: Write-blocking mode: most bytes one copy holds locked (guest writes there wait).
LOCKED_SPAN = 4 * 1024 * 1024

#: Auto mode: seconds over which the dirty set must shrink by a tenth.
AUTO_WINDOW = 1.0

#: Auto mode, before READY: after a copy while the guest is busy, the job rests
#: this fraction of the copy's time, so the guest keeps about half of the
#: daemon (its loop and the disk) while the job catches up.
GUEST_REST = 1.0

#: Seconds since its last write for which a guest counts as busy: one waiting
#: for a flush (which the job's copying slows down) completes no write for a
#: while, and needs the rest most.
GUEST_BUSY = 1.0


class CopyMode(enum.StrEnum):
    """``__org.blockd_copy-mode``: how an active commit keeps up with the guest."""

    BACKGROUND = "background"
    WRITE_BLOCKING = "write-blocking"
    AUTO = "auto"

#: Moves every user of a node onto another at one moment: (old, new, prepare),
#: ``prepare`` running while nothing is in flight (the export registry's); with
#: new = old it only holds the users while ``prepare`` runs.
Pivot = Callable[[BlockNode, BlockNode, Callable[[], Awaitable[None]]], Awaitable[object]]

#: Whether a user outside the graph (a writable export) writes to a node.
Writers = Callable[[BlockNode], bool]


def no_writers(node: BlockNode) -> bool:
    return False


@dataclass(frozen=True)
class ActiveCommitPlan:
    """A validated active commit: ``top`` is the chain's active layer."""

    top: BlockNode
    base: BlockNode
    #: ``top`` down to, but not including, ``base``.
    intermediates: tuple[BlockNode, ...]


def granularity(base: BlockNode) -> int:
    """Dirty-tracking granularity: base's cluster size within [4 KiB, 64 KiB], as QEMU."""
    cluster = base.cluster_size or 65536
    return min(65536, max(4096, cluster))


class ActiveCommitJob(Job):
    job_type = "commit"

    def __init__(
        self,
        job_id: str,
        events: EventSink,
        graph: BlockGraph,
        plan: ActiveCommitPlan,
        pivot: Pivot,
        writers: Writers = no_writers,
        copy_mode: CopyMode | None = None,
        **options: Unpack[JobOptions],
    ) -> None:
        super().__init__(job_id, events, **options)
        self.copy_mode = copy_mode or CopyMode.BACKGROUND
        #: the client chose a mode: the queries report the one in effect (a
        #: request without the extension gets QSD's replies, member for member)
        self._report_mode = copy_mode is not None
        self.graph = graph
        self.plan = plan
        self._pivot = pivot
        self._writers = writers
        self._copy = ChainCopy(graph, plan.top, plan.base)
        self._dirty = DirtyBitmap(plan.top.size, granularity(plan.base))
        self._mirror = WriteMirror(plan.base, self._dirty, self._on_change, self._on_mirror_failure)
        self._mirror_failure: BlockIOError | None = None
        #: auto mode: when the current window began, and the dirty bytes then
        self._window: tuple[float, int] | None = None
        #: bytes per second of the recent copies (a moving average)
        self._rate = 0.0
        #: when the guest's last write to top completed
        self._guest_wrote_at = -math.inf
        self._held: list[BlockNode] = []
        self._watching = False
        self._using = False
        self._base_was_read_only = plan.base.read_only
        self._complete_requested = False
        self._pivoted = False
        self._cursor = 0
        self._in_flight = 0

    # -- bookkeeping ------------------------------------------------------------------

    def _update_length(self) -> None:
        # QEMU's definition: what is done plus what is known to be left.
        self.length = self.offset + self._dirty.dirty_bytes + self._in_flight

    def _on_change(self, cleared: int) -> None:
        self._guest_wrote_at = trio.current_time()
        # a mirrored write that cleaned dirty chunks did part of the job's work
        self.offset += cleared
        self._update_length()

    def _on_mirror_failure(self, error: BlockIOError) -> None:
        if self._mirror_failure is None:
            self._mirror_failure = error
        self._kick()

    @property
    def copy_mode_in_effect(self) -> CopyMode:
        return CopyMode.WRITE_BLOCKING if self._mirror.blocking else CopyMode.BACKGROUND

    def _block_writes(self) -> None:
        self._mirror.blocking = True
        log.info(
            "job %s: copy mode write-blocking: writes to %s are made on %s too",
            self.id, self.plan.top.node_name, self.plan.base.node_name,
        )  # fmt: skip

    # -- hooks of Job -----------------------------------------------------------------

    def cancel_is_forced(self, force: bool) -> bool:
        # Only a READY job can be cancelled softly (finish without pivoting).
        return force or self.status not in (JobStatus.READY, JobStatus.STANDBY)

    def request_completion(self) -> None:
        self._complete_requested = True
        self._kick()

    def job_info(self) -> dict[str, Any]:
        info = super().job_info()
        if self._report_mode:
            info["__org.blockd_copy-mode"] = str(self.copy_mode_in_effect)
        return info

    def block_job_info(self) -> dict[str, Any]:
        info = super().block_job_info()
        if self._report_mode:
            info["__org.blockd_copy-mode"] = str(self.copy_mode_in_effect)
        if self.status is JobStatus.PENDING:
            # QEMU's mirror keeps the chain drained from the end of its copying
            # until it is finalized, and a drain counts as a pause there.
            info["paused"] = True
        return info

    async def setup(self) -> None:
        """Hold the nodes, open base read-write, start watching writes; undone by clean."""
        plan = self.plan
        # QEMU reopens base before it asks for the nodes, and puts it back
        # when that fails (which a blkdebug base's file name shows).
        await plan.base.reopen(read_only=False)
        try:
            self.graph.claim_for_commit(self.id, plan.top, plan.base, active=True)
        except BaseException:
            if self._base_was_read_only:
                await restore_read_only(self.id, plan.base)
            raise
        for node in {id(n): n for n in (plan.top, *plan.intermediates, plan.base)}.values():
            self.graph.add_blocker(node, BLOCKER)
            self._held.append(node)
        # As with QEMU's filter above top and its own handle on base:
        # blockdev-del finds top busy and base in use.
        self.graph.add_user(plan.base)
        self.graph.cover(plan.top)
        self._using = True
        plan.top.set_write_hook(self._mirror)
        self._watching = True
        # A write already under way passed the hook unseen: once it is over,
        # the scan finds what it changed (a copy before then could miss it).
        await plan.top.writes_settled()

    async def run(self) -> None:
        top, base = self.plan.top, self.plan.base
        if base.size < top.size:
            try:
                await base.truncate(top.size)
            except BlockIOError as err:
                # QEMU's job asks its truncate for no message: the client gets errno's words
                raise BlockIOError(err.errno) from err
        if self.copy_mode is CopyMode.WRITE_BLOCKING:
            self._block_writes()
        await self._scan()
        while True:
            if self.status is JobStatus.RUNNING:
                await self.throttle()
            else:
                # QEMU 7.2's mirror ignores the speed limit once READY: what
                # the guest writes is copied at once, and neither a lowered
                # speed nor the bytes already charged delay completion.
                await self.pause_point()
            if self._mirror_failure is not None:
                error, self._mirror_failure = self._mirror_failure, None
                await self.io_error(error, "write")
                continue
            self._auto_switch()
            dirty = self._dirty.dirty_bytes
            running = self.status is JobStatus.RUNNING
            held = max(HOLD_BYTES, min(HOLD_MAX, self._rate * HOLD_SECONDS))
            if self.speed:
                # the last copy is one step, like any other under the limit
                held = min(held, step_size(self.speed))
            hold = running and not self._mirror.blocking and dirty <= held
            if dirty and not hold:
                began = trio.current_time()
                await self._copy_next()
                now = trio.current_time()
                if (
                    running
                    and self.copy_mode is CopyMode.AUTO
                    and now - self._guest_wrote_at < GUEST_BUSY
                ):
                    await self.sleep((now - began) * GUEST_REST)
                continue
            if running:
                # Everything known is copied (with the writes held for the
                # last few chunks in background mode): flush base and go
                # READY, as QEMU's mirror does, whatever the guest writes
                # during the flush (READY does not promise an empty dirty set,
                # the final sync of the pivot empties it).  Waiting for a
                # flush that no write overlaps would never end under a
                # steady writer.
                if dirty and not await self._copy_held():
                    continue
                synced = self.offset
                if not await self._flush_base():
                    continue
                self._transition(JobStatus.READY)
                # the event reports the moment nothing was left, as QEMU's does
                # (its progress moves only between the job's steps)
                self.events.emit(
                    BlockJobReady(self.job_type, self.id, synced, synced, self.speed)
                )
                log.info("job %s: %s and %s in sync", self.id, top.node_name, base.node_name)
            if self._complete_requested or self.cancelled:
                return
            await self.sleep(READY_POLL)

    def _auto_switch(self) -> None:
        """Auto mode: go write-blocking once the dirty set stops shrinking."""
        if self.copy_mode is not CopyMode.AUTO or self._mirror.blocking:
            return
        now, dirty = trio.current_time(), self._dirty.dirty_bytes
        if self._window is None:
            self._window = (now, dirty)
            return
        began, before = self._window
        if now - began < AUTO_WINDOW:
            return
        if dirty and dirty * 10 > before * 9:
            log.info(
                "job %s: the dirty set went from %d to %d bytes in %.1f s: switching to "
                "write-blocking", self.id, before, dirty, now - began,
            )  # fmt: skip
            self._block_writes()
        self._window = (now, dirty)

    async def _scan(self) -> None:
        """Mark dirty everything the layers above base hold (zero clusters too).

        An I/O error here fails the job at once, whatever ``on-error`` says,
        as in QEMU's mirror: nothing is copied yet, and the error policy is
        about the copying (so no BLOCK_JOB_ERROR either).
        """
        top, base = self.plan.top, self.plan.base
        pos, size, chunk = 0, top.size, WINDOW
        while pos < size:
            await self.pause_point()
            end = min(size, pos + chunk)
            runs = await self.graph.allocation_runs_above(top, base, pos, end - pos)
            for layer, _status, start, n in runs:
                if layer is not None:
                    self._dirty.mark(start, n)
            self._update_length()
            # where the layers hold little, the next question covers more
            chunk = min(2 * chunk, SCAN) if len(runs) < _SCAN_RUNS else WINDOW
            pos = end

    async def _copy_next(self) -> None:
        """Copy the dirty runs of the next window (after the last one, wrapping).

        One batch takes every dirty run in the window, so scattered small
        writes cost one copy per window rather than one per chunk.  In
        write-blocking mode the window's span is locked while it is copied
        (the guest's writes there wait), and its runs are taken once the lock
        is held: a mirrored write may have cleaned some meanwhile.
        """
        step = step_size(self.speed)
        start = self._dirty.next_run(self._cursor, 1) or self._dirty.next_run(0, 1)
        if start is None:
            return
        offset = start[0]
        try:
            if self._mirror.blocking:
                end = min(offset + min(step, LOCKED_SPAN), self._dirty.size)
                async with self._mirror.locks.holding(offset, end - offset):
                    await self._copy_runs(self._dirty.runs(offset, end, step), step)
            else:
                await self._copy_runs(self._dirty.runs(offset, self._dirty.size, step), step)
        except CopyFailed as failed:
            await self.io_error(failed.error, failed.operation)

    async def _copy_runs(self, runs: list[tuple[int, int]], budget: int) -> None:
        """Copy dirty runs, in order, up to ``budget`` bytes (raises CopyFailed,
        leaving them dirty)."""
        taken: list[tuple[int, int]] = []
        total = 0
        for offset, n in runs:
            if total >= budget:
                break
            n = min(n, budget - total)
            taken.append((offset, n))
            total += n
        if not taken:
            return
        # Cleared before copying: a write landing meanwhile marks it again.
        for offset, n in taken:
            self._dirty.clear(offset, n)
        self._in_flight = total
        began = trio.current_time()
        try:
            copied = await self._copy.ranges(taken)
        except BaseException:
            for offset, n in taken:
                self._dirty.mark(offset, n)
            raise
        finally:
            self._in_flight = 0
            self._update_length()
        self._cursor = taken[-1][0] + taken[-1][1]
        seconds = trio.current_time() - began
        if seconds > 0:
            rate = total / seconds
            self._rate = rate if not self._rate else (self._rate + rate) / 2
        self.offset += total
        self._update_length()
        self.account(copied)

    async def _copy_held(self) -> bool:
        """Copy what is dirty with every write to top held; False if a copy failed
        (the on-error policy is applied once the writes are let go)."""
        try:
            async with self._mirror.locks.holding(0, WHOLE):
                while self._dirty:
                    await self._copy_runs(self._dirty.runs(0, self._dirty.size, WINDOW), WINDOW)
        except CopyFailed as failed:
            await self.io_error(failed.error, failed.operation)
            return False
        return True

    async def _flush_base(self) -> bool:
        try:
            await self.plan.base.flush()
        except BlockIOError as err:
            await self.io_error(err, "write")
            return False
        return True

    async def _final_sync(self) -> None:
        """Copy what is still dirty and flush base; runs with the guest's I/O held."""
        while self._dirty:
            try:
                await self._copy_runs(self._dirty.runs(0, self._dirty.size, WINDOW), WINDOW)
            except CopyFailed as failed:
                raise failed.error from failed
        await self.plan.base.flush()

    async def prepare(self) -> None:
        top, base = self.plan.top, self.plan.base
        if self.cancelled:
            # A soft cancel: base gets a consistent copy of the moment the
            # users are held, and they go on with top.
            await self._pivot(top, top, self._final_sync)
            return
        await self._pivot(top, base, self._final_sync)
        self._pivoted = True
        log.info("job %s: the users of %s now use %s", self.id, top.node_name, base.node_name)
        for parent, edge in self.graph.parents(top):
            if edge == "backing":
                # An overlay added on top while the job ran reads base from now
                # on, as QEMU replaces top by base under every parent: base
                # holds what it read through top.  Its header keeps naming top
                # (which still holds that data), so its file name shows the
                # override, as in QEMU.
                parent.backing = base
                self.graph.relink(parent, top, base)
            else:
                # A node opened on top itself (a raw or blkdebug node over
                # it) reads and writes base from now on too: left on top, its
                # writes would land in an image that has left the chain.
                parent.file = base
        if top.read_only and not base.read_only and not self._written_elsewhere():
            # Base takes top's place, and its open mode with it (as in QEMU):
            # a read-only top leaves a read-only base.
            await restore_read_only(self.id, base)

    async def clean(self) -> None:
        self.graph.release_claims(self.id)
        if self._watching:
            # writes already past the hook finish with it (a mirror into base
            # included) before base may go back to read-only
            self._mirror.blocking = False
            self.plan.top.set_write_hook(None)
            self._watching = False
            await self._mirror.drain()
        for node in self._held:
            self.graph.remove_blocker(node, BLOCKER)
        self._held.clear()
        base = self.plan.base
        if self._using:
            self._using = False
            self.graph.uncover(self.plan.top)
            await self.graph.remove_user(base)
        # After the pivot base has top's open mode (see prepare), as in QEMU.
        if (
            self._base_was_read_only
            and not self._pivoted
            and not base.closed
            and not self._written_elsewhere()
        ):
            await restore_read_only(self.id, base)

    def _written_elsewhere(self) -> bool:
        """Whether a user added while base was read-write writes to base or its file."""
        base = self.plan.base
        for node in (base, base.file):
            if node is None:
                continue
            if self._writers(node):
                return True
            for parent, edge in self.graph.parents(node):
                if edge == "file" and parent is not base and not parent.read_only:
                    return True
        return False
