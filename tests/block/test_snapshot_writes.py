"""Writes into images with internal snapshots: what the snapshots hold never changes.

Images get their snapshots from ``qemu-img snapshot -c`` after writes by
``qemu-io`` (data, preallocated zero clusters, compressed clusters), so data
clusters, zero-allocated clusters, compressed clusters and L2 tables are all
shared with a snapshot when blockd starts writing.  The judges are qemu's:
each snapshot's content through ``qemu-img convert -l snapshot.name=...``
(must equal what it was before blockd opened the image), the active view
through ``qemu-img compare`` against a model, and ``qemu-img check`` (no
leak, no corruption: wrong refcounts or COPIED flags are corruptions there).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import BlockIOError, ImageError
from tests.power import Power, PowerLoss, VolatileFile

from . import test_commit_power_loss as commit_power
from . import test_kill_leaks as kill
from .conftest import (
    assert_clean,
    check,
    compare_with,
    create,
    open_qcow2,
    pattern,
    property_settings,
    qemu_io,
    run,
    to_raw,
)

KiB = 1024
MiB = 1 << 20


def snapshot_content(img: Path, name: str, out: Path) -> bytes:
    """The guest view a snapshot holds, as qemu-img reads it."""
    run("qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw", str(img), str(out))
    return out.read_bytes()


def take_snapshot(img: Path, name: str, tmp: Path, contents: dict[str, bytes]) -> None:
    run("qemu-img", "snapshot", "-c", name, str(img))
    contents[name] = snapshot_content(img, name, tmp / f"{name}.raw")


def assert_snapshots_kept(img: Path, contents: dict[str, bytes], tmp: Path) -> None:
    """Every snapshot reads as before (qemu-img reads one at the image's current
    size: past the size it had, zeros)."""
    for name, before in contents.items():
        after = snapshot_content(img, name, tmp / f"{name}-after.raw")
        assert after[: len(before)] == before, f"snapshot {name} changed"
        assert after[len(before) :] == bytes(len(after) - len(before)), name


def discard_model(model: bytearray, cluster_size: int, off: int, n: int) -> None:
    """What a discard leaves in an image without backing: whole clusters read zeros
    (the image's end counts as a cluster boundary), partial ones are untouched."""
    size = len(model)
    first = -(-off // cluster_size)
    last_excl = -(-size // cluster_size) if off + n >= size else (off + n) // cluster_size
    for c in range(first, last_excl):
        model[c * cluster_size : min((c + 1) * cluster_size, size)] = bytes(
            min((c + 1) * cluster_size, size) - c * cluster_size
        )


async def apply(node: BlockNode, model: bytearray, cs: int, op: str, off: int, n: int,
                byte: int) -> None:  # fmt: skip
    if op == "write":
        data = pattern(byte, n)
        await node.write(off, data)
        model[off : off + n] = data
    elif op == "zero":
        await node.write_zeroes(off, n)
        model[off : off + n] = bytes(n)
    elif op == "discard":
        await node.discard(off, n)
        discard_model(model, cs, off, n)
    elif op == "flush":
        await node.flush()
    else:
        assert await node.read(off, n) == bytes(model[off : off + n])


def prefill(img: Path, compat: str, cs: int, size: int, salt: int) -> None:
    """qemu-io writes that leave every kind of cluster: data, zero (preallocated
    in v3: qemu-io's ``write -z`` keeps the allocation), compressed."""
    compressed = size // 2 // cs * cs
    cmds = [
        f"write -P {0x10 + salt:#x} 0 {size // 2}",
        f"write -P {0x20 + salt:#x} {size // 3 + 100} {size // 5}",
        # a compressed write needs a cluster without a host cluster
        f"discard {compressed} {cs}",
        f"write -c -P {0x30 + salt:#x} {compressed} {cs}",
    ]
    if compat == "1.1":
        cmds.append(f"write -z {size // 8 // cs * cs} {2 * cs}")
    qemu_io(img, *cmds)


@pytest.mark.parametrize(
    ("compat", "cluster_size", "size"),
    [
        ("1.1", 65536, 8 * MiB),
        ("0.10", 4096, 2 * MiB),
        ("1.1", 512, 512 * KiB),  # an L2 table covers 32 KiB: many shared tables
        ("1.1", 2 * MiB, 16 * MiB),
    ],
)
async def test_writes_keep_every_snapshot(
    tmp_path: Path, graph: BlockGraph, compat: str, cluster_size: int, size: int
) -> None:
    img = create(tmp_path / "s.qcow2", size, compat=compat, cluster_size=cluster_size)
    cs = cluster_size
    contents: dict[str, bytes] = {}
    prefill(img, compat, cs, size, 0)
    take_snapshot(img, "s1", tmp_path, contents)
    qemu_io(
        img, f"write -P 0x41 {size // 4} {size // 4}", f"discard 0 {cs}", f"write -c -P 0x42 0 {cs}"
    )
    take_snapshot(img, "s2", tmp_path, contents)
    model = bytearray(to_raw(img, tmp_path / "before.raw"))

    node = await open_qcow2(graph, img)
    assert not node.read_only
    ops = [
        ("write", 100, 3 * cs + 7, 0x51),  # partial, whole and compressed (cluster 0) clusters
        ("write", size // 2 - 5, 10, 0x52),  # across the compressed cluster of s1
        ("write", size // 8 + 3, cs, 0x53),  # into the preallocated zero clusters
        ("zero", size // 3, 2 * cs + 11, 0),
        ("discard", size // 4, 3 * cs, 0),
        ("write", size - cs - 1, cs + 1, 0x54),  # the end: a table no snapshot shares
        ("read", 0, size, 0),
        ("write", 100, 3 * cs + 7, 0x55),  # again: now in place, the clusters are ours
        ("flush", 0, 0, 0),
    ]
    for op, off, n, byte in ops:
        await apply(node, model, cs, op, off, n, byte)
    assert await node.read(0, size) == bytes(model)
    await graph.close_all()
    assert_clean(img)
    compare_with(img, bytes(model), tmp_path)
    assert_snapshots_kept(img, contents, tmp_path)

    # qemu-img snapshots what blockd wrote; blockd writes on top of that
    take_snapshot(img, "s3", tmp_path, contents)
    node = await open_qcow2(graph, img, name="again")
    for op, off, n, byte in [
        ("write", 0, size, 0x61),
        ("discard", 0, size // 2, 0),
        ("zero", size // 2, size // 4, 0),
    ]:
        await apply(node, model, cs, op, off, n, byte)
    await graph.close_all()
    assert_clean(img)
    compare_with(img, bytes(model), tmp_path)
    assert_snapshots_kept(img, contents, tmp_path)

    # qemu-img deletes and applies snapshots by the refcounts blockd kept
    run("qemu-img", "snapshot", "-d", "s2", str(img))
    assert_clean(img)
    run("qemu-img", "snapshot", "-a", "s1", str(img))
    assert_clean(img)
    compare_with(img, contents["s1"], tmp_path)


@pytest.mark.parametrize("cluster_size", [4096, 65536])
async def test_compressed_image_with_snapshots(
    tmp_path: Path, graph: BlockGraph, cluster_size: int
) -> None:
    """``qemu-img convert -c`` packs many compressed clusters into each host
    cluster (one count per stream), and two snapshots share them all: writes
    drop one count per stream they replace."""
    cs = cluster_size
    size = 64 * cs
    src = create(tmp_path / "src.qcow2", size)
    qemu_io(src, f"write -P 0x11 0 {size // 2}", f"write -P 0x12 {size // 2} {size // 4}")
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cs}", str(src),
        str(img))  # fmt: skip
    contents: dict[str, bytes] = {}
    take_snapshot(img, "s1", tmp_path, contents)
    take_snapshot(img, "s2", tmp_path, contents)
    model = bytearray(contents["s1"])
    node = await open_qcow2(graph, img)
    rng = random.Random(cs)
    for _ in range(30):
        op = rng.choice(["write", "write", "zero", "discard", "read"])
        off = rng.randrange(0, size)
        n = rng.randrange(1, min(size - off, 3 * cs) + 1)
        await apply(node, model, cs, op, off, n, rng.randrange(1, 256))
    await graph.close_all()
    assert_clean(img)
    compare_with(img, bytes(model), tmp_path)
    assert_snapshots_kept(img, contents, tmp_path)
    for name in contents:
        run("qemu-img", "snapshot", "-d", name, str(img))
    assert_clean(img)


async def test_snapshot_list_after_writes(tmp_path: Path, graph: BlockGraph) -> None:
    """The snapshot table is read, never written: ImageInfo lists the same snapshots."""
    img = create(tmp_path / "l.qcow2", "1M")
    qemu_io(img, "write -P 0x42 0 64k")
    run("qemu-img", "snapshot", "-c", "first", str(img))
    run("qemu-img", "snapshot", "-c", "second", str(img))
    node = await open_qcow2(graph, img)
    await node.write(0, pattern(0x43, 4096))
    info = node.image_info(actual_size=img.stat().st_blocks * 512)
    names = [s["name"] for s in info["snapshots"]]
    assert names == ["first", "second"]
    await graph.close_all()
    listed = run("qemu-img", "snapshot", "-l", str(img)).stdout
    assert "first" in listed and "second" in listed
    assert_clean(img)
    qemu_io(img, "read -P 0x43 0 4k", "read -P 0x42 4k 60k")


def share_active_l1(img: Path, counted: bool) -> None:
    """Make the only snapshot use the active L1 table (``counted``: its own is given
    back and the active one counted twice, as qemu-img check wants it)."""
    buf = bytearray(img.read_bytes())
    cluster_bits = struct.unpack_from(">I", buf, 20)[0]
    l1_offset = struct.unpack_from(">Q", buf, 40)[0]
    reftable = struct.unpack_from(">Q", buf, 48)[0]
    snapshots = struct.unpack_from(">Q", buf, 64)[0]
    old_l1 = struct.unpack_from(">Q", buf, snapshots)[0]
    struct.pack_into(">Q", buf, snapshots, l1_offset)
    block = struct.unpack_from(">Q", buf, reftable)[0]  # 16-bit counters, one block
    for offset, delta in ((l1_offset, +1), (old_l1, -1)) if counted else ():
        pos = block + 2 * (offset >> cluster_bits)
        struct.pack_into(">H", buf, pos, struct.unpack_from(">H", buf, pos)[0] + delta)
    img.write_bytes(bytes(buf))


@pytest.mark.parametrize("counted", [True, False])
async def test_shared_active_l1_is_refused(
    tmp_path: Path, graph: BlockGraph, counted: bool
) -> None:
    """QEMU always gives a snapshot an L1 table of its own; one that shares the
    active L1 would change with every L1 entry written, so writing is refused
    (whether the refcounts say so or not)."""
    img = create(tmp_path / "l1.qcow2", "1M")
    qemu_io(img, "write -P 0x42 0 64k")
    run("qemu-img", "snapshot", "-c", "s1", str(img))
    share_active_l1(img, counted)
    # consistent refcounts as qemu-img sees them, or not
    assert (check(img).get("corruptions", 0) == 0) is counted
    before = img.read_bytes()
    with pytest.raises(ImageError, match="active L1 table is shared with an internal snapshot"):
        await open_qcow2(graph, img)
    node = await open_qcow2(graph, img, read_only=True)
    assert await node.read(0, 4096) == pattern(0x42, 4096)
    await graph.close_all()
    assert img.read_bytes() == before


async def test_grow_v3_keeps_snapshots_v2_refused(tmp_path: Path, graph: BlockGraph) -> None:
    """As QEMU 7.2: a v3 image with snapshots grows (each snapshot records its
    size), a v2 one is refused and left as it was."""
    contents: dict[str, bytes] = {}
    v3 = create(tmp_path / "v3.qcow2", "1M")
    qemu_io(v3, "write -P 0x42 0 1M")
    take_snapshot(v3, "s1", tmp_path, contents)
    node = await open_qcow2(graph, v3)
    await node.truncate(3 * MiB)
    await node.write(2 * MiB, pattern(0x43, 4096))
    await graph.close_all()
    assert_clean(v3)
    assert_snapshots_kept(v3, contents, tmp_path)
    compare_with(v3, pattern(0x42, MiB) + bytes(MiB) + pattern(0x43, 4096) + bytes(MiB - 4096),
                 tmp_path)  # fmt: skip

    v2 = create(tmp_path / "v2.qcow2", "1M", compat="0.10")
    qemu_io(v2, "write -P 0x42 0 64k")
    run("qemu-img", "snapshot", "-c", "s1", str(v2))
    before = v2.read_bytes()
    node = await open_qcow2(graph, v2, name="v2")
    with pytest.raises(BlockIOError, match=r"^Can't resize a v2 image which has snapshots$"):
        await node.truncate(2 * MiB)
    assert node.size == MiB
    await graph.close_all()
    assert v2.read_bytes() == before


# -- random sequences ---------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    compat = draw(st.sampled_from(["0.10", "1.1"]))
    cluster_size = 1 << draw(st.integers(9, 16))
    # at least two clusters; sector granular like qemu-img
    size = max(2 * cluster_size, 512 * draw(st.integers(1, 1024)))
    snapshots = draw(st.integers(1, 3))
    ops = []
    for _ in range(draw(st.integers(1, 14))):
        op = draw(st.sampled_from(["write", "write", "zero", "discard", "read", "flush"]))
        off = draw(st.integers(0, size - 1))
        n = draw(st.integers(1, min(size - off, 3 * cluster_size + 1000)))
        ops.append((op, off, n, draw(st.integers(1, 255))))
    return {
        "compat": compat,
        "cluster_size": cluster_size,
        "size": size,
        "snapshots": snapshots,
        "ops": ops,
    }


@property_settings
@given(sc=scenarios())
@example(
    sc={  # small clusters, three snapshots, every kind of change
        "compat": "1.1",
        "cluster_size": 512,
        "size": 96 * 1024,
        "snapshots": 3,
        "ops": [
            ("write", 100, 2000, 7),
            ("zero", 3000, 40000, 1),
            ("discard", 30000, 40000, 1),
            ("write", 0, 96 * 1024, 9),
            ("read", 0, 96 * 1024, 1),
        ],
    }
)
async def test_random_writes_keep_snapshots(sc: dict) -> None:
    """qemu-io writes and ``qemu-img snapshot -c`` in turn (1-3 snapshots), then
    random writes, zero writes, discards and flushes through blockd: each
    snapshot unchanged, the active view as modelled, qemu-img check clean,
    also once qemu-img has deleted every snapshot."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cs, size, compat = sc["cluster_size"], sc["size"], sc["compat"]
        img = create(tmp / "r.qcow2", size, compat=compat, cluster_size=cs)
        contents: dict[str, bytes] = {}
        for i in range(sc["snapshots"]):
            prefill(img, compat, cs, size, i)
            take_snapshot(img, f"s{i}", tmp, contents)
        qemu_io(img, f"write -P 0x77 {size // 2} {size // 4}", f"discard {size // 4} {cs}")
        model = bytearray(to_raw(img, tmp / "before.raw"))
        graph = BlockGraph()
        try:
            node = await open_qcow2(graph, img)
            for op, off, n, byte in sc["ops"]:
                await apply(node, model, cs, op, off, n, byte)
            assert await node.read(0, size) == bytes(model)
        finally:
            await graph.close_all()
        assert_clean(img)
        compare_with(img, bytes(model), tmp)
        assert_snapshots_kept(img, contents, tmp)
        # deleting them leaves exactly what the active view needs counted
        for name in contents:
            run("qemu-img", "snapshot", "-d", name, str(img))
        assert_clean(img)
        compare_with(img, bytes(model), tmp)


# -- power loss ---------------------------------------------------------------------


@pytest.mark.parametrize(("compat", "cluster_size"), [("1.1", 512), ("0.10", 4096)])
async def test_power_loss_keeps_snapshots(tmp_path: Path, compat: str, cluster_size: int) -> None:
    """The power goes at some I/O point of writes over shared clusters and tables:
    afterwards qemu-img check finds no corruption (leaks at most) and every
    snapshot still holds what it held."""
    cs = cluster_size
    size = 256 * KiB
    template = create(tmp_path / "template.qcow2", size, compat=compat, cluster_size=cs)
    contents: dict[str, bytes] = {}
    prefill(template, compat, cs, size, 0)
    take_snapshot(template, "s1", tmp_path, contents)
    qemu_io(template, f"write -P 0x41 {size // 4} {size // 4}")
    take_snapshot(template, "s2", tmp_path, contents)
    pristine = template.read_bytes()

    async def run_once(crash_at: int, seed: int) -> int:
        img = tmp_path / f"img-{crash_at}.qcow2"
        img.write_bytes(pristine)
        inner = await FileNode.open("f", str(img), read_only=False)
        power = Power(crash_at)
        file = VolatileFile(inner, power)
        node = await Qcow2Node.open("q", file, read_only=False)
        rng = random.Random(seed)
        try:
            for _ in range(12):
                op = rng.choice(["write", "write", "zero", "discard"])
                off = rng.randrange(0, size)
                n = rng.randrange(1, min(size - off, 6 * cs) + 1)
                if op == "write":
                    await node.write(off, pattern(rng.randrange(1, 256), n))
                elif op == "zero":
                    await node.write_zeroes(off, n)
                else:
                    await node.discard(off, n)
            await node.flush()
        except BlockIOError:
            assert power.lost
        await file.lose_power(random.Random(seed * 7 + crash_at))
        await inner.close()
        result = check(img)
        assert result.get("corruptions", 0) == 0, (crash_at, result)
        assert result.get("check-errors", 0) == 0, (crash_at, result)
        assert_snapshots_kept(img, contents, tmp_path)
        img.unlink()
        return power.ops

    total = await run_once(-1, 1)  # no crash: count the I/O points
    assert total > 40
    rng = random.Random(42)
    for k in sorted(rng.sample(range(1, total + 1), 12)):
        await run_once(k, 1)


# -- kill -------------------------------------------------------------------------


@pytest.mark.parametrize(("compat", "cluster_size"), [("1.1", 4096), ("0.10", 512)])
async def test_kill_at_any_io_point_keeps_snapshots(
    tmp_path: Path, compat: str, cluster_size: int
) -> None:
    """A kill (everything written stays) at each I/O point of a workload over
    shared tables and clusters: no corruption, leaks only in the windows crash
    safety pays for (``test_kill_leaks.py``: here also between an L1 entry
    pointing at a table's copy and the old table's decrement), every snapshot
    unchanged."""
    size = 1 << 20
    template = create(tmp_path / "template.qcow2", size, compat=compat, cluster_size=cluster_size)
    contents: dict[str, bytes] = {}
    prefill(template, compat, cluster_size, size, 0)
    take_snapshot(template, "s1", tmp_path, contents)
    pristine = template.read_bytes()

    async def run_once(kill_at: int) -> tuple[Path, list[tuple[str, int, int]]]:
        img = tmp_path / f"k{kill_at}.qcow2"
        img.write_bytes(pristine)
        inner = await FileNode.open("f", str(img), read_only=False)
        file = kill.KilledFile(inner, kill_at)
        node = await Qcow2Node.open("q", file, read_only=False)
        with contextlib.suppress(PowerLoss):  # killed: whatever was written stays
            await kill.workload(node, random.Random(5))
        await inner.close()
        return img, file.trace

    img, trace = await run_once(-1)
    bits = cluster_size.bit_length() - 1
    allowed = kill.windows(trace, kill.structures(img), bits)
    assert allowed
    # the points around pointer and refcount switches, and some others
    rng = random.Random(1)
    inside = sorted({k for w in allowed for k in w})
    points = set(rng.sample(inside, min(len(inside), 20)))
    points |= set(rng.sample(range(1, len(trace) + 1), min(len(trace), 15)))
    for k in sorted(points):
        img, _ = await run_once(k)
        result = check(img)
        assert result.get("corruptions", 0) == 0, (k, result)
        assert result.get("check-errors", 0) == 0, (k, result)
        if result.get("leaks", 0):
            assert any(k in w for w in allowed), (k, result, trace[max(0, k - 6) : k])
        assert_snapshots_kept(img, contents, tmp_path)
        img.unlink()


async def test_write_over_a_snapshot_l1_table_marks_corrupt(
    tmp_path: Path, graph: BlockGraph
) -> None:
    """An active L2 entry that points at a snapshot's L1 table (corrupt refcounts
    aside, the overlap check's business): the write is refused, as QEMU refuses
    it ("inactive L1 table"), and the snapshot's table is left as it was."""
    img = create(tmp_path / "o.qcow2", "1M")
    qemu_io(img, "write -P 0x42 0 64k")
    run("qemu-img", "snapshot", "-c", "s1", str(img))
    buf = bytearray(img.read_bytes())
    l1_offset = struct.unpack_from(">Q", buf, 40)[0]
    snapshots = struct.unpack_from(">Q", buf, 64)[0]
    snap_l1 = struct.unpack_from(">Q", buf, snapshots)[0]
    l2 = struct.unpack_from(">Q", buf, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", buf, l1_offset, l2 | 1 << 63)  # the table and the entry: "ours"
    struct.pack_into(">Q", buf, l2, snap_l1 | 1 << 63)
    img.write_bytes(bytes(buf))
    before = buf[snap_l1 : snap_l1 + 65536]
    node = await open_qcow2(graph, img)
    with pytest.raises(BlockIOError):
        await node.write(0, pattern(0x43, 4096))
    assert node.corrupt
    await graph.close_all()
    after = img.read_bytes()
    assert after[snap_l1 : snap_l1 + 65536] == before
    assert struct.unpack_from(">Q", after, 72)[0] & 2  # corrupt bit on disk


@pytest.mark.parametrize("active", [False, True], ids=["intermediate", "active"])
@pytest.mark.parametrize("host", [True, False], ids=["bulk", "read-write"])
async def test_power_loss_in_a_commit_into_a_base_with_snapshots(
    tmp_path: Path, active: bool, host: bool
) -> None:
    """``test_commit_power_loss.py``'s chain with a snapshot of base (512-byte
    clusters: the commit copies many shared L2 tables): at sampled I/O points
    of the commit the power goes; every image valid, every overlay's view as
    before, and base's snapshot as it was; on host file nodes (the bulk copy:
    shared tables copied among a batch's new ones) and on the other node."""
    template = tmp_path / "template"
    commit_power.make_chain(template)
    contents: dict[str, bytes] = {}
    take_snapshot(template / "base.qcow2", "s1", tmp_path, contents)
    before = {}
    for image in ("top", "top2"):
        before[image] = tmp_path / f"{image}.raw"
        to_raw(template / f"{image}.qcow2", before[image])
    mid_digest = commit_power.digest(template / "mid.qcow2")

    async def attempt(crash_at: int) -> int:
        d = tmp_path / f"run-{crash_at}"
        shutil.copytree(template, d)
        ops, done = await commit_power.commit_once(
            d, crash_at, active=active, seed=1, host=host
        )
        commit_power.judge(d, before, mid_digest, active=active, done=done)
        assert_snapshots_kept(d / "base.qcow2", contents, tmp_path)
        shutil.rmtree(d)
        return ops

    total = await attempt(-1)  # no power loss: count the I/O points
    assert total > 10
    for crash_at in sorted(random.Random(3).sample(range(1, total + 1), min(total, 20))):
        await attempt(crash_at)
