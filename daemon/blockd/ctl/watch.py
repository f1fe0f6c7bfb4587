"""Following one job until it ends: a live bar on a terminal, plain lines elsewhere.

The job's outcome comes from its events (registered before the job was
started, so none is missed); progress comes from ``query-block-jobs``, polled,
since QMP sends no progress events.  Ctrl-C asks the daemon to cancel the job;
a second Ctrl-C leaves it running and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from qemu.qmp import EventListener
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from blockd.ctl.client import Daemon, DaemonError
from blockd.ctl.units import human_duration, human_rate, human_size
from blockd.ctl.views import state_text

#: How often progress is asked for.
POLL_INTERVAL = 0.25
#: Plain mode: a progress line at least this often, and at each tenth done.
PLAIN_INTERVAL = 30.0
#: Rate over this many seconds of samples.
RATE_WINDOW = 5.0


class Outcome(IntEnum):
    """The exit status of a wait, as documented in ``blockctl --help``."""

    DONE = 0
    FAILED = 1
    CANCELLED = 3
    #: A second Ctrl-C: the job goes on without us (128 + SIGINT, as shells say).
    LEFT_RUNNING = 130


@dataclass
class JobProgress:
    offset: int = 0
    length: int = 0
    state: str = "created"
    rate: float | None = None

    @property
    def percent(self) -> float:
        if not self.length:  # nothing to copy: done is all of it
            return 100.0 if self.state in ("ready", "pending", "completed") else 0.0
        return 100.0 * self.offset / self.length

    def eta(self) -> str:
        if self.state != "running" or not self.rate or self.length <= self.offset:
            return "-"
        return human_duration((self.length - self.offset) / self.rate)

    def line(self) -> str:
        rate = human_rate(self.rate) if self.rate is not None else "-"
        return (
            f"{self.percent:5.1f}%  {human_size(self.offset)} / {human_size(self.length)}"
            f"  {rate}  ETA {self.eta()}  {self.state}"
        )


class _Rate:
    """Bytes per second over the last few seconds of samples."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, offset: int) -> float | None:
        now = time.monotonic()
        self._samples.append((now, offset))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        first_time, first_offset = self._samples[0]
        if now - first_time < 0.5:
            return None
        return max(offset - first_offset, 0) / (now - first_time)


class _Interrupts:
    """SIGINT while waiting: the first asks for a cancel, the second gives up."""

    def __init__(self) -> None:
        self.count = 0
        #: Set by the second Ctrl-C, even while the daemon does not answer.
        self.second = asyncio.Event()

    def __enter__(self) -> _Interrupts:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._hit)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)

    def _hit(self) -> None:
        self.count += 1
        if self.count >= 2:
            self.second.set()


class Watcher:
    """Shows one job and returns its outcome."""

    def __init__(
        self,
        daemon: Daemon,
        listener: EventListener,
        job_id: str,
        con: Console,
        *,
        pivot: bool,
        stop_at_ready: bool,
    ) -> None:
        self.daemon = daemon
        self.listener = listener
        self.job_id = job_id
        self.con = con
        self.pivot = pivot
        self.stop_at_ready = stop_at_ready
        self.progress = JobProgress()
        self._rate = _Rate()
        self._started = time.monotonic()
        self._last_plain: tuple[float, int, str] = (0.0, -1, "")
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._pivot_requested = False
        self._cancel_sent = False
        #: The last line, printed below the bar once it stops.
        self._final = ""

    async def run(self) -> Outcome:
        with _Interrupts() as interrupts:
            if self.con.is_terminal:
                self._bar = Progress(
                    TextColumn(f"[bold]{escape(self.job_id)}[/]"),
                    BarColumn(),
                    TextColumn("{task.fields[line]}"),
                    console=self.con,
                    refresh_per_second=8,
                )
                self._task = self._bar.add_task(self.job_id, total=None, line="")
                with self._bar:
                    outcome = await self._race(interrupts)
            else:
                outcome = await self._race(interrupts)
        self._say(self._final)
        return outcome

    async def _race(self, interrupts: _Interrupts) -> Outcome:
        """The job's outcome, unless a second Ctrl-C comes first (whatever the
        daemon is doing: a daemon that does not answer must not hold us)."""
        following = asyncio.ensure_future(self._loop(interrupts))
        second = asyncio.ensure_future(interrupts.second.wait())
        await asyncio.wait([following, second], return_when=asyncio.FIRST_COMPLETED)
        if following.done():
            second.cancel()
            return following.result()
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        if self._cancel_sent:
            self._final = (
                f"stopped waiting for {self.job_id}; the cancel already asked for may still "
                f"take effect: `blockctl jobs` shows it"
            )
        else:
            self._final = (
                f"left {self.job_id} running: `blockctl wait {self.job_id}` watches it again, "
                f"`blockctl cancel {self.job_id}` stops it"
            )
        return Outcome.LEFT_RUNNING

    async def _loop(self, interrupts: _Interrupts) -> Outcome:
        while True:
            if interrupts.count == 1 and not self._cancel_sent:
                self._cancel_sent = True
                self._say(f"cancelling {self.job_id} (Ctrl-C again to leave it running and exit)")
                try:
                    await self.daemon.execute("job-cancel", {"id": self.job_id})
                except DaemonError as err:
                    print(f"blockctl: {err}", file=sys.stderr)
            outcome = await self._poll()
            if outcome is not None:
                return outcome
            try:
                event = await asyncio.wait_for(self.listener.get(), POLL_INTERVAL)
            except TimeoutError:
                continue
            outcome = await self._on_event(event)
            if outcome is not None:
                return outcome

    async def _on_event(self, event: Mapping[str, Any]) -> Outcome | None:
        data = event.get("data", {})
        if data.get("device", data.get("id")) != self.job_id:
            return None
        name = event.get("event")
        if name == "BLOCK_JOB_READY":
            self.progress.state = "ready"
            self._show()
            return await self._ready()
        elif name == "BLOCK_JOB_ERROR":
            self._say(f"{self.job_id}: I/O error on {data.get('operation')}, "
                      f"action {data.get('action')}")
        elif name == "BLOCK_JOB_COMPLETED":
            self.progress.offset = int(data.get("offset", self.progress.offset))
            self.progress.length = int(data.get("len", self.progress.length))
            if "error" in data:
                self.progress.state = "failed"
                self._show()
                self._final = f"{self.job_id}: failed: {data['error']}"
                return Outcome.FAILED
            self.progress.state = "completed"
            self._show()
            took = human_duration(time.monotonic() - self._started)
            moved = "; its users moved onto base" if self._pivot_requested else ""
            self._final = f"{self.job_id}: done in {took}{moved}"
            return Outcome.DONE
        elif name == "BLOCK_JOB_CANCELLED":
            self.progress.state = "cancelled"
            self._show()
            self._final = f"{self.job_id}: cancelled; the chain is as it was"
            return Outcome.CANCELLED
        return None

    async def _ready(self) -> Outcome | None:
        """The job is ready (an active commit in sync): pivot, or stop here."""
        if self.pivot:
            if not self._pivot_requested:
                self._pivot_requested = True
                self._say(f"{self.job_id}: ready, pivoting onto base")
                await self.daemon.execute("block-job-complete", {"device": self.job_id})
            return None
        if self.stop_at_ready:
            self._final = (
                f"{self.job_id}: ready: base is in sync and kept in sync; "
                f"`blockctl complete {self.job_id}` pivots onto base, "
                f"`blockctl cancel {self.job_id}` stops keeping it in sync"
            )
            return Outcome.DONE
        return None

    async def _poll(self) -> Outcome | None:
        for job in await self.daemon.execute("query-jobs"):
            if job.get("id") == self.job_id and job.get("status") == "concluded":
                # Events come before the reply that shows their effect: an
                # outcome event, if there was one since we listened, is queued.
                while not self.listener.empty():
                    outcome = await self._on_event(await self.listener.get())
                    if outcome is not None:
                        return outcome
                # kept by auto-dismiss=false, ended before we listened
                return self._concluded(job)
        for job in await self.daemon.execute("query-block-jobs"):
            if job.get("device") == self.job_id:
                self.progress.offset = int(job.get("offset", 0))
                self.progress.length = int(job.get("len", 0))
                self.progress.state = state_text(job)
                self.progress.rate = self._rate.add(self.progress.offset)
                self._show()
                # READY was sent before we listened (``blockctl wait`` on a ready job)
                if job.get("ready") and job.get("status") == "ready":
                    return await self._ready()
        return None

    def _concluded(self, job: Mapping[str, Any]) -> Outcome:
        self.progress.state = "concluded"
        self._show()
        if "error" in job:
            self._final = f"{self.job_id}: ended with an error: {job['error']}"
            return Outcome.FAILED
        self._final = f"{self.job_id}: concluded (waiting to be dismissed)"
        return Outcome.DONE

    def _show(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(
                self._task,
                completed=self.progress.offset,
                total=self.progress.length or None,
                line=self.progress.line(),
            )
            return
        now = time.monotonic()
        tenth = int(self.progress.percent // 10)
        last_time, last_tenth, last_state = self._last_plain
        if (
            self.progress.state != last_state
            or tenth != last_tenth
            or now - last_time >= PLAIN_INTERVAL
        ):
            self._last_plain = (now, tenth, self.progress.state)
            self.con.print(f"{self.job_id}: {self.progress.line()}", markup=False, soft_wrap=True)

    def _say(self, text: str) -> None:
        self.con.print(text, markup=False, soft_wrap=True)
