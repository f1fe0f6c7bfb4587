"""The snapshot lifecycle as management stacks run it, round after round, live.

A disk is exported over NBD and a libnbd client keeps writing to it.  Each
round makes an overlay file (``blockdev-create`` of a file, then of a qcow2
image on it), adds it, takes an external snapshot onto it
(``blockdev-snapshot``: the export moves to the overlay), lets the guest write
into it, and then merges it back: an active commit that is completed (the
export pivots back onto the disk's image), or a ``block-stream`` that pulls
the old image into the overlay (which then stands alone, and the old image is
dropped).  After every round the chain has one image again and what the
guest reads through the export equals a model of every acknowledged write.

The same loop runs against qemu-storage-daemon 7.2, which is how the test
itself is checked: it must pass there too.
"""

from __future__ import annotations

import json
import select
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_system_module, require_tool
from tests.helpers import DaemonProcess, RawQMP, negotiated, start_blockd, start_qsd
from tests.images import backing_of, check, create, qemu_io

MiB = 1 << 20
SIZE = 16 * MiB
ROUNDS = 20

#: The guest: writes of 4 KiB to 64 KiB at 4 KiB-aligned random places, about
#: 200 a second, a tenth of them FUA; a line on stdin pauses it (after a flush,
#: with every acknowledged write in its log) or stops it.
WRITER = textwrap.dedent(
    r"""
    import nbd, os, random, select, sys, time
    uri, seed, size, log_path = sys.argv[1:5]
    size = int(size)
    rng = random.Random(int(seed))
    h = nbd.NBD(); h.connect_uri(uri)
    log = open(log_path, "wb", buffering=0)
    pending = b""
    def command(block):
        # os.read, not sys.stdin: a buffered stdin may hold a line select() cannot see
        global pending
        while b"\n" not in pending:
            ready, _, _ = select.select([0], [], [], None if block else 0)
            if not ready:
                return ""
            pending += os.read(0, 4096)
        line, pending = pending.split(b"\n", 1)
        return line.decode().strip()
    while True:
        line = command(False)
        while line == "pause":
            h.flush()
            log.flush()
            print("paused", flush=True)
            line = command(True)
        if line == "stop":
            break
        length = rng.choice([4096, 16384, 65536])
        offset = rng.randrange(0, (size - length) // 4096) * 4096
        data = os.urandom(length)
        h.pwrite(data, offset, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
        log.write(offset.to_bytes(8, "little") + length.to_bytes(8, "little") + data)
        time.sleep(0.005)
    h.flush(); h.shutdown(); log.close()
    print("stopped", flush=True)
    """
)


@dataclass
class Guest:
    proc: subprocess.Popen[str]
    log: Path
    model: bytearray
    applied: int = 0
    writes: int = 0

    def _tell(self, command: str, answer: str) -> None:
        """Send a command and wait (a minute at most) for the writer's answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, f"the writer did not answer {command!r}"
        assert self.proc.stdout.readline().strip() == answer

    def pause(self) -> None:
        self._tell("pause", "paused")
        self._apply()

    def wait_writes(self, count: int) -> None:
        """Until the guest has logged ``count`` more writes (on the real clock)."""
        start = self.logged()
        deadline = time.monotonic() + 30
        while self.logged() < start + count * 4112 and time.monotonic() < deadline:
            time.sleep(0.01)

    def logged(self) -> int:
        """Bytes in the writer's log (none before it has connected)."""
        return self.log.stat().st_size if self.log.exists() else 0

    def resume(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        self._tell("stop", "stopped")
        assert self.proc.wait(30) == 0
        self._apply()

    def _apply(self) -> None:
        raw = self.log.read_bytes()
        pos = self.applied
        while pos < len(raw):
            offset = int.from_bytes(raw[pos : pos + 8], "little")
            length = int.from_bytes(raw[pos + 8 : pos + 16], "little")
            self.model[offset : offset + length] = raw[pos + 16 : pos + 16 + length]
            pos += 16 + length
            self.writes += 1
        self.applied = pos


@dataclass
class Loop:
    dir: Path
    daemon: DaemonProcess
    qmp: RawQMP
    uri: str

    def ok(self, command: str, **arguments: Any) -> Any:
        reply = self.qmp.execute(command, arguments)
        assert "return" in reply, (command, arguments, reply)
        return reply["return"]

    def run_job(self, command: str, job: str, **arguments: Any) -> None:
        """Start a job and wait for it to conclude without error, then dismiss it."""
        self.ok(command, **{"job-id": job, **arguments})
        self.qmp.wait_event("JOB_STATUS_CHANGE", timeout=60, id=job, status="concluded")
        found = [j for j in self.ok("query-jobs") if j["id"] == job]
        assert found and "error" not in found[0], found
        self.ok("job-dismiss", id=job)

    def make_overlay(self, name: str) -> Path:
        path = self.dir / f"{name}.qcow2"
        file_options = {"driver": "file", "filename": str(path), "size": 0}
        self.run_job("blockdev-create", f"create-file-{name}", options=file_options)
        self.ok("blockdev-add", driver="file", filename=str(path), **{"node-name": f"{name}-file"})
        qcow2 = {"driver": "qcow2", "file": f"{name}-file", "size": SIZE}
        self.run_job("blockdev-create", f"create-{name}", options=qcow2)
        self.ok("blockdev-add", driver="qcow2", file=f"{name}-file", backing=None,
                **{"node-name": name})  # fmt: skip
        return path

    def export_node(self) -> str:
        (export,) = self.ok("query-block-exports")
        return str(export["node-name"])

    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.ok("query-named-block-nodes")}

    def guest_view(self) -> bytes:
        out = self.dir / "view.raw"
        subprocess.run(
            [require_tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", self.uri, str(out)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return out.read_bytes()


@pytest.fixture(params=["blockd", "qemu-storage-daemon"])
def loop(request: pytest.FixtureRequest, tmp_path: Path, sock_dir: Path) -> Iterator[Loop]:
    sock = sock_dir / "qmp.sock"
    daemon = start_blockd(sock) if request.param == "blockd" else start_qsd(sock)
    qmp = negotiated(daemon)
    base = create(tmp_path / "disk.qcow2", "16M")
    qemu_io(base, f"write -P 0x5a 0 {SIZE}")
    nbd_sock = sock_dir / "nbd.sock"
    try:
        lp = Loop(tmp_path, daemon, qmp, f"nbd+unix:///disk?socket={nbd_sock}")
        lp.ok("blockdev-add", driver="file", filename=str(base), **{"node-name": "disk-file"})
        lp.ok("blockdev-add", driver="qcow2", file="disk-file", **{"node-name": "disk"})
        lp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd_sock)}})
        lp.ok("block-export-add", type="nbd", id="e", name="disk", writable=True,
              **{"node-name": "disk"})  # fmt: skip
        yield lp
    finally:
        qmp.close()
        daemon.stop()


def start_guest(lp: Loop) -> Guest:
    python = require_system_module("nbd")
    script = lp.dir / "writer.py"
    script.write_text(WRITER)
    log = lp.dir / "writes.log"
    proc = subprocess.Popen(
        [python, str(script), lp.uri, "17", str(SIZE), str(log)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return Guest(proc, log, bytearray(b"\x5a" * SIZE))


@pytest.mark.parametrize("merge", ["commit", "stream"])
def test_twenty_rounds_of_snapshot_and_merge(loop: Loop, merge: str) -> None:
    lp = loop
    guest = start_guest(lp)
    try:
        run_rounds(lp, guest, merge)
    finally:
        if guest.proc.poll() is None:
            guest.proc.kill()


def run_rounds(lp: Loop, guest: Guest, merge: str) -> None:
    current, current_path = "disk", lp.dir / "disk.qcow2"
    for n in range(ROUNDS):
        name = f"ov{n}"
        overlay_path = lp.make_overlay(name)
        lp.ok("blockdev-snapshot", node=current, overlay=name)
        assert lp.export_node() == name
        guest.wait_writes(10)  # into the overlay
        if merge == "commit":
            lp.ok("block-commit", device=name, **{"job-id": f"c{n}"})
            lp.qmp.wait_event("BLOCK_JOB_READY", timeout=60, device=f"c{n}")
            lp.ok("block-job-complete", device=f"c{n}")
            lp.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60, device=f"c{n}")
            assert lp.export_node() == current
            lp.ok("blockdev-del", **{"node-name": name})
            lp.ok("blockdev-del", **{"node-name": f"{name}-file"})
            overlay_path.unlink()
        else:
            lp.ok("block-stream", device=name, **{"job-id": f"s{n}"})
            lp.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60, device=f"s{n}")
            assert lp.export_node() == name
            lp.ok("blockdev-del", **{"node-name": current})
            lp.ok("blockdev-del", **{"node-name": f"{current}-file"})
            current_path.unlink()
            current, current_path = name, overlay_path
        completed = [
            e for e in lp.qmp.events if e["event"] == "BLOCK_JOB_COMPLETED" and "error" in e["data"]
        ]
        assert completed == []
        # one image again, serving exactly what the guest wrote
        assert lp.node_names() == {current, f"{current}-file"}
        guest.pause()
        assert lp.guest_view() == bytes(guest.model), f"round {n}"
        guest.resume()
    guest.stop()
    assert guest.writes > ROUNDS * 5
    assert lp.guest_view() == bytes(guest.model)
    lp.ok("block-export-del", id="e")
    lp.qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
    lp.ok("blockdev-del", **{"node-name": current})
    lp.ok("blockdev-del", **{"node-name": f"{current}-file"})
    assert backing_of(current_path) is None
    check(current_path)
    info = subprocess.run(
        [require_tool("qemu-img"), "info", "--output=json", str(current_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(info)["virtual-size"] == SIZE
