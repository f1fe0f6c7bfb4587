"""Clusters whose refcount drops to 0 are punched out of the host file.

Measured by what the file system holds (``st_blocks``); qemu-img judges that
the image stays clean and reads what the guest wrote.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import trio

from blockd.block.graph import BlockGraph

from .conftest import assert_clean, create, open_qcow2, qemu_io

KiB = 1024
MiB = 1024 * KiB


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


#: what splitting an extent may cost the file system (its own tree blocks)
SLACK = 64 * KiB


async def test_discard_and_zero_write_punch_freed_clusters(
    tmp_path: Path, graph: BlockGraph
) -> None:
    img = create(tmp_path / "p.qcow2", 8 * MiB)
    node = await open_qcow2(graph, img)
    await node.write(0, os.urandom(4 * MiB))
    await node.flush()
    full = allocated(img)
    size = img.stat().st_size
    await node.discard(MiB, MiB)
    await node.flush()
    assert allocated(img) <= full - MiB + SLACK
    await node.write_zeroes(2 * MiB, MiB)
    await node.flush()
    assert allocated(img) <= full - 2 * MiB + SLACK
    assert img.stat().st_size == size  # holes, not a shorter file
    # the freed clusters are taken again, and hold what is written there
    await node.write(6 * MiB, b"\x61" * (2 * MiB))
    await graph.close_all()
    assert img.stat().st_size == size
    assert_clean(img)
    qemu_io(img, "read -P 0 1M 2M", "read -P 0x61 6M 2M")


async def test_concurrent_frees_and_allocations_keep_data(
    tmp_path: Path, graph: BlockGraph
) -> None:
    """A punch never lands on a cluster handed out again: writes racing with
    discards of other clusters all read back."""
    cs = 4096
    img = create(tmp_path / "r.qcow2", 2 * MiB, cluster_size=cs)
    node = await open_qcow2(graph, img)
    model = bytearray(2 * MiB)

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(60):
            c = r.randrange(2 * MiB // cs // 4) * 4 + seed  # each worker its own clusters
            if r.random() < 0.6:
                data = bytes([r.randrange(1, 256)]) * cs
                await node.write(c * cs, data)
                model[c * cs : c * cs + len(data)] = data
            else:
                await node.discard(c * cs, cs)
                model[c * cs : (c + 1) * cs] = bytes(cs)
            if r.random() < 0.2:
                await node.flush()

    async with trio.open_nursery() as nursery:
        for seed in range(4):
            nursery.start_soon(worker, seed)
    assert await node.read(0, 2 * MiB) == bytes(model)
    await graph.close_all()
    assert_clean(img)
