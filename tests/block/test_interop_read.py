"""Images written by QEMU, read back through our nodes, judged by qemu-img convert."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from blockd.block.graph import BlockGraph
from blockd.block.node import Status

from .conftest import assert_clean, create, open_qcow2, qemu_io, run, to_raw

MiB = 1 << 20


async def read_all(node, chunk: int = 3 * MiB + 4097) -> bytes:
    out = bytearray()
    pos = 0
    while pos < node.size:
        n = min(chunk, node.size - pos)
        out += await node.read(pos, n)
        pos += n
    return bytes(out)


@pytest.mark.parametrize(
    ("compat", "cluster_size", "refcount_bits"),
    [
        ("0.10", 65536, 16),
        ("1.1", 512, 1),
        ("1.1", 4096, 64),
        ("1.1", 65536, 8),
        ("1.1", 2 * MiB, 32),
        ("0.10", 1024, 16),
    ],
)
async def test_read_patterns(
    tmp_path: Path, graph: BlockGraph, compat: str, cluster_size: int, refcount_bits: int
) -> None:
    img = create(
        tmp_path / "a.qcow2",
        6 * MiB + 1536,
        compat=compat,
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
    )
    qemu_io(
        img,
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 3000",
        "write -P 0x33 1M 1M",
        "write -z 1536k 128k",
        "write -P 0x44 5M 1M",
        "discard 5M 64k" if compat == "1.1" else "write -P 0x55 5M 4k",
        f"write -P 0x66 {6 * MiB} 1536",
    )
    expected = to_raw(img, tmp_path / "a.raw")
    node = await open_qcow2(graph, img, read_only=True)
    assert node.size == len(expected)
    assert await read_all(node) == expected
    # unaligned small reads
    for off, n in [(1, 1), (65535, 2), (100 * 1024 - 1, 3002), (6 * MiB + 1000, 536)]:
        assert await node.read(off, n) == expected[off : off + n]


async def test_read_compressed(tmp_path: Path, graph: BlockGraph) -> None:
    src = create(tmp_path / "src.qcow2", 4 * MiB)
    qemu_io(src, "write -P 0x5a 0 1M", "write -P 0xa5 1536k 100k", "write -P 0x01 3M 7")
    comp = tmp_path / "comp.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(comp))
    expected = to_raw(src, tmp_path / "src.raw")
    node = await open_qcow2(graph, comp, read_only=True)
    assert await read_all(node) == expected
    status, n = await node.block_status(0, 4 * MiB)
    assert status is Status.DATA
    assert n >= 65536


@pytest.mark.parametrize("cluster_size", [4096, 65536, 2 * MiB])
async def test_read_and_overwrite_zstd_compressed(
    tmp_path: Path, graph: BlockGraph, cluster_size: int
) -> None:
    src = create(tmp_path / "src.qcow2", 6 * MiB, cluster_size=cluster_size)
    qemu_io(src, "write -P 0x5a 0 1M", "write -P 0xa5 1536k 100k", "write -P 0x01 5M 7")
    comp = tmp_path / "zstd.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
        f"compression_type=zstd,cluster_size={cluster_size}", str(src), str(comp))  # fmt: skip
    expected = bytearray(to_raw(src, tmp_path / "src.raw"))
    node = await open_qcow2(graph, comp)
    assert await read_all(node) == expected
    # A write into a compressed cluster moves it to a normal one.
    await node.write(1536 * 1024 + 10, b"\x77" * 5000)
    expected[1536 * 1024 + 10 : 1536 * 1024 + 5010] = b"\x77" * 5000
    await graph.close_all()
    assert to_raw(comp, tmp_path / "after.raw") == expected
    assert_clean(comp)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_read_backing_chain(tmp_path: Path, graph: BlockGraph, compat: str) -> None:
    base = create(tmp_path / "base.qcow2", 2 * MiB, compat=compat, cluster_size=4096)
    qemu_io(base, "write -P 0xbb 0 2M")
    mid = create(
        tmp_path / "mid.qcow2",
        3 * MiB,
        compat=compat,
        cluster_size=65536,
        backing=Path("base.qcow2"),
    )
    qemu_io(mid, "write -P 0xcc 64k 64k", "write -P 0xcd 1M 100")
    top = create(tmp_path / "top.qcow2", 4 * MiB, compat=compat, cluster_size=512, backing=mid)
    cmds = ["write -P 0xdd 1000 5000"]
    if compat == "1.1":
        cmds.append("write -z 128k 64k")
    qemu_io(top, *cmds)
    expected = to_raw(top, tmp_path / "top.raw")
    node = await open_qcow2(graph, top, read_only=True)
    assert node.backing is not None
    assert node.backing.backing is not None
    assert node.backing.read_only
    assert node.backing.node_name.startswith("#block")
    assert await read_all(node) == expected
    chain = list(graph.chain(node))
    assert [n.filename for n in chain] == [
        str(top),
        str(tmp_path / "mid.qcow2"),
        str(tmp_path / "base.qcow2"),
    ]


async def test_block_status_and_allocated_above(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 1 0 1M")
    top = create(tmp_path / "top.qcow2", 1 * MiB, backing=base)
    qemu_io(top, "write -P 2 64k 64k", "write -z 192k 128k")
    node = await open_qcow2(graph, top, read_only=True)
    assert await node.block_status(0, MiB) == (Status.UNALLOCATED, 65536)
    assert await node.block_status(65536, MiB - 65536) == (Status.DATA, 65536)
    assert await node.block_status(192 * 1024, 256 * 1024) == (Status.ZERO, 128 * 1024)
    assert node.backing is not None
    assert await graph.is_allocated_above(node, node.backing, 0, MiB) == (False, 65536)
    assert await graph.is_allocated_above(node, node.backing, 65536, MiB - 65536) == (True, 65536)
    assert await graph.is_allocated_above(node, None, 0, MiB) == (True, 65536)
    assert await graph.is_allocated_above(node, node.backing, 320 * 1024, 100) == (False, 100)


async def test_block_status_on_huge_sparse_image_is_cheap(
    tmp_path: Path, graph: BlockGraph
) -> None:
    import time

    img = create(tmp_path / "huge.qcow2", "64G")
    qemu_io(img, "write -P 1 0 64k", "write -P 2 40G 64k")
    node = await open_qcow2(graph, img, read_only=True)
    t0 = time.monotonic()
    assert await node.block_status(0, node.size) == (Status.DATA, 65536)
    extents = []
    pos = 0
    while pos < node.size:
        allocated, n = await graph.is_allocated_above(node, None, pos, node.size - pos)
        if extents and extents[-1][0] == allocated:
            extents[-1] = (allocated, extents[-1][1] + n)
        else:
            extents.append((allocated, n))
        pos += n
    assert extents == [(True, 65536), (False, 40 * 2**30 - 65536), (True, 65536),
                       (False, 24 * 2**30 - 65536)]
    assert time.monotonic() - t0 < 5


def qemu_map(path: Path) -> list[dict]:
    return json.loads(run("qemu-img", "map", "--output=json", str(path)).stdout)


@pytest.mark.parametrize("seed", range(4))
async def test_is_allocated_above_matches_qemu_img_map(
    tmp_path: Path, graph: BlockGraph, seed: int
) -> None:
    rng = random.Random(seed)
    sizes = [MiB, 3 * MiB // 2, 2 * MiB]  # base, mid, top: each bigger than the last
    paths: list[Path] = []
    for depth, size in enumerate(sizes):
        p = create(tmp_path / f"l{depth}.qcow2", size,
                   cluster_size=rng.choice([512, 4096, 65536]),
                   backing=paths[-1] if paths else None)
        cmds = []
        for _ in range(6):
            off = rng.randrange(0, size // 512) * 512
            n = min(rng.randrange(1, 64) * 4096, size - off)
            cmds.append(f"write {'-z' if rng.random() < 0.3 else '-P 9'} {off} {n}")
        qemu_io(p, *cmds)
        paths.append(p)
    top = await open_qcow2(graph, paths[-1], read_only=True)
    chain = list(graph.chain(top))
    qmap = qemu_map(paths[-1])
    sector = 512
    nsec = top.size // sector
    depth_of = [0] * nsec
    present = [False] * nsec
    for e in qmap:
        for s in range(e["start"] // sector, (e["start"] + e["length"]) // sector):
            depth_of[s], present[s] = e["depth"], e["present"]
    sizes_from_top = list(reversed(sizes))
    for base_depth in (1, 2, 3):  # base = mid, base = l0, no base
        base = chain[base_depth] if base_depth < len(chain) else None
        expected = []
        for s in range(nsec):
            allocated = present[s] and depth_of[s] < base_depth
            # qemu-img map shows "absent" past a short intermediate layer, but
            # QEMU's is_allocated_above counts those synthesised zeros as allocated
            short = any(s * sector >= sizes_from_top[d] for d in range(1, base_depth)
                        if d < len(sizes_from_top))
            expected.append(allocated or (not present[s] and short))
        got: list[bool] = []
        pos = 0
        while pos < top.size:
            allocated, n = await graph.is_allocated_above(top, base, pos, top.size - pos)
            assert n % sector == 0
            got.extend([allocated] * (n // sector))
            pos += n
        assert got == expected, base_depth
