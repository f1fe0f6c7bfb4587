"""Auto copy mode decides on the dirty set's trend: it stays in background
mode while the copy gains on the guest, and turns write-blocking once a
window passes without the dirty set shrinking by a tenth.

In-process on the real clock: a speed limit stretches the copy over a few of
auto mode's one-second windows, so the decision is made (and made more
than once) before READY.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from blockd.block.graph import BlockGraph
from blockd.events import EventBus
from blockd.jobs.active_commit import CopyMode

from .conftest import active_commit_job, assert_clean, create, open_qcow2, qemu_io, seen

MiB = 1024 * 1024
SPEED = 1 * MiB


async def run_auto(
    tmp_path: Path, guest_bytes_per_second: int, data: int = 3 * MiB, speed: int = SPEED
) -> list[CopyMode]:
    """The modes in effect, sampled every 0.2 s until READY, with a guest
    writing random 64 KiB blocks at the given rate meanwhile."""
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
        job = active_commit_job(graph, events, copy_mode=CopyMode.AUTO, speed=speed)

        async def guest() -> None:
            while guest_bytes_per_second and not ready.is_set():
                block = rng.randrange(8 * MiB // (64 * 1024)) * 64 * 1024
                await top.write(block, b"\x33" * 64 * 1024)
                await trio.sleep(64 * 1024 / guest_bytes_per_second)

        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            nursery.start_soon(guest)
            with trio.fail_after(60):
                while not ready.is_set():
                    modes.append(job.copy_mode_in_effect)
                    await trio.sleep(0.2)
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


async def test_decides_over_a_window_not_a_step(tmp_path: Path) -> None:
    # 8 MiB at 4 MiB/s: each 512 KiB step takes a sixteenth of the dirty set,
    # less than a tenth, while each window takes half of it
    modes = await run_auto(tmp_path, 0, data=8 * MiB, speed=4 * MiB)
    assert len(modes) >= 5
    assert set(modes) == {CopyMode.BACKGROUND}
