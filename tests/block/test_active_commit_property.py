"""Active commit against a model: random guest I/O before, during and after the job.

The guest writes through a real :class:`~blockd.export.exports.Export` (what
the NBD server uses), so the pivot is the one clients get.  At every phase
boundary the export must read exactly as the model says; at the end base
alone must, and qemu-img must find every image clean.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import trio
from hypothesis import example, given
from hypothesis import strategies as st

from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.graph import BlockGraph
from blockd.events import EventBus
from blockd.export.exports import Export, ExportRegistry
from blockd.jobs.active_commit import ActiveCommitJob, ActiveCommitPlan
from blockd.jobs.commit import plan_commit
from blockd.jobs.registry import JobRegistry
from blockd.jobs.status import JobStatus

from .conftest import (
    assert_clean,
    compare_with,
    create,
    open_qcow2,
    property_settings,
    qemu_io,
    to_raw,
)

#: before the job, while it copies, in READY, while it completes, after the pivot
PHASES = 5


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    size = 64 * 1024 * draw(st.integers(1, 40))
    ops = []
    for _ in range(draw(st.integers(1, 25))):
        op = draw(st.sampled_from(["write", "write", "write", "zero", "discard"]))
        off = draw(st.integers(0, size - 1))
        n = draw(st.integers(1, min(size - off, 300_000)))
        ops.append((draw(st.integers(0, PHASES - 1)), op, off, n, draw(st.integers(1, 255))))
    return {
        "size": size,
        "top_cluster": 1 << draw(st.integers(12, 16)),
        "base_cluster": 1 << draw(st.integers(9, 16)),
        "base_compat": draw(st.sampled_from(["0.10", "1.1"])),
        "mid": draw(st.booleans()),
        "ops": ops,
    }


def discard_model(model: bytearray, off: int, n: int, cluster: int, size: int) -> None:
    """Whole clusters of the range read as zeros afterwards; partial ones are kept
    (top is v3 over a backing file: zero flags; base has none: unallocated)."""
    first = -(-off // cluster)
    end = off + n
    last = -(-size // cluster) if end >= size else end // cluster
    for c in range(first, last):
        lo, hi = c * cluster, min((c + 1) * cluster, size)
        model[lo:hi] = bytes(hi - lo)


async def guest(export: Export, model: bytearray, ops: list[Any]) -> None:
    size = len(model)
    for op, off, n, byte in ops:
        async with export.use() as node:
            # what a discard leaves depends on the image it lands in (top or base)
            assert isinstance(node, Qcow2Node)
            cluster = node.cluster_size
            if op == "write":
                await node.write(off, bytes([byte]) * n)
                model[off : off + n] = bytes([byte]) * n
            elif op == "zero":
                await node.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                await node.discard(off, n)
                discard_model(model, off, n, cluster, size)
        await trio.lowlevel.checkpoint()


async def reads_as(export: Export, model: bytearray) -> None:
    async with export.use() as node:
        assert await node.read(0, len(model)) == bytes(model)


def build(tmp: Path, sc: dict[str, Any]) -> Path:
    size = sc["size"]
    base = create(tmp / "base.qcow2", size, compat=sc["base_compat"],
                  cluster_size=sc["base_cluster"])  # fmt: skip
    qemu_io(base, f"write -P 0x11 0 {size // 2}")
    backing = base
    if sc["mid"]:
        backing = create(tmp / "mid.qcow2", size, backing=base)
        qemu_io(backing, f"write -P 0x22 {size // 4} {size // 2}", f"write -z 0 {size // 8}")
    top = create(tmp / "top.qcow2", size, cluster_size=sc["top_cluster"], backing=backing)
    qemu_io(top, f"write -P 0x33 {size // 3} {size // 3}")
    return top


async def run_scenario(tmp: Path, sc: dict[str, Any]) -> bytearray:
    top_path = build(tmp, sc)
    model = bytearray(to_raw(top_path, tmp / "start.raw"))
    phases: list[list[Any]] = [[] for _ in range(PHASES)]
    for phase, *op in sc["ops"]:
        phases[phase].append(op)
    graph = BlockGraph()
    events = EventBus()
    ready = trio.Event()
    events.subscribe(lambda event: ready.set() if event.name == "BLOCK_JOB_READY" else None)
    try:
        top = await open_qcow2(graph, top_path)
        exports = ExportRegistry(events, graph)
        exports.server = object()  # requests are made through the export, not over a socket
        export = exports.add("e", top, name=None, description=None, writable=True,
                             writethrough=False)  # fmt: skip
        jobs = JobRegistry()
        async with trio.open_nursery() as nursery:
            await nursery.start(jobs.serve)
            await guest(export, model, phases[0])
            plan = plan_commit(graph, device=top.node_name)
            assert isinstance(plan, ActiveCommitPlan)
            job = ActiveCommitJob("j", events, graph, plan, exports.switch_node)
            jobs.add(job)
            await job.setup()
            jobs.start(job)
            await guest(export, model, phases[1])
            with trio.fail_after(60):
                await ready.wait()
            assert job.status is JobStatus.READY
            await reads_as(export, model)
            await guest(export, model, phases[2])
            job.complete()
            await guest(export, model, phases[3])
            with trio.fail_after(60):
                await job.concluded.wait()
            assert job.error is None
            assert export.node is plan.base
            await reads_as(export, model)
            await guest(export, model, phases[4])
            await reads_as(export, model)
            nursery.cancel_scope.cancel()
    finally:
        await graph.close_all()
    return model


@property_settings
@given(sc=scenarios())
@example(
    sc={  # every phase writes across cluster boundaries of both images
        "size": 1024 * 1024,
        "top_cluster": 65536,
        "base_cluster": 4096,
        "base_compat": "1.1",
        "mid": True,
        "ops": [
            (0, "write", 1000, 70000, 1),
            (1, "zero", 60000, 200000, 0),
            (1, "write", 500000, 300000, 2),
            (2, "discard", 0, 300000, 0),
            (3, "write", 65535, 2, 3),
            (3, "write", 900000, 100000, 4),
            (4, "discard", 100000, 100000, 0),
            (4, "write", 4095, 4098, 5),
        ],
    }
)
async def test_active_commit_matches_the_model(sc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = await run_scenario(tmp, sc)
        for name in ("base", "mid", "top") if sc["mid"] else ("base", "top"):
            assert_clean(tmp / f"{name}.qcow2")
        compare_with(tmp / "base.qcow2", bytes(model), tmp)
