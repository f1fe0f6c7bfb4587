"""The active commit's write hook (``blockd.block.mirror``), in-process on real images.

Write-blocking: a guest write reaches base before it returns, cleans the
dirty chunks it covers whole, waits for the job's copy of an overlapping
range (and the copy never writes older data over it), overlapping writes
reach both images in one order; a failed mirror write leaves the guest's
write successful and goes to the job's on-error policy; a flush of top
flushes base.  Background: writes only mark chunks dirty, and a write that
cannot wait is turned away while a range lock over it is queued; in
write-blocking it is mirrored in the same worker call where base can take it
in place.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from blockd.block.direct import DirectIO, start_direct
from blockd.block.dirty import DirtyBitmap
from blockd.block.graph import BlockGraph
from blockd.block.mirror import WHOLE, WriteMirror
from blockd.block.node import BlockNode
from blockd.errors import BlockIOError
from blockd.events import EmittedEvent, EventBus
from blockd.jobs.active_commit import ActiveCommitJob, ActiveCommitPlan, CopyMode
from blockd.jobs.commit import plan_commit
from blockd.jobs.job import OnError

from .conftest import assert_clean, create, no_users, open_qcow2, qemu_io, to_raw

KiB, MiB = 1024, 1024 * 1024
CHUNK = 64 * KiB


async def chain(graph: BlockGraph, tmp_path: Path) -> tuple[BlockNode, BlockNode]:
    create(tmp_path / "base.qcow2", "4M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x11 0 4M")
    create(tmp_path / "top.qcow2", "4M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 1M 1M")
    base = await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
    top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
    return top, base


class Hooked:
    """A WriteMirror on top, as a job would install it; records what it reports."""

    def __init__(self, top: BlockNode, base: BlockNode, *, blocking: bool) -> None:
        self.dirty = DirtyBitmap(top.size, CHUNK)
        self.cleared = 0
        self.failures: list[BlockIOError] = []
        self.mirror = WriteMirror(base, self.dirty, self._changed, self.failures.append)
        self.mirror.blocking = blocking
        top.set_write_hook(self.mirror)

    def _changed(self, cleared: int) -> None:
        self.cleared += cleared


async def test_write_blocking_mirrors_and_cleans_whole_chunks(
    graph: BlockGraph, tmp_path: Path
) -> None:
    top, base = await chain(graph, tmp_path)
    hooked = Hooked(top, base, blocking=True)
    hooked.dirty.mark(0, 4 * MiB)
    await top.write(CHUNK, b"\xaa" * CHUNK)  # chunk 1, whole
    await top.write(3 * CHUNK + 512, b"\xbb" * 4096)  # part of chunk 3
    await top.write_zeroes(5 * CHUNK, 2 * CHUNK)  # chunks 5 and 6, whole
    assert await base.read(CHUNK, CHUNK) == b"\xaa" * CHUNK
    assert await base.read(3 * CHUNK + 512, 4096) == b"\xbb" * 4096
    assert await base.read(5 * CHUNK, 2 * CHUNK) == bytes(2 * CHUNK)
    assert hooked.cleared == 3 * CHUNK
    assert [run for run in hooked.dirty.runs(0, 8 * CHUNK)] == [
        (0, CHUNK), (2 * CHUNK, 3 * CHUNK), (7 * CHUNK, CHUNK)
    ]  # fmt: skip
    # a discard's result need not read the same on base: copied later instead
    hooked.dirty.clear(0, 4 * MiB)
    await top.discard(MiB, CHUNK)
    assert hooked.dirty.runs(0, 4 * MiB) == [(MiB, CHUNK)]
    assert await base.read(MiB, CHUNK) == b"\x11" * CHUNK
    assert hooked.failures == []


async def test_background_only_marks_dirty(graph: BlockGraph, tmp_path: Path) -> None:
    top, base = await chain(graph, tmp_path)
    hooked = Hooked(top, base, blocking=False)
    await top.write(CHUNK + 4096, b"\xaa" * 4096)
    await top.write_zeroes(3 * CHUNK, CHUNK)
    assert await base.read(CHUNK, 4 * CHUNK) == b"\x11" * 4 * CHUNK
    assert hooked.dirty.runs(0, 4 * MiB) == [(CHUNK, CHUNK), (3 * CHUNK, CHUNK)]


async def test_direct_writes_in_background_mark_dirty(graph: BlockGraph, tmp_path: Path) -> None:
    top, base = await chain(graph, tmp_path)
    await top.write(MiB, b"\x33" * CHUNK)  # top's own cluster, mapped and cached
    hooked = Hooked(top, base, blocking=False)
    io = top.direct_io(MiB, 4096, True)
    assert io is not None and io.also is None  # the fast path may write it alone
    assert len(hooked.mirror.locks) == 1  # and holds its range meanwhile
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hooked.mirror.drain)
        await trio.testing.wait_all_tasks_blocked()
        # a whole-node lock is queued: no write may jump it
        assert refused(top, 2 * MiB, 4096)
        await direct_write(io, b"\x44" * 4096)
    assert hooked.dirty.runs(0, 4 * MiB) == [(MiB, CHUNK)]
    assert len(hooked.mirror.locks) == 0
    read = top.direct_io(MiB, 4096, False)
    assert read is not None  # reads are not the hook's business
    read.release()


def refused(node: BlockNode, offset: int, length: int) -> bool:
    """Whether a write there would go to the async path (a resolved one is let go)."""
    io = node.direct_io(offset, length, True)
    if io is not None:
        io.release()
    return io is None


async def direct_write(io: DirectIO, data: bytes) -> None:
    """What the NBD fast path does with a resolved write: one worker call, then release."""
    finished = trio.Event()
    start_direct([(io, True, memoryview(data))], lambda _result: finished.set())
    await finished.wait()
    io.release()


async def test_direct_writes_in_write_blocking_go_to_base_in_the_same_call(
    graph: BlockGraph, tmp_path: Path
) -> None:
    top, base = await chain(graph, tmp_path)
    await top.write(MiB, b"\x33" * 2 * CHUNK)
    await base.read(MiB, 2 * CHUNK)  # base's L2 table cached: resolvable in place
    hooked = Hooked(top, base, blocking=True)
    hooked.dirty.mark(0, 4 * MiB)
    io = top.direct_io(MiB, CHUNK, True)  # a whole chunk
    assert io is not None and io.also is not None
    await direct_write(io, b"\x55" * CHUNK)
    io = top.direct_io(MiB + CHUNK + 4096, 4096, True)  # part of the next one
    assert io is not None and io.also is not None
    await direct_write(io, b"\x66" * 4096)
    assert await base.read(MiB, CHUNK) == b"\x55" * CHUNK
    assert await base.read(MiB + CHUNK + 4096, 4096) == b"\x66" * 4096
    assert hooked.cleared == CHUNK
    assert hooked.dirty.runs(MiB, MiB + 2 * CHUNK) == [(MiB + CHUNK, CHUNK)]
    assert len(hooked.mirror.locks) == 0
    # base cannot take it in place (no cluster there): the async path
    await top.write(3 * MiB, b"\x77" * CHUNK)
    await base.write_zeroes(3 * MiB, CHUNK)
    assert refused(top, 3 * MiB, 4096)
    assert len(hooked.mirror.locks) == 0
    # a mirror that fails: the guest's write stands, its chunks are dirty again
    hooked.dirty.clear(0, 4 * MiB)
    io = top.direct_io(MiB + 8192, 4096, True)
    assert io is not None and io.also is not None
    io.also.fd = -1
    await direct_write(io, b"\x88" * 4096)
    assert io.ok
    assert await top.read(MiB + 8192, 4096) == b"\x88" * 4096
    assert [err.errno for err in hooked.failures] == [errno.EBADF]
    assert hooked.dirty.runs(0, 4 * MiB) == [(MiB, CHUNK)]


async def test_a_write_waits_for_the_copy_of_its_range(graph: BlockGraph, tmp_path: Path) -> None:
    top, base = await chain(graph, tmp_path)
    hooked = Hooked(top, base, blocking=True)
    done = trio.Event()

    async def guest() -> None:
        await top.write(MiB + CHUNK, b"\x77" * 4096)
        done.set()

    async with trio.open_nursery() as nursery:
        entry = await hooked.mirror.locks.lock(MiB, 2 * CHUNK)  # the job copies there
        nursery.start_soon(guest)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert await top.read(MiB + CHUNK, 4096) == b"\x22" * 4096  # not started yet
        hooked.mirror.locks.unlock(entry)
    assert await base.read(MiB + CHUNK, 4096) == b"\x77" * 4096


async def test_overlapping_writes_reach_both_images_in_one_order(
    graph: BlockGraph, tmp_path: Path
) -> None:
    top, base = await chain(graph, tmp_path)
    Hooked(top, base, blocking=True)
    gate = trio.Event()
    write = base.write

    mirroring = trio.Event()

    async def slow_first_mirror(offset: int, data: bytes) -> None:
        if data[:1] == b"\xa1":
            mirroring.set()
            await gate.wait()
        await write(offset, data)

    base.write = slow_first_mirror  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(top.write, 2 * MiB, b"\xa1" * 8192)
        await mirroring.wait()  # the first is on top, its mirror waits
        nursery.start_soon(top.write, 2 * MiB + 4096, b"\xb2" * 8192)
        await trio.testing.wait_all_tasks_blocked()
        # the second waits for the first's mirror before touching top
        assert await top.read(2 * MiB + 4096, 4096) == b"\xa1" * 4096
        gate.set()
    want = b"\xa1" * 4096 + b"\xb2" * 8192
    assert await top.read(2 * MiB, 12288) == want
    assert await base.read(2 * MiB, 12288) == want


async def test_a_failed_mirror_write_does_not_fail_the_guest(
    graph: BlockGraph, tmp_path: Path
) -> None:
    top, base = await chain(graph, tmp_path)
    hooked = Hooked(top, base, blocking=True)

    async def broken(offset: int, data: bytes) -> None:
        raise BlockIOError(errno.EIO)

    base.write = broken  # type: ignore[method-assign]
    await top.write(3 * MiB, b"\x55" * 4096)
    assert await top.read(3 * MiB, 4096) == b"\x55" * 4096
    assert [err.errno for err in hooked.failures] == [errno.EIO]
    assert hooked.dirty.runs(0, 4 * MiB) == [(3 * MiB, CHUNK)]  # copied again later


@pytest.mark.parametrize("blocking", [True, False])
async def test_a_flush_of_top_flushes_base_in_write_blocking(
    graph: BlockGraph, tmp_path: Path, blocking: bool
) -> None:
    top, base = await chain(graph, tmp_path)
    hooked = Hooked(top, base, blocking=blocking)
    flushes = 0
    flush = base.flush

    async def counted() -> None:
        nonlocal flushes
        flushes += 1
        await flush()

    base.flush = counted  # type: ignore[method-assign]
    await top.write(0, b"\x66" * 4096)
    await top.flush()
    assert flushes == (1 if blocking else 0)

    async def broken() -> None:
        raise BlockIOError(errno.EIO)

    base.flush = broken  # type: ignore[method-assign]
    await top.flush()  # the guest's flush of top succeeded: so does its FLUSH
    assert len(hooked.failures) == (1 if blocking else 0)


class Events:
    def __init__(self) -> None:
        self.bus = EventBus()
        self.seen: list[EmittedEvent] = []
        self.arrived: dict[str, trio.Event] = {}
        self.bus.subscribe(self._heard)

    def _heard(self, event: EmittedEvent) -> None:
        self.seen.append(event)
        self.arrived.setdefault(event.name, trio.Event()).set()

    async def wait(self, name: str) -> None:
        with trio.fail_after(60):
            await self.arrived.setdefault(name, trio.Event()).wait()

    def named(self, name: str) -> list[Any]:
        return [e.data for e in self.seen if e.name == name]


async def test_the_job_never_copies_older_data_over_a_mirrored_write(
    graph: BlockGraph, tmp_path: Path
) -> None:
    """The job has read top's 0x22 for [1M, 2M) and is writing it to base when
    the guest writes 0x77 there: the guest's write waits for the copy, then
    reaches base after it, so base ends with 0x77 (without the range lock the
    older copy would land last, and the 4 KiB write leaves its chunk clean)."""
    top, base = await chain(graph, tmp_path)
    events = Events()
    plan = plan_commit(graph, device="top")
    assert isinstance(plan, ActiveCommitPlan)
    job = ActiveCommitJob(
        "j", events.bus, graph, plan, no_users, copy_mode=CopyMode.WRITE_BLOCKING
    )
    copying, gate = trio.Event(), trio.Event()
    originals = {name: getattr(base, name) for name in ("write_from_host", "write_many_from_host")}

    def gated(name: str) -> Callable[..., Awaitable[bool]]:
        async def call(*args: Any) -> bool:
            copying.set()
            await gate.wait()
            result: bool = await originals[name](*args)
            return result

        return call

    for name in originals:
        setattr(base, name, gated(name))
    job.create(lambda _job: None)
    guest_done = trio.Event()

    async def guest() -> None:
        await top.write(MiB + 5 * 4096, b"\x77" * 4096)
        guest_done.set()

    async with trio.open_nursery() as nursery:
        await job.setup()
        job.start(nursery)
        with trio.fail_after(30):
            await copying.wait()
        nursery.start_soon(guest)
        await trio.testing.wait_all_tasks_blocked()
        assert not guest_done.is_set()
        gate.set()
        await guest_done.wait()
        await events.wait("BLOCK_JOB_READY")
        assert await base.read(MiB + 5 * 4096, 4096) == b"\x77" * 4096
        job.complete()
        await job.concluded.wait()
    assert job.error is None
    await graph.close_all()
    view = bytearray(b"\x11" * 4 * MiB)
    view[MiB : 2 * MiB] = b"\x22" * MiB
    view[MiB + 5 * 4096 : MiB + 6 * 4096] = b"\x77" * 4096
    assert to_raw(tmp_path / "base.qcow2", tmp_path / "base.raw") == bytes(view)
    assert_clean(tmp_path / "base.qcow2")


@pytest.mark.parametrize("on_error", [OnError.REPORT, OnError.IGNORE])
async def test_a_failed_mirror_write_follows_on_error(
    graph: BlockGraph, tmp_path: Path, on_error: OnError
) -> None:
    top, base = await chain(graph, tmp_path)
    events = Events()
    plan = plan_commit(graph, device="top")
    assert isinstance(plan, ActiveCommitPlan)
    job = ActiveCommitJob(
        "j", events.bus, graph, plan, no_users, copy_mode=CopyMode.WRITE_BLOCKING, on_error=on_error
    )
    job.create(lambda _job: None)
    write = base.write
    failed = False

    async def fails_once(offset: int, data: bytes) -> None:
        nonlocal failed
        if not failed:
            failed = True
            raise BlockIOError(errno.EIO)
        await write(offset, data)

    with trio.fail_after(60):
        await run_failing(job, top, base, events, on_error, fails_once)
    assert events.named("BLOCK_JOB_ERROR") == [
        {"device": "j", "operation": "write", "action": str(on_error)}
    ]
    await graph.close_all()
    if on_error is OnError.REPORT:
        assert job.error == "Input/output error"
        return
    # ignored: the chunk stayed dirty and the pivot's copy brought it over
    assert job.error is None
    view = bytearray(b"\x11" * 4 * MiB)
    view[MiB : 2 * MiB] = b"\x22" * MiB
    view[3 * MiB + 4096 : 3 * MiB + 8192] = b"\x99" * 4096
    assert to_raw(tmp_path / "base.qcow2", tmp_path / "base.raw") == bytes(view)


async def run_failing(
    job: ActiveCommitJob,
    top: BlockNode,
    base: BlockNode,
    events: Events,
    on_error: OnError,
    fails_once: Callable[[int, bytes], Awaitable[None]],
) -> None:
    async with trio.open_nursery() as nursery:
        await job.setup()
        job.start(nursery)
        await events.wait("BLOCK_JOB_READY")
        base.write = fails_once  # type: ignore[method-assign]
        await top.write(3 * MiB + 4096, b"\x99" * 4096)  # the guest's write succeeds
        assert await top.read(3 * MiB + 4096, 4096) == b"\x99" * 4096
        if on_error is OnError.REPORT:
            await job.concluded.wait()
        else:
            await events.wait("BLOCK_JOB_ERROR")
            job.complete()
            await job.concluded.wait()


async def test_drain_waits_for_writes_in_flight(graph: BlockGraph, tmp_path: Path) -> None:
    top, base = await chain(graph, tmp_path)
    hooked = Hooked(top, base, blocking=True)
    entry = hooked.mirror.locks.try_lock(0, 4096)
    assert entry is not None
    assert hooked.mirror.locks.try_lock(0, WHOLE) is None
    drained = trio.Event()

    async def drain() -> None:
        await hooked.mirror.drain()
        drained.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        assert not drained.is_set()
        hooked.mirror.locks.unlock(entry)
    assert drained.is_set()
