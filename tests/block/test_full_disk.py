"""Writes that run out of space on a real file system, at every point where they can.

The image lives on a small tmpfs (``tests/diskfull.py``) that a filler file
has filled completely.  Each write is tried; when the kernel refuses it with
ENOSPC, one page is freed and the same write tried again, until it goes
through.  So every write the driver makes that needs a new page of the
file (data, a new L2 table, a new refcount block, the blocks and table of a
refcount table growth) fails once, with the disk full at exactly that
point, and each failure is followed by the next attempt on the same node.

After failures, with the node still open (after its flush): ``qemu-img
check`` finds no corruption and no leak, and the guest view equals the
model of the writes that succeeded, except where the failed write was going.
At the end: a clean image holding exactly the model, and the failures have
struck each kind of metadata allocation the geometry makes.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any

import pytest

from blockd.block.drivers.file import FileNode
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import BlockIOError
from tests.diskfull import PAGE, SmallFs

from .conftest import assert_clean, compare_with, create, open_qcow2, qemu_io, run

KiB = 1024
MiB = 1 << 20
SIZE = 4 * MiB

#: Check the open image after every this many failures (each check runs
#: qemu-img twice; the failures come in the hundreds).
CHECK_EVERY = 25

#: What the file is told (blkdebug event names) just before each metadata
#: write whose failure the test wants to see, by kind.
L2_TABLE = ("l2_alloc_write", "l2_update")
REFBLOCK = "refblock_alloc_write"
REFTABLE_BLOCKS = "refblock_alloc_write_blocks"
REFTABLE = "refblock_alloc_write_table"
DATA = "write_aio"

CASES = [
    # (cluster size, refcount bits, backing, bytes written before the disk fills,
    #  requests, kinds of write that must have failed at least once)
    # 512-byte clusters with 64-bit counters: an L2 table per 32 KiB of guest, a
    # refcount block per 32 KiB of file, the refcount table grows at 2 MiB
    (512, 64, False, 1920 * KiB, 60, {L2_TABLE, REFBLOCK, REFTABLE_BLOCKS, DATA}),
    # a cluster is a page: each metadata cluster fails on its own
    (4096, 64, True, 0, 60, {L2_TABLE, DATA}),
    # counters narrower than a byte share bytes with their neighbours
    (1024, 1, False, 0, 60, {L2_TABLE, DATA}),
    # the default geometry: 16 pages per cluster (fewer requests: each fails many times)
    (65536, 16, True, 0, 20, {DATA}),
]


def workload(rng: random.Random, cluster_size: int, count: int) -> list[tuple[str, int, int]]:
    ops = []
    for _ in range(count):
        op = rng.choice(["write"] * 6 + ["zero", "discard"])
        off = rng.randrange(0, SIZE // 512) * 512
        n = rng.choice([512, 4 * KiB, cluster_size, 3 * cluster_size + 512, 64 * KiB])
        ops.append((op, off, min(n, SIZE - off)))
    return ops


async def apply(node: BlockNode, op: str, off: int, data: bytes) -> None:
    if op == "write":
        await node.write(off, data)
    elif op == "zero":
        await node.write_zeroes(off, len(data))
    else:
        await node.discard(off, len(data))


def expected(model: bytearray, op: str, off: int, data: bytes, cluster_size: int) -> None:
    """What the guest sees after the op: discards drop whole clusters only, and
    (no backing data shows through them: zero flag with a backing file) read as zeros."""
    if op != "discard":
        model[off : off + len(data)] = data
        return
    lo = -(-off // cluster_size) * cluster_size
    hi = SIZE if off + len(data) >= SIZE else (off + len(data)) // cluster_size * cluster_size
    if hi > lo:
        model[lo:hi] = bytes(hi - lo)


def check_open_image(img: Path, model: bytearray, failing: tuple[int, int], tmp: Path) -> None:
    """The image as another process sees it while the node stays open: no
    corruption, no leak, and the model's data outside the range being written."""
    report = run("qemu-img", "check", "-U", "--output=json", str(img), check=False)
    assert report.returncode == 0, report.stdout + report.stderr
    seen = bytearray(to_raw_shared(img, tmp / "open.raw"))
    lo, hi = failing
    seen[lo:hi] = model[lo:hi]
    assert seen == model


def to_raw_shared(img: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-U", "-O", "raw", str(img), str(out))
    return out.read_bytes()


def watch_failed_writes(node: BlockNode) -> set[Any]:
    """The kinds of write (the event the driver raised before it) that the file
    refused, as a set the test reads at the end."""
    file = node.file
    assert isinstance(file, FileNode)
    events: list[str] = []
    struck: set[Any] = set()
    write = file._do_write

    async def watched(offset: int, data: bytes) -> None:
        try:
            await write(offset, data)
        except BlockIOError:
            last = events[-1] if events else None
            struck.add(tuple(events[-2:]) if last == "l2_update" else last)
            raise

    async def watched_many(writes: list[tuple[int, bytes]]) -> None:
        # new L2 tables and their L1 entries go out as batches
        for offset, data in writes:
            await watched(offset, data)

    file.debug_event = events.append  # type: ignore[method-assign]
    file._do_write = watched  # type: ignore[method-assign]
    file._do_write_many = watched_many  # type: ignore[method-assign]
    return struck


@pytest.mark.parametrize(
    ("cluster_size", "refcount_bits", "backing", "before", "requests", "kinds"), CASES
)
async def test_a_write_failing_at_every_page_leaves_a_sound_image(
    small_fs: SmallFs,
    graph: BlockGraph,
    tmp_path: Path,
    cluster_size: int,
    refcount_bits: int,
    backing: bool,
    before: int,
    requests: int,
    kinds: set[Any],
) -> None:
    model = bytearray(SIZE)
    base = None
    if backing:
        base = create(tmp_path / "base.qcow2", SIZE)
        qemu_io(base, f"write -P 0x5b 0 {SIZE}")
        model[:] = b"\x5b" * SIZE
    img = create(small_fs.path / "img.qcow2", SIZE, cluster_size=cluster_size,
                 refcount_bits=refcount_bits, backing=base)  # fmt: skip
    if before:
        qemu_io(img, f"write -P 0x11 0 {before}")
        model[:before] = b"\x11" * before
    node = await open_qcow2(graph, img)
    struck = watch_failed_writes(node)
    failures = 0
    small_fs.leave(0)
    rng = random.Random(cluster_size)
    for op, off, n in workload(rng, cluster_size, requests):
        data = bytes([rng.randrange(1, 256)]) * n if op == "write" else bytes(n)
        while True:
            try:
                await apply(node, op, off, data)
                break
            except BlockIOError as err:
                if err.errno != errno.ENOSPC:
                    raise
            failures += 1
            if failures % CHECK_EVERY == 0:
                await node.flush()
                check_open_image(img, model, (off, off + n), tmp_path)
            # failed attempts must not eat the space freed for the next one
            assert small_fs.filler_size(), f"still no space for {op} {off}+{n}, filler gone"
            small_fs.give(PAGE)
        expected(model, op, off, data, cluster_size)
    await node.flush()
    check_open_image(img, model, (0, 0), tmp_path)
    await graph.close_all()
    assert_clean(img)
    compare_with(img, bytes(model), tmp_path)
    assert failures > 50, failures
    assert kinds <= struck, (failures, struck)


async def test_growing_on_a_full_disk(small_fs: SmallFs, graph: BlockGraph, tmp_path: Path) -> None:
    """A bigger L1 table (commit into a smaller base grows it) refused by a full
    disk, page after page: nothing leaks, and the grow goes through once there is room."""
    img = create(small_fs.path / "img.qcow2", MiB, cluster_size=512, refcount_bits=64)
    qemu_io(img, f"write -P 0x21 0 {MiB}")
    node = await open_qcow2(graph, img)
    struck = watch_failed_writes(node)
    small_fs.leave(0)
    failures = 0
    while True:
        try:
            await node.truncate(48 * MiB)
            break
        except BlockIOError as err:
            if err.errno != errno.ENOSPC:
                raise
        failures += 1
        await node.flush()
        report = run("qemu-img", "check", "-U", str(img), check=False)
        assert report.returncode == 0, report.stdout
        assert small_fs.filler_size(), "still no space with the filler gone"
        small_fs.give(PAGE)
    small_fs.give_all()
    await node.write(40 * MiB, b"\x42" * 4096)
    await graph.close_all()
    assert_clean(img)
    model = bytearray(48 * MiB)
    model[:MiB] = b"\x21" * MiB
    model[40 * MiB : 40 * MiB + 4096] = b"\x42" * 4096
    compare_with(img, bytes(model), tmp_path)
    assert failures >= 3 and "l1_grow_write_table" in struck, (failures, struck)
