"""Changing the backing file name atomically: new name first, then one pointer write."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from blockd.block.graph import BlockGraph
from tests.block.conftest import assert_clean, create, open_qcow2, run

MiB = 1 << 20


def header_pointer(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        f.seek(8)
        offset, size = struct.unpack(">QI", f.read(12))
    return offset, size


def backing_name(path: Path) -> str:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(path)).stdout)
    return str(info["backing-filename"])


async def test_repoint_keeps_the_old_name_until_the_pointer_moves(
    tmp_path: Path, graph: BlockGraph
) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    create(tmp_path / "mid.qcow2", MiB, backing=base)
    top = create(tmp_path / "top.qcow2", MiB, backing=tmp_path / "mid.qcow2")
    old_offset, old_size = header_pointer(top)
    node = await open_qcow2(graph, top, name="top", backing=None)
    base_node = await open_qcow2(graph, base, name="base", read_only=True)
    await node.change_backing(base_node, str(base), "qcow2")
    new_offset, new_size = header_pointer(top)
    raw = top.read_bytes()
    # The old name is still where it was: a crash before the 12-byte pointer
    # write would have left a header naming mid, intact.
    assert raw[old_offset : old_offset + old_size] == str(tmp_path / "mid.qcow2").encode()
    assert raw[new_offset : new_offset + new_size] == str(base).encode()
    assert (new_offset, new_size) != (old_offset, old_size)
    # Names of every length keep finding room, and qemu reads each of them.
    for name in ("b", "x" * 900, "base.qcow2", str(base)):
        await node.change_backing(base_node, name, "qcow2")
        assert backing_name(top) == name
    await graph.close_all()
    assert backing_name(top) == str(base)
    assert_clean(top)
    run("qemu-img", "compare", str(top), str(base))


async def test_new_format_falls_back_to_a_full_rewrite(tmp_path: Path, graph: BlockGraph) -> None:
    raw_base = tmp_path / "base.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(raw_base), str(MiB))
    top = create(tmp_path / "top.qcow2", MiB, backing=create(tmp_path / "mid.qcow2", MiB))
    node = await open_qcow2(graph, top, name="top", backing=None)
    await node.change_backing(None, str(raw_base), "raw")
    await graph.close_all()
    info = json.loads(run("qemu-img", "info", "--output=json", str(top)).stdout)
    assert info["backing-filename"] == str(raw_base)
    assert info["backing-filename-format"] == "raw"
    assert_clean(top)
