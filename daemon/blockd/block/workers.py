"""The worker threads that run blocking file I/O for the trio event loop.

``trio.to_thread.run_sync`` costs about a hundred microseconds a call here
(capacity limiter, context copy, a thread cache built for generality), which
is several times the cost of a 4 KiB read from the page cache.  This pool
does the minimum: a job goes into one shared ``queue.SimpleQueue``, an idle
thread takes it, and the result comes back through
``TrioToken.run_sync_soon``, which reschedules the waiting task directly.

Threads are started on demand up to :data:`MAX_THREADS` and then live for
the life of the process (idle ones only sleep on the queue), so the number of
threads doing disk I/O stays bounded however many nodes and clients there are.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

#: Threads doing blocking I/O at most, over all nodes.
MAX_THREADS = 16

#: What to run, what to call on the loop with its outcome, and which loop.
_Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], object], trio.lowlevel.TrioToken]


class _Pool:
    """Threads sharing one job queue.

    Every queued job is either promised to an idle thread or counted in the
    backlog that busy threads work off, so a job never waits while a thread
    could have been started for it.
    """

    def __init__(self, max_threads: int) -> None:
        self._max = max_threads
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._backlog = 0

    def submit(self, job: _Job) -> None:
        with self._lock:
            start = False
            if self._idle:
                self._idle -= 1
            elif self._threads < self._max:
                self._threads += 1
                start = True
            else:
                self._backlog += 1
        if start:
            try:
                threading.Thread(target=self._work, name="blockd-io", daemon=True).start()
            except BaseException as failure:
                with self._lock:
                    self._threads -= 1
                    # A process at its thread limit (systemd's TasksMax, say)
                    # cannot start one more: a running thread takes the job
                    # once it is free.  With none running, the caller hears why.
                    queued = isinstance(failure, RuntimeError) and self._threads > 0
                    if queued:
                        self._backlog += 1
                if not queued:
                    raise
        self._jobs.put(job)

    def _work(self) -> None:
        # Signals go to the main thread, where Python handles them anyway; a
        # signal landing here could cut a wait in glibc short (see listio).
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        jobs = self._jobs
        while True:
            fn, done, token = jobs.get()
            result = outcome.capture(fn)
            with contextlib.suppress(trio.RunFinishedError):
                # the loop is gone only when nobody waits for this any more
                token.run_sync_soon(done, result)
            del fn, done, token, result
            with self._lock:
                if self._backlog:
                    self._backlog -= 1
                else:
                    self._idle += 1


_pool = _Pool(MAX_THREADS)


async def run(fn: Callable[[], T]) -> T:
    """``fn()`` in a worker thread; its result or exception.

    Like ``trio.to_thread.run_sync`` without ``abandon_on_cancel``: a cancel
    before the call starts raises at once, one after waits for the call to
    finish (a blocking system call cannot be taken back).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    submit(fn, functools.partial(trio.lowlevel.reschedule, trio.lowlevel.current_task()))

    def refuse(_raise_cancel: Any) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED

    result: T = await trio.lowlevel.wait_task_rescheduled(refuse)
    return result


def submit(fn: Callable[[], T], done: Callable[[outcome.Outcome[T]], object]) -> None:
    """Start ``fn()`` in a worker thread; ``done(outcome)`` then runs on this trio loop.

    For callers that have many calls in flight and would rather not keep a
    task waiting on each: ``done`` runs as a plain callback between tasks, so
    it must not block and must not raise (trio treats that as its own crash).
    """
    _pool.submit((fn, done, trio.lowlevel.current_trio_token()))
