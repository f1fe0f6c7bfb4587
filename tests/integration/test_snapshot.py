"""External snapshots of an exported disk while a guest writes to it.

The guest is a libnbd client (Debian's system python) keeping several writes
in flight, each into its own 4 KiB slot with content of its own, and logging
when it sent each one and when the reply came (``time.monotonic``: one clock
for every process of the machine).  The judges are qemu-img (check, info,
convert) on the images once the daemon has stopped:

* nothing the guest was told is written is missing from the disk's view
  (the overlay's chain), and nothing is there that the guest did not write;
* every write acknowledged before the command was sent is in the old image,
  and none sent after its reply is: they are in the overlay;
* the client never lost its connection (its script would fail).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, RawQMP, start_blockd
from tests.images import check, check_consistent, create, guest_view, qemu_img, qemu_io
from tests.integration.test_nbd import nbdsh

MiB = 1 << 20
SIZE = 64 * MiB
SLOT = 4096
SLOTS = SIZE // SLOT
#: what base holds before the guest starts (slots are written from 8 MiB on)
BASE_DATA = (0, 8 * MiB)

WRITER = """
import nbd, os, sys, time
uri, stop_path = sys.argv[1:3]
h = nbd.NBD(); h.connect_uri(uri)
slot, limit = 2048, 16384  # from 8 MiB on
inflight, flushes, since = {}, {}, 0

def reap():
    global since
    h.poll(-1)
    for cookie in [c for c in inflight if h.aio_command_completed(c)]:
        s, sent = inflight.pop(cookie)
        print(s, sent, time.monotonic(), flush=True)
        since += 1
    for cookie in [c for c in flushes if h.aio_command_completed(c)]:
        print("F", flushes.pop(cookie), time.monotonic(), flush=True)
    if since >= 64:  # now and then a flush, as a guest's file system does
        flushes[h.aio_flush()] = time.monotonic()
        since = 0

while slot < limit and not os.path.exists(stop_path):
    while len(inflight) < 8 and slot < limit:
        data = slot.to_bytes(8, "little") * 512
        inflight[h.aio_pwrite(data, slot * 4096)] = (slot, time.monotonic())
        slot += 1
    reap()
while inflight or flushes:
    reap()
h.flush(); h.shutdown()
print("done", flush=True)
"""


def slot_data(slot: int) -> bytes:
    return slot.to_bytes(8, "little") * (SLOT // 8)


class Guest:
    """The libnbd writer: several writes in flight, each logged (slot, sent,
    acknowledged) on its stdout as its reply arrives."""

    def __init__(self, d: Path, uri: str) -> None:
        nbdsh("import nbd")  # fails loudly if the bindings are missing
        script = d / "writer.py"
        script.write_text(WRITER)
        self.stop_file = d / "stop"
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", str(script), uri, str(self.stop_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.writes: list[tuple[int, float, float]] = []
        self.stderr_text = ""
        #: (sent, acknowledged) of the guest's flushes
        self.flushes: list[tuple[float, float]] = []

    def _parse(self, line: str) -> None:
        what, sent, acked = line.split()
        if what == "F":
            self.flushes.append((float(sent), float(acked)))
        else:
            self.writes.append((int(what), float(sent), float(acked)))

    def durable_before(self, moment: float) -> set[int]:
        """Slots whose write was acknowledged before a flush sent by ``moment``
        was acknowledged: a crash cannot lose them."""
        covered = max((sent for sent, acked in self.flushes if acked <= moment), default=0.0)
        return {slot for slot, _, acked in self.writes if acked <= covered}

    def wait_for(self, count: int, *, flushes: int = 0) -> None:
        """Read the log until ``count`` more writes (and ``flushes`` more
        flushes) are acknowledged."""
        assert self.proc.stdout is not None
        want, want_flushes = len(self.writes) + count, len(self.flushes) + flushes
        while len(self.writes) < want or len(self.flushes) < want_flushes:
            line = self.proc.stdout.readline().decode()
            assert line and line != "done\n", f"the writer stopped early: {self.stderr()}"
            self._parse(line)

    def finish(self) -> None:
        """Stop the writer; it must end cleanly (never disconnected)."""
        self.stop_file.touch()
        assert self.read_rest() == 0, self.stderr_text
        assert self.writes

    def read_rest(self) -> int:
        """Log what is left until the writer exits; its exit status.  Read through
        the same buffered pipe as :meth:`wait_for` (``communicate`` would skip
        what that buffer holds already)."""
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        lines = self.proc.stdout.read().decode().splitlines()
        self.stderr_text = self.proc.stderr.read().decode()
        status = self.proc.wait(60)
        if status == 0:
            assert lines[-1] == "done", self.stderr_text
        for line in lines:
            if line != "done":
                self._parse(line)
        return status

    def stderr(self) -> str:
        self.proc.kill()
        return self.proc.communicate()[1].decode()


@dataclass
class Served:
    dir: Path
    daemon: DaemonProcess
    qmp: RawQMP
    uri: str

    def execute(self, command: str, **arguments: Any) -> Any:
        return self.qmp.execute(command, arguments)

    def export_node(self) -> str:
        [export] = self.execute("query-block-exports")["return"]
        name: str = export["node-name"]
        return name

    def ro(self, name: str) -> bool:
        nodes = self.execute("query-named-block-nodes", flat=True)["return"]
        return bool(next(n["ro"] for n in nodes if n["node-name"] == name))

    def stop(self) -> None:
        self.qmp.close()
        self.daemon.stop()
        assert "Traceback" not in self.daemon.stderr(), self.daemon.stderr()[-3000:]


def serve(d: Path, sock_dir: Path) -> Served:
    """base.qcow2 (8 MiB of data) exported writable as 'disk'; ov.qcow2, an
    empty image without a backing, added with ``backing: null``."""
    qemu_io(create(d / "base.qcow2", "64M"), "write -P 0x11 0 8M")
    create(d / "ov.qcow2", "64M")
    daemon = start_blockd(sock_dir / "qmp.sock")
    qmp = RawQMP(sock_dir / "qmp.sock")
    qmp.negotiate()
    for name, extra in (("base", {}), ("ov", {"backing": None})):
        file = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
        args = {"driver": "qcow2", "node-name": name, "file": file, **extra}
        assert qmp.execute("blockdev-add", args) == {"return": {}}
    nbd_sock = sock_dir / "nbd.sock"
    addr = {"type": "unix", "data": {"path": str(nbd_sock)}}
    assert qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
    export = {"type": "nbd", "id": "e", "node-name": "base", "name": "disk", "writable": True}
    assert qmp.execute("block-export-add", export) == {"return": {}}
    return Served(d, daemon, qmp, f"nbd+unix:///disk?socket={nbd_sock}")


@pytest.fixture
def served(tmp_path: Path, sock_dir: Path) -> Iterator[Served]:
    s = serve(tmp_path, sock_dir)
    try:
        yield s
    finally:
        s.qmp.close()
        s.daemon.stop()


def slots_in(image: Path, out: Path) -> dict[int, bytes]:
    """Each written slot's content in ``image`` read alone (its chain cut off)."""
    alone = json.dumps({"driver": "qcow2", "backing": None,
                        "file": {"driver": "file", "filename": str(image)}})  # fmt: skip
    qemu_img("convert", "-O", "raw", f"json:{alone}", str(out))
    raw = out.read_bytes()
    return {s: raw[s * SLOT : (s + 1) * SLOT] for s in range(BASE_DATA[1] // SLOT, SLOTS)}


def test_snapshot_while_the_guest_writes(served: Served) -> None:
    d = served.dir
    guest = Guest(d, served.uri)
    guest.wait_for(200)
    sent = time.monotonic()
    reply = served.execute("blockdev-snapshot", node="base", overlay="ov")
    answered = time.monotonic()
    assert reply == {"return": {}}
    # until 150 writes sent after the reply are acknowledged (what was written
    # while the command ran may still be waiting in the log)
    while sum(sent_at > answered for _, sent_at, _ in guest.writes) < 150:
        guest.wait_for(50)
    guest.finish()
    assert served.export_node() == "ov"
    assert served.ro("base") is True
    served.stop()
    check(d / "base.qcow2")
    check(d / "ov.qcow2")
    info = json.loads(qemu_img("info", "--output=json", str(d / "ov.qcow2")))
    assert info["backing-filename"] == str(d / "base.qcow2")
    assert info["backing-filename-format"] == "qcow2"
    # the disk's view: base's data, then every write the guest made
    view = guest_view(d / "ov.qcow2", d / "view.raw").read_bytes()
    assert view[: 8 * MiB] == b"\x11" * (8 * MiB)
    written = {slot for slot, _, _ in guest.writes}
    assert len(written) == len(guest.writes)
    for slot in range(BASE_DATA[1] // SLOT, SLOTS):
        want = slot_data(slot) if slot in written else bytes(SLOT)
        assert view[slot * SLOT : (slot + 1) * SLOT] == want, slot
    # the switch: what was acknowledged before is in base, what came after is not
    in_base = slots_in(d / "base.qcow2", d / "base.raw")
    in_ov = slots_in(d / "ov.qcow2", d / "ov.raw")
    before = [s for s, _, acked in guest.writes if acked < sent]
    after = [s for s, issued, _ in guest.writes if issued > answered]
    assert len(before) >= 200 and len(after) >= 150
    for slot in before:
        assert in_base[slot] == slot_data(slot), slot
    # (the overlay may hold a copy of base's slots: a partial cluster is completed
    # from the backing when first written)
    for slot in after:
        assert in_base[slot] == bytes(SLOT) and in_ov[slot] == slot_data(slot), slot


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.1, 1.0])
def test_sigkill_during_snapshot_keeps_the_guest_view(
    tmp_path: Path, sock_dir: Path, delay: float
) -> None:
    """Killed just after the command is sent (before, during or after its one
    header write): every image is valid, and whichever image the overlay's
    header makes the disk holds every write the guest was told is done."""
    d = tmp_path
    s = serve(d, sock_dir)
    guest = Guest(d, s.uri)
    guest.wait_for(100, flushes=1)
    sent = time.monotonic()
    s.qmp.send(json.dumps({"execute": "blockdev-snapshot",
                           "arguments": {"node": "base", "overlay": "ov"}}))  # fmt: skip
    time.sleep(delay)  # only varies where the kill lands; nothing is timed
    os.kill(s.daemon.proc.pid, signal.SIGKILL)
    s.daemon.proc.wait(10)
    s.qmp.close()
    killed = time.monotonic()
    guest.read_rest()  # disconnected: it fails
    check_consistent(d / "base.qcow2")
    check_consistent(d / "ov.qcow2")
    info = json.loads(qemu_img("info", "--output=json", str(d / "ov.qcow2")))
    written = {slot for slot, _, _ in guest.writes}
    # a crash loses only what no flush covered (the NBD contract)
    kept = guest.durable_before(killed)
    if "backing-filename" in info:
        assert info["backing-filename"] == str(d / "base.qcow2")
        disk = d / "ov.qcow2"
        # the snapshot flushed base before it wrote the header
        kept |= {slot for slot, _, acked in guest.writes if acked < sent}
    else:
        # never named base: nothing can have been written to it
        assert set(slots_in(d / "ov.qcow2", d / "ov.raw").values()) == {bytes(SLOT)}
        disk = d / "base.qcow2"
    view = guest_view(disk, d / "view.raw").read_bytes()
    assert view[: 8 * MiB] == b"\x11" * (8 * MiB)
    assert len(kept) >= 64
    for slot in range(BASE_DATA[1] // SLOT, SLOTS):
        got = view[slot * SLOT : (slot + 1) * SLOT]
        if slot in kept:
            assert got == slot_data(slot), slot
        elif slot in written:  # acknowledged, but no flush covered it
            assert got in (slot_data(slot), bytes(SLOT)), slot
        else:  # never sent, or no reply came
            assert got in (slot_data(slot), bytes(SLOT)), slot


def test_a_failed_header_write_undoes_the_whole_transaction(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Two disks in one transaction; the second overlay's header write fails
    (blkdebug): the first overlay's header, already written, is put back as it
    was, byte for byte, and both exports stay where they were."""
    d = tmp_path
    for name in ("a", "b", "a1", "b1"):
        create(d / f"{name}.qcow2", "64M")
    qemu_io(d / "a.qcow2", "write -P 0x11 0 1M")
    before = {name: (d / f"{name}.qcow2").read_bytes() for name in ("a", "b", "a1", "b1")}
    daemon = start_blockd(sock_dir / "qmp.sock")
    qmp = RawQMP(sock_dir / "qmp.sock")
    qmp.negotiate()
    try:
        for name in ("a", "b", "a1", "b1"):
            file: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
            if name == "b1":
                rule = {"event": "pwritev", "errno": 5}
                file = {"driver": "blkdebug", "image": file, "inject-error": [rule]}
            args = {"driver": "qcow2", "node-name": name, "file": file}
            if name.endswith("1"):
                args["backing"] = None
            assert qmp.execute("blockdev-add", args) == {"return": {}}
        addr = {"type": "unix", "data": {"path": str(sock_dir / "nbd.sock")}}
        assert qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
        for disk in "ab":
            export = {"type": "nbd", "id": disk, "node-name": disk, "writable": True}
            assert qmp.execute("block-export-add", export) == {"return": {}}
        actions = [{"type": "blockdev-snapshot", "data": {"node": disk, "overlay": f"{disk}1"}}
                   for disk in "ab"]  # fmt: skip
        reply = qmp.execute("transaction", {"actions": actions})
        assert reply["error"]["class"] == "GenericError"
        assert "Input/output error" in reply["error"]["desc"], reply
        exports = sorted((e["id"], e["node-name"])
                         for e in qmp.execute("query-block-exports")["return"])  # fmt: skip
        assert exports == [("a", "a"), ("b", "b")]
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})["return"]
        named = {n["node-name"]: n for n in nodes if not n["node-name"].startswith("#")}
        assert all(not n["ro"] and "backing_file" not in n for n in named.values())
        uri = f"nbd+unix:///a?socket={sock_dir / 'nbd.sock'}"
        subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 0 1M", uri], check=True,
                       capture_output=True)  # fmt: skip
        assert qmp.execute("block-export-del", {"id": "a", "mode": "hard"}) == {"return": {}}
        assert qmp.execute("block-export-del", {"id": "b", "mode": "hard"}) == {"return": {}}
        qmp.wait_event("BLOCK_EXPORT_DELETED", id="b")
    finally:
        qmp.close()
        daemon.stop()
    assert "Traceback" not in daemon.stderr()
    assert f"a1 names {d / 'a.qcow2'}" in daemon.stderr()  # written, then taken back
    for name in ("a", "b", "a1", "b1"):
        assert (d / f"{name}.qcow2").read_bytes() == before[name], name
        check(d / f"{name}.qcow2")
