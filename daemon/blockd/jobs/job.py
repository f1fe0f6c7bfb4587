"""A job's life as QEMU defines it, shared by every job kind.

A job kind subclasses :class:`Job` and writes :meth:`Job.run`, calling
:meth:`Job.pause_point` (or :meth:`Job.throttle`) between units of work.
Everything a client can do to a job happens at those points: pause and
cancel are requests that the job honours there, so a metadata update in
progress is never cut in half.  When the job is idle at such a point (asleep
for the rate limit, or paused), pause and resume take effect at once, inside
the command, which is the event order qemu-storage-daemon shows.

The end of a job follows ``job.c``: a job that ran to completion goes
waiting -> pending (and waits there for ``job-finalize`` unless
auto-finalize), then :meth:`prepare` applies its result; a failed or
cancelled one goes aborting and :meth:`abort` undoes its setup; either way
:meth:`clean` runs, then the completion event, then concluded (and null
unless auto-dismiss is off).
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypedDict

import trio

from blockd import logs
from blockd.errors import BlockdError, BlockIOError
from blockd.events import (
    BlockJobCancelled,
    BlockJobCompleted,
    BlockJobError,
    BlockJobPending,
    EventSink,
    JobStatusChange,
)
from blockd.jobs.ratelimit import RateLimiter
from blockd.jobs.status import JobStatus, Verb, check_transition, check_verb

log = logging.getLogger(__name__)



class OnError(enum.StrEnum):
    """What a job does when its I/O fails (QAPI ``BlockdevOnError``)."""

    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


class JobOptions(TypedDict, total=False):
    """What every job kind takes from its command (the QAPI common job options)."""

    speed: int
    on_error: OnError
    auto_finalize: bool
    auto_dismiss: bool


class JobFailed(Exception):
    """Raised by a job body to fail the job; the text is what clients see."""


class _Cancelled(Exception):
    """Unwinds a force-cancelled job's body from its pause point."""


def check_speed(speed: int) -> None:
    """A job's speed (bytes per second, 0 for none) as QEMU checks it."""
    if speed < 0:
        raise BlockdError("Parameter 'speed' expects a non-negative value")


class Job:
    """State, verbs and events common to all jobs; subclasses supply the work."""

    job_type: ClassVar[str]
    #: A block job (commit) is listed by query-block-jobs, answers the
    #: block-job-* verbs and sends the BLOCK_JOB_* events; other jobs
    #: (create) only have the job-* verbs and JOB_STATUS_CHANGE.
    is_block_job: ClassVar[bool] = True

    def __init__(
        self,
        job_id: str,
        events: EventSink,
        *,
        speed: int = 0,
        on_error: OnError = OnError.REPORT,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.id = job_id
        self.events = events
        self.on_error = on_error
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = JobStatus.UNDEFINED
        #: Progress, in bytes: how much is done of how much there is to do.
        self.offset = 0
        self.length = 0
        #: Bytes actually copied (progress also counts what needed no copy).
        self.copied = 0
        self._started_at: float  # set by start()
        self.io_status = "ok"
        self.error: str | None = None
        #: False while the job waits at a pause point (sleeping or paused).
        self.busy = False
        #: Paused by a client or by the stop on-error policy (QEMU counts
        #: internal pauses too; blockd has none, so one flag is the count).
        self.user_paused = False
        #: A cancel was requested; ``force_cancel`` says whether it is a real
        #: cancel or (for jobs that support it) "finish without completing".
        self.cancelled = False
        self.force_cancel = False
        self._limiter = RateLimiter(clock, speed)
        self._wake = trio.Event()
        self._finalize_requested = trio.Event()
        self.concluded = trio.Event()
        self._on_dismiss: Callable[[Job], None] = lambda job: None

    # -- what subclasses provide ------------------------------------------

    async def run(self) -> None:
        """The work.  Return to succeed; raise JobFailed to fail."""
        raise NotImplementedError

    async def prepare(self) -> None:
        """Apply the result of a successful job (graph changes).  May fail."""

    async def abort(self) -> None:
        """Undo setup after failure or cancellation."""

    async def clean(self) -> None:
        """Release what the job held, whatever the outcome."""

    def dismissed(self) -> None:
        """Release what a job keeps until it is dismissed (QEMU's block job
        keeps its hold on its nodes until the job itself is freed)."""

    def cancel_is_forced(self, force: bool) -> bool:
        """Whether a cancel request is a real cancel; only READY jobs differ."""
        return True

    def request_completion(self) -> None:
        """``job-complete``: only jobs that reach READY support it."""
        raise BlockdError(f"The active block job '{self.id}' cannot be completed")

    # -- state ------------------------------------------------------------

    @property
    def speed(self) -> int:
        return self._limiter.speed

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled and self.force_cancel

    def _transition(self, new: JobStatus) -> None:
        check_transition(self.status, new)
        self.status = new
        self.events.emit(JobStatusChange(id=self.id, status=new))

    def _settle(self) -> None:
        """Apply pause requests to the status at once if the job is idle.

        A busy job applies them itself at its next pause point; a job whose
        work is over is in no state that a pause changes.
        """
        if not self.busy:
            self._apply_pause_requests()

    def _apply_pause_requests(self) -> None:
        if self.user_paused and not self.is_cancelled:
            if self.status is JobStatus.RUNNING:
                self._transition(JobStatus.PAUSED)
            elif self.status is JobStatus.READY:
                self._transition(JobStatus.STANDBY)
        elif self.status is JobStatus.PAUSED:
            self._transition(JobStatus.RUNNING)
        elif self.status is JobStatus.STANDBY:
            self._transition(JobStatus.READY)

    def _kick(self) -> None:
        self._wake.set()

    async def _idle(self, seconds: float = math.inf) -> None:
        self._wake = trio.Event()
        self.busy = False
        try:
            with trio.move_on_after(seconds):
                await self._wake.wait()
        finally:
            self.busy = True

    # -- the points where a job body yields -------------------------------

    async def pause_point(self) -> None:
        """Honour pause and cancel requests; raises to unwind a cancelled job.

        A pause requested while the job was busy takes effect here; the resume
        or cancel that ends it finds the job idle and settles its status.
        """
        self._apply_pause_requests()
        while self.user_paused and not self.is_cancelled:
            await self._idle()
        if self.is_cancelled:
            raise _Cancelled

    async def sleep(self, seconds: float) -> None:
        if not self.user_paused and not self.is_cancelled:
            await self._idle(seconds)
        await self.pause_point()

    def account(self, nbytes: int) -> None:
        """Charge ``nbytes`` of copying to the rate limit."""
        self.copied += nbytes
        self._limiter.delay(nbytes)

    async def throttle(self) -> None:
        """Wait as long as the speed limit requires; always a pause point.

        The delay is recomputed after every wake-up, so a new speed, a pause
        or a cancel takes effect at once and early wake-ups are not a way
        around the limit.
        """
        while True:
            delay = self._limiter.delay()
            await self.sleep(delay)
            if not delay:
                return

    async def io_error(self, error: BlockIOError, operation: str) -> None:
        """Apply the on-error policy to a failed read or write.

        Returns when the caller should retry the same work; raises JobFailed
        when the job must fail.
        """
        nospace = error.is_nospace
        if self.on_error is OnError.IGNORE:
            action = "ignore"
        elif self.on_error is OnError.STOP or (
            self.on_error in (OnError.ENOSPC, OnError.AUTO) and nospace
        ):
            action = "stop"
        else:
            action = "report"
        self.events.emit(BlockJobError(device=self.id, operation=operation, action=action))
        if action == "report":
            raise JobFailed(error.desc)
        if action == "stop":
            if self.io_status == "ok":
                self.io_status = "nospace" if nospace else "failed"
            self.user_paused = True
        await self.pause_point()

    # -- lifecycle ----------------------------------------------------------

    def create(self, on_dismiss: Callable[[Job], None]) -> None:
        self._on_dismiss = on_dismiss
        self._transition(JobStatus.CREATED)

    def early_fail(self) -> None:
        """Drop a job whose setup failed before it started."""
        self._transition(JobStatus.NULL)
        self._on_dismiss(self)

    def start(self, nursery: trio.Nursery) -> None:
        self._started_at = time.monotonic()
        self.busy = True
        self._transition(JobStatus.RUNNING)
        nursery.start_soon(self._main, name=f"job {self.id}")

    async def _main(self) -> None:
        error: str | None = None
        try:
            await self.run()
        except _Cancelled:
            pass
        except JobFailed as err:
            error = str(err)
        except BlockdError as err:
            error = err.desc
        except Exception as err:
            log.exception("job %s failed unexpectedly", self.id)
            error = f"Internal error: {err}"
        self.busy = False
        # Finishing touches the graph and headers: never leave it half done,
        # even when the daemon is shutting down around us.
        with trio.CancelScope(shield=True):
            await self._finish(error)

    async def _finish(self, error: str | None) -> None:
        if error is None and not self.is_cancelled:
            self._transition(JobStatus.WAITING)
            self._transition(JobStatus.PENDING)
            if not self.auto_finalize:
                if self.is_block_job:
                    self.events.emit(BlockJobPending(type=self.job_type, id=self.id))
                await self._finalize_requested.wait()
            if not self.is_cancelled:
                try:
                    await self.prepare()
                except BlockdError as err:
                    # an I/O error or a refusal the client is told of: not a bug
                    log.error("job %s could not apply its result: %s", self.id, err.desc)
                    error = err.desc
                except Exception as err:
                    log.exception("job %s could not apply its result", self.id)
                    error = str(err)
        if error is not None or self.is_cancelled:
            self.error = error if error is not None else "Operation canceled"
            self._transition(JobStatus.ABORTING)
            try:
                await self.abort()
            except Exception:
                log.exception("job %s could not undo its setup", self.id)
        try:
            await self.clean()
        except Exception:
            log.exception("job %s could not release its resources", self.id)
        progress = (self.job_type, self.id, self.length, self.offset, self.speed)
        if self.is_cancelled:
            if self.is_block_job:
                self.events.emit(BlockJobCancelled(*progress))
            logs.job_cancelled(self.id, self.job_type, self.copied, self.length)
        else:
            if self.is_block_job:
                self.events.emit(BlockJobCompleted(*progress, error=error))
            if error is None:
                seconds = time.monotonic() - self._started_at
                logs.job_finished(self.id, self.job_type, self.copied, self.length, seconds)
            else:
                logs.job_failed(self.id, self.job_type, error, self.copied, self.length)
        self._transition(JobStatus.CONCLUDED)
        self.concluded.set()
        if self.auto_dismiss:
            self._dismiss()

    def _dismiss(self) -> None:
        self._transition(JobStatus.NULL)
        self.dismissed()
        self._on_dismiss(self)

    # -- verbs (command handlers call these) --------------------------------

    def user_pause(self) -> None:
        check_verb(self.id, self.status, Verb.PAUSE)
        if self.user_paused:
            raise BlockdError("Job is already paused")
        self.user_paused = True
        self._settle()
        self._kick()

    def user_resume(self) -> None:
        if not self.user_paused:
            raise BlockdError("Can't resume a job that was not paused")
        check_verb(self.id, self.status, Verb.RESUME)
        self.io_status = "ok"
        self.user_paused = False
        self._settle()
        self._kick()

    def user_cancel(self, force: bool) -> None:
        check_verb(self.id, self.status, Verb.CANCEL)
        force = self.cancel_is_forced(force)
        if self.user_paused:
            # as QEMU, which resumes a paused job to cancel it: the resume
            # clears an error status too
            self.io_status = "ok"
            self.user_paused = False
        # Only a READY (or STANDBY) job can be cancelled softly, so a job whose
        # work is over is always cancelled for real.
        self.cancelled = True
        self.force_cancel |= force
        if self.is_cancelled:
            self._finalize_requested.set()
        self._settle()
        self._kick()

    def set_speed(self, speed: int) -> None:
        check_verb(self.id, self.status, Verb.SET_SPEED)
        check_speed(speed)
        self._limiter.set_speed(speed)
        # A sleeping job recomputes its delay when woken: a lower speed puts
        # it back to sleep for longer, a higher one shortens its wait.
        self._kick()

    def complete(self) -> None:
        check_verb(self.id, self.status, Verb.COMPLETE)
        if self.cancelled:
            raise BlockdError(f"The active block job '{self.id}' cannot be completed")
        self.request_completion()

    def finalize(self) -> None:
        check_verb(self.id, self.status, Verb.FINALIZE)
        self._finalize_requested.set()

    def dismiss(self) -> None:
        check_verb(self.id, self.status, Verb.DISMISS)
        self._dismiss()

    # -- what query-block-jobs and query-jobs report ------------------------

    def block_job_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.length,
            "offset": self.offset,
            "busy": self.busy,
            "paused": self.user_paused,
            "speed": self.speed,
            "io-status": self.io_status,
            "ready": self.status in (JobStatus.READY, JobStatus.STANDBY),
            "status": str(self.status),
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    def job_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": str(self.status),
            "current-progress": self.offset,
            "total-progress": self.length,
        }
        if self.error is not None:
            info["error"] = self.error
        return info
