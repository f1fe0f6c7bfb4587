"""A SIGKILL at any moment leaves no leaked clusters, except in the one window
crash safety pays for (block/README.md, "metadata writes").

A killed process loses nothing it wrote (the page cache survives it), only
what it had not written yet.  The simulation stops the image's file at its
k-th write or flush, keeps everything written before, and asks ``qemu-img
check``: no corruption ever, and no leak unless the kill fell between a
refcount write-back and the pointer writes it was made for, with nothing
but other refcount writes and flushes in between (the flush that must come
first).  Before refcounts were written back at the flush, every allocating
write left its counters on disk until the next flush, and a kill anywhere in
that time leaked its clusters.

The daemon test does the same with a real process: SIGKILL during an active
commit with a guest writing through the NBD export (no flushes), at several
moments; every image must check clean.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.node import Qcow2Node
from tests.helpers import RawQMP, start_blockd
from tests.power import Power, PowerLoss, VolatileFile

from .conftest import check, create, qemu_io

KiB = 1024
OFFSET = 0x00FFFFFFFFFFFE00


class KilledFile(VolatileFile):
    """Stops at the k-th write or flush, everything written staying (a kill, not a
    power cut); keeps a trace (kind, offset, length) of the I/O."""

    def __init__(self, inner: FileNode, crash_at: int) -> None:
        super().__init__(inner, Power(crash_at))
        self.trace: list[tuple[str, int, int]] = []

    async def _do_write(self, offset: int, data: bytes) -> None:
        self.power.tick()
        self.trace.append(("write", offset, len(data)))
        await self.inner.write(offset, data)

    async def _do_flush(self) -> None:
        self.power.tick()
        self.trace.append(("flush", 0, 0))
        await self.inner.flush()

    async def _do_truncate(self, size: int) -> None:
        self.power.tick()
        self.trace.append(("truncate", size, 0))
        await self.inner.truncate(size)


def structures(img: Path) -> dict[int, str]:
    """Host cluster -> what it holds (header, l1, l2, reftable, refblock) in a finished image."""
    raw = img.read_bytes()
    bits = struct.unpack_from(">I", raw, 20)[0]
    cs = 1 << bits
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", raw, 36)
    kinds = {0: "header"}
    for c in range(l1_off >> bits, ((l1_off + l1_size * 8 - 1) >> bits) + 1):
        kinds[c] = "l1"
    for c in range(rt_off >> bits, (rt_off >> bits) + rt_clusters):
        kinds[c] = "reftable"
    for i in range(l1_size):
        l2 = struct.unpack_from(">Q", raw, l1_off + 8 * i)[0] & OFFSET
        if l2:
            kinds[l2 >> bits] = "l2"
    for i in range(rt_clusters * cs // 8):
        block = struct.unpack_from(">Q", raw, rt_off + 8 * i)[0] & ~0x1FF
        if block:
            kinds[block >> bits] = "refblock"
    return kinds


POINTERS = ("l1", "l2", "reftable", "header")


def windows(trace: list[tuple[str, int, int]], kinds: dict[int, str], bits: int) -> list[range]:
    """Kill points (op counts) inside a tight window, where crash safety allows a leak.

    Counting before pointing: a window opens with a refcount block write and
    closes after the run of pointer writes (and flushes between them) that
    follows the next flush.
    Unpointing before uncounting: it opens with a pointer write and closes
    after the refcount writes that follow the next flush.  Only writes of the
    opening sort and flushes may come in between.  A kill at op k means
    ops[:k - 1] are done.
    """
    def group(op: tuple[str, int, int]) -> str:
        what, offset, _n = op
        if what == "flush":
            return "flush"
        kind = kinds.get(offset >> bits, "data")
        return "ptr" if kind in POINTERS else "ref" if kind == "refblock" else "data"

    out = []
    for start, op in enumerate(trace):
        opening = group(op)
        if opening not in ("ref", "ptr"):
            continue
        closing = "ptr" if opening == "ref" else "ref"
        i, flushed = start + 1, False
        while i < len(trace) and group(trace[i]) in (opening, "flush"):
            flushed = flushed or group(trace[i]) == "flush"
            i += 1
        if not flushed or i == len(trace) or group(trace[i]) != closing:
            continue  # not a tight window: a kill in it must not leak
        # pointers made durable in turn (a new L2 table, flushed before the
        # L1 entry that names it) close the window together
        while i < len(trace) and group(trace[i]) in (closing, "flush"):
            i += 1
        out.append(range(start + 2, i + 1))  # the opening write done, the closing not all
    return out


async def workload(node: Qcow2Node, rng: random.Random) -> None:
    size = node.size
    for n in range(40):
        op = rng.choice(["write"] * 6 + ["zero", "discard", "flush"])
        off = rng.randrange(0, size)
        length = rng.randrange(1, min(size - off, 40 * KiB) + 1)
        if op == "write":
            await node.write(off, bytes([n + 1]) * length)
        elif op == "zero":
            await node.write_zeroes(off, length)
        elif op == "discard":
            await node.discard(off, length)
        else:
            await node.flush()
    await node.flush()


CONFIGS = [
    # (compat, cluster_size, refcount_bits, backing, image size)
    ("1.1", 4096, 16, False, 4 << 20),
    ("1.1", 512, 64, True, 2 << 20),  # new refcount blocks and a reftable growth
    ("0.10", 65536, 16, True, 8 << 20),
]


@pytest.mark.parametrize(("compat", "cluster_size", "refcount_bits", "backing", "size"), CONFIGS)
async def test_kill_at_any_io_point_leaks_only_in_the_window(
    tmp_path: Path, compat: str, cluster_size: int, refcount_bits: int, backing: bool, size: int
) -> None:
    base = None
    if backing:
        base = create(tmp_path / "base.qcow2", size, compat=compat)
        qemu_io(base, f"write -P 0x5b 0 {size}")

    async def run(kill_at: int) -> tuple[Path, list[tuple[str, int, int]]]:
        img = create(tmp_path / f"k{kill_at}.qcow2", size, compat=compat,
                     cluster_size=cluster_size, refcount_bits=refcount_bits, backing=base)
        inner = await FileNode.open("f", str(img), read_only=False)
        file = KilledFile(inner, kill_at)
        node = await Qcow2Node.open("q", file, read_only=False)
        with contextlib.suppress(PowerLoss):  # killed: whatever was written stays
            await workload(node, random.Random(5))
        await inner.close()
        return img, file.trace

    img, trace = await run(-1)
    bits = cluster_size.bit_length() - 1
    allowed = windows(trace, structures(img), bits)
    assert allowed, "the workload never committed an allocation"
    leaky_points = 0
    points = range(1, len(trace) + 1)
    if len(points) > 150:  # every point of the long run would take a minute
        points = sorted(random.Random(1).sample(points, 150))
    for k in points:
        img, _ = await run(k)
        result = check(img)
        assert result.get("corruptions", 0) == 0, (k, result)
        assert result.get("check-errors", 0) == 0, (k, result)
        if result.get("leaks", 0):
            leaky_points += 1
            assert any(k in w for w in allowed), (k, result, trace[max(0, k - 6) : k])
        img.unlink()
    inside = {k for w in allowed for k in w}
    assert len(inside) < len(trace)
    print(f"{len(trace)} I/O points, {len(inside)} in windows, {leaky_points} of "
          f"{len(points)} killed leaked")


def feed(writer: subprocess.Popen[bytes], rng: random.Random) -> None:
    """Random 64 KiB writes into qemu-io's stdin until it goes away."""
    assert writer.stdin is not None
    n = 0
    try:
        while True:
            off = rng.randrange(0, (64 << 20) - 65536, 4096)
            writer.stdin.write(f"write -P {n % 250} {off} 65536\n".encode())
            writer.stdin.flush()
            n += 1
    except (BrokenPipeError, OSError):
        return


def test_sigkill_during_active_commit_leaves_no_leaks(tmp_path: Path, sock_dir: Path) -> None:
    """The issue's trial, at several kill points: a guest writes through the
    export (no flush) while the commit copies; SIGKILL; every image checks clean.
    Before refcounts were written back at the flush, base leaked every cluster
    the commit had copied (hundreds, in every trial)."""
    for trial, delay in enumerate((0.3, 0.7, 1.2, 1.8)):
        d = tmp_path / f"t{trial}"
        d.mkdir()
        base = create(d / "base.qcow2", "64M")
        mid = create(d / "mid.qcow2", "64M", backing=base)
        top = create(d / "top.qcow2", "64M", backing=mid)
        qemu_io(base, "write -P 0x11 0 8M", "write -P 0x12 40M 4M")
        qemu_io(mid, "write -P 0x21 4M 8M")
        qemu_io(top, "write -P 0x31 6M 1M")
        sock = sock_dir / f"q{trial}.sock"
        daemon = start_blockd(sock)
        writer: subprocess.Popen[bytes] | None = None
        feeder: threading.Thread | None = None
        try:
            with RawQMP(sock) as qmp:
                qmp.negotiate()
                for name, backing, ro in (("base", None, True), ("mid", "base", True),
                                          ("top", "mid", False)):
                    file = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
                    assert qmp.execute("blockdev-add", {
                        "driver": "qcow2", "node-name": name, "read-only": ro,
                        "backing": backing, "file": file}) == {"return": {}}
                nbd = sock_dir / f"n{trial}.sock"
                assert qmp.execute("nbd-server-start", {
                    "addr": {"type": "unix", "data": {"path": str(nbd)}}}) == {"return": {}}
                assert qmp.execute("block-export-add", {
                    "type": "nbd", "id": "e", "node-name": "top", "name": "disk",
                    "writable": True}) == {"return": {}}
                # slow enough that the job is still copying when killed
                assert qmp.execute("block-commit", {
                    "job-id": "j", "device": "top", "speed": 4 << 20}) == {"return": {}}
                # -t writeback: qemu-io's default (writethrough) flushes after
                # every write, and each flush opens the window crash safety
                # needs (refcounts durable before the entries).  Commands come
                # on stdin, as many as it takes until the kill.
                writer = subprocess.Popen(
                    ["qemu-io", "-f", "raw", "-t", "writeback",
                     f"nbd+unix:///disk?socket={nbd}"],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                feeder = threading.Thread(target=feed, args=(writer, random.Random(trial)))
                feeder.start()
                time.sleep(delay)
                assert writer.poll() is None, "the guest stopped writing before the kill"
                assert qmp.execute("query-block-jobs")["return"][0]["ready"] is False
                os.kill(daemon.proc.pid, signal.SIGKILL)
                daemon.proc.wait(10)
        finally:
            if writer is not None:
                writer.kill()
                writer.wait()
            if feeder is not None:
                feeder.join()
            daemon.stop()
        assert top.stat().st_size > 4 << 20, "the guest's writes never reached top"
        for image in (base, mid, top):
            result = check(image)
            assert (result.get("leaks", 0), result.get("corruptions", 0)) == (0, 0), (
                trial, image.name, result)
