"""Images made with qemu-img's preallocation modes: read, written, judged by qemu."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockd.block.graph import BlockGraph
from tests.block.conftest import assert_clean, compare_with, create, open_qcow2, pattern, to_raw

MiB = 1 << 20


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_preallocated_images(
    tmp_path: Path, graph: BlockGraph, mode: str, compat: str
) -> None:
    image = create(tmp_path / "p.qcow2", 8 * MiB, compat=compat, extra=f"preallocation={mode}")
    reference = to_raw(image, tmp_path / "before.raw")
    node = await open_qcow2(graph, image)
    # Preallocated clusters read as zeros, as qemu-img sees them.
    assert await node.read(0, 8 * MiB) == reference
    model = bytearray(8 * MiB)
    for offset, length, byte in ((0, 4096, 1), (3 * MiB + 17, MiB, 2), (8 * MiB - 100, 100, 3)):
        await node.write(offset, pattern(byte, length))
        model[offset : offset + length] = pattern(byte, length)
    await node.write_zeroes(3 * MiB + 4096, 65536)
    model[3 * MiB + 4096 : 3 * MiB + 4096 + 65536] = bytes(65536)
    await graph.close_all()
    assert_clean(image)
    compare_with(image, bytes(model), tmp_path)
