"""A write-blocking active commit that ends without its pivot stops mirroring:
the guest's later writes reach top alone, and base keeps what the job left
there.  A write hook left behind would go on writing the guest's data into
base (an image the client may already use elsewhere), or fail the guest's
writes once base is read-only again.

In-process on the real clock; both ways a job can end without a pivot: a
cancel while it copies, and a cancel once READY.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from blockd.block.graph import BlockGraph
from blockd.events import EventBus
from blockd.jobs.active_commit import CopyMode

from .conftest import active_commit_job, assert_clean, create, open_qcow2, qemu_io, seen

KiB, MiB = 1024, 1024 * 1024


@pytest.mark.parametrize("when", ["running", "ready"])
async def test_guest_writes_after_the_job_reach_top_alone(tmp_path: Path, when: str) -> None:
    create(tmp_path / "base.qcow2", "4M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x11 0 4M")
    create(tmp_path / "top.qcow2", "4M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 0 2M")
    graph = BlockGraph()
    events = EventBus()
    running = seen(events, "JOB_STATUS_CHANGE", "running")
    ready = seen(events, "BLOCK_JOB_READY")
    try:
        base = await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        # at 64 KiB/s a running job copies a step and sleeps past the test
        speed = 64 * KiB if when == "running" else 0
        job = active_commit_job(graph, events, copy_mode=CopyMode.WRITE_BLOCKING, speed=speed)
        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                await (ready if when == "ready" else running).wait()
                # while the job runs, a guest write is mirrored into base
                await top.write(3 * MiB, b"\x33" * 64 * KiB)
                assert await base.read(3 * MiB, 64 * KiB) == b"\x33" * 64 * KiB
                job.user_cancel(force=True)
                await job.concluded.wait()
        left = await base.read(0, 4 * MiB)
        await top.write(3 * MiB + 64 * KiB, b"\x44" * 64 * KiB)
        await top.write(0, b"\x55" * 64 * KiB)
        assert await top.read(3 * MiB + 64 * KiB, 64 * KiB) == b"\x44" * 64 * KiB
        assert await top.read(0, 64 * KiB) == b"\x55" * 64 * KiB
        assert await base.read(0, 4 * MiB) == left
    finally:
        await graph.close_all()
    assert_clean(tmp_path / "top.qcow2")
    assert_clean(tmp_path / "base.qcow2")
