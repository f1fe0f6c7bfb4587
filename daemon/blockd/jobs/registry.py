"""The daemon's jobs, by id, and the nursery their bodies run in.

Job ids are the only handle clients have on a job (``block-job-*`` even calls
it ``device``), so ids are checked as QEMU checks them and never reused while
the job exists.  Jobs outlive the QMP connection that started them.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from blockd.errors import BlockdError, DeviceNotActive
from blockd.ids import well_formed
from blockd.jobs.job import Job
from blockd.jobs.status import JobStatus

log = logging.getLogger(__name__)



class JobRegistry:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host job bodies until cancelled; :meth:`shutdown` first, to end them cleanly."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def check_new_id(self, job_id: str) -> None:
        if not well_formed(job_id):
            raise BlockdError(f"Invalid job ID '{job_id}'")
        if job_id in self._jobs:
            raise BlockdError(f"Job ID '{job_id}' already in use")

    def add(self, job: Job) -> None:
        """Register a new job (it becomes ``created``); start it with :meth:`start`."""
        self.check_new_id(job.id)
        self._jobs[job.id] = job
        job.create(on_dismiss=self._forget)

    def start(self, job: Job) -> None:
        if self._nursery is None:
            raise RuntimeError("the job registry is not serving")
        job.start(self._nursery)

    def _forget(self, job: Job) -> None:
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def block_jobs(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.is_block_job]

    def running(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.status is not JobStatus.CONCLUDED]

    def block_job(self, job_id: str) -> Job:
        """Lookup for ``block-job-*`` commands, with their error class."""
        job = self._jobs.get(job_id)
        if job is None or not job.is_block_job:
            raise DeviceNotActive(f"Block job '{job_id}' not found")
        return job

    def job(self, job_id: str) -> Job:
        """Lookup for ``job-*`` commands, with their (different) error class."""
        job = self._jobs.get(job_id)
        if job is None:
            raise BlockdError("Job not found")
        return job

    async def shutdown(self, grace: float) -> None:
        """Force-cancel every job and wait, up to ``grace`` seconds, for them to end.

        Cancelled jobs leave their chains as they were, so stopping the daemon
        never changes what a guest sees.
        """
        for job in self.running():
            # A job past the point where cancel applies (aborting already, or
            # concluding) is refused by the verb table, and just finishes.
            with contextlib.suppress(BlockdError):
                job.user_cancel(force=True)
        with trio.move_on_after(grace) as scope:
            for job in self.running():
                await job.concluded.wait()
        if scope.cancelled_caught:
            stuck = [j.id for j in self.running()]
            log.error("jobs still running after %.0f s: %s", grace, stuck)
