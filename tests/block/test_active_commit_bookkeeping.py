"""What an active commit tells its clients about itself, and what a refused
start leaves behind: a progress total that never falls below what is done,
``paused`` only while the job waits to be finalized (QEMU's drained mirror),
a scan that finds data at the end of a large sparse disk at once, and a base
back to read-only when the job cannot take its nodes.

In-process, on images made by qemu-img.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.block.open import open_node
from blockd.errors import BlockError, BlockIOError
from blockd.events import EmittedEvent, EventBus
from blockd.jobs.active_commit import HOLD_BYTES
from blockd.jobs.job import OnError
from blockd.jobs.status import JobStatus

from .conftest import (
    active_commit_job,
    assert_clean,
    commit_to_the_end,
    compare_with,
    create,
    open_qcow2,
    qemu_io,
    ready_job,
    seen,
)

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024


async def chain(
    tmp_path: Path,
    graph: BlockGraph,
    size: str,
    *writes: str,
    top_size: str | None = None,
    top_read_only: bool = False,
    top_rules: list[dict[str, object]] | None = None,
    base_rules: list[dict[str, object]] | None = None,
) -> list[BlockNode]:
    """base (read-only, as a client adds it) <- top, each through blkdebug
    with its rules if any."""
    create(tmp_path / "base.qcow2", size)
    create(tmp_path / "top.qcow2", top_size or size, backing=Path("base.qcow2"))
    if writes:
        qemu_io(tmp_path / "top.qcow2", *writes)

    def file(name: str, rules: list[dict[str, object]] | None) -> dict[str, object]:
        plain: dict[str, object] = {"driver": "file", "filename": str(tmp_path / name)}
        if rules is None:
            return plain
        return {"driver": "blkdebug", "image": plain, "inject-error": rules}

    base = await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None,
                            read_only=True, file=file("base.qcow2", base_rules))  # fmt: skip
    top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base",
                           read_only=top_read_only, file=file("top.qcow2", top_rules))  # fmt: skip
    return [base, top]


async def test_the_total_counts_what_is_in_flight(tmp_path: Path) -> None:
    graph, events = BlockGraph(), EventBus()
    samples: list[tuple[int, int]] = []
    try:
        _base, top = await chain(tmp_path, graph, "8M", "write -P 0x22 0 4M")
        job = active_commit_job(graph, events, speed=4 * MiB)
        ready = seen(events, "BLOCK_JOB_READY")
        copy = job._copy.ranges

        async def copy_with_a_guest_write(ranges: list[tuple[int, int]]) -> int:
            # a guest write while the job's copy is in flight updates the total
            # (the first few copies: each write is more to copy)
            if len(samples) < 6:
                await top.write(6 * MiB, b"\x33" * 4 * KiB)
                samples.append((job.offset, job.length))
            return await copy(ranges)

        job._copy.ranges = copy_with_a_guest_write  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                await ready.wait()
            job.user_cancel(force=True)
    finally:
        await graph.close_all()
    assert len(samples) >= 4
    # done so far, plus what is being copied now, at the least
    assert all(length >= offset + 512 * KiB for offset, length in samples)
    # and exactly: the 4 MiB top held, plus the 64 KiB chunk the guest keeps
    # dirtying (the job reaches it only after the samples)
    assert {length for _offset, length in samples} == {4 * MiB + 64 * KiB}


async def test_paused_only_while_pending(tmp_path: Path) -> None:
    graph, events = BlockGraph(), EventBus()
    try:
        await chain(tmp_path, graph, "4M", "write -P 0x22 0 1M")
        job = active_commit_job(graph, events, auto_finalize=False, auto_dismiss=False)
        ready = seen(events, "BLOCK_JOB_READY")
        pending = seen(events, "JOB_STATUS_CHANGE", "pending")
        assert job.status is JobStatus.CREATED
        assert job.block_job_info()["paused"] is False
        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                assert job.block_job_info()["paused"] is False
                await ready.wait()
                assert job.block_job_info()["paused"] is False
                # nothing left to copy, nothing in flight: QEMU's len is offset
                assert job.length == job.offset
                job.complete()
                await pending.wait()
            assert job.status is JobStatus.PENDING
            assert job.block_job_info()["paused"] is True
            job.finalize()
        assert job.status is JobStatus.CONCLUDED
        assert job.block_job_info()["paused"] is False
    finally:
        await graph.close_all()


async def test_a_write_while_pending_reaches_base_from_its_first_byte(tmp_path: Path) -> None:
    """What the guest writes while the job waits to be finalized is copied by
    the pivot's last pass, whole: here into the disk's first chunk, where a
    pass that started one byte late would leave base's first byte stale."""
    graph, events = BlockGraph(), EventBus()
    try:
        base, top = await chain(tmp_path, graph, "4M", "write -P 0x22 1M 1M")
        pending = seen(events, "JOB_STATUS_CHANGE", "pending")
        async with ready_job(graph, events, auto_finalize=False) as job:
            job.complete()
            await pending.wait()
            await top.write(0, b"\x99" * 4 * KiB)
            job.finalize()
            await job.concluded.wait()
        assert job.error is None
        assert await base.read(0, 8 * KiB) == b"\x99" * 4 * KiB + bytes(4 * KiB)
    finally:
        await graph.close_all()


async def test_data_at_the_end_of_a_large_sparse_disk_is_found_at_once(tmp_path: Path) -> None:
    # the scan asks about ever larger spans where the layers hold little
    graph, events = BlockGraph(), EventBus()
    try:
        base, _top = await chain(tmp_path, graph, "64G", f"write -P 0x44 {64 * GiB - MiB} 64k")
        job = active_commit_job(graph, events)
        ready = seen(events, "BLOCK_JOB_READY")
        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(20):
                await ready.wait()
            assert await base.read(64 * GiB - MiB, 64 * KiB) == b"\x44" * 64 * KiB
            job.user_cancel(force=True)
    finally:
        await graph.close_all()


async def test_a_start_refused_for_a_claim_leaves_base_read_only(tmp_path: Path) -> None:
    graph, events = BlockGraph(), EventBus()
    try:
        base, top = await chain(tmp_path, graph, "4M", "write -P 0x22 0 1M")
        # another commit into base holds it, and lets nobody else write there
        graph.claim_for_commit("other", top, base, active=False)
        job = active_commit_job(graph, events)
        with pytest.raises(BlockError):
            await job.setup()
        assert base.read_only
    finally:
        await graph.close_all()


@pytest.mark.parametrize("when", ["running", "ready"])
async def test_a_cancelled_job_gives_its_nodes_back(tmp_path: Path, when: str) -> None:
    graph, events = BlockGraph(), EventBus()
    try:
        base, top = await chain(tmp_path, graph, "4M", "write -P 0x22 0 2M")
        # at 64 KiB/s a running job copies a step and sleeps past the test
        job = active_commit_job(graph, events, speed=64 * KiB if when == "running" else 0)
        reached = seen(events, "JOB_STATUS_CHANGE", when)
        async with trio.open_nursery() as nursery:
            await job.setup()
            assert graph.blocker(base) is not None and graph.blocker(top) is not None
            assert graph.in_use(base)  # the job's own handle on base
            assert not base.read_only
            job.start(nursery)
            with trio.fail_after(30):
                await reached.wait()
            job.user_cancel(force=True)
            await job.concluded.wait()
        assert graph.blocker(base) is None and graph.blocker(top) is None
        assert not graph.in_use(base)
        assert graph.deletion_blocker(base) is not None  # top's backing, as before
        assert base.read_only
    finally:
        await graph.close_all()


@pytest.mark.parametrize(
    ("base_size", "top_size", "data_at"),
    [("4M", "8M", 6 * MiB), ("8M", "4M", 1 * MiB)],
    ids=["smaller-base", "bigger-base"],
)
async def test_base_grows_to_top_s_size_and_never_shrinks(
    tmp_path: Path, base_size: str, top_size: str, data_at: int
) -> None:
    """A smaller base grows to top's size (top's data past base's old end
    reaches it); a bigger one keeps its size, as in QEMU: what it holds
    past top's end stays (it may be shown through another overlay)."""
    graph, events = BlockGraph(), EventBus()
    try:
        base, _top = await chain(
            tmp_path, graph, base_size, f"write -P 0x55 {data_at} 64k", top_size=top_size
        )
        async with ready_job(graph, events) as job:
            assert base.size == 8 * MiB
            assert await base.read(data_at, 64 * KiB) == b"\x55" * 64 * KiB
            job.user_cancel(force=True)
    finally:
        await graph.close_all()


async def test_a_base_that_cannot_grow_fails_the_job_in_errno_s_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's job asks its truncate of base for no message: the client reads
    errno's words, not the driver's sentence."""
    graph, events = BlockGraph(), EventBus()
    try:
        base, _top = await chain(tmp_path, graph, "4M", "write -P 0x55 6M 64k", top_size="8M")

        async def full(*_args: object, **_options: object) -> None:
            raise BlockIOError(errno.ENOSPC, "Could not resize the image: No space left on device")

        monkeypatch.setattr(base, "truncate", full)
        job = active_commit_job(graph, events)
        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                await job.concluded.wait()
        assert job.error == "No space left on device"
    finally:
        await graph.close_all()


@pytest.mark.parametrize("on_error", ["ignore", "stop"])
@pytest.mark.parametrize(
    "failing",
    # top's first read (a copy: of a dirty set small enough to be copied
    # with the writes held, or of a bigger one, copied a window at a time),
    # or the flush of base before READY
    [("top", "read_aio", 2), ("top", "read_aio", 8), ("base", "flush_to_disk", 2)],
    ids=["copy", "unheld-copy", "flush-of-base"],
)
async def test_what_failed_once_is_made_again(
    tmp_path: Path, on_error: str, failing: tuple[str, str, int]
) -> None:
    """A copy or the flush before READY fails once: the error goes through
    the on-error policy (an event, then a retry), not straight to the job's
    end."""
    graph, events = BlockGraph(), EventBus()
    node, event, mib = failing
    assert (mib * MiB > HOLD_BYTES) == (mib == 8)  # each case is what its id says
    rules: list[dict[str, object]] = [{"event": event, "once": True}]
    try:
        base, _top = await chain(
            tmp_path, graph, "16M", f"write -P 0x66 0 {mib}M",
            top_rules=rules if node == "top" else None,
            base_rules=rules if node == "base" else None,
        )  # fmt: skip
        job = active_commit_job(graph, events, on_error=OnError(on_error))
        ready, failed = seen(events, "BLOCK_JOB_READY"), seen(events, "BLOCK_JOB_ERROR")
        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                await failed.wait()
                if on_error == "stop":
                    job.user_resume()
                await ready.wait()
            assert await base.read(0, mib * MiB) == b"\x66" * mib * MiB
            job.user_cancel(force=True)
    finally:
        await graph.close_all()


async def test_no_ready_while_the_flush_of_base_keeps_failing(tmp_path: Path) -> None:
    """READY says base holds what the guest sees: while base cannot be
    flushed, each failure goes through on-error (here: ignore, so another
    try) and the job stays unready, however long it goes on."""
    graph, events = BlockGraph(), EventBus()
    try:
        await chain(tmp_path, graph, "4M", "write -P 0x66 0 2M",
                    base_rules=[{"event": "flush_to_disk"}])  # fmt: skip
        job = active_commit_job(graph, events, on_error=OnError.IGNORE)
        errors, decided = 0, trio.Event()

        def count(e: EmittedEvent) -> None:
            nonlocal errors
            errors += e.name == "BLOCK_JOB_ERROR"
            if errors == 3 or e.name == "BLOCK_JOB_READY":
                decided.set()

        events.subscribe(count)
        ready = seen(events, "BLOCK_JOB_READY")
        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                await decided.wait()
            assert not ready.is_set()
            job.user_cancel(force=True)
    finally:
        await graph.close_all()


async def test_a_read_only_top_leaves_a_read_only_base(tmp_path: Path) -> None:
    # base takes top's place in the graph, and its open mode with it (as in QEMU)
    graph, events = BlockGraph(), EventBus()
    try:
        base, _top = await chain(tmp_path, graph, "4M", "write -P 0x77 0 1M", top_read_only=True)
        job = active_commit_job(graph, events)
        ready = seen(events, "BLOCK_JOB_READY")
        async with trio.open_nursery() as nursery:
            await job.setup()
            assert not base.read_only
            job.start(nursery)
            with trio.fail_after(30):
                await ready.wait()
                job.complete()
                await job.concluded.wait()
        assert job.error is None
        assert base.read_only
        assert await base.read(0, 1 * MiB) == b"\x77" * MiB
    finally:
        await graph.close_all()


async def test_a_paused_ready_job_copies_nothing_until_resumed(tmp_path: Path) -> None:
    graph, events = BlockGraph(), EventBus()
    try:
        base, top = await chain(tmp_path, graph, "4M", "write -P 0x22 0 1M")
        standby = seen(events, "JOB_STATUS_CHANGE", "standby")
        async with ready_job(graph, events) as job:
            job.user_pause()
            await standby.wait()
            await top.write(2 * MiB, b"\x88" * 64 * KiB)
            await trio.sleep(0.5)  # five of a READY job's polls
            assert await base.read(2 * MiB, 64 * KiB) == bytes(64 * KiB)
            job.user_resume()
            for _poll in range(200):  # the job's next polls copy it
                await trio.sleep(0.05)
                if await base.read(2 * MiB, 64 * KiB) == b"\x88" * 64 * KiB:
                    break
            else:
                raise AssertionError("the write was not copied after the resume")
            job.user_cancel(force=True)
    finally:
        await graph.close_all()


@pytest.mark.parametrize(("cluster", "tracked"), [(512, 4 * KiB), (2 * MiB, 64 * KiB)])
async def test_base_clusters_outside_4k_to_64k_are_tracked_at_the_nearest_bound(
    tmp_path: Path, cluster: int, tracked: int
) -> None:
    """QEMU's mirror tracks dirty data in base's clusters, within [4 KiB, 64
    KiB]: a base of 512-byte or 2 MiB clusters commits like any other."""
    create(tmp_path / "base.qcow2", "8M", cluster_size=cluster)
    create(tmp_path / "top.qcow2", "8M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 1M 3M")
    graph = BlockGraph()
    try:
        await open_qcow2(graph, tmp_path / "base.qcow2", name="base", backing=None)
        await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        await commit_to_the_end(graph, tracked)
    finally:
        await graph.close_all()
    assert_clean(tmp_path / "base.qcow2")
    compare_with(tmp_path / "base.qcow2", bytes(1 * MiB) + b"\x22" * 3 * MiB + bytes(4 * MiB),
                 tmp_path)  # fmt: skip


async def test_a_raw_base_is_tracked_in_64k_chunks(tmp_path: Path) -> None:
    """A base without clusters (raw) is tracked as QEMU's mirror tracks it,
    in 64 KiB chunks, and the commit goes through."""
    base_path = tmp_path / "base.raw"
    base_path.write_bytes(b"\x11" * 8 * MiB)
    create(tmp_path / "top.qcow2", "8M", backing=base_path, backing_fmt="raw")
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 1M 3M")
    graph = BlockGraph()
    try:
        file = {"driver": "file", "filename": str(base_path)}
        await open_node(graph, {"driver": "raw", "node-name": "base", "file": file})
        await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="base")
        await commit_to_the_end(graph, 64 * KiB)
    finally:
        await graph.close_all()
    assert base_path.read_bytes() == b"\x11" * MiB + b"\x22" * 3 * MiB + b"\x11" * 4 * MiB


async def test_the_total_before_the_first_copy_is_what_top_holds(tmp_path: Path) -> None:
    """What query-block-jobs shows between the scan and the first copy: len
    is the data top holds, nothing more (nothing is in flight yet)."""
    graph, events = BlockGraph(), EventBus()
    try:
        await chain(tmp_path, graph, "8M", "write -P 0x22 0 3M")
        job = active_commit_job(graph, events)
        await job.setup()
        await job._scan()
        assert (job.offset, job.length) == (0, 3 * MiB)
    finally:
        await graph.close_all()
