"""When an active commit goes READY: as soon as everything known is copied and
base is flushed, as QEMU's mirror does, even if the guest keeps writing during
every flush; the pivot's final sync then copies what those writes left.

In-process, with the guest's writes made during base's flushes, so the
ordering is exact: a job that waited for a flush no write overlaps would never
get READY here (the test's time limit would fail it).
"""

from __future__ import annotations

from pathlib import Path

import trio

from blockd.block.graph import BlockGraph
from blockd.events import EmittedEvent, EventBus
from blockd.jobs.active_commit import ActiveCommitJob, ActiveCommitPlan, CopyMode
from blockd.jobs.commit import plan_commit
from blockd.jobs.status import JobStatus

from .conftest import (
    active_commit_job,
    assert_clean,
    create,
    no_users,
    open_qcow2,
    qemu_io,
    seen,
    to_raw,
)

KiB, MiB = 1024, 1024 * 1024


async def test_ready_despite_writes_during_every_flush(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2", "4M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x11 0 4M")
    create(tmp_path / "top.qcow2", "4M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 1M 1M")
    graph = BlockGraph()
    seen: list[EmittedEvent] = []
    events = EventBus()
    events.subscribe(seen.append)
    ready_seen = trio.Event()
    events.subscribe(lambda e: ready_seen.set() if e.name == "BLOCK_JOB_READY" else None)
    writes = 0
    try:
        base = await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        plan = plan_commit(graph, device="top")
        assert isinstance(plan, ActiveCommitPlan)
        job = ActiveCommitJob("j", events, graph, plan, no_users)
        flush = base.flush

        async def flush_while_the_guest_writes() -> None:
            nonlocal writes
            if job.status is JobStatus.RUNNING:
                # a guest write lands while base is being flushed
                writes += 1
                await top.write((writes % 64) * 64 * KiB, bytes([writes % 251 + 1]) * 4096)
            await flush()

        base.flush = flush_while_the_guest_writes  # type: ignore[method-assign]
        job.create(lambda _job: None)
        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                await ready_seen.wait()
                (ready,) = [e for e in seen if e.name == "BLOCK_JOB_READY"]
                assert ready.data is not None
                # the moment nothing was left: what was copied, all of it
                assert ready.data["offset"] == ready.data["len"] == MiB
                # the write made during the flush is still to copy
                assert writes == 1
                assert job.length > job.offset
                job.complete()
                await job.concluded.wait()
        assert job.error is None
    finally:
        await graph.close_all()
    # after the pivot base alone holds the guest's view, the flush-time write too
    view = bytearray(b"\x11" * 4 * MiB)
    view[MiB : 2 * MiB] = b"\x22" * MiB
    view[64 * KiB : 64 * KiB + 4096] = bytes([2]) * 4096
    assert to_raw(tmp_path / "base.qcow2", tmp_path / "base.raw") == bytes(view)
    assert_clean(tmp_path / "base.qcow2")


async def test_background_mode_gets_ready_under_a_guest_that_writes_during_every_copy(
    tmp_path: Path,
) -> None:
    """In background mode the last few chunks are copied with the guest's
    writes held: a guest that dirties a chunk during every copy would
    otherwise keep the job from READY for as long as it writes."""
    create(tmp_path / "base.qcow2", "4M")
    create(tmp_path / "top.qcow2", "4M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 0 1M")
    graph, events = BlockGraph(), EventBus()
    ready = seen(events, "BLOCK_JOB_READY")
    writes, written = 0, list[trio.Event]()
    try:
        await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        job = active_commit_job(graph, events, copy_mode=CopyMode.BACKGROUND)
        copy = job._copy.ranges
        async with trio.open_nursery() as nursery:

            async def guest_write(done: trio.Event) -> None:
                nonlocal writes
                writes += 1
                offset, data = 2 * MiB + (writes % 32) * 64 * KiB, bytes([writes % 251 + 1])
                await top.write(offset, data * 4096)
                done.set()

            async def copy_while_the_guest_writes(ranges: list[tuple[int, int]]) -> int:
                if job.status is JobStatus.RUNNING:
                    done = trio.Event()
                    written.append(done)
                    nursery.start_soon(guest_write, done)
                    # in place before the copy ends, unless the job holds the writes
                    with trio.move_on_after(0.5):
                        await done.wait()
                return await copy(ranges)

            job._copy.ranges = copy_while_the_guest_writes  # type: ignore[method-assign]
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                await ready.wait()
                for done in written:  # the guest's writes are over before the pivot
                    await done.wait()
                job.complete()
                await job.concluded.wait()
        assert job.error is None and writes > 0
    finally:
        await graph.close_all()
    view = bytearray(b"\x22" * MiB + bytes(3 * MiB))
    for n in range(1, writes + 1):
        offset = 2 * MiB + (n % 32) * 64 * KiB
        view[offset : offset + 4096] = bytes([n % 251 + 1]) * 4096
    assert to_raw(tmp_path / "base.qcow2", tmp_path / "base.raw") == bytes(view)
    assert_clean(tmp_path / "base.qcow2")
