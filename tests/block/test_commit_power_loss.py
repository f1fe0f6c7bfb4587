"""Power loss during a commit, intermediate and active: every image stays valid,
and every overlay still shows what it showed before.

All images sit on ``tests/power.py`` file nodes that share one power supply.
At the k-th write or flush of any of them the power goes: that operation and
every later one fail, the job ends as it ends on a dead disk, then each
file's unflushed writes are undone and a random subset replayed (a disk may
keep any of them).  Then qemu-img judges the files as a reboot finds them:
no corruption in any image (leaks allowed), ``mid`` byte for byte as it was,
and each overlay's chain - as its header now names it, ``mid`` or ``base`` -
reading exactly as before the commit.  Every I/O point of a run is a crash
point, so the header rewrites of the commit point are all covered.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.events import EventBus
from blockd.jobs.active_commit import ActiveCommitJob, ActiveCommitPlan
from blockd.jobs.commit import CommitJob, CommitPlan, plan_commit
from blockd.jobs.job import Job
from blockd.jobs.status import JobStatus
from tests.images import backing_of
from tests.power import Power, PowerLoss, VolatileFile, VolatileHostFile

from .conftest import check, create, qemu_io, run

KiB = 1024
SIZE = 1024 * KiB


def image_map(path: Path) -> list[dict[str, Any]]:
    proc = run("qemu-img", "map", "--output=json", str(path))
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def make_chain(d: Path) -> None:
    """base <- mid <- top, and top2 also on mid; small clusters in base for
    metadata churn, and free clusters in base that still hold old bytes.

    QEMU frees clusters without always punching them, so a cluster base
    reuses may hold anything: a new L2 table there reads as garbage unless
    its write is durable before the L1 entry pointing at it (a fresh
    cluster past the end of the file would read as an empty table anyway).
    """
    d.mkdir()
    base = create(d / "base.qcow2", SIZE, cluster_size=512)
    # written first, so freed they are the lowest free clusters: the next to be reused
    qemu_io(base, "write -P 0x55 900k 4k", "write -P 0x11 0 512k")
    [stale] = [e["offset"] for e in image_map(base) if e["start"] == 900 * KiB]
    qemu_io(base, "discard 900k 4k")
    with base.open("r+b") as f:  # what the freed clusters held, as a disk keeps it
        f.seek(stale)
        f.write(b"\x11" * 4 * KiB)
    mid = create(d / "mid.qcow2", SIZE, backing=Path("base.qcow2"))
    qemu_io(mid, "write -P 0x22 256k 384k", "write -z 0 64k", "write -P 0x23 960k 64k")
    top = create(d / "top.qcow2", SIZE, backing=Path("mid.qcow2"))
    qemu_io(top, "write -P 0x33 320k 64k")
    top2 = create(d / "top2.qcow2", SIZE, backing=Path("mid.qcow2"))
    qemu_io(top2, "write -P 0x44 700k 4k")


Volatile = VolatileFile | VolatileHostFile


async def open_image(
    graph: BlockGraph,
    files: list[Volatile],
    path: Path,
    backing: BlockNode | None,
    *,
    power: Power,
    read_only: bool,
    host: bool,
) -> Qcow2Node:
    file: Volatile
    if host:
        file = await VolatileHostFile.volatile(f"f-{path.stem}", str(path), power,
                                               read_only=read_only)  # fmt: skip
    else:
        inner = await FileNode.open(f"f-{path.stem}", str(path), read_only=read_only)
        file = VolatileFile(inner, power)
    files.append(file)
    node = await Qcow2Node.open(path.stem, file, read_only=read_only)
    node.backing = backing
    graph.add(node)
    return node


async def commit_once(
    d: Path, crash_at: int, *, active: bool, seed: int, host: bool = False
) -> tuple[int, bool]:
    """One commit with the power going at ``crash_at``; (I/O points, job succeeded);
    ``host``: the images on host file nodes (see the test below)."""
    power = Power(crash_at)
    graph = BlockGraph()
    files: list[Volatile] = []

    async def image(name: str, backing: BlockNode | None, *, read_only: bool) -> Qcow2Node:
        return await open_image(graph, files, d / f"{name}.qcow2", backing, power=power,
                                read_only=read_only, host=host)  # fmt: skip

    base = await image("base", None, read_only=True)
    mid = await image("mid", base, read_only=True)
    await image("top", mid, read_only=False)
    if not active:
        await image("top2", mid, read_only=True)
    events = EventBus()
    # READY (an active commit waits there for completion), or the end
    settled = trio.Event()
    events.subscribe(lambda event: settled.set() if event.name.startswith("BLOCK_JOB_") else None)
    job: Job
    if active:
        plan = plan_commit(graph, device="top", base_node="base")
        assert isinstance(plan, ActiveCommitPlan)

        async def pivot(
            old: BlockNode, new: BlockNode, prepare: Callable[[], Awaitable[None]]
        ) -> None:
            await prepare()  # no exports: nothing to hold while it runs

        job = ActiveCommitJob("j", events, graph, plan, pivot)
    else:
        plan = plan_commit(
            graph, device="top", top_node="mid", base_node="base", backing_file="base.qcow2"
        )
        assert isinstance(plan, CommitPlan)
        job = CommitJob("j", events, graph, plan)
    job.create(lambda _job: None)
    async with trio.open_nursery() as nursery:
        try:
            await job.setup()
        except PowerLoss:
            job.early_fail()
        else:
            job.start(nursery)
            with trio.fail_after(60):
                await settled.wait()
                if job.status is JobStatus.READY:
                    job.complete()
                await job.concluded.wait()
    succeeded = job.concluded.is_set() and job.error is None
    rng = random.Random(seed * 1009 + crash_at)
    for file in files:
        await file.lose_power(rng)
    return power.ops, succeeded


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def judge(d: Path, before: dict[str, Path], mid_digest: str, *, active: bool, done: bool) -> None:
    for image in ("base", "mid", "top", "top2"):
        result = check(d / f"{image}.qcow2")
        assert result.get("corruptions", 0) == 0, (image, result)
        assert result.get("check-errors", 0) == 0, (image, result)
    assert digest(d / "mid.qcow2") == mid_digest
    for image, view in before.items():
        overlay = d / f"{image}.qcow2"
        named = backing_of(overlay)
        if active:
            assert named == "mid.qcow2"
        else:
            assert named in ("mid.qcow2", "base.qcow2"), named
            if done:
                assert named == "base.qcow2"
        proc = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(view), str(overlay),
                   check=False)  # fmt: skip
        assert proc.returncode == 0, (image, named, proc.stdout + proc.stderr)
    if active and done:
        # The pivot happened: base alone now shows what top showed.
        proc = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(before["top"]),
                   str(d / "base.qcow2"), check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("active", [False, True], ids=["intermediate", "active"])
@pytest.mark.parametrize(
    "host",
    # a host file node: the copy goes file to file, a step's runs and its new
    # L2 tables in a batch each; another node: the copy is read and written
    [True, False],
    ids=["bulk", "read-write"],
)
async def test_power_loss_at_every_point_of_a_commit(
    tmp_path: Path, active: bool, host: bool
) -> None:
    template = tmp_path / "template"
    make_chain(template)
    before = {}
    for image in ("top", "top2"):
        before[image] = tmp_path / f"{image}.raw"
        run(
            "qemu-img", "convert", "-O", "raw", str(template / f"{image}.qcow2"), str(before[image])
        )
    mid_digest = digest(template / "mid.qcow2")

    async def attempt(crash_at: int) -> int:
        d = tmp_path / f"run-{crash_at}"
        shutil.copytree(template, d)
        ops, done = await commit_once(d, crash_at, active=active, host=host, seed=1)
        judge(d, before, mid_digest, active=active, done=done)
        shutil.rmtree(d)
        return ops

    total = await attempt(-1)  # no power loss: count the I/O points
    assert total > 10
    for crash_at in range(1, total + 1):
        await attempt(crash_at)
