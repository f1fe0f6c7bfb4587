"""Power-loss simulation: a crash at any point leaves at most leaked clusters.

The image sits on a file node that keeps an undo log of writes since the last
flush.  At the k-th write/flush it "loses power": every unflushed write is
undone, then a random subset is replayed (a disk may persist any subset of
unflushed writes).  ``qemu-img check`` must then find no corruption.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.node import BlockNode
from blockd.errors import BlockIOError

from .conftest import check, create, qemu_io

KiB = 1024


class PowerLoss(Exception):
    pass


class CrashingFile(BlockNode):
    driver = "file"
    growable = True

    def __init__(self, inner: FileNode, crash_at: int) -> None:
        super().__init__(inner.node_name + "-crash", read_only=False)
        self.inner = inner
        self.crash_at = crash_at
        self.ops = 0
        self.undo: list[tuple[int, bytes, bytes]] = []

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def filename(self) -> str:
        return self.inner.filename

    def _tick(self) -> None:
        self.ops += 1
        if self.ops == self.crash_at:
            raise PowerLoss

    async def _do_read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def _do_write(self, offset: int, data: bytes) -> None:
        self._tick()
        old = await self.inner.read(offset, len(data))
        self.undo.append((offset, old, data))
        await self.inner.write(offset, data)

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        await self._do_write(offset, bytes(length))

    async def _do_flush(self) -> None:
        self._tick()
        self.undo.clear()

    async def lose_power(self, rng: random.Random) -> None:
        pending = list(self.undo)
        for offset, old, _new in reversed(pending):
            await self.inner.write(offset, old)
        for offset, _old, new in pending:
            if rng.random() < 0.5:
                await self.inner.write(offset, new)
        await self.inner.close()


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
        file = CrashingFile(inner, crash_at)
        node = await Qcow2Node.open("q", file, read_only=False)
        rng = random.Random(seed)
        try:
            await workload(node, rng, 1900 * KiB if cluster_size == 512 else 200 * KiB)
            await node.flush()
        except PowerLoss:
            pass
        await file.lose_power(random.Random(seed * 7 + crash_at))
        result = check(img)
        last_end[0] = result.get("image-end-offset", 0)
        assert result.get("corruptions", 0) == 0, (crash_at, result)
        assert result.get("check-errors", 0) == 0, (crash_at, result)
        img.unlink()
        return file.ops

    total = await run_once(-1, 1)  # no crash: count the I/O points
    assert total > 50
    if cluster_size == 512:  # the refcount table (2 MiB reach) had to grow
        assert last_end[0] > 2 << 20
    rng = random.Random(42)
    points = sorted(rng.sample(range(1, total + 1), 15))
    for k in points:
        await run_once(k, 1)


class FailingFile(CrashingFile):
    """Fails the k-th write or flush with EIO, then keeps working."""

    def _tick(self) -> None:
        self.ops += 1
        if self.ops == self.crash_at:
            raise BlockIOError(errno.EIO)


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
        file = FailingFile(inner, k)
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
        file.crash_at = -1
        await node.write(1000, b"after" * 100)
        assert await node.read(1000, 500) == b"after" * 100
        await node.flush()
        await inner.close()
        result = check(img)
        assert failed <= 1
        assert result.get("corruptions", 0) == 0, (k, result)
        assert result.get("check-errors", 0) == 0, (k, result)
        qemu_io(img, "read -P 0x61 1000 1", "read -P 0x72 1004 1")  # "a...r" of "after"
