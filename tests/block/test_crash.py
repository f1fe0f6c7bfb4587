"""Power-loss simulation: a crash at any point leaves at most leaked clusters.

The image sits on a file node of ``tests/power.py``: at the k-th write, flush
or truncate the power goes, every unflushed write is undone and a random
subset replayed.  ``qemu-img check`` must then find no corruption.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.errors import BlockIOError
from tests.power import Power, VolatileFile

from .conftest import check, create, qemu_io

KiB = 1024


async def workload(node: Qcow2Node, rng: random.Random, tail: int) -> None:
    size = node.size
    for _ in range(14):
        op = rng.choice(["write", "write", "write", "zero", "discard"])
        off = rng.randrange(0, size)
        n = rng.randrange(1, min(size - off, 40 * KiB) + 1)
        if op == "write":
            await node.write(off, bytes([rng.randrange(1, 256)]) * n)
        elif op == "zero":
            await node.write_zeroes(off, n)
        else:
            await node.discard(off, n)
    await node.truncate(size + tail + 100 * KiB)
    await node.write(size + 1000, b"tail" * (tail // 4))


CONFIGS = [
    # (compat, cluster_size, refcount_bits, with backing); 512/64 forces new
    # refcount blocks and a refcount table growth within the workload
    ("1.1", 512, 64, False),
    ("1.1", 4096, 1, True),
    ("0.10", 1024, 16, True),
]


@pytest.mark.parametrize(("compat", "cluster_size", "refcount_bits", "backing"), CONFIGS)
async def test_power_loss_leaves_only_leaks(
    tmp_path: Path, compat: str, cluster_size: int, refcount_bits: int, backing: bool
) -> None:
    base = None
    if backing:
        base = create(tmp_path / "base.qcow2", "2M", compat=compat)
        qemu_io(base, "write -P 0x5b 0 2M")

    last_end = [0]

    async def run_once(crash_at: int, seed: int) -> int:
        img = create(
            tmp_path / f"img-{crash_at}.qcow2",
            1800 * KiB + 512,
            compat=compat,
            cluster_size=cluster_size,
            refcount_bits=refcount_bits,
            backing=base,
        )
        inner = await FileNode.open("f", str(img), read_only=False)
        power = Power(crash_at)
        file = VolatileFile(inner, power)
        node = await Qcow2Node.open("q", file, read_only=False)
        rng = random.Random(seed)
        try:
            await workload(node, rng, 1900 * KiB if cluster_size == 512 else 200 * KiB)
            await node.flush()
        except BlockIOError:
            assert power.lost
        await file.lose_power(random.Random(seed * 7 + crash_at))
        result = check(img)
        last_end[0] = result.get("image-end-offset", 0)
        assert result.get("corruptions", 0) == 0, (crash_at, result)
        assert result.get("check-errors", 0) == 0, (crash_at, result)
        img.unlink()
        return power.ops

    total = await run_once(-1, 1)  # no crash: count the I/O points
    assert total > 50
    if cluster_size == 512:  # the refcount table (2 MiB reach) had to grow
        assert last_end[0] > 2 << 20
    rng = random.Random(42)
    points = sorted(rng.sample(range(1, total + 1), 15))
    for k in points:
        await run_once(k, 1)


@pytest.mark.parametrize(("compat", "cluster_size", "refcount_bits", "backing"), CONFIGS[:2])
async def test_io_error_then_carry_on(
    tmp_path: Path, compat: str, cluster_size: int, refcount_bits: int, backing: bool
) -> None:
    """An I/O error in any step leaves metadata consistent and the node usable."""
    base = None
    if backing:
        base = create(tmp_path / "base.qcow2", "2M", compat=compat)
        qemu_io(base, "write -P 0x5b 0 2M")
    rng = random.Random(7)
    for k in sorted(rng.sample(range(1, 120), 12)):
        img = create(tmp_path / f"e-{k}.qcow2", 600 * KiB, compat=compat,
                     cluster_size=cluster_size, refcount_bits=refcount_bits, backing=base)
        inner = await FileNode.open("f", str(img), read_only=False)
        file = VolatileFile(inner, Power(k, flaky=True))
        node = await Qcow2Node.open("q", file, read_only=False)
        ops = random.Random(k)
        failed = 0
        for _ in range(25):
            off = ops.randrange(0, node.size)
            n = ops.randrange(1, min(node.size - off, 30 * KiB) + 1)
            try:
                if ops.random() < 0.7:
                    await node.write(off, bytes([ops.randrange(1, 256)]) * n)
                else:
                    await node.discard(off, n)
            except BlockIOError:
                failed += 1
        # after the failure the node still works and reads what it last wrote
        file.power.crash_at = -1  # (the failure may not have come yet)
        await node.write(1000, b"after" * 100)
        assert await node.read(1000, 500) == b"after" * 100
        await node.flush()
        await inner.close()
        result = check(img)
        assert failed <= 1
        assert result.get("corruptions", 0) == 0, (k, result)
        assert result.get("check-errors", 0) == 0, (k, result)
        qemu_io(img, "read -P 0x61 1000 1", "read -P 0x72 1004 1")  # "a...r" of "after"
