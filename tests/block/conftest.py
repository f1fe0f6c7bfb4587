"""Fixtures for block-layer tests: real images made and judged by qemu-img / qemu-io.

Without the qemu tools the tests skip locally but FAIL when CI=true, so a CI
image that lost its qemu packages cannot go green by skipping everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, settings

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.block.open import open_node
from blockd.events import EmittedEvent, EventBus
from blockd.jobs.active_commit import ActiveCommitJob, ActiveCommitPlan
from blockd.jobs.commit import plan_commit
from tests.conftest import require_tool


@pytest.fixture(autouse=True)
def _qemu_tools() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
        )
    return proc


def create(
    path: Path,
    size: int | str,
    *,
    compat: str = "1.1",
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    backing: Path | None = None,
    backing_fmt: str = "qcow2",
    extra: str = "",
) -> Path:
    opts = f"compat={compat},cluster_size={cluster_size},refcount_bits={refcount_bits}"
    if extra:
        opts += "," + extra
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    run(*args, str(path), str(size))
    return path


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> str:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    proc = run(*args, str(path))
    out = proc.stdout + proc.stderr
    assert "Pattern verification failed" not in out, out
    assert "error" not in out.lower(), out
    return out


def check(path: Path) -> dict[str, Any]:
    """qemu-img check as JSON; asserts the image is clean (no errors, no leaks)."""
    proc = run("qemu-img", "check", "--output=json", str(path), check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def assert_clean(path: Path) -> None:
    result = check(path)
    problems = {k: result.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
    assert not any(problems.values()), (
        problems,
        run("qemu-img", "check", str(path), check=False).stdout,
    )


def to_raw(path: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def compare_with(path: Path, data: bytes, tmp: Path) -> None:
    raw = tmp / "expected.raw"
    raw.write_bytes(data)
    proc = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def data_on_refcount_block(path: Path) -> bytes:
    """A 1 MiB image whose guest cluster 0 "is" its refcount block 0 (a corrupt L2
    entry); the refcount block's bytes, which no write may change."""
    img = create(path, "1M")
    qemu_io(img, "write -P 0x42 0 64k")
    buf = bytearray(img.read_bytes())
    assert struct.unpack_from(">Q", buf, 0x40000)[0] == 0x8000000000050000
    struct.pack_into(">Q", buf, 0x40000, 0x8000000000020000)
    img.write_bytes(bytes(buf))
    return bytes(buf[0x20000:0x30000])


#: Settings of the block layer's property tests: BLOCKD_PROPERTY_EXAMPLES examples
#: (25 unless set), no deadline (each example runs qemu-img), big scenarios allowed.
property_settings = settings(
    max_examples=int(os.environ.get("BLOCKD_PROPERTY_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


async def no_users(old: BlockNode, new: BlockNode, prepare: Callable[[], Awaitable[None]]) -> None:
    """A job's pivot hook (the export registry's) with no users to hold."""
    await prepare()


def active_commit_job(graph: BlockGraph, events: EventBus, **options: Any) -> ActiveCommitJob:
    """A created active commit of device ``top`` (options as ``block-commit``'s)."""
    plan = plan_commit(graph, device="top")
    assert isinstance(plan, ActiveCommitPlan)
    job = ActiveCommitJob("j", events, graph, plan, no_users, **options)
    job.create(lambda _job: None)
    return job


@contextlib.asynccontextmanager
async def ready_job(
    graph: BlockGraph, events: EventBus, **options: Any
) -> AsyncIterator[ActiveCommitJob]:
    """An active commit of top (options as ``block-commit``'s), started and
    READY; the block runs while it lives (30 s at most)."""
    ready = seen(events, "BLOCK_JOB_READY")
    job = active_commit_job(graph, events, **options)
    async with trio.open_nursery() as nursery:
        await job.setup()
        job.start(nursery)
        with trio.fail_after(30):
            await ready.wait()
            yield job


async def commit_to_the_end(graph: BlockGraph, tracked: int | None = None, **options: Any) -> None:
    """An active commit of top (options as ``block-commit``'s; dirty data
    tracked in ``tracked`` chunks, if given) through READY to its successful end."""
    async with ready_job(graph, EventBus(), **options) as job:
        if tracked is not None:
            assert job._dirty.granularity == tracked
        job.complete()
        await job.concluded.wait()
    assert job.error is None


def seen(events: EventBus, name: str, status: str | None = None) -> trio.Event:
    """Set once ``events`` carries the event ``name`` (a JOB_STATUS_CHANGE to ``status``)."""
    event = trio.Event()

    def listen(e: EmittedEvent) -> None:
        if e.name == name and (status is None or (e.data or {}).get("status") == status):
            event.set()

    events.subscribe(listen)
    return event


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    g = BlockGraph()
    yield g
    await g.close_all()


async def open_qcow2(
    graph: BlockGraph,
    path: Path,
    *,
    read_only: bool = False,
    name: str | None = None,
    **extra: Any,
) -> BlockNode:
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "read-only": read_only,
        # discard requests carried out (a client-opened node ignores them by default)
        "discard": "unmap",
        "file": {"driver": "file", "filename": str(path)},
    }
    if name is not None:
        opts["node-name"] = name
    opts.update(extra)
    return await open_node(graph, opts)
