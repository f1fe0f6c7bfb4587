"""An active commit that starts while guest writes are in flight on top.

The job learns of writes through top's write hook, installed when it starts.
A write already under way then (on the node's async path, or one the NBD fast
path resolved to host bytes) went past where the hook would have seen it; if
the job's first copy read top before that write landed, base would miss it
for good (the loop of tests/integration/test_snapshot_loop.py lost writes so).
The job therefore waits for the writes in flight when it installs its hook.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blockd.block.graph import BlockGraph
from blockd.events import EventBus
from blockd.jobs.active_commit import ActiveCommitJob, ActiveCommitPlan
from blockd.jobs.commit import plan_commit

from .conftest import assert_clean, create, no_users, open_qcow2, qemu_io, to_raw

KiB, MiB = 1024, 1024 * 1024


@pytest.mark.parametrize("path", ["async", "direct"])
async def test_a_write_in_flight_at_the_start_reaches_base(tmp_path: Path, path: str) -> None:
    create(tmp_path / "base.qcow2", "1M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x11 0 1M")
    create(tmp_path / "top.qcow2", "1M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 0 128k")
    graph = BlockGraph()
    events = EventBus()
    ready = trio.Event()
    events.subscribe(lambda e: ready.set() if e.name == "BLOCK_JOB_READY" else None)
    new = b"\x33" * (4 * KiB)
    try:
        await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        plan = plan_commit(graph, device="top")
        assert isinstance(plan, ActiveCommitPlan)
        job = ActiveCommitJob("j", events, graph, plan, no_users)
        landed = trio.Event()

        async def slow_write() -> None:
            # the write is in flight (past the hook's place) before the job starts
            if path == "async":
                real = top._do_write

                async def late(offset: int, data: bytes) -> None:
                    await trio.sleep(0.3)
                    await real(offset, data)

                top._do_write = late  # type: ignore[method-assign]
                await top.write(64 * KiB, new)
                top._do_write = real  # type: ignore[method-assign]
            else:
                await top.read(64 * KiB, len(new))  # its mapping cached: the fast path's case
                io = top.direct_io(64 * KiB, len(new), True)
                assert io is not None
                await trio.sleep(0.3)
                ((host, n),) = io.pieces
                assert n == len(new)
                os.pwrite(io.fd, new, host)
                io.release()
            landed.set()

        job.create(lambda _job: None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_write)
            await trio.sleep(0.05)
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                await ready.wait()
                await landed.wait()
                job.complete()
                await job.concluded.wait()
        assert job.error is None
    finally:
        await graph.close_all()
    view = bytearray(b"\x11" * MiB)
    view[: 128 * KiB] = b"\x22" * (128 * KiB)
    view[64 * KiB : 68 * KiB] = new
    assert to_raw(tmp_path / "base.qcow2", tmp_path / "base.raw") == bytes(view)
    assert_clean(tmp_path / "base.qcow2")
