"""A write-blocking active commit holds the window it copies against the
guest: a guest write there waits for the copy (else the copy could put the
older data it read over the guest's newer write in base, after the mirror
wrote it), and a write elsewhere does not wait.

In-process on the real clock, with the job's copy stopped half way.
"""

from __future__ import annotations

from pathlib import Path

import trio

from blockd.block.graph import BlockGraph
from blockd.events import EventBus
from blockd.jobs.active_commit import LOCKED_SPAN, CopyMode

from .conftest import (
    active_commit_job,
    assert_clean,
    commit_to_the_end,
    create,
    open_qcow2,
    qemu_io,
    to_raw,
)

KiB, MiB = 1024, 1024 * 1024


async def test_a_copy_holds_its_window_against_the_guest(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2", "8M")
    create(tmp_path / "top.qcow2", "8M", backing=Path("base.qcow2"))
    # the first dirty run starts at 1 MiB: the window is [1 MiB, 1 MiB + LOCKED_SPAN)
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 1M 2M")
    inside, outside = 2 * MiB, MiB + LOCKED_SPAN + 64 * KiB
    graph = BlockGraph()
    events = EventBus()
    try:
        base = await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        job = active_commit_job(graph, events, copy_mode=CopyMode.WRITE_BLOCKING)
        copying, go_on = trio.Event(), trio.Event()
        copy_ranges = job._copy.ranges

        async def stopped_copy(ranges: list[tuple[int, int]]) -> int:
            copying.set()
            await go_on.wait()
            return await copy_ranges(ranges)

        job._copy.ranges = stopped_copy  # type: ignore[method-assign]
        written: list[int] = []
        done = {inside: trio.Event(), outside: trio.Event()}

        async def guest(offset: int, byte: int) -> None:
            await top.write(offset, bytes([byte]) * 4 * KiB)
            written.append(offset)
            done[offset].set()

        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                await copying.wait()
                nursery.start_soon(guest, inside, 0x33)
                nursery.start_soon(guest, outside, 0x44)
                await done[outside].wait()
                await trio.sleep(0.2)
                assert written == [outside]  # the one in the window waits
                go_on.set()
                await done[inside].wait()
            job.user_cancel(force=True)
        # the guest's write is the newest in both images
        for node in (top, base):
            assert await node.read(inside, 4 * KiB) == b"\x33" * 4 * KiB
            assert await node.read(outside, 4 * KiB) == b"\x44" * 4 * KiB
    finally:
        await graph.close_all()
    assert_clean(tmp_path / "base.qcow2")


async def test_windows_anywhere_in_the_disk_are_copied(tmp_path: Path) -> None:
    """Each window is locked from its first dirty run on, wherever that lies
    (here past the first lock span, and not at a multiple of it)."""
    create(tmp_path / "base.qcow2", "16M")
    create(tmp_path / "top.qcow2", "16M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 5M 3M", "write -P 0x23 13M 64k")
    graph = BlockGraph()
    try:
        await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        await commit_to_the_end(graph, copy_mode=CopyMode.WRITE_BLOCKING)
    finally:
        await graph.close_all()
    view = bytearray(16 * MiB)
    view[5 * MiB : 8 * MiB] = b"\x22" * 3 * MiB
    view[13 * MiB : 13 * MiB + 64 * KiB] = b"\x23" * 64 * KiB
    assert to_raw(tmp_path / "base.qcow2", tmp_path / "base.raw") == bytes(view)
    assert_clean(tmp_path / "base.qcow2")
