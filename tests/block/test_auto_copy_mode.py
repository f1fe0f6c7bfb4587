"""Auto copy mode decides on the dirty set's trend: it stays in background
mode while the copy gains on the guest, and turns write-blocking once a
window passes without the dirty set shrinking by a tenth.

In-process on the real clock: a speed limit stretches the copy over a few of
auto mode's one-second windows, so the decision is made (and made more
than once) before READY.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import trio

from blockd.block.graph import BlockGraph
from blockd.events import EventBus
from blockd.jobs.active_commit import AUTO_WINDOW, CopyMode

from .conftest import active_commit_job, assert_clean, create, open_qcow2, qemu_io, seen

MiB = 1024 * 1024
SPEED = 1 * MiB


async def run_auto(
    tmp_path: Path,
    guest_bytes_per_second: int,
    data: int = 3 * MiB,
    speed: int = SPEED,
    copy_mode: CopyMode = CopyMode.AUTO,
    seconds: float = math.inf,
) -> list[CopyMode]:
    """The modes in effect, sampled every 0.2 s until READY (or for
    ``seconds``), with a guest writing random 64 KiB blocks at the given rate
    meanwhile."""
    create(tmp_path / "base.qcow2", "8M")
    create(tmp_path / "top.qcow2", "8M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "top.qcow2", f"write -P 0x22 0 {data}")
    graph = BlockGraph()
    events = EventBus()
    ready = seen(events, "BLOCK_JOB_READY")
    modes: list[CopyMode] = []
    rng = random.Random(7)
    try:
        await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        job = active_commit_job(graph, events, copy_mode=copy_mode, speed=speed)
        sampled = trio.Event()

        async def guest() -> None:
            while guest_bytes_per_second and not ready.is_set() and not sampled.is_set():
                block = rng.randrange(8 * MiB // (64 * 1024)) * 64 * 1024
                await top.write(block, b"\x33" * 64 * 1024)
                await trio.sleep(64 * 1024 / guest_bytes_per_second)

        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            nursery.start_soon(guest)
            with trio.fail_after(60), trio.move_on_after(seconds):
                while not ready.is_set():
                    modes.append(job.copy_mode_in_effect)
                    await trio.sleep(0.2)
            sampled.set()
            job.user_cancel(force=True)
            await job.concluded.wait()
    finally:
        await graph.close_all()
    assert_clean(tmp_path / "top.qcow2")
    return modes


async def test_stays_background_while_the_copy_gains(tmp_path: Path) -> None:
    modes = await run_auto(tmp_path, 0)
    assert len(modes) >= 10  # READY took a few windows: the decision was made
    assert set(modes) == {CopyMode.BACKGROUND}


async def test_turns_write_blocking_when_the_guest_keeps_up(tmp_path: Path) -> None:
    modes = await run_auto(tmp_path, 2 * SPEED)
    assert modes[0] is CopyMode.BACKGROUND
    assert modes[-1] is CopyMode.WRITE_BLOCKING


async def test_background_mode_stays_background_when_the_guest_keeps_up(
    tmp_path: Path,
) -> None:
    # what makes auto mode switch within a window (the test above) changes
    # nothing in the mode the client chose
    modes = await run_auto(tmp_path, 2 * SPEED, copy_mode=CopyMode.BACKGROUND,
                           seconds=3 * AUTO_WINDOW)  # fmt: skip
    assert len(modes) >= 10
    assert set(modes) == {CopyMode.BACKGROUND}


async def test_decides_over_a_window_not_a_step(tmp_path: Path) -> None:
    # 8 MiB at 4 MiB/s: each 512 KiB step takes a sixteenth of the dirty set,
    # less than a tenth, while each window takes half of it
    modes = await run_auto(tmp_path, 0, data=8 * MiB, speed=4 * MiB)
    assert len(modes) >= 5
    assert set(modes) == {CopyMode.BACKGROUND}


async def test_switches_when_a_window_takes_less_than_a_tenth(tmp_path: Path) -> None:
    """The threshold itself, on the real job's bookkeeping: a window that
    ends with nine tenths of its dirty set left (exactly) keeps background
    mode, one chunk more turns write-blocking; each decision starts the
    next window from the dirty set it saw."""
    create(tmp_path / "base.qcow2", "8M")
    create(tmp_path / "top.qcow2", "8M", backing=Path("base.qcow2"))
    graph = BlockGraph()
    try:
        await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        job = active_commit_job(graph, EventBus(), copy_mode=CopyMode.AUTO)
        chunk = job._dirty.granularity

        def window_ends_with(chunks: int) -> tuple[int, CopyMode]:
            """The dirty set the next window starts from, and the mode now."""
            assert job._window is not None
            job._window = (trio.current_time() - AUTO_WINDOW, job._window[1])
            job._dirty.clear(0, 8 * MiB)
            job._dirty.mark(0, chunks * chunk)
            job._auto_switch()
            assert job._window is not None
            return job._window[1] // chunk, job.copy_mode_in_effect

        job._dirty.mark(0, 20 * chunk)
        job._auto_switch()  # the first window begins
        # exactly nine tenths of 20, then more than a tenth less
        assert window_ends_with(18) == (18, CopyMode.BACKGROUND)
        assert window_ends_with(16) == (16, CopyMode.BACKGROUND)
        # 15 of 16: shrank by less than a tenth
        assert window_ends_with(15) == (15, CopyMode.WRITE_BLOCKING)
    finally:
        await graph.close_all()


async def copying_share(tmp_path: Path, mode: CopyMode, guest_writes: bool) -> float:
    """The share of its time from the start of its first copy to the start
    of its last that an unthrottled active commit of 192 MiB spends copying,
    while a guest writes a 4 KiB block every millisecond (or writes nothing).
    The window ends where the last copy starts: a copy's rest comes after
    it, and the last copy's would fall outside (with only a handful of
    copies, a big last one alone made the share of a resting job 0.65)."""
    tmp_path.mkdir()
    create(tmp_path / "base.qcow2", "256M")
    create(tmp_path / "top.qcow2", "256M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 0 192M")
    graph = BlockGraph()
    events = EventBus()
    ready = seen(events, "BLOCK_JOB_READY")
    rng = random.Random(7)
    copies: list[tuple[float, float]] = []
    try:
        await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        job = active_commit_job(graph, events, copy_mode=mode)
        copy_next = job._copy_next

        async def timed_copy() -> None:
            began = trio.current_time()
            await copy_next()
            copies.append((began, trio.current_time()))

        job._copy_next = timed_copy  # type: ignore[method-assign]

        async def guest() -> None:
            while guest_writes and not ready.is_set():
                await top.write(rng.randrange(256 * MiB // 4096) * 4096, b"\x33" * 4096)
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            nursery.start_soon(guest)
            with trio.fail_after(60):
                await ready.wait()
            job.user_cancel(force=True)
            await job.concluded.wait()
    finally:
        await graph.close_all()
    assert len(copies) >= 4
    return sum(end - began for began, end in copies[:-1]) / (copies[-1][0] - copies[0][0])


async def test_leaves_a_writing_guest_half_the_time(tmp_path: Path) -> None:
    """Until READY, auto mode rests as long as it copied whenever the guest
    wrote meanwhile (the guest keeps about half of the daemon's loop and
    disk); background mode copies all along, as QEMU's mirror does."""
    assert await copying_share(tmp_path / "auto", CopyMode.AUTO, True) < 0.6
    assert await copying_share(tmp_path / "background", CopyMode.BACKGROUND, True) > 0.8


async def test_copies_all_along_when_the_guest_is_quiet(tmp_path: Path) -> None:
    assert await copying_share(tmp_path / "auto", CopyMode.AUTO, False) > 0.8
