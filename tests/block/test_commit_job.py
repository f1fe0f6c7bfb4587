"""The intermediate commit job in-process: what it resolves, refuses, copies and
re-points, judged by qemu-img on the files it leaves.

The daemon tests (tests/integration/test_commit.py) cover the same ground
through a socket; these run in a second or two, which is what the mutation
run's fast tier needs to tell a live mutant of jobs/commit.py from a dead one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import BlockError, DeviceNotFound
from blockd.events import EmittedEvent, EventBus
from blockd.jobs.active_commit import ActiveCommitPlan
from blockd.jobs.commit import CommitJob, CommitPlan, plan_commit
from blockd.jobs.job import OnError
from blockd.jobs.status import JobStatus
from tests.images import backing_of

from .conftest import assert_clean, create, open_qcow2, qemu_io, to_raw

KiB, MiB = 1024, 1024 * 1024


def chain(d: Path, *, base_size: str = "1M") -> None:
    """base <- mid <- top, with top2 also on mid; each layer's data where the
    others can see whether it was copied."""
    create(d / "base.qcow2", base_size)
    qemu_io(d / "base.qcow2", "write -P 0x11 0 512k")
    create(d / "mid.qcow2", "1M", backing=Path("base.qcow2"))
    qemu_io(d / "mid.qcow2", "write -P 0x22 256k 384k", "write -z 0 64k")
    create(d / "top.qcow2", "1M", backing=Path("mid.qcow2"))
    qemu_io(d / "top.qcow2", "write -P 0x33 320k 64k")
    create(d / "top2.qcow2", "1M", backing=Path("mid.qcow2"))
    qemu_io(d / "top2.qcow2", "write -P 0x44 704k 64k")


async def open_chain(
    graph: BlockGraph, d: Path, *, top2: bool = True, base_read_only: bool = True
) -> dict[str, BlockNode]:
    nodes = {"base": await open_qcow2(graph, d / "base.qcow2", name="base",
                                      read_only=base_read_only, backing=None)}  # fmt: skip
    nodes["mid"] = await open_qcow2(graph, d / "mid.qcow2", name="mid", read_only=True,
                                    backing="base")  # fmt: skip
    nodes["top"] = await open_qcow2(graph, d / "top.qcow2", name="top", backing="mid")
    if top2:
        nodes["top2"] = await open_qcow2(graph, d / "top2.qcow2", name="top2", read_only=True,
                                         backing="mid")  # fmt: skip
    for node in nodes.values():
        graph.set_monitor_owned(node)
    return nodes


def views(d: Path, *names: str) -> dict[str, bytes]:
    return {n: to_raw(d / f"{n}.qcow2", d / f"{n}.raw") for n in names}


class Run:
    """One job run to its end (or to a point a test chooses), with its events."""

    def __init__(self) -> None:
        self.events = EventBus()
        self.seen: list[EmittedEvent] = []
        self.events.subscribe(self.seen.append)
        self.dismissed: list[object] = []

    def names(self) -> list[str]:
        return [e.name for e in self.seen]

    async def __call__(
        self,
        job: CommitJob,
        meanwhile: Callable[[CommitJob], Awaitable[None]] | None = None,
    ) -> CommitJob:
        job.create(self.dismissed.append)
        async with trio.open_nursery() as nursery:
            await job.setup()
            job.start(nursery)
            with trio.fail_after(30):
                if meanwhile is not None:
                    await meanwhile(job)
                await job.concluded.wait()
        return job


def commit_of(graph: BlockGraph, run_: Run, **options: object) -> CommitJob:
    plan = plan_commit(graph, device="top", top_node="mid", base_node="base")
    assert isinstance(plan, CommitPlan)
    return CommitJob("j", run_.events, graph, plan, **options)  # type: ignore[arg-type]


# -- a whole commit ------------------------------------------------------------------


async def test_commit_merges_mid_and_repoints_every_overlay(
    tmp_path: Path, graph: BlockGraph
) -> None:
    chain(tmp_path)
    before = views(tmp_path, "top", "top2")
    nodes = await open_chain(graph, tmp_path)
    r = Run()
    job = await r(commit_of(graph, r))
    assert job.error is None
    assert job.offset == job.length == MiB
    (completed,) = [e for e in r.seen if e.name == "BLOCK_JOB_COMPLETED"]
    assert completed.data is not None
    assert "error" not in completed.data and completed.data["offset"] == MiB
    # both overlays of mid now back onto base, in the graph and in their headers
    assert nodes["top"].backing is nodes["base"]
    assert nodes["top2"].backing is nodes["base"]
    # base goes back to read-only, as the client opened it; top2 too; top stays writable
    assert nodes["base"].read_only and nodes["top2"].read_only
    assert not nodes["top"].read_only
    # mid, added by a client, stays open until the job is dismissed
    assert graph.get("mid") is nodes["mid"]
    assert r.dismissed == [job]
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") == str(tmp_path / "base.qcow2")
    assert backing_of(tmp_path / "top2.qcow2") == str(tmp_path / "base.qcow2")
    assert views(tmp_path, "top", "top2") == before
    for image in ("base", "mid", "top", "top2"):
        assert_clean(tmp_path / f"{image}.qcow2")
    # base alone now holds what mid held over it (the zeros too)
    base = to_raw(tmp_path / "base.qcow2", tmp_path / "b.raw")
    assert base[: 64 * KiB] == bytes(64 * KiB)
    assert base[64 * KiB : 256 * KiB] == b"\x11" * (192 * KiB)
    assert base[256 * KiB : 640 * KiB] == b"\x22" * (384 * KiB)


async def test_an_overlay_the_job_does_not_hold_is_held_while_its_header_is_rewritten(
    tmp_path: Path, graph: BlockGraph
) -> None:
    """top2 is on mid but not the device: the job holds it only while it
    writes base's name into it, so no command can close it half-way (and
    lets it go afterwards)."""
    chain(tmp_path)
    nodes = await open_chain(graph, tmp_path)
    top2 = nodes["top2"]
    seen: list[str | None] = []
    change_backing = top2.change_backing

    async def watched(
        backing: BlockNode | None, backing_string: str | None, backing_format: str | None
    ) -> None:
        seen.append(graph.blocker(top2))
        await change_backing(backing, backing_string, backing_format)

    top2.change_backing = watched  # type: ignore[method-assign]
    r = Run()
    assert graph.blocker(top2) is None
    job = await r(commit_of(graph, r))
    assert job.error is None
    assert len(seen) == 1 and seen[0] is not None
    assert graph.blocker(top2) is None
    await graph.close_all()


async def test_intermediates_opened_with_the_chain_are_closed(
    tmp_path: Path, graph: BlockGraph
) -> None:
    chain(tmp_path)
    # top opened alone: mid and base come from the headers, owned by no client
    top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top")
    mid = top.backing
    assert mid is not None and mid.backing is not None
    r = Run()
    plan = plan_commit(graph, device="top", top_node=mid.node_name)
    assert isinstance(plan, CommitPlan) and plan.base is mid.backing
    job = await r(CommitJob("j", r.events, graph, plan))
    assert job.error is None
    assert top.backing is plan.base
    assert mid.closed
    assert graph.get(mid.node_name) is None
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") == str(tmp_path / "base.qcow2")


async def test_backing_file_argument_is_written(tmp_path: Path, graph: BlockGraph) -> None:
    chain(tmp_path)
    await open_chain(graph, tmp_path, top2=False)
    plan = plan_commit(
        graph, device="top", top_node="mid", base_node="base", backing_file="base.qcow2"
    )
    assert isinstance(plan, CommitPlan) and plan.backing_string == "base.qcow2"
    r = Run()
    assert (await r(CommitJob("j", r.events, graph, plan))).error is None
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") == "base.qcow2"


@pytest.mark.parametrize("mid_size", [1024, 960], ids=["1M", "960k"])
async def test_short_base_grows_and_its_tail_is_hidden(
    tmp_path: Path, graph: BlockGraph, mid_size: int
) -> None:
    """base 2M full of data, mid 1M (or 960k, off the copy's 512k pieces),
    top 1.25M: once top backs onto base, base's data past mid's end would
    show where top reads zeros today; it is zeroed there (less than one step
    of the copy) and nowhere else."""
    mid_end = mid_size * KiB
    create(tmp_path / "base.qcow2", "2M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x55 0 2M")
    create(tmp_path / "mid.qcow2", f"{mid_size}k", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "mid.qcow2", "write -P 0x66 0 64k")
    create(tmp_path / "top.qcow2", "1280k", backing=Path("mid.qcow2"))
    before = views(tmp_path, "top")["top"]
    # past mid's end the chain reads zeros, though base holds 0x55 there
    assert before[mid_end:] == bytes(1280 * KiB - mid_end)
    top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top")
    r = Run()
    plan = plan_commit(graph, device="top", top_node=top.backing.node_name)  # type: ignore[union-attr]
    assert isinstance(plan, CommitPlan)
    assert (await r(CommitJob("j", r.events, graph, plan))).error is None
    await graph.close_all()
    assert views(tmp_path, "top")["top"] == before
    base = to_raw(tmp_path / "base.qcow2", tmp_path / "b.raw")
    assert base[mid_end : 1280 * KiB] == bytes(1280 * KiB - mid_end)  # hidden where top sees it
    assert base[1280 * KiB :] == b"\x55" * (768 * KiB)  # untouched past top's end
    assert_clean(tmp_path / "base.qcow2")


async def test_base_smaller_than_mid_grows(tmp_path: Path, graph: BlockGraph) -> None:
    chain(tmp_path, base_size="512k")
    before = views(tmp_path, "top")
    nodes = await open_chain(graph, tmp_path, top2=False)
    r = Run()
    assert (await r(commit_of(graph, r))).error is None
    assert nodes["base"].size == MiB
    await graph.close_all()
    assert views(tmp_path, "top") == before
    assert_clean(tmp_path / "base.qcow2")


async def test_an_overlay_shorter_than_mid_has_nothing_hidden(
    tmp_path: Path, graph: BlockGraph
) -> None:
    """base and mid 2M, top 1M: top sees no further than its own end, so no
    part of base past mid's end is for the job to hide, and base ends up
    holding mid's data."""
    create(tmp_path / "base.qcow2", "2M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x55 0 2M")
    create(tmp_path / "mid.qcow2", "2M", backing=Path("base.qcow2"))
    qemu_io(tmp_path / "mid.qcow2", "write -P 0x66 512k 1M")
    create(tmp_path / "top.qcow2", "1M", backing=Path("mid.qcow2"))
    before = views(tmp_path, "top", "mid")
    await open_chain(graph, tmp_path, top2=False)
    r = Run()
    assert (await r(commit_of(graph, r))).error is None
    await graph.close_all()
    after = views(tmp_path, "top", "base")
    assert after["top"] == before["top"]
    assert after["base"] == before["mid"]
    assert_clean(tmp_path / "base.qcow2")


async def test_a_node_using_base_as_its_file_is_left_to_the_job_s_claim(
    tmp_path: Path, graph: BlockGraph
) -> None:
    """The plan refuses a base that another image backs onto (its data would
    change under that image); a node on base as its file is for the job's
    permission claim to judge, as QEMU's is, not a second backing user."""
    chain(tmp_path)
    await open_chain(graph, tmp_path, top2=False)
    await open_qcow2(graph, tmp_path / "base.qcow2", name="raw-on-base", driver="raw",
                     read_only=True, file="base")  # fmt: skip
    plan = plan_commit(graph, device="top", top_node="mid")
    assert isinstance(plan, CommitPlan) and plan.base is graph.get("base")


# -- stopping early ------------------------------------------------------------------


async def test_cancel_changes_no_header_and_gives_everything_back(
    tmp_path: Path, graph: BlockGraph
) -> None:
    chain(tmp_path)
    before = views(tmp_path, "top", "top2")
    nodes = await open_chain(graph, tmp_path)
    r = Run()

    async def cancel(job: CommitJob) -> None:
        # while it runs, the job uses mid and base (blockdev-del calls them in use)
        assert graph.in_use(nodes["mid"]) and graph.in_use(nodes["base"])
        job.user_cancel(force=False)

    job = await r(commit_of(graph, r, speed=1), cancel)
    assert job.status is JobStatus.NULL
    assert "BLOCK_JOB_CANCELLED" in r.names()
    assert nodes["top"].backing is nodes["mid"]
    assert nodes["top2"].backing is nodes["mid"]
    assert nodes["base"].read_only
    # every hold is gone: another commit of the same range can start
    for name in ("top", "mid", "base", "top2"):
        assert graph.blocker(nodes[name]) is None, name
    plan_commit(graph, device="top", top_node="mid", base_node="base")
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") == "mid.qcow2"
    assert backing_of(tmp_path / "top2.qcow2") == "mid.qcow2"
    assert views(tmp_path, "top", "top2") == before


async def test_job_holds_its_nodes_until_dismissed(tmp_path: Path, graph: BlockGraph) -> None:
    chain(tmp_path)
    nodes = await open_chain(graph, tmp_path, top2=False)
    r = Run()
    job = commit_of(graph, r, auto_dismiss=False)
    await r(job)
    assert job.status is JobStatus.CONCLUDED and job.error is None
    # the concluded job still holds the nodes it merged
    assert graph.blocker(nodes["mid"]) is not None
    with pytest.raises(BlockError, match="Need a root block node"):
        plan_commit(graph, device="top", top_node="base")
    job.dismiss()
    assert r.dismissed == [job]
    assert graph.blocker(nodes["mid"]) is None
    assert graph.blocker(nodes["top"]) is None


async def test_read_error_fails_the_job_and_changes_no_header(
    tmp_path: Path, graph: BlockGraph
) -> None:
    chain(tmp_path)
    base = await open_qcow2(graph, tmp_path / "base.qcow2", name="base", read_only=True,
                            backing=None)  # fmt: skip
    rules = [{"event": "read_aio"}]
    mid = await open_qcow2(graph, tmp_path / "mid.qcow2", name="mid", read_only=True,
                           backing="base", file={"driver": "blkdebug", "inject-error": rules,
                           "image": {"driver": "file",
                                     "filename": str(tmp_path / "mid.qcow2")}})  # fmt: skip
    top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="mid")
    r = Run()
    job = await r(commit_of(graph, r))
    assert job.error == "Input/output error"
    errors = [(e.data or {}).get("operation") for e in r.seen if e.name == "BLOCK_JOB_ERROR"]
    assert errors == ["read"]
    assert top.backing is mid and base.read_only
    # a failed job holds nothing: mid can be committed again
    assert graph.blocker(mid) is None and graph.blocker(base) is None
    plan_commit(graph, device="top", top_node="mid", base_node="base")
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") == "mid.qcow2"


async def test_stop_on_a_read_error_then_resume_completes(
    tmp_path: Path, graph: BlockGraph
) -> None:
    """on-error stop: the job pauses at the failed step and, resumed, copies it
    and the rest: every overlay's view is the same, on base now."""
    chain(tmp_path)
    before = views(tmp_path, "top")
    base = await open_qcow2(graph, tmp_path / "base.qcow2", name="base", read_only=True,
                            backing=None)  # fmt: skip
    rules = [{"event": "read_aio", "once": True}]
    await open_qcow2(graph, tmp_path / "mid.qcow2", name="mid", read_only=True,
                           backing="base", file={"driver": "blkdebug", "inject-error": rules,
                           "image": {"driver": "file",
                                     "filename": str(tmp_path / "mid.qcow2")}})  # fmt: skip
    top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top", backing="mid")
    r = Run()
    paused = trio.Event()

    def on_pause(e: EmittedEvent) -> None:
        if e.name == "JOB_STATUS_CHANGE" and (e.data or {}).get("status") == "paused":
            paused.set()

    r.events.subscribe(on_pause)

    async def resume(job: CommitJob) -> None:
        await paused.wait()
        assert job.block_job_info()["io-status"] == "failed"
        job.user_resume()

    plan = plan_commit(graph, device="top", top_node="mid", base_node="base")
    assert isinstance(plan, CommitPlan)
    job = await r(CommitJob("j", r.events, graph, plan, on_error=OnError.STOP), resume)
    assert job.error is None and job.offset == MiB
    assert top.backing is base
    await graph.close_all()
    assert backing_of(tmp_path / "top.qcow2") == str(tmp_path / "base.qcow2")
    assert views(tmp_path, "top") == before
    assert_clean(tmp_path / "base.qcow2")


# -- what plan_commit refuses ------------------------------------------------------------


async def test_plan_refusals(tmp_path: Path, graph: BlockGraph) -> None:
    chain(tmp_path)
    nodes = await open_chain(graph, tmp_path)

    def refused(**args: object) -> str:
        with pytest.raises(BlockError) as info:
            plan_commit(graph, **args)  # type: ignore[arg-type]
        return str(info.value)

    with pytest.raises(DeviceNotFound, match="Device 'nope' not found"):
        plan_commit(graph, device="nope")
    assert refused(device="mid") == "Need a root block node"
    assert refused(device="top", top_node="mid", top="mid.qcow2") == (
        "'top-node' and 'top' are mutually exclusive"
    )
    assert refused(device="top", top_node="gone") == ("Cannot find device='' nor node-name='gone'")
    assert refused(device="top", top_node="top2") == ("'top2' is not in this backing file chain")
    assert refused(device="top", top="nowhere.qcow2") == "Top image file nowhere.qcow2 not found"
    assert refused(device="top", base_node="base", base="base.qcow2") == (
        "'base-node' and 'base' are mutually exclusive"
    )
    assert refused(device="top", top_node="mid", base="nowhere.qcow2") == (
        "Can't find 'nowhere.qcow2' in the backing chain"
    )
    assert refused(device="top", top_node="mid", base_node="top") == (
        "'top' is not in this backing file chain"
    )
    assert refused(device="top", top_node="mid", base_node="mid") == (
        "cannot commit an image into itself"
    )
    assert refused(device="top", top="mid\0.qcow2") == "Top image file mid\0.qcow2 not found"
    assert refused(device="top", top_node="mid", backing_file="x" * 2000).startswith(
        "Backing file name too long"
    )
    assert refused(device="top", backing_file="x") == (
        "'backing-file' specified, but 'top' is the active layer"
    )
    assert (
        refused(
            device="top",
            top_node="mid",
            backing_file="x",
            has_writer=lambda n: n is nodes["mid"],
        )
        == "'backing-file' specified, but 'top' has a writer on it"
    )
    graph.add_blocker(nodes["top2"], "held by a test")
    assert refused(device="top", top_node="mid") == "Node 'top2' is busy: held by a test"
    graph.remove_blocker(nodes["top2"], "held by a test")
    graph.add_blocker(nodes["base"], "held by a test")
    assert refused(device="top", top_node="mid") == "Node 'base' is busy: held by a test"
    graph.remove_blocker(nodes["base"], "held by a test")


async def test_plan_names_and_defaults(tmp_path: Path, graph: BlockGraph) -> None:
    chain(tmp_path)
    # opened from the headers, so the nodes show plain file names (a json:
    # name, as a node given its backing by reference shows, matches no name)
    top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top")
    assert top.backing is not None and top.backing.backing is not None
    nodes = {"top": top, "mid": top.backing, "base": top.backing.backing}
    # top and base by file name (relative to the image above), base defaulting to the bottom
    plan = plan_commit(graph, device="top", top="mid.qcow2")
    assert isinstance(plan, CommitPlan)
    assert (plan.top, plan.base, plan.overlay) == (nodes["mid"], nodes["base"], nodes["top"])
    assert plan.intermediates == (nodes["mid"],)
    assert plan.overlay_chain == (nodes["top"],)
    assert plan.backing_string == str(tmp_path / "base.qcow2")
    plan = plan_commit(graph, device="top", top=str(tmp_path / "mid.qcow2"), base="base.qcow2")
    assert isinstance(plan, CommitPlan) and plan.base is nodes["base"]
    # naming the device itself as top is an active commit
    active = plan_commit(graph, device="top", top=str(tmp_path / "top.qcow2"))
    assert isinstance(active, ActiveCommitPlan)
    assert active.top is nodes["top"] and active.base is nodes["base"]
    assert active.intermediates == (nodes["top"], nodes["mid"])
    # the base of a two-image range is the one below top
    whole = plan_commit(graph, device="top", top_node="top", base_node=nodes["mid"].node_name)
    assert isinstance(whole, ActiveCommitPlan) and whole.intermediates == (nodes["top"],)


async def test_plan_refuses_a_base_another_chain_reads(tmp_path: Path, graph: BlockGraph) -> None:
    chain(tmp_path)
    create(tmp_path / "other.qcow2", "1M", backing=Path("base.qcow2"))
    await open_chain(graph, tmp_path, top2=False)
    await open_qcow2(graph, tmp_path / "other.qcow2", name="other", backing="base")
    with pytest.raises(BlockError) as info:
        plan_commit(graph, device="top", top_node="mid")
    assert str(info.value) == (
        "Conflicts with use by node 'other' as 'backing', which does not allow 'write' "
        "on base: committing into 'base' would change what 'other' reads"
    )


async def test_plan_refuses_a_top_used_other_than_as_backing(
    tmp_path: Path, graph: BlockGraph
) -> None:
    chain(tmp_path)
    await open_chain(graph, tmp_path, top2=False)
    # a raw node on mid's file node... and on mid itself, as its file
    mid = graph.get("mid")
    assert mid is not None
    await open_qcow2(graph, tmp_path / "mid.qcow2", name="raw-on-mid", driver="raw",
                     read_only=True, file="mid")  # fmt: skip
    refusal = (
        "Cannot commit 'mid': node 'raw-on-mid' uses it as 'file', and blockd re-points "
        "only overlays and exports onto the base"
    )
    with pytest.raises(BlockError) as info:
        plan_commit(graph, device="top", top_node="mid")
    assert str(info.value) == refusal
    # that user is why, even while something else holds it: the busy check is
    # for the overlays the commit would re-point
    raw_on_mid = graph.get("raw-on-mid")
    assert raw_on_mid is not None
    graph.add_blocker(raw_on_mid, "held by a test")
    with pytest.raises(BlockError) as info:
        plan_commit(graph, device="top", top_node="mid")
    assert str(info.value) == refusal


async def test_commit_of_a_lower_intermediate_repoints_the_image_above_it(
    tmp_path: Path, graph: BlockGraph
) -> None:
    """base <- m1 <- m2 <- top, commit m1: m2 (not top) is the overlay that
    gets base's name; top keeps naming m2."""
    create(tmp_path / "base.qcow2", "1M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x11 0 1M")
    for name, below, data in (("m1", "base", 0x21), ("m2", "m1", 0x22), ("top", "m2", 0x23)):
        create(tmp_path / f"{name}.qcow2", "1M", backing=Path(f"{below}.qcow2"))
        qemu_io(tmp_path / f"{name}.qcow2", f"write -P {data:#x} {(data - 0x20) * 128}k 64k")
    before = views(tmp_path, "top", "m2")
    top = await open_qcow2(graph, tmp_path / "top.qcow2", name="top")
    m2 = top.backing
    assert m2 is not None and m2.backing is not None and m2.backing.backing is not None
    m1, base = m2.backing, m2.backing.backing
    plan = plan_commit(graph, device="top", top_node=m1.node_name)
    assert isinstance(plan, CommitPlan)
    assert (plan.overlay, plan.base, plan.intermediates) == (m2, base, (m1,))
    assert plan.overlay_chain == (top, m2)
    r = Run()
    assert (await r(CommitJob("j", r.events, graph, plan))).error is None
    assert m2.backing is base and top.backing is m2
    await graph.close_all()
    assert backing_of(tmp_path / "m2.qcow2") == str(tmp_path / "base.qcow2")
    assert backing_of(tmp_path / "top.qcow2") == "m2.qcow2"
    assert views(tmp_path, "top", "m2") == before


async def test_a_failed_setup_gives_everything_back(tmp_path: Path, graph: BlockGraph) -> None:
    """An overlay of mid that cannot be opened read-write (marked corrupt) makes
    the job fail before it starts: no node stays held, base stays read-only."""
    chain(tmp_path)
    header = bytearray((tmp_path / "top2.qcow2").read_bytes()[:80])
    incompatible = int.from_bytes(header[72:80], "big") | 2  # the corrupt bit
    with open(tmp_path / "top2.qcow2", "r+b") as f:
        f.seek(72)
        f.write(incompatible.to_bytes(8, "big"))
    nodes = await open_chain(graph, tmp_path)
    r = Run()
    job = commit_of(graph, r)
    job.create(r.dismissed.append)
    with pytest.raises(BlockError, match="Image is corrupt; cannot be opened read/write"):
        await job.setup()
    for name, node in nodes.items():
        assert graph.blocker(node) is None, name
        assert not graph.in_use(node) or name == "top", name
    assert nodes["base"].read_only
    # nothing is held: the same plan can be made again
    plan_commit(graph, device="top", top_node="mid", base_node="base")


async def test_a_base_opened_read_write_stays_read_write(tmp_path: Path, graph: BlockGraph) -> None:
    chain(tmp_path)
    nodes = await open_chain(graph, tmp_path, top2=False, base_read_only=False)
    r = Run()
    assert (await r(commit_of(graph, r))).error is None
    assert not nodes["base"].read_only
    await nodes["base"].write(0, b"\x77" * 4096)  # still writable
