"""Dirty images (lazy refcounts not written back) are repaired on a read-write open.

The images are made dirty the way a crash makes them: qemu-io writes with lazy
refcounts on and is killed (``sigraise 9``) before it writes the counters
back.  qemu-img is the judge: ``check`` finds a repaired image clean, and the
guest view (``compare``) is what it was, also after a power loss at any point
of the repair.
"""

from __future__ import annotations

import json
import random
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.drivers.qcow2.refcount import get_refcount
from blockd.block.drivers.qcow2.repair import count_references, plan_repair, rebuild_refcounts
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import BlockIOError, ImageError
from tests.helpers import RawQMP, start_blockd
from tests.power import Power, VolatileFile

from .conftest import assert_clean, check, create, open_qcow2, qemu_io, run, to_raw

KiB = 1024
MiB = 1024 * KiB


def crash_writing(path: Path, *commands: str) -> None:
    """Run qemu-io's ``commands`` on ``path`` and kill it (SIGKILL) before it closes."""
    args = ["qemu-io", "-f", "qcow2"]
    for c in (*commands, "sigraise 9"):
        args += ["-c", c]
    proc = subprocess.run([*args, str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert "fail" not in proc.stdout.lower(), proc.stdout


def dirty_image(path: Path, *, cluster_size: int = 65536, refcount_bits: int = 16) -> Path:
    """A 4 MiB image with data written under lazy refcounts by a process that died."""
    create(path, 4 * MiB, cluster_size=cluster_size, refcount_bits=refcount_bits,
           extra="lazy_refcounts=on")
    qemu_io(path, "write -P 0x11 0 256k")  # counted: written before the crash session
    crash_writing(path, "write -P 0x5a 256k 1M", "write -P 0x33 3M 100k",
                  "write -z 0 64k", "discard 1M 64k")
    assert is_dirty(path)
    result = check(path)
    assert result.get("corruptions", 0) > 0, result  # counters really are missing
    return path


def is_dirty(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(hdr.OFF_INCOMPAT)
        return bool(struct.unpack(">Q", f.read(8))[0] & hdr.INCOMPAT_DIRTY)


async def open_unlocked(graph: BlockGraph, path: Path, *, read_only: bool = False) -> BlockNode:
    """Opened without image locks, so qemu-img can judge the image while it is open."""
    file = {"driver": "file", "filename": str(path), "locking": "off"}
    return await open_qcow2(graph, path, read_only=read_only, file=file)


def guest_view_equal(a: Path, b: Path) -> None:
    proc = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("cluster_size", "refcount_bits"), [(65536, 16), (512, 1), (4096, 64)])
async def test_rw_open_repairs_then_writes(
    tmp_path: Path, graph: BlockGraph, cluster_size: int, refcount_bits: int
) -> None:
    img = dirty_image(tmp_path / "d.qcow2", cluster_size=cluster_size,
                      refcount_bits=refcount_bits)
    before = tmp_path / "before.qcow2"
    before.write_bytes(img.read_bytes())
    node = await open_unlocked(graph, img)
    assert not is_dirty(img)  # repaired at open, before any write
    assert_clean(img)
    await node.write(2 * MiB, b"\x77" * (512 * KiB))  # new clusters: none may be in use
    await graph.close_all()
    assert_clean(img)
    qemu_io(img, "read -P 0x11 64k 192k", "read -P 0 0 64k", "read -P 0x5a 256k 768k",
            "read -P 0 1M 64k", "read -P 0x5a 1088k 192k", "read -P 0x77 2M 512k",
            "read -P 0x33 3M 100k")
    # the guest view of the dirty image did not change, except for the new write
    # qemu-io repairs it too, on its own (and says so)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 2M 512k", str(before))
    assert_clean(before)
    guest_view_equal(img, before)


async def test_read_only_open_writes_nothing(tmp_path: Path, graph: BlockGraph) -> None:
    img = dirty_image(tmp_path / "d.qcow2")
    raw = img.read_bytes()
    node = await open_qcow2(graph, img, read_only=True)
    assert await node.read(256 * KiB, 4) == b"\x5a" * 4
    await graph.close_all()
    assert img.read_bytes() == raw


async def test_reopen_read_write_repairs(tmp_path: Path, graph: BlockGraph) -> None:
    """The path of a commit's base: opened read-only, reopened read-write for the job."""
    img = dirty_image(tmp_path / "d.qcow2")
    node = await open_unlocked(graph, img, read_only=True)
    await node.reopen(read_only=False)
    assert not is_dirty(img)
    assert_clean(img)
    await node.write(2 * MiB, b"\x66" * MiB)
    await node.flush()
    assert_clean(img)
    qemu_io(img, "read -P 0x5a 256k 768k", "read -P 0x66 2M 1M", "read -P 0x33 3M 100k")


async def test_unrepairable_image_refused_untouched(tmp_path: Path, graph: BlockGraph) -> None:
    """Refused before anything is written (not even the autoclear bits are cleared)."""
    img = create(tmp_path / "d.qcow2", 4 * MiB, extra="lazy_refcounts=on")
    run("qemu-img", "bitmap", "--add", str(img), "b0")
    crash_writing(img, "write -P 0x5a 0 1M", "write -P 0x33 3M 100k")
    buf = bytearray(img.read_bytes())
    assert struct.unpack_from(">Q", buf, hdr.OFF_AUTOCLEAR)[0] == 1
    l1 = struct.unpack_from(">Q", buf, 40)[0]
    l2 = struct.unpack_from(">Q", buf, l1)[0] & 0x00FFFFFFFFFFFE00
    assert struct.unpack_from(">Q", buf, l2 + 8)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", buf, l2 + 8, (1 << 63) | (len(buf) + (64 << 20)) & ~0xFFFF)
    img.write_bytes(bytes(buf))
    with pytest.raises(ImageError, match=r"past the end of the file.*qemu-img check -r all"):
        await open_qcow2(graph, img)
    assert img.read_bytes() == bytes(buf)
    node = await open_qcow2(graph, img, read_only=True)
    assert await node.read(3 * MiB, 4) == b"\x33" * 4
    with pytest.raises(ImageError, match="past the end of the file"):
        await node.reopen(read_only=False)
    assert node.read_only
    assert await node.read(3 * MiB, 4) == b"\x33" * 4
    await graph.close_all()
    assert img.read_bytes() == bytes(buf)


def snapshot_image(path: Path) -> Path:
    """A dirty image with two internal snapshots sharing clusters with the active layer."""
    create(path, 4 * MiB, extra="lazy_refcounts=on")
    qemu_io(path, "write -P 0x21 0 2M")
    run("qemu-img", "snapshot", "-c", "s1", str(path))
    qemu_io(path, "write -P 0x22 1M 512k")
    run("qemu-img", "snapshot", "-c", "s2", str(path))
    crash_writing(path, "write -P 0x23 1536k 1M", "write -P 0x24 64k 64k")
    assert is_dirty(path)
    return path


async def test_recount_matches_qemu_repair_with_snapshots(tmp_path: Path) -> None:
    """Every cluster's count equals what ``qemu-img check -r all`` settles on."""
    img = snapshot_image(tmp_path / "s.qcow2")
    fixed = tmp_path / "fixed.qcow2"
    fixed.write_bytes(img.read_bytes())
    run("qemu-img", "check", "-r", "all", str(fixed), check=False)
    assert_clean(fixed)
    assert not is_dirty(fixed)

    inner = await FileNode.open("f", str(img), read_only=True)
    node = await Qcow2Node.open("q", inner, read_only=True)
    counts = await count_references(inner, node.header, node._mapping.l1, node.snapshots,
                                    node._snapshot_table_bytes)
    await inner.close()

    fixed_file = await FileNode.open("g", str(fixed), read_only=True)
    judge = await Qcow2Node.open("j", fixed_file, read_only=True)
    h = judge.header
    cs = h.cluster_size
    structure = {h.refcount_table_offset // cs + i for i in range(h.refcount_table_clusters)}
    structure |= {e // cs for e in judge._refs.table if e}
    per_block = cs * 8 // h.refcount_bits
    shared = 0
    for c in range(len(counts)):
        if c in structure:
            continue
        block = judge._refs.table[c // per_block] if c // per_block < len(judge._refs.table) else 0
        want = 0
        if block:
            raw = await fixed_file.read(block, cs)
            want = get_refcount(raw, c % per_block, h.refcount_bits)
        assert counts[c] == want, (c, counts[c], want)
        shared += want > 1
    await fixed_file.close()
    assert shared > 0  # the snapshots' clusters were counted


async def test_rebuild_with_snapshots_keeps_them(tmp_path: Path) -> None:
    """The rebuild itself on an image with snapshots: clean (OFLAG_COPIED
    corrected too), and every snapshot intact.

    Nodes with snapshots open read-only, so the rebuild runs here on a
    read-only node's tables over a writable file.
    """
    img = snapshot_image(tmp_path / "s.qcow2")
    flip_copied_flags(img)  # corrected on the way
    views = {}
    for name in ("s1", "s2"):
        out = tmp_path / f"{name}.raw"
        run("qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw", str(img), str(out))
        views[name] = out.read_bytes()
    active = to_raw(img, tmp_path / "active.raw")

    inner = await FileNode.open("f", str(img), read_only=False)
    node = await Qcow2Node.open("q", inner, read_only=True)
    counts = await count_references(inner, node.header, node._mapping.l1, node.snapshots,
                                    node._snapshot_table_bytes)
    repair = await plan_repair(inner, node.header, node._mapping, node._meta, counts)
    await rebuild_refcounts(inner, node.header, node._mapping, node._refs, node._meta, repair)
    await inner.close()

    assert not is_dirty(img)
    assert_clean(img)
    for name, view in views.items():
        out = tmp_path / f"{name}-after.raw"
        run("qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw", str(img), str(out))
        assert out.read_bytes() == view, name
    assert to_raw(img, tmp_path / "active-after.raw") == active


@pytest.mark.parametrize(("cluster_size", "refcount_bits"), [(65536, 16), (512, 64)])
async def test_power_loss_during_repair(
    tmp_path: Path, cluster_size: int, refcount_bits: int
) -> None:
    """A crash at every I/O point of the repair: the image reads the same to
    qemu-img and to blockd, is dirty (and repaired by the next open, ours or
    QEMU's) or clean by qemu-img check."""
    src = dirty_image(tmp_path / "src.qcow2", cluster_size=cluster_size,
                      refcount_bits=refcount_bits)
    view = to_raw(src, tmp_path / "src.raw")

    async def run_once(crash_at: int, seed: int) -> int:
        img = tmp_path / f"img-{crash_at}.qcow2"
        img.write_bytes(src.read_bytes())
        inner = await FileNode.open("f", str(img), read_only=False)
        power = Power(crash_at)
        file = VolatileFile(inner, power)
        try:
            node = await Qcow2Node.open("q", file, read_only=False)
            await node.flush()
        except BlockIOError:
            assert power.lost
        await file.lose_power(random.Random(seed * 7 + crash_at))

        assert to_raw(img, tmp_path / "after.raw") == view, crash_at  # qemu-img's view
        ro_file = await FileNode.open("r", str(img), read_only=True)
        ro = await Qcow2Node.open("r", ro_file, read_only=True)
        assert await ro.read(0, ro.size) == view, crash_at  # blockd's view
        await ro_file.close()
        if not is_dirty(img):
            result = check(img)
            assert not result.get("corruptions") and not result.get("check-errors"), result
        qemu_copy = tmp_path / "qemu-copy.qcow2"
        qemu_copy.write_bytes(img.read_bytes())
        # the next read-write open repairs whatever is left: blockd's ...
        again = await FileNode.open("a", str(img), read_only=False)
        await Qcow2Node.open("a", again, read_only=False)
        await again.close()
        assert_clean(img)
        assert to_raw(img, tmp_path / "after.raw") == view, crash_at
        # ... and QEMU's (qemu-io opens read-write and repairs a dirty image)
        run("qemu-io", "-f", "qcow2", "-c", "read -P 0x33 3M 100k", str(qemu_copy))
        assert_clean(qemu_copy)
        img.unlink()
        return power.ops

    total = await run_once(-1, 1)  # no crash: count the I/O points
    assert total >= 6
    for k in range(1, total + 1):
        await run_once(k, k)


def test_sigkill_daemon_during_repair(tmp_path: Path) -> None:
    """A real daemon killed at moments spread over a blockdev-add that repairs
    (every I/O point of the repair is covered by the power-loss test above)."""
    src = tmp_path / "src.qcow2"
    create(src, 16 * MiB, cluster_size=512, extra="lazy_refcounts=on")
    crash_writing(src, "write -P 0x5a 0 6M", "write -P 0x5b 10M 1M")
    view = to_raw(src, tmp_path / "src.raw")

    def attempt(name: str, kill_after: float | None) -> float:
        img = tmp_path / f"{name}.qcow2"
        img.write_bytes(src.read_bytes())
        daemon = start_blockd(tmp_path / f"{name}.sock")
        try:
            with RawQMP(daemon.socket_path) as qmp:
                qmp.negotiate()
                t0 = time.monotonic()
                qmp.send(json.dumps({"execute": "blockdev-add", "arguments": {
                    "driver": "qcow2", "node-name": "n",
                    "file": {"driver": "file", "filename": str(img)}}}))  # fmt: skip
                if kill_after is None:
                    assert qmp.read_reply() == {"return": {}}
                    return time.monotonic() - t0
                time.sleep(kill_after)
                daemon.signal(signal.SIGKILL)
                daemon.wait()
        finally:
            daemon.stop()
        assert to_raw(img, tmp_path / "after.raw") == view, kill_after
        if not is_dirty(img):
            result = check(img)
            assert not result.get("corruptions") and not result.get("check-errors"), result
        return 0.0

    took = attempt("whole", None)
    assert not is_dirty(tmp_path / "whole.qcow2")
    assert_clean(tmp_path / "whole.qcow2")
    for k in (2, 4, 6, 8, 10):  # some kills come after the end
        attempt(f"k{k}", took * k / 8)


async def test_dirty_image_with_bitmap(tmp_path: Path, graph: BlockGraph) -> None:
    """The bitmaps' clusters are not counted: the open clears their autoclear bit
    first, after which no reader follows the extension (they become free)."""
    img = create(tmp_path / "b.qcow2", 4 * MiB, extra="lazy_refcounts=on")
    qemu_io(img, "write -P 0x11 0 1M")
    run("qemu-img", "bitmap", "--add", str(img), "b0")
    crash_writing(img, "write -P 0x12 2M 1M")
    assert is_dirty(img)
    await open_unlocked(graph, img)
    assert_clean(img)
    await graph.close_all()
    assert "b0" not in run("qemu-img", "info", str(img)).stdout
    qemu_io(img, "read -P 0x11 0 1M", "read -P 0x12 2M 1M")


def flip_copied_flags(path: Path) -> None:
    """Set OFLAG_COPIED on one shared data cluster's active L2 entry and clear it on
    an unshared one: both wrong, and QEMU's check calls both corruption."""
    buf = bytearray(path.read_bytes())
    l1_off = struct.unpack_from(">Q", buf, 40)[0]
    l2_off = struct.unpack_from(">Q", buf, l1_off)[0] & 0x00FFFFFFFFFFFE00
    entries = [struct.unpack_from(">Q", buf, l2_off + 8 * i)[0] for i in range(8192)]
    shared = next(i for i, e in enumerate(entries) if e and not e >> 63)
    owned = next(i for i, e in enumerate(entries) if e >> 63)
    struct.pack_into(">Q", buf, l2_off + 8 * shared, entries[shared] | 1 << 63)
    struct.pack_into(">Q", buf, l2_off + 8 * owned, entries[owned] & ~(1 << 63))
    path.write_bytes(bytes(buf))


async def test_dirty_image_with_compressed_clusters(tmp_path: Path, graph: BlockGraph) -> None:
    """Compressed streams are counted by the host clusters their bytes cover
    (several streams may share one)."""
    img = create(tmp_path / "c.qcow2", 4 * MiB, extra="lazy_refcounts=on")
    qemu_io(img, "write -c -P 0x41 0 256k")
    crash_writing(img, "write -c -P 0x42 1M 512k", "write -P 0x43 3M 64k")
    assert is_dirty(img)
    fixed = tmp_path / "fixed.qcow2"
    fixed.write_bytes(img.read_bytes())
    run("qemu-img", "check", "-r", "all", str(fixed), check=False)
    await open_unlocked(graph, img)
    assert_clean(img)
    await graph.close_all()
    guest_view_equal(img, fixed)
    qemu_io(img, "read -P 0x41 0 256k", "read -P 0x42 1M 512k", "read -P 0x43 3M 64k")
