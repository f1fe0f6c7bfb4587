"""Power loss under an NBD client: what the server acknowledged as durable survives.

A kill cannot tell a flushed write from one still in the page cache (the
cache survives the process), so this simulates the power going instead: the
qcow2 node of a real NBD server (in this process, on a Unix socket) sits on a
``tests/power.py`` file node that remembers every write not yet covered by a
*completed* flush.  At a random write or flush the power goes: that operation
and every later one fail, the server is stopped, and every remembered write is
undone (or, in half the runs, a random subset of them is kept).

Then each promise the server made must hold: every acknowledged FUA write or
WRITE_ZEROES, every acknowledged write in a ``writethrough`` export, and every
write acknowledged before a FLUSH was sent whose own reply was success, reads
back with its data; and ``qemu-img check`` finds no corruption (leaked
clusters are the price of a crash, as in QEMU).

The server takes its ordinary path here (the fast path writes only to a plain
file node's descriptor); FUA writes, write-through exports and FLUSH always
take that path, and a FLUSH covers the fast path's writes the same way.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.graph import BlockGraph
from blockd.events import EventBus
from blockd.export import protocol as p
from blockd.export.exports import ExportRegistry
from tests.conftest import require_tool
from tests.images import create, qemu_img, qemu_io
from tests.power import Power, VolatileFile

from .test_nbd_inflight import listening, negotiate, receive_exactly

KiB = 1024
SIZE = 4 << 20
SLOT = 64 * KiB  # every write has a 64 KiB slot of its own, never reused
#: client sessions per mode, each cut at 5 random points (more: BLOCKD_FUZZ_EXAMPLES)
RUNS = max(3, int(os.environ.get("BLOCKD_FUZZ_EXAMPLES", "0")) // 50)


@dataclass
class Promises:
    """What the client was told is durable: (offset, data) per slot."""

    durable: dict[int, bytes] = field(default_factory=dict)
    #: acknowledged, not yet promised: durable once a later FLUSH succeeds
    acked: dict[int, bytes] = field(default_factory=dict)
    ops: int = 0


async def client(stream: trio.SocketStream, rng: random.Random, writethrough: bool) -> Promises:
    """Random batches of pipelined writes (some FUA), write-zeroes and FLUSHes."""
    promises = Promises()
    slots = list(range(SIZE // SLOT))
    rng.shuffle(slots)
    handle = 0
    while slots:
        batch: dict[int, tuple[str, int, bytes]] = {}
        out = b""
        covered_by_flush = dict(promises.acked)  # acked before this batch is sent
        for _ in range(rng.randrange(1, 6)):
            handle += 1
            roll = rng.random()
            if roll < 0.2:
                batch[handle] = ("flush", 0, b"")
                out += struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.FLUSH, handle, 0, 0)
                continue
            if not slots:
                break
            offset = slots.pop() * SLOT + rng.randrange(0, 8) * 512
            length = rng.choice([512, 4096, 5000, 32 * KiB])
            fua = rng.random() < 0.4
            flags = p.CmdFlag.FUA if fua else 0
            if roll < 0.35:
                data = bytes(length)
                batch[handle] = ("fua" if fua else "write", offset, data)
                out += struct.pack(
                    ">IHHQQI", p.REQUEST_MAGIC, flags, p.Cmd.WRITE_ZEROES, handle, offset,
                    length,
                )  # fmt: skip
                continue
            data = bytes([rng.randrange(1, 256)]) * length
            batch[handle] = ("fua" if fua else "write", offset, data)
            out += struct.pack(
                ">IHHQQI", p.REQUEST_MAGIC, flags, p.Cmd.WRITE, handle, offset, length
            ) + data
        await stream.send_all(out)
        for _ in batch:
            magic, error, got = struct.unpack(">IIQ", await receive_exactly(stream, 16))
            assert magic == p.SIMPLE_REPLY_MAGIC
            promises.ops += 1
            kind, offset, data = batch[got]
            if error:
                continue
            if kind == "flush":
                promises.durable.update(covered_by_flush)
            elif kind == "fua" or writethrough:
                promises.durable[offset] = data
            else:
                promises.acked[offset] = data
    return promises


async def one_run(
    tmp_path: Path, template: Path, seed: int, cut_at: int, writethrough: bool
) -> tuple[int, int]:
    """One client session with the power cut at file operation ``cut_at`` (-1: never).

    Returns the file operations seen and the number of durable promises checked.
    """
    image = tmp_path / f"img-{seed}-{cut_at}.qcow2"
    shutil.copyfile(template, image)
    inner = await FileNode.open("f", str(image), read_only=False)
    power = Power(cut_at)
    file = VolatileFile(inner, power)
    node = await Qcow2Node.open("q", file, read_only=False)
    registry = ExportRegistry(EventBus(), BlockGraph())
    registry.server = object()  # pretend it runs: the server below serves the registry
    registry.add("e", node, name="disk", description=None, writable=True,
                 writethrough=writethrough)  # fmt: skip
    path = str(tmp_path / f"s-{seed}-{cut_at}")
    server = await listening(registry, path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        stream = await trio.open_unix_socket(path)
        await negotiate(stream)
        with trio.fail_after(60):
            promises = await client(stream, random.Random(seed), writethrough)
        await stream.aclose()
        await server.stop()
    if cut_at < 0:
        await node.flush()
        await node.close()
        await inner.close()
    else:
        power.lost = True  # from here on, nothing reaches the disk
        await file.lose_power(random.Random(seed) if seed % 2 else None)
    argv = [require_tool("qemu-img"), "check", "--output=json", str(image)]
    checked = subprocess.run(argv, capture_output=True, text=True)
    result = json.loads(checked.stdout)
    assert result.get("corruptions", 0) == 0, (seed, cut_at, result)
    assert result.get("check-errors", 0) == 0, (seed, cut_at, result)
    raw = tmp_path / "guest.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    guest = raw.read_bytes()
    for offset, data in sorted(promises.durable.items()):
        assert guest[offset : offset + len(data)] == data, (seed, cut_at, offset, len(data))
    image.unlink()
    raw.unlink()
    return power.ops, len(promises.durable)


@pytest.mark.parametrize("writethrough", [False, True])
async def test_acknowledged_durable_writes_survive_power_loss(
    tmp_path: Path, writethrough: bool
) -> None:
    # data everywhere, so a lost WRITE_ZEROES shows too
    template = create(tmp_path / "template.qcow2", str(SIZE))
    qemu_io(template, f"write -P 0xee 0 {SIZE}")
    rng = random.Random(2026 + writethrough)
    checked = 0
    for seed in range(RUNS):
        total, _ = await one_run(tmp_path, template, seed, -1, writethrough)
        assert total > 20
        for cut_at in sorted(rng.sample(range(1, total + 1), 5)):
            _ops, promised = await one_run(tmp_path, template, seed, cut_at, writethrough)
            checked += promised
    assert checked > 50
