"""File-to-file copies between qcow2 images (map_data / write_from_host), as commit uses them."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from blockd.block.drivers.file import FileNode
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode, HostExtents, Status
from blockd.errors import BlockIOError
from tests.power import count_syncs

from .conftest import assert_clean, compare_with, create, open_qcow2, qemu_io, run

KiB = 1024
MiB = 1 << 20


def _fill(rng: random.Random, path: Path, size: int, step: int) -> None:
    cmds = []
    for off in range(0, size, step):
        what = rng.choice(["data", "data", "zero", "none"])
        n = min(rng.randrange(1, step // 512 + 1) * 512, size - off)
        if what == "data":
            cmds.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
        elif what == "zero":
            cmds.append(f"write -z {off} {n}")
    if cmds:
        qemu_io(path, *cmds)


async def _image(graph: BlockGraph, path: Path, name: str, read_only: bool = False) -> BlockNode:
    return await open_qcow2(graph, path, name=name, read_only=read_only, backing=None)


@pytest.mark.parametrize(("src_cluster", "dst_cluster", "batch"), [
    (65536, 65536, True), (65536, 65536, False), (4096, 65536, True), (65536, 4096, True),
    (512, 2048, True),
])
async def test_copy_between_images(
    graph: BlockGraph, tmp_path: Path, src_cluster: int, dst_cluster: int, batch: bool
) -> None:
    rng = random.Random(src_cluster * 7 + dst_cluster + batch)
    size = 4 * MiB
    src_path = create(tmp_path / "src.qcow2", size, cluster_size=src_cluster)
    dst_path = create(tmp_path / "dst.qcow2", size, cluster_size=dst_cluster)
    _fill(rng, src_path, size, 96 * KiB)
    _fill(rng, dst_path, size, 160 * KiB)  # some clusters in place, some allocated
    src = await _image(graph, src_path, "src", read_only=True)
    dst = await _image(graph, dst_path, "dst")
    expected = bytearray(await dst.read(0, size))
    # the data runs of src, as commit finds them
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        status, n = await src.block_status(pos, size - pos)
        if status is Status.DATA:
            runs.append((pos, n))
        pos += n
    assert runs
    mapped: list[tuple[int, int, HostExtents]] = []
    for (off, n), ext in zip(runs, await src.map_data(runs), strict=True):
        assert ext is not None
        assert sum(p[2] for p in ext.pieces) == n
        mapped.append((off, n, ext))
        expected[off : off + n] = await src.read(off, n)
    try:
        done = await dst.write_many_from_host(mapped) if batch else False
        if not done:
            for off, n, ext in mapped:
                assert await dst.write_from_host(off, n, ext)
    finally:
        for _o, _n, ext in mapped:
            ext.release()
    assert await dst.read(0, size) == bytes(expected)
    await graph.close_all()
    compare_with(dst_path, bytes(expected), tmp_path)
    assert_clean(dst_path)
    assert_clean(src_path)


async def test_a_batch_makes_its_new_l2_tables_together(
    graph: BlockGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch into an empty image that needs a new L2 table for every range
    syncs the file a few times in all, not a few times per table (a 1 TiB
    commit of scattered clusters made 2,048 tables, three syncs each), and
    the image is whole: qemu-img reads the data back and finds no fault."""
    size = 64 * MiB
    src_path = create(tmp_path / "src.qcow2", size, cluster_size=4096)
    # 4 KiB clusters: an L2 table maps 2 MiB, so 32 of them cover the disk
    dst_path = create(tmp_path / "dst.qcow2", size, cluster_size=4096)
    ranges = [(k * 2 * MiB + 8 * KiB, 8 * KiB) for k in range(size // (2 * MiB))]
    qemu_io(src_path, *(f"write -P {k % 250 + 1} {o} {n}" for k, (o, n) in enumerate(ranges)))
    src = await _image(graph, src_path, "src", read_only=True)
    dst = await _image(graph, dst_path, "dst")
    expected = bytearray(size)
    mapped: list[tuple[int, int, HostExtents]] = []
    for (off, n), ext in zip(ranges, await src.map_data(ranges), strict=True):
        assert ext is not None
        mapped.append((off, n, ext))
        expected[off : off + n] = await src.read(off, n)
    syncs = count_syncs(monkeypatch)
    try:
        assert await dst.write_many_from_host(mapped)
    finally:
        for _o, _n, ext in mapped:
            ext.release()
    assert len(syncs) <= 8
    monkeypatch.undo()
    await graph.close_all()
    compare_with(dst_path, bytes(expected), tmp_path)
    assert_clean(dst_path)


async def test_batch_sharing_a_cluster_is_refused(graph: BlockGraph, tmp_path: Path) -> None:
    src_path = create(tmp_path / "src.qcow2", MiB, cluster_size=4096)
    dst_path = create(tmp_path / "dst.qcow2", MiB, cluster_size=65536)
    qemu_io(src_path, "write -P 1 0 4k", "write -P 2 8k 4k")
    src = await _image(graph, src_path, "src", read_only=True)
    dst = await _image(graph, dst_path, "dst")
    a, b = await src.map_data([(0, 4096), (8192, 4096)])
    assert a is not None and b is not None
    assert not await dst.write_many_from_host([(0, 4096, a), (8192, 4096, b)])
    assert await dst.write_from_host(0, 4096, a)
    assert await dst.write_from_host(8192, 4096, b)
    a.release()
    b.release()
    assert await dst.read(0, 12288) == b"\1" * 4096 + bytes(4096) + b"\2" * 4096


async def test_map_data_only_for_plain_data(graph: BlockGraph, tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", MiB)
    qemu_io(path, "write -P 1 0 64k", "write -z 64k 64k")
    img = await _image(graph, path, "img", read_only=True)
    [ext] = await img.map_data([(0, 65536)])
    assert ext is not None and len(ext.pieces) == 1
    ext.release()
    # zero cluster, unallocated, nothing
    assert await img.map_data([(0, 128 * KiB), (128 * KiB, 64 * KiB), (0, 0)]) == [None] * 3


async def test_map_data_of_compressed_clusters_is_none(graph: BlockGraph, tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"abc" * (MiB // 3) + b"a")
    path = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(path))
    img = await _image(graph, path, "img", read_only=True)
    assert await img.map_data([(0, 65536)]) == [None]


@pytest.mark.parametrize("cluster_size", [512, 65536])
async def test_readinto_matches_read(graph: BlockGraph, tmp_path: Path, cluster_size: int) -> None:
    size = 3 * MiB + 512
    base_path = create(tmp_path / "base.qcow2", 2 * MiB, cluster_size=cluster_size)
    top_path = create(tmp_path / "top.qcow2", size, cluster_size=cluster_size,
                      backing=base_path)
    qemu_io(base_path, "write -P 7 0 2M")
    qemu_io(top_path, "write -P 1 4k 100k", "write -z 512k 128k", "write -P 3 1M 1M")
    raw = tmp_path / "c.raw"
    raw.write_bytes(b"xyz" * 100000)
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster_size}",
        str(raw), str(tmp_path / "c.qcow2"))
    top = await open_qcow2(graph, top_path, read_only=True)
    comp = await open_qcow2(graph, tmp_path / "c.qcow2", read_only=True)
    rng = random.Random(cluster_size)
    for node in (top, comp):
        for _ in range(30):
            off = rng.randrange(0, node.size)
            n = rng.randrange(0, min(node.size - off, 700 * KiB) + 1)
            buf = bytearray(n + 3)
            await node.readinto(off, memoryview(buf)[1 : n + 1])
            assert bytes(buf[1 : n + 1]) == await node.read(off, n)
            assert buf[0] == 0 and buf[n + 1 :] == b"\0\0"
    with pytest.raises(BlockIOError):
        await top.readinto(0, b"readonly")  # type: ignore[arg-type]


@pytest.mark.parametrize("cluster_size", [4096, 65536])
async def test_concurrent_allocating_writes(
    graph: BlockGraph, tmp_path: Path, cluster_size: int
) -> None:
    """Allocating writes flush outside the lock; writers sharing a cluster still
    must not lose each other's bytes (disjoint bytes, shared clusters)."""
    size = 8 * MiB
    base_path = create(tmp_path / "base.qcow2", size, cluster_size=cluster_size)
    qemu_io(base_path, "write -P 9 0 8M")
    path = create(tmp_path / "img.qcow2", size, cluster_size=cluster_size, backing=base_path)
    qemu_io(path, "write -P 5 1M 1M", "write -z 3M 64k")
    node = await open_qcow2(graph, path)
    expected = bytearray(b"\x09" * size)
    expected[MiB : 2 * MiB] = b"\x05" * MiB
    expected[3 * MiB : 3 * MiB + 65536] = bytes(65536)
    tasks = 6
    stripe = 3000  # bytes: every cluster is shared by several tasks
    rng = random.Random(cluster_size)

    async def writer(t: int) -> None:
        order = list(range(t, size // stripe, tasks))
        rng.shuffle(order)
        for k in order[:120]:
            data = bytes([t + 16]) * stripe
            await node.write(k * stripe, data)
            expected[k * stripe : (k + 1) * stripe] = data
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for t in range(tasks):
            nursery.start_soon(writer, t)
    await graph.close_all()
    # what qemu sees through the real backing file is what we wrote
    compare_with(path, bytes(expected), tmp_path)
    assert_clean(path)


@pytest.mark.parametrize("kernel_copy", [True, False])
async def test_file_copy_many(tmp_path: Path, kernel_copy: bool,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernel_copy:
        def refuse(*_args: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    payload = random.Random(3).randbytes(3 * MiB)
    src_path.write_bytes(payload)
    dst_path.write_bytes(b"\xff" * MiB)
    src = await FileNode.open("src", str(src_path), read_only=True)
    dst = await FileNode.open("dst", str(dst_path), read_only=False)
    try:
        # in order, out of order, growing the file, and past the source's end
        await dst.copy_many([(4096, src, 0, 100_000), (2 * MiB, src, MiB, 2 * MiB),
                             (200_000, src, 3 * MiB - 1000, 5000)])
        await dst.copy_from(5 * MiB, src, 3 * MiB, 1000)
        assert dst.size == 5 * MiB + 1024  # the file has 5 MiB + 1000 bytes: whole sectors
    finally:
        await src.close()
        await dst.close()
    out = dst_path.read_bytes()
    assert out[:4096] == b"\xff" * 4096
    assert out[4096 : 4096 + 100_000] == payload[:100_000]
    assert out[200_000 : 201_000] == payload[-1000:]
    assert out[201_000 : 205_000] == bytes(4000)  # the source ended: zeros
    assert out[2 * MiB : 4 * MiB] == payload[MiB:]
    assert out[5 * MiB :] == bytes(1000)
