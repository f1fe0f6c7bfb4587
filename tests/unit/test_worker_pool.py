"""The worker-thread pool at the process's thread limit (systemd's TasksMax,
say): a job waits for a running thread rather than failing; only with no
thread at all does the caller hear that none could be started."""

from __future__ import annotations

import threading

import pytest
import trio

from blockd.block import workers


def cannot_start(self: threading.Thread) -> None:
    raise RuntimeError("can't start new thread")


async def test_a_job_waits_for_a_running_thread_when_no_more_can_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers, "_pool", workers._Pool(4))
    gate = threading.Event()
    ran: list[str] = []  # in the order the (one) thread ran them

    def first() -> None:
        gate.wait(10)
        ran.append("first")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run, first)  # the one thread there is
            await trio.sleep(0.1)
            monkeypatch.setattr(threading.Thread, "start", cannot_start)
            nursery.start_soon(workers.run, lambda: ran.append("second"))
            await trio.sleep(0.1)
            assert ran == []  # waiting for the busy thread, not refused
            gate.set()
    assert ran == ["first", "second"]


async def test_with_no_thread_at_all_the_caller_hears_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "_pool", workers._Pool(4))
    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await workers.run(lambda: "never")
