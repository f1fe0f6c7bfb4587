"""block-stream through a real daemon, with the device exported and written.

The chain is base <- i1 <- i2 <- i3 <- top; ``top`` is exported writable over
NBD and written by libnbd and qemu-io clients while the job runs.  Every
acknowledged write must be in top's view afterwards, over what the chain
showed before; the images must pass ``qemu-img check``; the header must name
base (or nothing).  A SIGKILL at any moment leaves every image consistent
and the view unchanged.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, RawQMP, start_blockd
from tests.images import backing_of, check, check_consistent, create, guest_view, qemu_io
from tests.integration.test_active_commit import WRITER, apply_log
from tests.integration.test_nbd import dump, io, nbdsh

MiB = 1 << 20
SIZE = 64 * MiB
LAYERS = ("base", "i1", "i2", "i3", "top")


@dataclass
class Disk:
    """A running blockd serving ``top`` over NBD, and a model of its view."""

    dir: Path
    daemon: DaemonProcess
    qmp: RawQMP
    model: bytearray
    uri: str

    def write(self, offset: int, length: int, pattern: int) -> None:
        io(self.uri, f"write -P {pattern:#x} {offset} {length}")
        self.model[offset : offset + length] = bytes([pattern]) * length

    def execute(self, command: str, **arguments: Any) -> Any:
        return self.qmp.execute(command, arguments)

    def stream(self, **arguments: Any) -> None:
        args = {"job-id": "j", "device": "top", **arguments}
        assert self.execute("block-stream", **args) == {"return": {}}

    def done(self) -> dict[str, Any]:
        event = self.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120, device="j")
        self.qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="null")
        return event

    def view(self) -> bytes:
        return guest_view(self.dir / "top.qcow2", self.dir / "view.raw").read_bytes()


def make_chain(d: Path) -> None:
    backing = None
    for name in LAYERS:
        create(d / f"{name}.qcow2", "64M", backing=backing)
        backing = f"{name}.qcow2"
    qemu_io(d / "base.qcow2", "write -P 0x11 0 16M", "write -P 0x12 40M 8M")
    qemu_io(d / "i1.qcow2", "write -P 0x21 4M 12M", "write -z 41M 1M")
    qemu_io(d / "i2.qcow2", "write -P 0x31 8M 8M", "write -P 0x32 48M 8M")
    qemu_io(d / "i3.qcow2", "write -P 0x41 10M 1M", "write -z 50M 512k", "write -P 0x42 60M 4M")
    qemu_io(d / "top.qcow2", "write -P 0x51 11M 1M", "write -P 0x52 52M 2M")


@pytest.fixture
def disk(tmp_path: Path, sock_dir: Path) -> Iterator[Disk]:
    d = tmp_path
    make_chain(d)
    model = bytearray(guest_view(d / "top.qcow2", d / "start.raw").read_bytes())
    daemon = start_blockd(sock_dir / "qmp.sock")
    qmp = RawQMP(sock_dir / "qmp.sock", timeout=60)
    qmp.negotiate()
    backing = None
    for name in LAYERS:
        file = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
        args = {"driver": "qcow2", "node-name": name, "read-only": name != "top",
                "backing": backing, "file": file}  # fmt: skip
        assert qmp.execute("blockdev-add", args) == {"return": {}}
        backing = name
    nbd_sock = sock_dir / "nbd.sock"
    addr = {"type": "unix", "data": {"path": str(nbd_sock)}}
    assert qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
    export = {"type": "nbd", "id": "e", "node-name": "top", "name": "disk", "writable": True}
    assert qmp.execute("block-export-add", export) == {"return": {}}
    uri = f"nbd+unix:///disk?socket={nbd_sock}"
    try:
        yield Disk(d, daemon, qmp, model, uri)
    finally:
        qmp.close()
        daemon.stop()


def names(backing: str | None, image: Path) -> bool:
    """Whether a header's backing string names ``image``: by its file name, or
    (QEMU's name for a node whose backing the client gave) by ``json:`` options."""
    if backing is None:
        return False
    if backing.startswith("json:"):
        return bool(json.loads(backing[5:])["file"]["filename"] == str(image))
    return backing == str(image)


def finish(disk: Disk) -> None:
    """Stop the daemon cleanly; every image must then be clean."""
    assert disk.execute("quit") == {"return": {}}
    assert disk.daemon.wait(30) == 0
    for name in LAYERS:
        check(disk.dir / f"{name}.qcow2")


@pytest.mark.parametrize("base", [None, "i1"])
def test_stream_while_libnbd_clients_write(disk: Disk, base: str | None) -> None:
    """Two libnbd clients write random overlapping ranges (each in its half,
    in order) all through the stream: the view afterwards is the view
    before plus every acknowledged write."""
    d = disk.dir
    nbdsh("import nbd")  # fails loudly if the bindings are missing
    script = d / "writer.py"
    script.write_text(WRITER)
    writers = []
    for i, (lo, hi) in enumerate(((0, SIZE // 2), (SIZE // 2, SIZE))):
        argv = ["/usr/bin/python3", str(script), disk.uri, str(i + 10), str(lo), str(hi), "3",
                str(d / f"log{i}")]  # fmt: skip
        writers.append(subprocess.Popen(argv, stderr=subprocess.PIPE))
    # slow enough that the writers meet the copy everywhere
    disk.stream(speed=24 * MiB, **({"base-node": base} if base else {}))
    completed = disk.done()
    assert "error" not in completed["data"]
    assert completed["data"]["offset"] == completed["data"]["len"] == SIZE
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    writes = sum(apply_log(disk.model, d / f"log{i}") for i in range(2))
    assert writes > 20
    # the export serves the model, before and after the daemon goes
    assert dump(disk.uri, d / "served.raw") == bytes(disk.model)
    nodes = {n["node-name"]: n for n in disk.execute("query-named-block-nodes")["return"]}
    assert set(LAYERS) <= set(nodes)  # added by the client: they stay
    finish(disk)
    assert disk.view() == bytes(disk.model)
    backing = backing_of(d / "top.qcow2")
    assert backing is None if base is None else names(backing, d / "i1.qcow2")


def test_stream_with_qemu_io_writes_and_backing_file(disk: Disk) -> None:
    """qemu-io writes (each one a whole connection, flushed) between the job's
    steps, over ranges the job has copied, is copying and has not reached."""
    disk.write(9 * MiB, MiB, 0xA0)
    disk.stream(**{"base-node": "base", "backing-file": "base.qcow2", "speed": 8 * MiB})
    rng = random.Random(5)
    for n in range(12):
        offset = rng.randrange(0, SIZE - 2 * MiB, 4096)
        disk.write(offset, rng.choice([4096, 65536, MiB + 512]), 0xB0 + n)
    assert disk.execute("block-job-set-speed", device="j", speed=0) == {"return": {}}
    assert "error" not in disk.done()["data"]
    finish(disk)
    assert disk.view() == bytes(disk.model)
    assert backing_of(disk.dir / "top.qcow2") == "base.qcow2"


def test_speed_pause_and_cancel_through_the_daemon(disk: Disk) -> None:
    disk.stream(speed=MiB)
    [job] = disk.execute("query-block-jobs")["return"]
    assert job["type"] == "stream" and job["speed"] == MiB and job["len"] == SIZE
    assert disk.execute("block-job-pause", device="j") == {"return": {}}
    disk.qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="paused")
    disk.write(30 * MiB, MiB, 0xC1)
    assert disk.execute("block-job-set-speed", device="j", speed=2 * MiB) == {"return": {}}
    [job] = disk.execute("query-block-jobs")["return"]
    assert job["paused"] and job["speed"] == 2 * MiB
    assert disk.execute("block-job-resume", device="j") == {"return": {}}
    assert disk.execute("block-job-cancel", device="j") == {"return": {}}
    cancelled = disk.qmp.wait_event("BLOCK_JOB_CANCELLED", device="j")
    assert cancelled["data"]["type"] == "stream"
    finish(disk)
    assert disk.view() == bytes(disk.model)
    assert backing_of(disk.dir / "top.qcow2") == "i3.qcow2"


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_mid_stream_keeps_every_image_and_the_view(disk: Disk, seed: int) -> None:
    """Killed at a random moment, while a client writes: every image is
    consistent (leaks allowed) and top reads as before plus the writes."""
    d = disk.dir
    rng = random.Random(seed)
    # mostly killed while copying; the last seed's job is over before (header rewritten)
    speed = (8, 16, 32, 1024)[seed] * MiB
    disk.stream(speed=speed, **({"base-node": "i1"} if seed % 2 else {}))
    stop = threading.Event()

    def keep_writing() -> None:
        n = 0
        while not stop.is_set():
            disk.write((n * 7 % 60) * MiB + 4096 * n, 200 * 1024, 0xD0 + n % 16)
            n += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    time.sleep(rng.uniform(0.2, 2.5))
    stop.set()
    writer.join()
    os.kill(disk.daemon.proc.pid, signal.SIGKILL)
    disk.daemon.proc.wait(10)
    for name in LAYERS:
        check_consistent(d / f"{name}.qcow2")
    backing = backing_of(d / "top.qcow2")
    assert backing in ("i3.qcow2", None) or names(backing, d / "i1.qcow2")
    assert disk.view() == bytes(disk.model)
