"""The stream job in-process: what it resolves, refuses, copies and re-points,
and that a guest writing to the device meanwhile always wins, judged by
qemu-img on the files it leaves.

The daemon tests (tests/integration/test_stream.py) and the differential
ones (tests/interop/test_stream_differential.py) cover the same ground
through a socket.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode, Status
from blockd.block.open import open_node
from blockd.block.serialise import RangeGate
from blockd.errors import BlockError
from blockd.events import EmittedEvent, EventBus
from blockd.jobs import stream as stream_module
from blockd.jobs.job import OnError
from blockd.jobs.stream import StreamJob, StreamPlan, plan_stream
from tests.images import backing_of

from .conftest import assert_clean, create, no_users, open_qcow2, qemu_io, run, seen, to_raw

KiB, MiB = 1024, 1024 * 1024
SIZE = 4 * MiB


def chain(d: Path, *, cluster_size: int = 65536) -> None:
    """base <- mid <- mid2 <- top, each layer's data where the others can show
    whether it was copied (zeros in mid over base's data, a short mid2)."""
    create(d / "base.qcow2", SIZE, cluster_size=cluster_size)
    qemu_io(d / "base.qcow2", "write -P 0x11 0 2M", "write -P 0x12 3M 1M")
    create(d / "mid.qcow2", SIZE, backing=Path("base.qcow2"), cluster_size=cluster_size)
    qemu_io(d / "mid.qcow2", "write -P 0x21 256k 512k", "write -z 1M 128k")
    create(d / "mid2.qcow2", "3M", backing=Path("mid.qcow2"), cluster_size=cluster_size)
    qemu_io(d / "mid2.qcow2", "write -P 0x31 640k 256k", "write -P 0x32 2M 64k")
    create(d / "top.qcow2", SIZE, backing=Path("mid2.qcow2"), cluster_size=cluster_size)
    qemu_io(d / "top.qcow2", "write -P 0x41 704k 64k", "write -P 0x42 1088k 4k")


async def open_chain(
    graph: BlockGraph, d: Path, writable: tuple[str, ...] = ("top",)
) -> dict[str, BlockNode]:
    """The chain as a client adds it: every node by blockdev-add (monitor-owned)."""
    nodes: dict[str, BlockNode] = {}
    backing = None
    for name in ("base", "mid", "mid2", "top"):
        nodes[name] = await open_qcow2(graph, d / f"{name}.qcow2", name=name,
                                       read_only=name not in writable, backing=backing)  # fmt: skip
        graph.set_monitor_owned(nodes[name])
        backing = name
    return nodes


class Run:
    """One job run to its end, with its events and whatever runs meanwhile."""

    def __init__(self) -> None:
        self.events = EventBus()
        self.seen: list[EmittedEvent] = []
        self.events.subscribe(self.seen.append)

    def names(self) -> list[str]:
        return [e.name for e in self.seen]

    def job(self, graph: BlockGraph, plan: StreamPlan, **options: Any) -> StreamJob:
        return StreamJob("j", self.events, graph, plan, no_users, **options)

    async def __call__(
        self, job: StreamJob, meanwhile: Callable[[StreamJob], Awaitable[None]] | None = None
    ) -> StreamJob:
        job.create(lambda j: None)
        async with trio.open_nursery() as nursery:
            await job.open_device()
            job.setup()
            job.start(nursery)
            with trio.fail_after(60):
                if meanwhile is not None:
                    await meanwhile(job)
                await job.concluded.wait()
        return job


async def open_chain_failing_a_read(
    graph: BlockGraph, d: Path, errno: int
) -> dict[str, BlockNode]:
    """base <- mid <- mid2 <- top, only top writable; mid's first data read fails with ``errno``."""
    nodes: dict[str, BlockNode] = {}
    backing = None
    for name in ("base", "mid", "mid2", "top"):
        file: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
        if name == "mid":
            rules = [{"event": "read_aio", "once": True, "errno": errno}]
            file = {"driver": "blkdebug", "image": file, "inject-error": rules}
        nodes[name] = await open_qcow2(graph, d / f"{name}.qcow2", name=name,
                                       read_only=name != "top", backing=backing,
                                       file=file)  # fmt: skip
        backing = name
    return nodes


def view(d: Path, name: str = "top") -> bytes:
    return to_raw(d / f"{name}.qcow2", d / f"{name}.raw")


# -- whole streams -------------------------------------------------------------------


def repointed(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The job's log lines that say what the device backs onto now."""
    return [r.getMessage() for r in caplog.records if "now backs onto" in r.getMessage()]


async def test_stream_whole_chain_drops_the_backing(
    tmp_path: Path, graph: BlockGraph, caplog: pytest.LogCaptureFixture
) -> None:
    chain(tmp_path)
    before = view(tmp_path)
    nodes = await open_chain(graph, tmp_path)
    r = Run()
    with caplog.at_level(logging.INFO, logger="blockd"):
        job = await r(r.job(graph, plan_stream(graph, device="top")))
    assert repointed(caplog) == ["job j: top now backs onto nothing"]
    assert job.error is None and job.offset == job.length == SIZE
    assert r.names()[-3:] == ["BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE", "JOB_STATUS_CHANGE"]
    assert nodes["top"].backing is None
    # the intermediates a client added stay open, untouched and read-only
    assert all(n in graph for n in ("base", "mid", "mid2"))
    assert nodes["mid2"].read_only
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") is None
    assert view(tmp_path) == before
    for name in ("base", "mid", "mid2", "top"):
        assert_clean(tmp_path / f"{name}.qcow2")


async def test_speed_limits_what_the_stream_copies(tmp_path: Path, graph: BlockGraph) -> None:
    # about 3.5 MiB to copy at 1 MiB/s: well over a second, whatever the load
    chain(tmp_path)
    before = view(tmp_path)
    await open_chain(graph, tmp_path)
    r = Run()
    began = trio.current_time()
    job = await r(r.job(graph, plan_stream(graph, device="top"), speed=1 * MiB))
    assert job.error is None and job.offset == job.length == SIZE
    assert trio.current_time() - began > 1.5
    await graph.close_all()
    assert view(tmp_path) == before


async def test_stream_to_base_names_it_and_closes_implicit_intermediates(
    tmp_path: Path, graph: BlockGraph
) -> None:
    chain(tmp_path)
    before = view(tmp_path)
    # opened from the headers: mid2 and mid are implicit children
    top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top")
    mid2 = top.backing
    assert mid2 is not None and mid2.backing is not None
    mid = mid2.backing
    base = mid.backing
    assert base is not None
    r = Run()
    plan = plan_stream(graph, device="top", base_node=base.node_name)
    assert plan.intermediates == (mid2, mid)
    job = await r(r.job(graph, plan))
    assert job.error is None
    assert top.backing is base
    assert mid2.node_name not in graph and mid.node_name not in graph
    assert base.node_name in graph
    # base now belongs to top, as in QEMU: closing top closes it (no file
    # left open for a node nobody can reach or delete)
    await graph.close_node(top)
    assert len(graph) == 0
    assert backing_of(tmp_path / "top.qcow2") == str(tmp_path / "base.qcow2")
    assert view(tmp_path) == before
    assert_clean(tmp_path / "top.qcow2")
    # Only what the intermediates showed came up: base's first 256k are
    # still read from base; past short mid2's end, its zeros hide base's data.
    mapped = run("qemu-img", "map", "--output=json", str(tmp_path / "top.qcow2"))
    extents = json.loads(mapped.stdout)

    def over(start: int, end: int) -> list[dict[str, Any]]:
        return [e for e in extents if e["start"] < end and e["start"] + e["length"] > start]

    assert all(e["depth"] == 1 and e["data"] for e in over(0, 256 * KiB))
    assert all(e["depth"] == 0 and e["zero"] for e in over(3 * MiB, SIZE))


async def test_stream_with_backing_file_and_read_only_device(
    tmp_path: Path, graph: BlockGraph, caplog: pytest.LogCaptureFixture
) -> None:
    chain(tmp_path)
    before = view(tmp_path, "mid2")
    nodes = await open_chain(graph, tmp_path)
    r = Run()
    plan = plan_stream(graph, device="mid2", base_node="base", backing_file="base.qcow2")
    with caplog.at_level(logging.INFO, logger="blockd"):
        job = await r(r.job(graph, plan))
    assert job.error is None
    assert repointed(caplog) == ["job j: mid2 now backs onto base.qcow2"]
    # opened read-write for the job only
    assert nodes["mid2"].read_only
    assert nodes["mid2"].backing is nodes["base"]
    await graph.close_all()
    assert backing_of(tmp_path / "mid2.qcow2") == "base.qcow2"
    assert view(tmp_path, "mid2") == before
    assert_clean(tmp_path / "mid2.qcow2")


async def test_small_clusters_and_a_short_intermediate(tmp_path: Path, graph: BlockGraph) -> None:
    """mid2 is shorter than top: past its end it shows zeros over base's data,
    which must come up as zeros (else base's data would show afterwards)."""
    chain(tmp_path, cluster_size=4096)
    before = view(tmp_path)
    await open_chain(graph, tmp_path)
    r = Run()
    job = await r(r.job(graph, plan_stream(graph, device="top", base_node="base")))
    assert job.error is None
    await graph.close_all()
    assert view(tmp_path) == before
    assert before[3 * MiB : 4 * MiB] == bytes(MiB)
    assert_clean(tmp_path / "top.qcow2")


async def test_cancel_leaves_the_chain(tmp_path: Path, graph: BlockGraph) -> None:
    chain(tmp_path)
    before = view(tmp_path)
    nodes = await open_chain(graph, tmp_path)
    r = Run()

    async def cancel(job: StreamJob) -> None:
        job.user_cancel(force=True)

    plan = plan_stream(graph, device="top")
    job = await r(r.job(graph, plan, speed=64 * KiB, auto_dismiss=False), cancel)
    assert job.is_cancelled and "BLOCK_JOB_CANCELLED" in r.names()
    assert nodes["top"].backing is nodes["mid2"]
    # the job holds its nodes until it is dismissed, as QEMU's does
    assert graph.blocker(nodes["mid"]) == stream_module.BLOCKER
    job.dismissed()
    assert graph.blocker(nodes["mid"]) is None
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") == "mid2.qcow2"
    assert view(tmp_path) == before
    assert_clean(tmp_path / "top.qcow2")


async def test_ignored_read_error_fails_the_job_and_keeps_the_chain(
    tmp_path: Path, graph: BlockGraph
) -> None:
    chain(tmp_path)
    before = view(tmp_path)
    nodes = await open_chain_failing_a_read(graph, tmp_path, 5)
    r = Run()
    job = await r(r.job(graph, plan_stream(graph, device="top"), on_error=OnError.IGNORE))
    assert job.error == "Input/output error"
    errors = [e.data for e in r.seen if e.name == "BLOCK_JOB_ERROR"]
    assert errors == [{"device": "j", "operation": "read", "action": "ignore"}]
    # the job went on to the end, and left the chain as it was
    assert job.offset == job.length == SIZE
    assert nodes["top"].backing is nodes["mid2"]
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") == "mid2.qcow2"
    assert view(tmp_path) == before


@pytest.mark.parametrize(("on_error", "errno"), [(OnError.STOP, 5), (OnError.ENOSPC, 28)])
async def test_stopped_on_a_read_error_and_resumed_streams_everything(
    tmp_path: Path, graph: BlockGraph, on_error: OnError, errno: int
) -> None:
    chain(tmp_path)
    before = view(tmp_path)
    nodes = await open_chain_failing_a_read(graph, tmp_path, errno)
    r = Run()
    stopped = seen(r.events, "BLOCK_JOB_ERROR")

    async def resume_once_stopped(job: StreamJob) -> None:
        await stopped.wait()
        job.user_resume()

    job = r.job(graph, plan_stream(graph, device="top"), on_error=on_error)
    await r(job, resume_once_stopped)
    errors = [e.data for e in r.seen if e.name == "BLOCK_JOB_ERROR"]
    assert errors == [{"device": "j", "operation": "read", "action": "stop"}]
    # the failed step ran again: everything was streamed, and the chain dropped
    assert job.error is None and job.offset == job.length == SIZE
    assert nodes["top"].backing is None
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") is None
    assert view(tmp_path) == before


# -- what the job holds ---------------------------------------------------------------


def refused(attach: Callable[[], None], holder: str) -> bool:
    """Whether ``attach`` is refused, for a conflict with ``holder``."""
    try:
        attach()
    except BlockError as err:
        return holder in err.desc
    return False


async def test_the_job_holds_its_nodes_until_qemu_s_would_let_go(
    tmp_path: Path, graph: BlockGraph
) -> None:
    """Nobody may resize the device or write to an image between it and base
    while the job runs; the device is let go when the job ends, the images
    below only when it is dismissed (QSD alike: the "holds" conversation of
    tests/interop/test_stream_differential.py)."""
    chain(tmp_path)
    nodes = await open_chain(graph, tmp_path, writable=("top", "mid2"))
    top, mid2 = nodes["top"], nodes["mid2"]

    def resize_top() -> None:
        graph.attach_creator(top, "creator")
        graph.detach_user(top, "creator")

    def write_mid2() -> None:
        graph.attach_user(mid2, "export", writable=True)
        graph.detach_user(mid2, "export")

    holder = "stream job 'j'"
    r = Run()

    async def while_it_runs(job: StreamJob) -> None:
        assert refused(resize_top, holder) and refused(write_mid2, holder)
        job.set_speed(0)

    plan = plan_stream(graph, device="top", base_node="base")
    job = await r(r.job(graph, plan, speed=1, auto_dismiss=False), while_it_runs)
    assert job.error is None and job.status.value == "concluded"
    assert not refused(resize_top, holder) and refused(write_mid2, holder)
    job.dismissed()
    assert not refused(write_mid2, holder)


async def test_a_stream_refused_for_its_id_leaves_the_job_with_that_id_its_nodes(
    tmp_path: Path, graph: BlockGraph
) -> None:
    """block-stream cleans up after a job it made and refused (its id in use)
    before that job took anything: the claims under that id are the other
    job's, and stay."""
    chain(tmp_path)
    nodes = await open_chain(graph, tmp_path, writable=("top", "mid2", "base"))
    events = EventBus()
    running = StreamJob("j", events, graph, plan_stream(graph, device="top", base_node="base"),
                        no_users)  # fmt: skip
    running.setup()
    refused_job = StreamJob("j", events, graph, plan_stream(graph, device="base"), no_users)
    await refused_job.open_device()
    await refused_job.clean()  # what block_stream does when the id is taken
    with pytest.raises(BlockError, match="stream job 'j'"):
        graph.attach_creator(nodes["top"], "creator")
    with pytest.raises(BlockError, match="stream job 'j'"):
        graph.attach_user(nodes["mid2"], "export", writable=True)
    running.dismissed()


# -- what plan_stream refuses ----------------------------------------------------------


async def test_refusals(tmp_path: Path, graph: BlockGraph) -> None:
    chain(tmp_path)
    await open_chain(graph, tmp_path)
    image = {"driver": "file", "filename": str(tmp_path / "base.qcow2")}
    await open_node(graph, {"driver": "blkdebug", "node-name": "dbg", "read-only": True,
                            "image": image})  # fmt: skip
    cases: list[tuple[dict[str, Any], str]] = [
        ({"device": "top", "bottom": "dbg"},
         "Node 'dbg' is a filter, use a non-filter node as 'bottom'"),
        ({"device": "x"}, "Cannot find device='x' nor node-name='x'"),
        ({"device": "top", "base_node": "top"}, "Node 'top' is not a backing image of 'top'"),
        ({"device": "mid", "base_node": "mid2"}, "Node 'mid2' is not a backing image of 'mid'"),
        ({"device": "top", "bottom": "x"}, "Cannot find device='' nor node-name='x'"),
        ({"device": "mid", "bottom": "top"}, "Node 'top' is not in a chain starting from 'mid'"),
        ({"device": "top", "base": "nosuch"}, "Can't find 'nosuch' in the backing chain"),
        ({"device": "top", "backing_file": "b"},
         "backing file specified, but streaming the entire chain"),
        ({"device": "top", "bottom": "mid", "backing_file": "b"},
         "backing file specified, but streaming the entire chain"),
    ]  # fmt: skip
    for args, text in cases:
        with pytest.raises(BlockError) as caught:
            plan_stream(graph, **args)
        assert caught.value.desc == text
    graph.add_blocker(graph.get("mid2"), "held")  # type: ignore[arg-type]
    with pytest.raises(BlockError, match="Node 'mid2' is busy: held"):
        plan_stream(graph, device="top")
    with pytest.raises(BlockError, match="Node 'mid2' is busy: held"):
        plan_stream(graph, device="top", bottom="mid")
    # below base, a held node is none of the stream's business
    assert plan_stream(graph, device="top", base_node="mid2").intermediates == ()
    graph.remove_blocker(graph.get("mid2"), "held")  # type: ignore[arg-type]
    plan = plan_stream(graph, device="top", bottom="mid")
    assert plan.base is graph.get("base")


# -- a guest writing meanwhile -----------------------------------------------------------


async def test_gate_orders_a_write_and_an_exclusive_range() -> None:
    gate = RangeGate()
    log: list[str] = []

    async def write(offset: int, length: int, name: str) -> None:
        token = await gate.begin_write(offset, length)
        log.append(f"{name} in")
        await trio.sleep(0.01)
        log.append(f"{name} out")
        gate.end_write(token)

    async def copy() -> None:
        async with gate.exclusive(0, 100):
            log.append("copy in")
            # the holder's own writes go through
            token = await gate.begin_write(10, 10)
            gate.end_write(token)
            await trio.sleep(0.01)
            log.append("copy out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, 50, 10, "early")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(copy)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(write, 99, 1, "late")
        nursery.start_soon(write, 100, 10, "beside")
    # the copy waited for the write in flight; the write over it waited for the copy
    assert log.index("early out") < log.index("copy in")
    assert log.index("copy out") < log.index("late in")
    assert log.index("beside in") < log.index("copy out")


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_guest_writes_during_the_stream_win(
    tmp_path: Path, graph: BlockGraph, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """A guest writing random overlapping ranges (data, zeros, discards) into
    the device while it is streamed: the device ends with exactly its view
    before plus every write, in order."""
    chain(tmp_path, cluster_size=4096)
    model = bytearray(view(tmp_path))
    nodes = await open_chain(graph, tmp_path)
    top = nodes["top"]
    # small steps, so that the copy and the writes interleave everywhere
    monkeypatch.setattr(stream_module, "step_size", lambda speed: 96 * KiB)
    rng = random.Random(seed)
    writes = 0

    async def guest(job: StreamJob) -> None:
        nonlocal writes
        while job.status.value in ("created", "running") or writes < 50:
            # half of them where the job is copying right now
            near = rng.random() < 0.5 and job.offset < SIZE
            offset = rng.randrange(job.offset, min(SIZE, job.offset + 96 * KiB)) if near else (
                rng.randrange(0, SIZE - 1))  # fmt: skip
            length = min(rng.choice([512, 4 * KiB, 7 * KiB, 64 * KiB, 200 * KiB]), SIZE - offset)
            kind = rng.random()
            if kind < 0.7:
                data = bytes([rng.randrange(1, 256)]) * length
                await top.write(offset, data)
                model[offset : offset + length] = data
            else:
                await top.write_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
            writes += 1

    async def meanwhile(job: StreamJob) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest, job)

    r = Run()
    job = await r(r.job(graph, plan_stream(graph, device="top", base_node="mid")), meanwhile)
    assert job.error is None
    assert await top.read(0, SIZE) == bytes(model)
    await graph.close_all()
    assert view(tmp_path) == bytes(model)
    # mid's name as QEMU gives it: json, since the client gave it its backing
    backing = backing_of(tmp_path / "top.qcow2")
    assert backing is not None and backing.startswith("json:")
    assert json.loads(backing[5:])["file"]["filename"] == str(tmp_path / "mid.qcow2")
    assert_clean(tmp_path / "top.qcow2")


async def test_copy_skips_what_a_write_put_there_first(tmp_path: Path, graph: BlockGraph) -> None:
    """The check that the device holds nothing is made under the range: a
    write that lands before the copy takes it is never overwritten."""
    chain(tmp_path)
    nodes = await open_chain(graph, tmp_path)
    top = nodes["top"]
    copy = stream_module.StreamCopy(graph, top, None)
    # mid2's data at 640k: the device holds nothing there yet
    assert (await top.block_status(640 * KiB, 64 * KiB))[0] is Status.UNALLOCATED
    async with trio.open_nursery() as nursery:

        async def write() -> None:
            await top.write(640 * KiB, b"\x77" * 4096)

        token = await top.range_gate.begin_write(0, 1)  # a write in flight elsewhere in the window
        nursery.start_soon(copy.window, 0, MiB)
        await trio.testing.wait_all_tasks_blocked()
        # the copy holds the window and waits for that write; a new write waits for the copy
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()
        assert (await top.block_status(640 * KiB, 4096))[0] is Status.UNALLOCATED
        top.range_gate.end_write(token)
    assert await top.read(640 * KiB, 4096) == b"\x77" * 4096
    assert await top.read(644 * KiB, 4096) == b"\x31" * 4096


@pytest.mark.parametrize(("start", "end"), [(320 * KiB, 384 * KiB), (576 * KiB, 640 * KiB)])
async def test_a_step_copies_nothing_outside_its_window(
    tmp_path: Path, graph: BlockGraph, start: int, end: int
) -> None:
    """A step writes only inside the range it holds against the guest's
    writes, though the layer it copies from holds data past its end (a
    write there meanwhile would otherwise be overwritten by older data)."""
    chain(tmp_path)
    nodes = await open_chain(graph, tmp_path)
    top = nodes["top"]
    copy = stream_module.StreamCopy(graph, top, None)
    before = await top.block_status(end, 128 * KiB)
    assert before[0] is Status.UNALLOCATED  # mid's or mid2's data is there
    await copy.window(start, end)
    assert await top.block_status(start, end - start) == (Status.DATA, end - start)
    assert await top.block_status(end, 128 * KiB) == before


@pytest.mark.parametrize("cluster", [4 * KiB, 64 * KiB, 256 * KiB])
async def test_a_step_holds_its_whole_clusters_and_no_more(
    tmp_path: Path, graph: BlockGraph, cluster: int
) -> None:
    """A step that starts or ends inside a cluster holds the whole cluster
    (a guest write anywhere in it is ordered with the copy), and nothing of
    the clusters beside it: the device's own clusters, whatever their size."""
    chain(tmp_path, cluster_size=cluster)
    nodes = await open_chain(graph, tmp_path)
    top = nodes["top"]
    copy = stream_module.StreamCopy(graph, top, None)
    start, end = 10 * cluster + cluster // 2, 11 * cluster + cluster // 2  # mid 10 to mid 11
    beside = [await top.range_gate.begin_write(pos, 1) for pos in (10 * cluster - 1, 12 * cluster)]
    with trio.fail_after(10):
        await copy.window(start, end)  # nothing in flight over its clusters: no wait
        await copy.window(10 * cluster, 12 * cluster)  # nor when it ends on a boundary
    for edge in (10 * cluster, 12 * cluster - 1):
        inside = await top.range_gate.begin_write(edge, 1)
        done = trio.Event()

        async def step(done: trio.Event) -> None:
            await copy.window(start, end)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(step, done)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            top.range_gate.end_write(inside)
    for token in beside:
        top.range_gate.end_write(token)


async def test_a_backing_name_the_header_cannot_take_fails_the_job_cleanly(
    tmp_path: Path, graph: BlockGraph
) -> None:
    chain(tmp_path)
    before = view(tmp_path)
    nodes = await open_chain(graph, tmp_path)
    r = Run()
    plan = plan_stream(graph, device="top", base_node="base", backing_file="b" * 2000)
    job = await r(r.job(graph, plan))
    assert job.error is not None and "too long" in job.error
    assert nodes["top"].backing is nodes["mid2"]
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") == "mid2.qcow2"
    assert view(tmp_path) == before
    assert_clean(tmp_path / "top.qcow2")
