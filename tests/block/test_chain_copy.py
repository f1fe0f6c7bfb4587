"""ChainCopy, the copy both commits make: what it leaves in base, by which path,
and how its failures are named, on real images made and judged by qemu-img.

The chain (12 MiB, base all 0x11 data):

    mid  data 0x22 [0, 1M), zeros [1M, 1.5M)
    top  data 0x33 [512k, 768k), zeros [2M, 2.25M), compressed 0x44 [3M, +64k),
         compressed zeros [3200k, +64k), data [6M, 11M) starting with 512 zero bytes

so a copy meets every kind of run: mapped data (file to file, batched), zero
runs, data no file-to-file copy can take (compressed, read and written), and
data that reads as zeros.  A blkdebug filter under top or base (no rules)
takes file-to-file copying away from that image; with rules it fails I/O.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.block.open import open_node
from blockd.errors import BlockIOError
from blockd.jobs.copy import ChainCopy, CopyFailed, Steps, restore_read_only, step_size
from tests.power import count_syncs

from .conftest import (
    compare_with,
    create,
    data_on_refcount_block,
    qemu_io,
    run,
    to_raw,
)

KiB = 1024
MiB = 1 << 20
GiB = 1 << 30
SIZE = 12 * MiB

#: What the layers above base hold, as (start, length, reads as zeros).
HELD = [
    (0, 1 * MiB, False),
    (1 * MiB, 512 * KiB, True),
    (2 * MiB, 256 * KiB, True),
    (3 * MiB, 64 * KiB, False),
    (3200 * KiB, 64 * KiB, True),
    (6 * MiB, 5 * MiB, False),
]


def make_chain(tmp: Path) -> tuple[Path, Path, Path]:
    base = create(tmp / "base.qcow2", SIZE)
    qemu_io(base, f"write -P 0x11 0 {SIZE}")
    mid = create(tmp / "mid.qcow2", SIZE, backing=base)
    qemu_io(mid, "write -P 0x22 0 1M", "write -z 1M 512k")
    top = create(tmp / "top.qcow2", SIZE, backing=mid)
    qemu_io(
        top,
        "write -P 0x33 512k 256k",
        "write -z 2M 256k",
        "write -c -P 0x44 3M 64k",
        "write -c -P 0 3200k 64k",
        "write -P 0 6M 512",
        f"write -P 0x55 {6 * MiB + 512} {5 * MiB - 512}",
    )
    return base, mid, top


def file_opts(path: Path, rules: list[dict[str, Any]] | None) -> dict[str, Any]:
    opts: dict[str, Any] = {"driver": "file", "filename": str(path)}
    if rules is None:
        return opts
    blkdebug = {"driver": "blkdebug", "image": opts}
    if rules:  # (QEMU refuses an empty list)
        blkdebug["inject-error"] = rules
    return blkdebug


async def open_chain(
    graph: BlockGraph,
    paths: tuple[Path, ...],
    *,
    debug: str = "",
    rules: list[dict[str, Any]] | None = None,
    writable: tuple[str, ...] = ("base",),
) -> list[BlockNode]:
    """Each image on the one below, base read-write (and any other named in
    ``writable``); ``debug`` names the image opened through blkdebug (with ``rules``)."""
    nodes: list[BlockNode] = []
    for name, path in zip(("base", "mid", "top"), paths, strict=False):
        opts: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": name,
            "read-only": name not in writable,
            "discard": "unmap",  # carried out, not ignored (a client's node ignores them)
            "file": file_opts(path, (rules or []) if name == debug else None),
            "backing": nodes[-1].node_name if nodes else None,
        }
        nodes.append(await open_node(graph, opts))
    return nodes


def zero_extents(path: Path) -> list[tuple[int, int]]:
    """The guest ranges qemu-img map says read as zeros without data (merged)."""
    extents = json.loads(run("qemu-img", "map", "--output=json", str(path)).stdout)
    ranges: list[tuple[int, int]] = []
    for ext in extents:
        if ext["zero"] and not ext["data"]:
            start, n = ext["start"], ext["length"]
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
            else:
                ranges.append((start, n))
    return ranges


@pytest.mark.parametrize("debug", ["", "top", "base"])
@pytest.mark.parametrize("windows", [
    [(0, SIZE)],
    [(0, 3100 * KiB), (3100 * KiB, 7 * MiB), (7 * MiB, SIZE)],
    # a window ending inside a run, starting where a run starts (3M + 16k)
    [(0, 3088 * KiB), (3088 * KiB, 3112 * KiB), (3112 * KiB, SIZE)],
])  # fmt: skip
async def test_base_ends_up_as_top_shows_the_chain(
    tmp_path: Path, debug: str, windows: list[tuple[int, int]]
) -> None:
    """Whatever path the data takes (file to file, batched or not, or read and
    written), base holds top's view; zeros stay sparse; the rest of base is
    left alone; a window reports the bytes held above base in it."""
    paths = make_chain(tmp_path)
    expected = to_raw(paths[2], tmp_path / "view.raw")
    graph = BlockGraph()
    try:
        base, _mid, top = await open_chain(graph, paths, debug=debug)
        copy = ChainCopy(graph, top, base)
        for start, end in windows:
            held = sum(max(0, min(end, s + n) - max(start, s)) for s, n, _zero in HELD)
            assert await copy.window(start, end) == held
    finally:
        await graph.close_all()
    compare_with(paths[0], expected, tmp_path)
    assert zero_extents(paths[0]) == [(s, n) for s, n, zero in HELD if zero]
    run("qemu-img", "check", str(paths[0]))


async def fail_once(
    tmp_path: Path, debug: str, rule: dict[str, Any], start: int, end: int
) -> CopyFailed:
    paths = make_chain(tmp_path)
    graph = BlockGraph()
    try:
        base, _mid, top = await open_chain(graph, paths, debug=debug, rules=[rule])
        with pytest.raises(CopyFailed) as failed:
            await ChainCopy(graph, top, base).window(start, end)
    finally:
        await graph.close_all()
    return failed.value


@pytest.mark.parametrize(
    ("debug", "event", "start", "end", "operation"),
    [
        # working out who holds what: top's L2 table cannot be read
        ("top", "l2_load", 0, SIZE, "read"),
        # top's data, read because blkdebug keeps it from a file-to-file copy
        ("top", "read_aio", 6 * MiB, 7 * MiB, "read"),
        # a zero run written as zeros into base
        ("base", "l2_update", 1 * MiB, 2 * MiB, "write"),
        # data written into base (read and written: blkdebug under base)
        ("base", "write_aio", 6 * MiB, 7 * MiB, "write"),
        # data that reads as zeros, written as zeros
        ("base", "l2_update", 3200 * KiB, 3264 * KiB, "write"),
    ],
)
async def test_a_failed_io_names_its_operation(
    tmp_path: Path, debug: str, event: str, start: int, end: int, operation: str
) -> None:
    rule = {"event": event, "errno": errno.ENOSPC, "once": True}
    failed = await fail_once(tmp_path, debug, rule, start, end)
    assert failed.operation == operation
    assert failed.error.errno == errno.ENOSPC
    assert str(failed) == "No space left on device"


async def test_a_node_whose_flush_fails_stays_read_write_after_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Putting a node a job opened read-write back to read-only flushes it
    first; when that flush fails (a failing disk) the job's outcome is
    decided already: the node stays read-write and usable, and the job is
    told nothing (a commit whose header already names base must not fail)."""
    paths = make_chain(tmp_path)
    graph = BlockGraph()
    try:
        rules = [{"event": "flush_to_disk", "errno": errno.EIO, "once": True}]
        base, _mid, _top = await open_chain(graph, paths, debug="base", rules=rules)
        await base.write(0, b"\x77" * 4096)
        with caplog.at_level(logging.WARNING, logger="blockd"):
            await restore_read_only("j", base)
        assert not base.read_only
        assert [r.getMessage() for r in caplog.records] == [
            "job j: base stays read-write: Input/output error"
        ]
        await restore_read_only("j", base)  # the disk works again
        assert base.read_only
    finally:
        await graph.close_all()


@pytest.mark.parametrize("fails", ["runs", "map_data"])
async def test_a_metadata_read_that_fails_is_a_read_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """Asking the layers what they hold (``runs``, as a commit's step looks
    ahead) and finding where a layer's data lies in its file (``map_data``,
    for a copy file to file) read metadata: a failure there is the read
    on-error hears of.  (blkdebug, which could fail them, also keeps a layer
    from being copied file to file, so the failure is made here.)"""
    paths = make_chain(tmp_path)
    graph = BlockGraph()
    try:
        base, _mid, top = await open_chain(graph, paths)
        copy = ChainCopy(graph, top, base)

        async def eio(*_args: Any) -> list[Any]:
            raise BlockIOError(errno.EIO)

        if fails == "runs":
            monkeypatch.setattr(copy, "runs", eio)
            failing = Steps(copy, 0, top.size).next(MiB)
        else:
            monkeypatch.setattr(top, "map_data", eio)
            failing = copy.window(6 * MiB, 7 * MiB)
        with pytest.raises(CopyFailed) as failed:
            await failing
    finally:
        await graph.close_all()
    assert failed.value.operation == "read"
    assert failed.value.error.errno == errno.EIO


@pytest.mark.parametrize(
    ("runs", "mid_runs"),
    [
        ([(0, 64 * KiB)], []),
        ([(0, 64 * KiB), (128 * KiB, 64 * KiB)], []),
        # two layers' runs: one batch for base, whatever layer each came from
        ([(128 * KiB, 64 * KiB)], [(0, 64 * KiB)]),
    ],
)
async def test_a_file_to_file_write_that_fails_is_a_write_operation(
    tmp_path: Path, runs: list[tuple[int, int]], mid_runs: list[tuple[int, int]]
) -> None:
    """One mapped run goes by write_from_host, two by write_many_from_host
    (one layer's, or the batch of all layers'): base's guest cluster 0 lies
    on its refcount block, so the write is refused (EIO)."""
    base_path = tmp_path / "base.qcow2"
    data_on_refcount_block(base_path)
    below = base_path
    if mid_runs:
        below = create(tmp_path / "mid.qcow2", "1M", backing=base_path)
        qemu_io(below, *(f"write -P 0x55 {s} {n}" for s, n in mid_runs))
    top_path = create(tmp_path / "top.qcow2", "1M", backing=below)
    qemu_io(top_path, *(f"write -P 0x66 {s} {n}" for s, n in runs))
    chain = (base_path, below, top_path) if mid_runs else (base_path, top_path)
    graph = BlockGraph()
    try:
        nodes = await open_chain(graph, chain)
        base, top = nodes[0], nodes[-1]
        with pytest.raises(CopyFailed) as failed:
            await ChainCopy(graph, top, base).window(0, 1 * MiB)
    finally:
        await graph.close_all()
    assert failed.value.operation == "write"
    assert isinstance(failed.value.error, BlockIOError)
    assert failed.value.error.errno == errno.EIO


@pytest.mark.parametrize(
    ("speed", "step"),
    [
        (0, 32 * MiB),
        (1, 512 * KiB),
        (5 * MiB - 1, 512 * KiB),
        (45 * MiB, 4608 * KiB),
        (46 * MiB, 4608 * KiB),  # rounded down to whole chunks
        (300 * MiB, 30 * MiB),
        (320 * MiB + 5 * MiB, 32 * MiB),
    ],
)
def test_step_size(speed: int, step: int) -> None:
    """QEMU's 512 KiB chunks, about a tenth of a second's worth of them, at
    most the 32 MiB window (and all of it without a speed limit)."""
    assert step_size(speed) == step
    assert type(step_size(speed)) is int  # offsets and progress stay whole bytes


async def test_the_source_clusters_are_let_go_after_the_copy(tmp_path: Path) -> None:
    """A file-to-file copy pins the source's clusters while it reads them; an
    active commit's guest then discarding them in top must not wait forever.
    (A pin left behind hangs this test: freeing is shielded from cancellation.)"""
    paths = make_chain(tmp_path)
    graph = BlockGraph()
    try:
        base, _mid, top = await open_chain(graph, paths, writable=("base", "top"))
        await ChainCopy(graph, top, base).window(0, SIZE)
        await top.discard(512 * KiB, 256 * KiB)
        await top.discard(6 * MiB, 5 * MiB)
    finally:
        await graph.close_all()
    run("qemu-img", "check", str(paths[2]))


@pytest.mark.parametrize("gather", [True, False], ids=["gathering", "throttled"])
@pytest.mark.parametrize("unit", [256 * KiB, MiB, 32 * MiB])
async def test_steps_cover_the_range_in_whole_units_and_batch_sparse_runs(
    tmp_path: Path, unit: int, gather: bool
) -> None:
    """Steps follow each other without a gap, end on multiples of the unit
    (or at the end), give exactly the runs of a window over the whole range,
    copy at most two units each, and gather scattered runs of many units into
    one step: the chain of this module's other tests, mid also holding
    clusters scattered over a much larger range.  A throttled job's steps
    (no gathering) are one unit each, however little they find, as QEMU's
    rate-limited commit goes one request's worth at a time."""
    base = create(tmp_path / "base.qcow2", 256 * MiB)
    mid = create(tmp_path / "mid.qcow2", 256 * MiB, backing=base)
    qemu_io(mid, "write -P 0x22 0 1M", "write -z 1M 512k",
            *(f"write -P 9 {off * MiB + 64 * KiB} 4k" for off in range(16, 256, 5)))  # fmt: skip
    top = create(tmp_path / "top.qcow2", 256 * MiB, backing=mid)
    qemu_io(top, "write -P 0x33 512k 256k", "write -z 2M 256k", "write -P 7 6M 5M")
    graph = BlockGraph()
    try:
        b, _m, t = await open_chain(graph, (base, mid, top))
        copy = ChainCopy(graph, t, b)
        whole = await copy.runs(0, t.size)
        steps = Steps(copy, 0, t.size)
        offset, got, count = 0, [], 0
        while offset < t.size:
            end, runs = await steps.next(unit, gather=gather)
            assert end > offset
            assert end == t.size or end % unit == 0
            assert gather or end == min(offset + unit, t.size)
            assert all(offset <= pos and pos + n <= end for _l, _s, pos, n in runs)
            assert sum(n for *_x, n in runs) <= 2 * unit
            got += runs
            offset, count = end, count + 1
    finally:
        await graph.close_all()
    joined: list[tuple[str, str, int, int]] = []
    for layer, status, pos, n in got:
        last = joined[-1] if joined else None
        if last and last[:2] == (layer.node_name, status.value) and last[2] + last[3] == pos:
            joined[-1] = (*last[:3], last[3] + n)
        else:
            joined.append((layer.node_name, status.value, pos, n))
    assert joined == [(layer.node_name, status.value, pos, n) for layer, status, pos, n in whole]
    if gather:  # 48 scattered clusters past 16 MiB: far fewer steps than windows
        assert count < (t.size // unit) // 2 if unit < 32 * MiB else count <= 3


async def test_a_long_run_past_an_empty_first_unit_is_split_at_the_cut(tmp_path: Path) -> None:
    """Nothing in the first unit, then one run from the second unit on,
    longer than a unit (a guest that never wrote its first window): the first
    step looks two units further, finds more than a unit and cuts the run at
    the end of the second unit.  The piece before the cut is copied now, the
    rest by the next steps; a wrong length for the first piece would leave
    part of the run uncopied."""
    base = create(tmp_path / "base.qcow2", 8 * MiB)
    mid = create(tmp_path / "mid.qcow2", 8 * MiB, backing=base)
    qemu_io(mid, "write -P 0x22 1M 3M")
    graph = BlockGraph()
    try:
        b, m = await open_chain(graph, (base, mid))
        steps = Steps(ChainCopy(graph, m, b), 0, m.size)
        got = []
        offset = 0
        while offset < m.size:
            offset, runs = await steps.next(MiB)
            got.append((offset, [(pos, n) for _l, _s, pos, n in runs]))
    finally:
        await graph.close_all()
    assert got[0] == (2 * MiB, [(MiB, MiB)])
    pieces = [piece for _end, runs in got for piece in runs]
    assert [pos for pos, _n in pieces] == list(
        itertools.accumulate((n for _pos, n in pieces[:-1]), initial=MiB)
    )
    assert sum(n for _pos, n in pieces) == 3 * MiB


async def test_steps_through_a_huge_sparse_chain_look_through_a_bounded_stretch_each(
    tmp_path: Path,
) -> None:
    """Past the first 16 GiB too (images of tens of GiB are common): each
    step moves on, looks through at most 16 GiB (copy.SCAN) plus the chunk
    that crossed it (4 GiB of 64 KiB clusters), so a pause or a cancel waits
    for no more, ends on a whole unit as the small images' steps do, and
    all the steps together give exactly the runs of the whole range.  And
    the walk's cost follows the data, not the size: the look-ahead doubles
    across empty stretches, so the layers are asked a few dozen times, not
    once per 32 MiB unit (2,048 times)."""
    size = 64 * GiB
    base = create(tmp_path / "base.qcow2", size)
    mid = create(tmp_path / "mid.qcow2", size, backing=base)
    qemu_io(mid, "write -P 1 1G 64k", f"write -P 2 {17 * GiB + 64 * KiB} 4k",
            "write -P 3 40G 1M", f"write -P 4 {size - MiB} 1M")  # fmt: skip
    top = create(tmp_path / "top.qcow2", size, backing=mid)
    qemu_io(top, "write -P 5 20G 64k")
    graph = BlockGraph()
    try:
        b, _m, t = await open_chain(graph, (base, mid, top))
        copy = ChainCopy(graph, t, b)
        whole = await copy.runs(0, t.size)
        asked = 0
        runs_of = copy.runs

        async def counted(offset: int, end: int) -> list[Any]:
            nonlocal asked
            asked += 1
            return await runs_of(offset, end)

        copy.runs = counted  # type: ignore[method-assign]
        steps = Steps(copy, 0, t.size)
        offset, got = 0, []
        with trio.fail_after(60):
            while offset < t.size:
                end, runs = await steps.next(32 * MiB)
                assert offset < end <= offset + 16 * GiB + 4 * GiB
                assert end == t.size or end % (32 * MiB) == 0
                got += runs
                offset = end
    finally:
        await graph.close_all()
    assert [(r[0].node_name, r[2], r[3]) for r in got] == [
        (r[0].node_name, r[2], r[3]) for r in whole
    ]
    assert len(whole) == 5
    assert asked <= 64, asked


@pytest.mark.timeout(60)
async def test_copies_go_on_while_the_guest_frees_what_they_copy(tmp_path: Path) -> None:
    """An active commit copies from top while the guest discards and rewrites
    there.  A discard frees clusters holding the metadata lock and waits for
    their pins; a copy that held some pins while it waited for that lock to map
    more would wait forever (the active commit froze with its exports this way).
    Freeing is shielded from cancellation, so a deadlock is caught by the timeout."""
    paths = make_chain(tmp_path)
    graph = BlockGraph()
    cluster = 64 * KiB
    try:
        base, _mid, top = await open_chain(graph, paths, writable=("base", "top"))
        copy = ChainCopy(graph, top, base)
        rng = random.Random(5)
        done = 0

        async def copier() -> None:
            nonlocal done
            for _ in range(600):
                first = 6 * MiB + rng.randrange(64) * cluster
                ranges = [(first + i * 3 * cluster, cluster) for i in range(4)]
                await copy.ranges([r for r in ranges if r[0] + r[1] <= 11 * MiB])
                done += 1

        async def guest() -> None:
            while done < 600:
                at = 6 * MiB + rng.randrange(80) * cluster
                if rng.random() < 0.5:
                    await top.discard(at, 2 * cluster)
                else:
                    await top.write(at, bytes([rng.randrange(1, 256)]) * cluster)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(copier)
            nursery.start_soon(guest)
    finally:
        await graph.close_all()
    run("qemu-img", "check", str(paths[2]))
    run("qemu-img", "check", str(paths[0]))


@pytest.mark.parametrize("layers", [2, 8])
async def test_a_deep_chain_s_step_is_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layers: int
) -> None:
    """The data of every layer above base goes into base as one batch: the
    flushes a batch needs (data and counters before the new L2 entries) are
    paid once per step, not once per layer (a 48-image chain's commit spent
    most of its time in them).  Base then shows what top shows."""
    paths: list[Path] = [create(tmp_path / "img0.qcow2", SIZE)]
    for i in range(1, layers + 1):
        paths.append(create(tmp_path / f"img{i}.qcow2", SIZE, backing=paths[-1]))
        qemu_io(paths[-1], *(f"write -P {i} {(i + 8 * k) * 128 * KiB} 64k" for k in range(3)))
    expected = to_raw(paths[-1], tmp_path / "view.raw")
    graph = BlockGraph()
    nodes: list[BlockNode] = []
    try:
        for i, path in enumerate(paths):
            nodes.append(await open_node(graph, {
                "driver": "qcow2", "node-name": path.stem, "read-only": i > 0,
                "file": file_opts(path, None), "backing": nodes[-1].node_name if nodes else None,
            }))  # fmt: skip
        syncs = count_syncs(monkeypatch)
        assert await ChainCopy(graph, nodes[-1], nodes[0]).window(0, SIZE) == layers * 3 * 64 * KiB
        monkeypatch.undo()
    finally:
        await graph.close_all()
    # base's one new L2 table, then the batch's (layer by layer: 19 for eight layers)
    assert len(syncs) <= 6
    compare_with(paths[0], expected, tmp_path)
    run("qemu-img", "check", str(paths[0]))
