"""BlockNode.direct_io on qcow2: which requests it resolves, and to which host bytes.

The NBD server moves resolved requests' bytes itself, so a wrong answer here
would write guest data over metadata or read the wrong cluster: qemu-img map
is the judge of where each guest cluster lies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode

from .conftest import create, data_on_refcount_block, open_qcow2, qemu_io, run

K = 1024


def host_of(img: Path, guest: int) -> int:
    """Where qemu-img map says guest offset ``guest`` lies in the file."""
    extents = json.loads(run("qemu-img", "map", "-U", "--output=json", str(img)).stdout)
    for ext in extents:
        if ext["start"] <= guest < ext["start"] + ext["length"] and ext["data"]:
            return int(ext["offset"]) + guest - int(ext["start"])
    raise AssertionError(f"guest offset {guest} is not mapped")


def resolved(
    node: BlockNode, offset: int, length: int, write: bool
) -> list[tuple[int, int]] | None:
    """direct_io's pieces, or None; the range is released at once (a held one
    would keep the node's close waiting, and a failing test hanging)."""
    io = node.direct_io(offset, length, write)
    if io is None:
        return None
    io.release()
    return io.pieces


async def test_one_cluster_and_several(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "d.qcow2", "1M")
    qemu_io(img, "write -P 1 0 64k", "write -P 2 128k 64k", "write -P 3 64k 64k")
    node = await open_qcow2(graph, img)
    assert resolved(node, 4 * K, 4 * K, True) is None  # its L2 table is not cached yet
    await node.read(0, 4 * K)
    assert resolved(node, 4 * K, 4 * K, True) == [(host_of(img, 4 * K), 4 * K)]
    # guest clusters 0 and 1 were allocated apart (cluster 2 came between)
    assert resolved(node, 60 * K, 8 * K, False) == [
        (host_of(img, 60 * K), 4 * K),
        (host_of(img, 64 * K), 4 * K),
    ]


async def test_bytes_written_through_it_read_back(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "d.qcow2", "1M")
    qemu_io(img, "write -P 1 0 128k")
    node = await open_qcow2(graph, img)
    await node.read(0, 4 * K)
    io = node.direct_io(62 * K, 4 * K, True)
    assert io is not None
    try:
        pos = 0
        for host, n in io.pieces:
            os.pwrite(io.fd, b"\x77" * n, host)
            pos += n
    finally:
        io.release()
    assert await node.read(60 * K, 8 * K) == b"\x01" * 2 * K + b"\x77" * 4 * K + b"\x01" * 2 * K
    await graph.close_all()
    qemu_io(img, "read -P 0x77 62k 4k", "read -P 1 0 62k", "read -P 1 66k 62k")


async def test_what_it_leaves_to_the_ordinary_path(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "d.qcow2", "1M")
    qemu_io(img, "write -P 1 0 64k", "write -z 64k 64k")
    node = await open_qcow2(graph, img)
    await node.read(0, 4 * K)
    assert resolved(node, 128 * K, 4 * K, False) is None  # unallocated
    assert resolved(node, 64 * K, 4 * K, True) is None  # zero cluster
    assert resolved(node, 60 * K, 8 * K, True) is None  # half of it in the zero cluster
    assert resolved(node, 1024 * K - 512, 1024, False) is None  # past the end
    await graph.close_all()
    ro = await open_qcow2(graph, img, read_only=True)
    await ro.read(0, 4 * K)
    assert resolved(ro, 0, 4 * K, True) is None
    assert resolved(ro, 0, 4 * K, False) == [(host_of(img, 0), 4 * K)]


async def test_refuses_a_write_onto_metadata(tmp_path: Path, graph: BlockGraph) -> None:
    img = tmp_path / "m.qcow2"
    data_on_refcount_block(img)
    node = await open_qcow2(graph, img)
    await node.read(0, 4 * K)
    # the ordinary path must see this write, to refuse it and mark the image corrupt
    assert resolved(node, 512, 512, True) is None
    assert resolved(node, 0, 128 * K, True) is None
