"""The job state machine, verbs, events and on-error policy, with a job kind
of the test's own and trio's virtual clock (rate-limited waits take no real time)."""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import trio
import trio.testing

from blockd.errors import BlockdError, BlockIOError, DeviceNotActive
from blockd.events import Event
from blockd.jobs.job import Job, OnError
from blockd.jobs.registry import JobRegistry
from blockd.jobs.status import TRANSITIONS, VERBS, JobStatus
from tests.helpers import check_event

UNIT = 512 * 1024


class Recorder:
    """An event sink that keeps (name, data) and checks each against its schema."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Mapping[str, Any] | None]] = []

    def emit(self, event: Event) -> None:
        data = event.data()
        check_event(event.name, data)
        self.events.append((event.name, data))

    def statuses(self) -> list[str]:
        return [
            d["status"] if n == "JOB_STATUS_CHANGE" else n for n, d in self.events if d is not None
        ]

    def clear(self) -> None:
        self.events.clear()


class CopyJob(Job):
    """Copies ``units`` chunks; ``faults`` maps a chunk to errnos raised in turn."""

    job_type = "commit"

    def __init__(
        self, *args: Any, units: int = 8, faults: dict[int, list[int]] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.units = units
        self.faults = faults or {}
        self.calls: list[str] = []
        self.progress_gate: trio.Event | None = None

    async def run(self) -> None:
        self.length = self.units * UNIT
        done = 0
        while done < self.units:
            await self.throttle()
            if self.progress_gate is not None:
                await self.progress_gate.wait()
            pending = self.faults.get(done)
            if pending:
                try:
                    raise BlockIOError(pending.pop(0))
                except BlockIOError as err:
                    await self.io_error(err, "write")
                    continue
            done += 1
            self.offset += UNIT
            self.account(UNIT)

    async def prepare(self) -> None:
        self.calls.append("prepare")

    async def abort(self) -> None:
        self.calls.append("abort")

    async def clean(self) -> None:
        self.calls.append("clean")


@pytest.fixture
async def registry() -> AsyncIterator[JobRegistry]:
    reg = JobRegistry()
    async with trio.open_nursery() as nursery:
        await nursery.start(reg.serve)
        yield reg
        nursery.cancel_scope.cancel()


def new_job(rec: Recorder, reg: JobRegistry, job_id: str = "job0", **kw: Any) -> CopyJob:
    job = CopyJob(job_id, rec, **kw)
    reg.add(job)
    reg.start(job)
    return job


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_tables_match_qemu() -> None:
    assert TRANSITIONS[JobStatus.RUNNING] == {"paused", "ready", "waiting", "aborting"}
    assert VERBS["complete"] == {"ready", "standby"}
    assert VERBS["cancel"] == {
        "created",
        "running",
        "paused",
        "ready",
        "standby",
        "waiting",
        "pending",
    }


async def test_success_sequence(registry: JobRegistry) -> None:
    rec = Recorder()
    job = new_job(rec, registry)
    assert rec.statuses() == ["created", "running"]
    await job.concluded.wait()
    assert rec.statuses() == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    assert rec.events[4][1] == {
        "type": "commit",
        "device": "job0",
        "len": 8 * UNIT,
        "offset": 8 * UNIT,
        "speed": 0,
    }
    assert job.calls == ["prepare", "clean"]
    assert registry.jobs() == []


async def test_auto_dismiss_off_keeps_concluded_job(registry: JobRegistry) -> None:
    rec = Recorder()
    job = new_job(rec, registry, auto_dismiss=False)
    await job.concluded.wait()
    assert rec.statuses()[-1] == "concluded"
    info = registry.block_job("job0").block_job_info()
    assert info["status"] == "concluded" and "error" not in info
    with pytest.raises(
        BlockdError, match="Job 'job0' in state 'concluded' cannot accept command verb 'cancel'"
    ):
        job.user_cancel(force=False)
    job.dismiss()
    assert rec.statuses()[-1] == "null"
    assert registry.jobs() == []


async def test_auto_finalize_off_waits_for_finalize(registry: JobRegistry) -> None:
    rec = Recorder()
    job = new_job(rec, registry, auto_finalize=False)
    await settle()
    assert rec.statuses()[-3:] == ["waiting", "pending", "BLOCK_JOB_PENDING"]
    assert rec.events[-1][1] == {"type": "commit", "id": "job0"}
    assert job.calls == []
    with pytest.raises(BlockdError, match="cannot accept command verb 'dismiss'"):
        job.dismiss()
    job.finalize()
    await job.concluded.wait()
    assert job.calls == ["prepare", "clean"]
    assert rec.statuses()[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]


async def test_cancel_while_pending_aborts(registry: JobRegistry) -> None:
    rec = Recorder()
    job = new_job(rec, registry, auto_finalize=False)
    await settle()
    job.user_cancel(force=True)
    await job.concluded.wait()
    assert job.calls == ["abort", "clean"]
    assert rec.statuses()[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


async def test_cancel_while_running(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Recorder()
    job = new_job(rec, registry, speed=UNIT, auto_dismiss=False)
    await trio.sleep(2.5)
    assert 0 < job.offset < job.length
    assert job.block_job_info()["busy"] is False  # asleep for the rate limit
    job.user_cancel(force=False)
    await job.concluded.wait()
    assert rec.statuses()[2:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
    assert job.calls == ["abort", "clean"]
    assert job.job_info()["error"] == "Operation canceled"
    assert job.block_job_info()["error"] == "Operation canceled"


async def test_report_fails_the_job(registry: JobRegistry) -> None:
    rec = Recorder()
    job = new_job(rec, registry, faults={2: [errno.ENOSPC]})
    await job.concluded.wait()
    assert rec.statuses()[2:] == [
        "BLOCK_JOB_ERROR",
        "aborting",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert rec.events[2][1] == {"device": "job0", "operation": "write", "action": "report"}
    assert rec.events[4][1]["error"] == "No space left on device"
    assert rec.events[4][1]["offset"] == 2 * UNIT
    assert job.calls == ["abort", "clean"]


async def test_ignore_retries_the_same_chunk(registry: JobRegistry) -> None:
    rec = Recorder()
    job = new_job(rec, registry, on_error=OnError.IGNORE, faults={3: [errno.EIO, errno.EIO]})
    await job.concluded.wait()
    names = [n for n, _ in rec.events]
    assert names.count("BLOCK_JOB_ERROR") == 2
    assert {d["action"] for n, d in rec.events if n == "BLOCK_JOB_ERROR"} == {"ignore"}
    assert job.offset == job.length  # nothing was skipped
    assert job.calls == ["prepare", "clean"]


@pytest.mark.parametrize(
    ("policy", "err", "action", "io_status"),
    [
        (OnError.STOP, errno.EIO, "stop", "failed"),
        (OnError.STOP, errno.ENOSPC, "stop", "nospace"),
        (OnError.ENOSPC, errno.ENOSPC, "stop", "nospace"),
        (OnError.AUTO, errno.ENOSPC, "stop", "nospace"),
        (OnError.ENOSPC, errno.EIO, "report", None),
        (OnError.AUTO, errno.EIO, "report", None),
    ],
)
async def test_stop_pauses_until_resume(
    registry: JobRegistry, policy: OnError, err: int, action: str, io_status: str | None
) -> None:
    rec = Recorder()
    job = new_job(rec, registry, on_error=policy, faults={1: [err]})
    await settle()
    assert rec.events[2] == (
        "BLOCK_JOB_ERROR",
        {"device": "job0", "operation": "write", "action": action},
    )
    if action == "report":
        assert job.concluded.is_set()
        return
    assert rec.statuses()[3:] == ["paused"]
    info = job.block_job_info()
    assert info["paused"] is True and info["io-status"] == io_status and info["status"] == "paused"
    job.user_resume()
    assert rec.statuses()[4] == "running"
    assert job.block_job_info()["io-status"] == "ok"
    await job.concluded.wait()
    assert job.calls == ["prepare", "clean"]


async def test_pause_and_resume_of_an_idle_job_take_effect_at_once(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Recorder()
    job = new_job(rec, registry, speed=UNIT)
    await trio.sleep(1.5)
    job.user_pause()
    # Asleep for the rate limit, the job is paused inside the command.
    assert rec.statuses()[-1] == "paused"
    with pytest.raises(BlockdError, match="Job is already paused"):
        job.user_pause()
    offset = job.offset
    await trio.sleep(10)
    assert job.offset == offset
    job.user_resume()
    assert rec.statuses()[-1] == "running"
    with pytest.raises(BlockdError, match="Can't resume a job that was not paused"):
        job.user_resume()
    await job.concluded.wait()


async def test_pause_of_a_busy_job_applies_at_its_pause_point(registry: JobRegistry) -> None:
    rec = Recorder()
    job = CopyJob("busy", rec)
    job.progress_gate = trio.Event()
    registry.add(job)
    registry.start(job)
    await settle()
    assert job.busy  # blocked mid-chunk, not at a pause point
    job.user_pause()
    assert rec.statuses()[-1] == "running"
    assert job.block_job_info()["paused"] is True
    job.progress_gate.set()
    await settle()
    assert rec.statuses()[-1] == "paused"
    job.user_resume()
    await job.concluded.wait()


async def test_cancel_of_a_paused_job(registry: JobRegistry) -> None:
    rec = Recorder()
    job = new_job(rec, registry, on_error=OnError.STOP, faults={0: [errno.EIO]})
    await settle()
    assert job.status is JobStatus.PAUSED
    job.user_cancel(force=True)
    await job.concluded.wait()
    assert rec.statuses()[3:] == [
        "paused",
        "running",
        "aborting",
        "BLOCK_JOB_CANCELLED",
        "concluded",
        "null",
    ]


async def test_verbs_refused_in_the_wrong_state(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Recorder()
    job = new_job(rec, registry, speed=1)
    await trio.sleep(1)
    for verb in (job.complete, job.finalize, job.dismiss):
        with pytest.raises(BlockdError) as failure:
            verb()
        name = verb.__name__
        assert (
            str(failure.value)
            == f"Job 'job0' in state 'running' cannot accept command verb '{name}'"
        )
    with pytest.raises(BlockdError, match="Parameter 'speed' expects a non-negative value"):
        job.set_speed(-1)
    assert job.block_job_info()["speed"] == 1
    job.user_cancel(force=True)
    await job.concluded.wait()


async def test_set_speed_wakes_a_throttled_job(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Recorder()
    job = new_job(rec, registry, speed=1)  # one chunk, then ~14.5 virtual hours of debt
    await trio.sleep(60)
    assert job.offset == UNIT
    job.set_speed(0)
    await job.concluded.wait()
    assert job.offset == job.length
    assert trio.current_time() < 120


async def test_raising_the_speed_mid_sleep_wakes_the_job_and_it_goes_on(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Recorder()
    job = new_job(rec, registry, speed=64 * 1024)  # one chunk, then 8 s of debt
    await trio.sleep(1.5)
    assert job.offset == UNIT
    # 2 MiB/s: the first chunk's debt is already paid; the job must not fail
    # (a negative sleep once did) and must not sleep out the old 8 s.
    job.set_speed(2 * 1024 * 1024)
    await job.concluded.wait()
    assert job.error is None
    assert rec.events[-3][0] == "BLOCK_JOB_COMPLETED"
    assert "error" not in (rec.events[-3][1] or {})
    # 7 more chunks at 2 MiB/s: 1.75 s; not 8 s for the first.
    assert 1.5 + 1.5 <= trio.current_time() < 1.5 + 2.5


async def test_registry_ids_and_lookups(registry: JobRegistry) -> None:
    rec = Recorder()
    for bad in ("", "1abc", "a b", "a/b"):
        with pytest.raises(BlockdError, match=f"Invalid job ID '{bad}'"):
            registry.add(CopyJob(bad, rec))
    new_job(rec, registry, "ok-1._x", auto_dismiss=False)
    with pytest.raises(BlockdError, match=r"Job ID 'ok-1\._x' already in use"):
        registry.add(CopyJob("ok-1._x", rec))
    with pytest.raises(DeviceNotActive, match="Block job 'nosuch' not found"):
        registry.block_job("nosuch")
    with pytest.raises(BlockdError, match=r"^Job not found$") as failure:
        registry.job("nosuch")
    assert failure.value.error_class == "GenericError"


async def test_shutdown_cancels_everything(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Recorder()
    jobs = [new_job(rec, registry, f"j{i}", speed=1) for i in range(3)]
    paused = jobs[1]
    await trio.sleep(1)
    paused.user_pause()
    await registry.shutdown(grace=5)
    assert all(j.concluded.is_set() for j in jobs)
    assert [n for n, _ in rec.events].count("BLOCK_JOB_CANCELLED") == 3
    assert registry.jobs() == []


class SlowAbortJob(CopyJob):
    """A job whose clean-up after a cancel takes until ``gate`` opens."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = trio.Event()

    async def abort(self) -> None:
        await self.gate.wait()
        await super().abort()


async def test_shutdown_waits_for_a_job_already_aborting(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    job = SlowAbortJob("j0", rec, speed=1)
    registry.add(job)
    registry.start(job)
    await trio.sleep(1)
    job.user_cancel(force=True)
    await settle()
    assert job.status == "aborting"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(registry.shutdown, 5)
        await trio.sleep(2)
        assert not job.concluded.is_set()
        job.gate.set()
    # shutdown returned only once the aborting job had concluded, in time
    assert job.concluded.is_set()
    assert "still running" not in caplog.text


async def test_shutdown_names_the_jobs_that_outlive_the_grace(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    job = SlowAbortJob("j0", rec, speed=1)
    registry.add(job)
    registry.start(job)
    await trio.sleep(1)
    await registry.shutdown(grace=5)
    assert not job.concluded.is_set()
    assert "jobs still running after 5 s: ['j0']" in caplog.text
    job.gate.set()


async def test_paused_in_query_follows_pause_and_resume(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Recorder()
    job = new_job(rec, registry, speed=UNIT)
    await trio.sleep(1.5)
    assert job.block_job_info()["paused"] is False
    job.user_pause()
    assert job.block_job_info()["paused"] is True
    job.user_resume()
    assert job.block_job_info()["paused"] is False
    await job.concluded.wait()


async def test_the_log_tells_what_was_copied_and_how_long_it_took(
    registry: JobRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Operators read a job's outcome in the log: the bytes copied, and for
    a finished job the time it took (real time, not the virtual clock)."""
    caplog.set_level(logging.INFO, logger="blockd")
    rec = Recorder()
    failing = new_job(rec, registry, "failing", faults={3: [errno.EIO]})
    await failing.concluded.wait()
    assert (
        f"job failing (commit) failed after {3 * UNIT} of {8 * UNIT} bytes: Input/output error"
        in caplog.text
    )
    cancelled = new_job(rec, registry, "cancelled", on_error=OnError.STOP, faults={2: [errno.EIO]})
    await settle()
    cancelled.user_cancel(force=True)
    await cancelled.concluded.wait()
    assert f"job cancelled (commit) cancelled after {2 * UNIT} of {8 * UNIT} bytes" in caplog.text
    started = time.monotonic()
    finished = new_job(rec, registry, "finished")
    await finished.concluded.wait()
    elapsed = time.monotonic() - started
    found = re.search(
        r"job finished \(commit\) finished: 4\.0 MiB of 4194304 bytes copied in ([0-9.]+) s",
        caplog.text,
    )
    assert found is not None, caplog.text
    # logged to 0.1 s
    assert 0 <= float(found[1]) <= elapsed + 0.05


class ReadyJob(CopyJob):
    """Copies, then stays READY until completed or cancelled softly (a mirror's
    life: only READY jobs support job-complete and soft cancel)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.complete_requested = False

    def cancel_is_forced(self, force: bool) -> bool:
        return force or self.status not in (JobStatus.READY, JobStatus.STANDBY)

    def request_completion(self) -> None:
        self.complete_requested = True
        self._kick()

    async def run(self) -> None:
        await super().run()
        self._transition(JobStatus.READY)
        while not (self.complete_requested or self.cancelled):
            await self.sleep(1)

    async def prepare(self) -> None:
        self.calls.append("prepare (soft cancel)" if self.cancelled else "prepare")


async def test_a_ready_job_paused_is_standby_and_completes_once_resumed(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Recorder()
    job = ReadyJob("r", rec)
    registry.add(job)
    registry.start(job)
    await trio.sleep(5)
    assert job.block_job_info()["ready"] is True
    job.user_pause()
    assert rec.statuses()[-2:] == ["ready", "standby"]  # at once: the job was idle
    await trio.sleep(5)  # its poll comes round and finds it paused
    info = job.block_job_info()
    assert (info["status"], info["paused"], info["ready"]) == ("standby", True, True)
    job.complete()  # accepted in standby, acted on after the resume
    await trio.sleep(5)
    assert job.status == "standby"
    job.user_resume()
    with trio.fail_after(60):  # a job stuck paused fails the test instead of hanging it
        await job.concluded.wait()
    assert rec.statuses()[-7:] == [
        "standby", "ready", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    assert job.calls == ["prepare", "clean"]


async def test_soft_cancel_of_a_ready_job_finishes_it(
    registry: JobRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Recorder()
    job = ReadyJob("r", rec)
    registry.add(job)
    registry.start(job)
    await trio.sleep(5)
    job.user_cancel(force=False)
    with pytest.raises(BlockdError, match="The active block job 'r' cannot be completed"):
        job.complete()
    with trio.fail_after(60):  # a job stuck paused fails the test instead of hanging it
        await job.concluded.wait()
    assert rec.statuses()[-6:] == [
        "ready", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    assert job.calls == ["prepare (soft cancel)", "clean"]


async def test_cancel_of_a_paused_job_clears_paused(registry: JobRegistry) -> None:
    rec = Recorder()
    job = new_job(rec, registry, on_error=OnError.STOP, faults={0: [errno.EIO]}, auto_dismiss=False)
    await settle()
    assert job.block_job_info()["paused"] is True
    job.user_cancel(force=True)
    with trio.fail_after(60):  # a job stuck paused fails the test instead of hanging it
        await job.concluded.wait()
    assert job.block_job_info()["paused"] is False


class FailingPrepareJob(CopyJob):
    def __init__(self, *args: Any, failure: Exception, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.failure = failure

    async def prepare(self) -> None:
        raise self.failure


@pytest.mark.parametrize(
    ("failure", "error", "traceback"),
    [
        (BlockIOError(errno.ENOSPC), "No space left on device", False),
        (RuntimeError("not expected"), "not expected", True),
    ],
)
async def test_a_result_that_cannot_be_applied_fails_the_job(
    registry: JobRegistry,
    caplog: pytest.LogCaptureFixture,
    failure: Exception,
    error: str,
    traceback: bool,
) -> None:
    """A refusal or I/O error the client is told of is logged as such; anything
    else is a bug and logged with its traceback."""
    rec = Recorder()
    job = FailingPrepareJob("p", rec, failure=failure)
    registry.add(job)
    registry.start(job)
    await job.concluded.wait()
    assert rec.statuses()[-5:] == [
        "pending",
        "aborting",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert rec.events[-3][1] is not None and rec.events[-3][1]["error"] == error
    assert job.calls == ["abort", "clean"]
    [record] = [r for r in caplog.records if "could not apply its result" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert (record.exc_info is not None) is traceback


async def test_progress_is_nothing_of_nothing_before_the_job_runs(registry: JobRegistry) -> None:
    """What queries show while the command sets the job up (other clients can
    ask then) and between the command and the job's first step."""
    rec = Recorder()
    job = CopyJob("job0", rec)
    registry.add(job)
    info = job.block_job_info()
    assert (info["status"], info["busy"], info["len"], info["offset"]) == ("created", False, 0, 0)
    registry.start(job)
    assert job.block_job_info()["busy"] is True  # started: it runs until its first pause point
    assert job.job_info() == {
        "id": "job0",
        "type": "commit",
        "status": "running",
        "current-progress": 0,
        "total-progress": 0,
    }
    await job.concluded.wait()


async def test_a_pending_job_is_not_busy(registry: JobRegistry) -> None:
    rec = Recorder()
    job = new_job(rec, registry, auto_finalize=False)
    await settle()
    info = job.block_job_info()
    job.finalize()  # first: a job left pending would hold the test's teardown
    await job.concluded.wait()
    assert (info["status"], info["busy"], info["paused"]) == ("pending", False, False)


async def test_a_pause_requested_mid_chunk_applies_before_the_rate_limit_wait(
    registry: JobRegistry,
) -> None:
    """Real clock: the chunk just copied costs a second of rate limit, and the
    pause must not wait that second out before the job shows as paused."""
    rec = Recorder()
    job = CopyJob("busy", rec, speed=UNIT)
    job.progress_gate = trio.Event()
    registry.add(job)
    registry.start(job)
    await settle()
    job.user_pause()
    job.progress_gate.set()
    await settle()
    assert job.status == "paused"
    job.user_cancel(force=True)
    await job.concluded.wait()


class FailingCleanupJob(CopyJob):
    """abort() or clean() raises (a bug): the job must still conclude."""

    def __init__(self, *args: Any, failing: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.failing = failing

    async def abort(self) -> None:
        await super().abort()
        if self.failing == "abort":
            raise RuntimeError("abort broke")

    async def clean(self) -> None:
        await super().clean()
        if self.failing == "clean":
            raise RuntimeError("clean broke")


@pytest.mark.parametrize(
    ("failing", "logged"),
    [("abort", "could not undo its setup"), ("clean", "could not release its resources")],
)
async def test_a_failing_abort_or_clean_still_concludes_the_job(
    registry: JobRegistry, caplog: pytest.LogCaptureFixture, failing: str, logged: str
) -> None:
    rec = Recorder()
    job = FailingCleanupJob("f", rec, failing=failing, faults={1: [errno.EIO]})
    registry.add(job)
    registry.start(job)
    with trio.fail_after(10):
        await job.concluded.wait()
    assert job.calls == ["abort", "clean"]
    assert rec.statuses()[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert rec.events[-3][1] is not None and rec.events[-3][1]["error"] == "Input/output error"
    [record] = [r for r in caplog.records if logged in r.getMessage()]
    assert record.exc_info is not None


class GatedPrepareJob(CopyJob):
    """A job whose result takes until ``gate`` opens to apply."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = trio.Event()

    async def prepare(self) -> None:
        await self.gate.wait()
        await super().prepare()


async def test_applying_a_result_is_not_cut_short_by_the_daemon_going_down() -> None:
    """The graph and the headers are never left half changed."""
    rec = Recorder()
    registry = JobRegistry()
    job = GatedPrepareJob("g", rec)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.serve)
        registry.add(job)
        registry.start(job)
        await settle()
        assert job.status == "pending"  # in prepare
        nursery.cancel_scope.cancel()
        job.gate.set()
    assert job.concluded.is_set()
    assert job.calls == ["prepare", "clean"]
    assert rec.statuses()[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]


async def test_a_job_cancelled_while_being_set_up_is_cancelled_once_started(
    registry: JobRegistry,
) -> None:
    """Another client may cancel a job while its command still sets it up."""
    rec = Recorder()
    job = CopyJob("job0", rec)
    registry.add(job)
    job.user_cancel(force=True)
    assert job.status == "created"
    registry.start(job)
    await job.concluded.wait()
    assert rec.statuses() == [
        "created", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null",
    ]  # fmt: skip
    assert job.calls == ["abort", "clean"]
