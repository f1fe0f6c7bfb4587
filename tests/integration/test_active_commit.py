"""Active commit: the exported active layer merged into base while clients write to it.

The guest's side is played by qemu-io and libnbd writing through blockd's
NBD export; the judges are qemu-img (check, convert) and qemu-io reading the
images once the daemon has stopped.  Every test keeps a model of what the
guest wrote and compares the image that ends up serving the disk with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, check_event, start_blockd, start_qsd
from tests.images import (
    backing_of,
    check,
    check_consistent,
    create,
    guest_view,
    qemu_io,
    same_data,
)
from tests.integration.test_nbd import io, nbdsh

MiB = 1 << 20
SIZE = 64 * MiB


@dataclass
class Disk:
    """A running blockd serving ``top`` (base <- mid <- top) over NBD, and a model."""

    dir: Path
    daemon: DaemonProcess
    qmp: RawQMP
    model: bytearray
    nbd_sock: Path
    uri: str = ""
    written: list[str] = field(default_factory=list)

    def write(self, offset: int, length: int, pattern: int) -> None:
        io(self.uri, f"write -P {pattern:#x} {offset} {length}")
        self.model[offset : offset + length] = bytes([pattern]) * length

    def zero(self, offset: int, length: int) -> None:
        io(self.uri, f"write -z {offset} {length}")
        self.model[offset : offset + length] = bytes(length)

    def execute(self, command: str, **arguments: Any) -> Any:
        return self.qmp.execute(command, arguments)

    def commit(self, **arguments: Any) -> None:
        assert self.execute("block-commit", **{"job-id": "j", "device": "top", **arguments}) == {
            "return": {}
        }

    def job(self) -> dict[str, Any]:
        [info] = self.execute("query-block-jobs")["return"]
        assert isinstance(info, dict)
        return info

    def export_node(self) -> str:
        [export] = self.execute("query-block-exports")["return"]
        name: str = export["node-name"]
        return name

    def ro(self, name: str) -> bool:
        nodes = self.execute("query-named-block-nodes", flat=True)["return"]
        return next(n["ro"] for n in nodes if n["node-name"] == name)

    def stop(self) -> None:
        self.qmp.close()
        self.daemon.stop()
        assert "Traceback" not in self.daemon.stderr(), self.daemon.stderr()[-3000:]

    def matches(self, image: Path) -> bool:
        """Whether ``image``'s chain reads exactly as the model."""
        raw = guest_view(image, self.dir / f"{image.stem}.view.raw")
        return raw.read_bytes() == bytes(self.model)


def make_chain(d: Path) -> tuple[Path, Path, Path]:
    base = create(d / "base.qcow2", "64M")
    mid = create(d / "mid.qcow2", "64M", backing="base.qcow2")
    top = create(d / "top.qcow2", "64M", backing="mid.qcow2")
    qemu_io(base, "write -P 0x11 0 8M", "write -P 0x12 40M 4M")
    qemu_io(mid, "write -P 0x21 4M 8M", "write -z 41M 1M")
    qemu_io(top, "write -P 0x31 6M 1M", "write -P 0x32 50M 2M")
    return base, mid, top


def add_chain(qmp: RawQMP, d: Path, *, files: dict[str, dict[str, Any]] | None = None) -> None:
    """The explicit chain; ``files`` replaces the file child of the images it names."""
    for name, backing, ro in (("base", None, True), ("mid", "base", True), ("top", "mid", False)):
        file: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
        file = (files or {}).get(name, file)
        args = {"driver": "qcow2", "node-name": name, "read-only": ro, "backing": backing}
        assert qmp.execute("blockdev-add", {**args, "file": file}) == {"return": {}}


def serve(d: Path, sock_dir: Path, *, explicit: bool = True, **chain_options: Any) -> Disk:
    make_chain(d)
    model = bytearray(guest_view(d / "top.qcow2", d / "start.raw").read_bytes())
    daemon = start_blockd(sock_dir / "qmp.sock")
    qmp = RawQMP(sock_dir / "qmp.sock")
    qmp.negotiate()
    if explicit:
        add_chain(qmp, d, **chain_options)
    else:
        file = {"driver": "file", "filename": str(d / "top.qcow2")}
        args = {"driver": "qcow2", "node-name": "top", "file": file}
        assert qmp.execute("blockdev-add", args) == {"return": {}}
    nbd_sock = sock_dir / "nbd.sock"
    addr = {"type": "unix", "data": {"path": str(nbd_sock)}}
    assert qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
    export = {"type": "nbd", "id": "e", "node-name": "top", "name": "disk", "writable": True}
    assert qmp.execute("block-export-add", export) == {"return": {}}
    return Disk(d, daemon, qmp, model, nbd_sock, f"nbd+unix:///disk?socket={nbd_sock}")


@contextmanager
def serving(d: Path, sock_dir: Path, **options: Any) -> Iterator[Disk]:
    disk = serve(d, sock_dir, **options)
    try:
        yield disk
    finally:
        disk.qmp.close()
        disk.daemon.stop()


@pytest.fixture
def disk(tmp_path: Path, sock_dir: Path) -> Iterator[Disk]:
    with serving(tmp_path, sock_dir) as d:
        yield d


def final_statuses(disk: Disk) -> list[str]:
    disk.qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="null")
    return disk.qmp.job_statuses("j")


def test_complete_pivots_the_export_with_writes_before_during_and_after_ready(
    disk: Disk,
) -> None:
    d = disk.dir
    disk.write(1 * MiB, 1 * MiB, 0x41)  # before the job
    disk.commit(speed=2 * MiB)
    info = disk.job()
    assert info["status"] == "running" and info["ready"] is False
    disk.write(20 * MiB, 3 * MiB, 0x42)  # while it copies
    disk.zero(50 * MiB, 512 * 1024)
    assert disk.job()["status"] == "running"
    assert disk.execute("block-job-complete", device="j")["error"]["desc"] == (
        "Job 'j' in state 'running' cannot accept command verb 'complete'"
    )
    assert disk.execute("block-job-set-speed", device="j", speed=0) == {"return": {}}
    ready = disk.qmp.wait_event("BLOCK_JOB_READY", device="j")
    check_event("BLOCK_JOB_READY", ready["data"])
    assert ready["data"]["len"] == ready["data"]["offset"]
    length = disk.job()["len"]
    disk.write(30 * MiB, 1 * MiB, 0x43)  # while READY: len grows by what was written
    deadline = time.monotonic() + 10
    while (info := disk.job())["offset"] < length + MiB and time.monotonic() < deadline:
        time.sleep(0.05)
    assert info["len"] == length + MiB and info["offset"] == length + MiB
    assert info["status"] == "ready" and info["ready"] is True
    assert disk.execute("block-job-complete", device="j") == {"return": {}}
    done = disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
    assert "error" not in done["data"]
    assert final_statuses(disk) == [
        "created", "running", "ready", "BLOCK_JOB_READY",
        "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    assert disk.export_node() == "base"
    assert disk.ro("base") is False  # base is the active image now
    disk.write(60 * MiB, 1 * MiB, 0x44)  # after the pivot: lands in base only
    disk.stop()
    for image in ("base", "mid", "top"):
        check(d / f"{image}.qcow2")
    assert disk.matches(d / "base.qcow2")
    # No header was rewritten: top had no overlay, and top and mid stay as they were.
    assert backing_of(d / "top.qcow2") == "mid.qcow2"
    assert backing_of(d / "mid.qcow2") == "base.qcow2"
    qemu_io(d / "base.qcow2", "read -P 0x44 60M 1M", "read -P 0x43 30M 1M")


def test_soft_cancel_in_ready_completes_without_pivot(disk: Disk) -> None:
    d = disk.dir
    disk.write(3 * MiB, 2 * MiB, 0x51)
    disk.commit()
    disk.qmp.wait_event("BLOCK_JOB_READY", device="j")
    disk.write(9 * MiB, 1 * MiB, 0x52)
    assert disk.execute("block-job-cancel", device="j") == {"return": {}}
    done = disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
    assert "error" not in done["data"]
    assert final_statuses(disk)[-5:] == [
        "waiting",
        "pending",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert disk.export_node() == "top"
    assert disk.ro("base") is True  # blockd restores the open mode (QSD 7.2 does not)
    disk.stop()
    for image in ("base", "mid", "top"):
        check(d / f"{image}.qcow2")
    assert disk.matches(d / "top.qcow2")
    assert disk.matches(d / "base.qcow2")  # base holds a consistent copy


@pytest.mark.parametrize("when", ["running", "ready"])
@pytest.mark.parametrize("command", ["block-job-cancel-force", "job-cancel"])
def test_forced_cancel_changes_nothing_the_guest_sees(disk: Disk, when: str, command: str) -> None:
    d = disk.dir
    disk.write(2 * MiB, 1 * MiB, 0x61)
    if when == "running":
        disk.commit(speed=1 * MiB)
    else:
        disk.commit()
        disk.qmp.wait_event("BLOCK_JOB_READY", device="j")
    disk.write(12 * MiB, 1 * MiB, 0x62)
    if command == "job-cancel":
        assert disk.execute("job-cancel", id="j") == {"return": {}}
    elif when == "running":
        # Before READY a soft cancel is a real cancel too.
        assert disk.execute("block-job-cancel", device="j") == {"return": {}}
    else:
        assert disk.execute("block-job-cancel", device="j", force=True) == {"return": {}}
    disk.qmp.wait_event("BLOCK_JOB_CANCELLED", device="j")
    statuses = final_statuses(disk)
    assert statuses[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert ("BLOCK_JOB_READY" in statuses) is (when == "ready")
    assert disk.export_node() == "top"
    assert disk.ro("base") is True
    disk.write(13 * MiB, 1 * MiB, 0x63)
    disk.stop()
    for image in ("base", "mid", "top"):
        check(d / f"{image}.qcow2")
    assert disk.matches(d / "top.qcow2")


def test_pause_in_ready_is_standby_and_complete_waits_for_resume(disk: Disk) -> None:
    d = disk.dir
    disk.commit()
    disk.qmp.wait_event("BLOCK_JOB_READY", device="j")
    assert disk.execute("block-job-pause", device="j") == {"return": {}}
    disk.qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="standby")
    info = disk.job()
    assert info["status"] == "standby" and info["paused"] is True and info["ready"] is True
    disk.write(7 * MiB, 1 * MiB, 0x71)  # the guest is not paused, only the copying
    assert disk.job()["len"] > disk.job()["offset"]
    # 7.2 accepts complete in standby; it happens once the job runs again.
    assert disk.execute("block-job-complete", device="j") == {"return": {}}
    time.sleep(0.3)
    assert disk.job()["status"] == "standby"
    assert disk.export_node() == "top"
    assert disk.execute("block-job-resume", device="j") == {"return": {}}
    disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
    assert final_statuses(disk)[4:] == [
        "standby",
        "ready",
        "waiting",
        "pending",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert disk.export_node() == "base"
    disk.stop()
    check(d / "base.qcow2")
    assert disk.matches(d / "base.qcow2")


def test_manual_finalize_copies_what_was_written_while_pending(disk: Disk) -> None:
    d = disk.dir
    disk.commit(**{"auto-finalize": False, "auto-dismiss": False})
    disk.qmp.wait_event("BLOCK_JOB_READY", device="j")
    assert disk.execute("job-complete", id="j") == {"return": {}}
    disk.qmp.wait_event("BLOCK_JOB_PENDING", id="j")
    disk.write(33 * MiB, 2 * MiB, 0x81)  # still served by top, still tracked
    assert disk.export_node() == "top"
    assert disk.execute("job-finalize", id="j") == {"return": {}}
    disk.qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="concluded")
    assert disk.export_node() == "base"
    assert disk.execute("job-dismiss", id="j") == {"return": {}}
    disk.stop()
    check(d / "base.qcow2")
    assert disk.matches(d / "base.qcow2")


@pytest.mark.parametrize(
    ("where", "event", "errno", "policy", "action", "io_status"),
    [
        ("base", "write_aio", 5, "stop", "stop", "failed"),
        ("base", "write_aio", 28, "enospc", "stop", "nospace"),
        ("base", "write_aio", 5, "report", "report", None),
        ("base", "write_aio", 5, "ignore", "ignore", None),
        ("mid", "read_aio", 5, "stop", "stop", "failed"),
    ],
)
def test_io_errors_follow_on_error(
    tmp_path: Path,
    sock_dir: Path,
    where: str,
    event: str,
    errno: int,
    policy: str,
    action: str,
    io_status: str | None,
) -> None:
    file = {"driver": "file", "filename": str(tmp_path / f"{where}.qcow2")}
    rule = {"event": event, "errno": errno, "once": True}
    if where == "mid":
        rule["sector"] = 4 * MiB // 512  # mid's data, which the commit reads
    blkdebug = {"driver": "blkdebug", "image": file, "inject-error": [rule]}
    operation = "write" if event == "write_aio" else "read"
    with serving(tmp_path, sock_dir, files={where: blkdebug}) as disk:
        disk.commit(**{"on-error": policy})
        error = disk.qmp.wait_event("BLOCK_JOB_ERROR", device="j")
        assert error["data"] == {"device": "j", "operation": operation, "action": action}
        if action == "report":
            done = disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
            assert done["data"]["error"] == "Input/output error"
            assert disk.export_node() == "top"
            assert disk.ro("base") is True
        else:
            if action == "stop":
                disk.qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="paused")
                assert disk.job()["io-status"] == io_status
                disk.write(5 * MiB, 1 * MiB, 0x91)  # the guest goes on meanwhile
                assert disk.execute("block-job-resume", device="j") == {"return": {}}
            disk.qmp.wait_event("BLOCK_JOB_READY", device="j")
            assert disk.execute("block-job-complete", device="j") == {"return": {}}
            done = disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
            assert "error" not in done["data"]
            assert disk.export_node() == "base"
        disk.stop()
    for image in ("base", "mid", "top"):
        check(tmp_path / f"{image}.qcow2")
    assert disk.matches(tmp_path / ("top.qcow2" if action == "report" else "base.qcow2"))


def test_header_chain_pivot_then_delete_the_old_top(tmp_path: Path, sock_dir: Path) -> None:
    """Base was opened with top's chain; it outlives top while the export uses it."""
    with serving(tmp_path, sock_dir, explicit=False) as disk:
        disk.commit()
        disk.qmp.wait_event("BLOCK_JOB_READY", device="j")
        assert disk.execute("block-job-complete", device="j") == {"return": {}}
        disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
        node = disk.export_node()
        assert node.startswith("#block")
        assert disk.execute("blockdev-del", **{"node-name": "top"}) == {"return": {}}
        names = [n["node-name"] for n in disk.execute("query-named-block-nodes")["return"]]
        assert node in names and "top" not in names
        disk.write(17 * MiB, 1 * MiB, 0xA1)
        # hard: qemu-io's disconnect may not have reached the server yet
        assert disk.execute("block-export-del", id="e", mode="hard") == {"return": {}}
        disk.qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
        assert disk.execute("query-named-block-nodes")["return"] == []
        disk.stop()
    check(tmp_path / "base.qcow2")
    assert disk.matches(tmp_path / "base.qcow2")


WRITER = """
import nbd, os, random, sys
uri, seed, lo, hi, seconds, out = sys.argv[1:7]
rng = random.Random(int(seed)); lo, hi = int(lo), int(hi)
h = nbd.NBD(); h.connect_uri(uri)
log = []
import time
end = time.monotonic() + float(seconds)
while time.monotonic() < end:
    length = rng.choice([4096, 65536, 300000])
    offset = rng.randrange(lo, hi - length)
    data = os.urandom(length)
    h.pwrite(data, offset, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
    log.append((offset, data))
h.flush(); h.shutdown()
with open(out, "wb") as f:
    for offset, data in log:
        f.write(offset.to_bytes(8, "little") + len(data).to_bytes(8, "little") + data)
"""


def apply_log(model: bytearray, path: Path) -> int:
    raw = path.read_bytes()
    pos = count = 0
    while pos < len(raw):
        offset = int.from_bytes(raw[pos : pos + 8], "little")
        length = int.from_bytes(raw[pos + 8 : pos + 16], "little")
        model[offset : offset + length] = raw[pos + 16 : pos + 16 + length]
        pos += 16 + length
        count += 1
    return count


def test_writers_keep_going_through_the_pivot(disk: Disk) -> None:
    """Two libnbd clients write nonstop while the job copies, goes READY and
    pivots; every acknowledged write ends up in base, in order."""
    d = disk.dir
    nbdsh("import nbd")  # fails loudly if the bindings are missing
    script = d / "writer.py"
    script.write_text(WRITER)
    writers = []
    for i, (lo, hi) in enumerate(((0, SIZE // 2), (SIZE // 2, SIZE))):
        argv = ["/usr/bin/python3", str(script), disk.uri, str(i), str(lo), str(hi), "4",
                str(d / f"log{i}")]  # fmt: skip
        writers.append(subprocess.Popen(argv, stderr=subprocess.PIPE))
    time.sleep(0.5)
    disk.commit()
    disk.qmp.wait_event("BLOCK_JOB_READY", device="j")
    time.sleep(0.5)
    assert disk.execute("block-job-complete", device="j") == {"return": {}}
    disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
    assert disk.export_node() == "base"
    for writer in writers:
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
    writes = sum(apply_log(disk.model, d / f"log{i}") for i in range(2))
    assert writes > 20
    disk.stop()
    for image in ("base", "mid", "top"):
        check(d / f"{image}.qcow2")
    assert disk.matches(d / "base.qcow2")


def test_sigkill_during_active_commit_loses_nothing(disk: Disk) -> None:
    """A crash at any moment leaves every image valid and the chain serving the
    guest's data: top (with its chain) still holds every acknowledged write."""
    d = disk.dir
    disk.write(2 * MiB, 1 * MiB, 0xB1)
    disk.commit(speed=8 * MiB)
    stop = threading.Event()

    def keep_writing() -> None:
        n = 0
        while not stop.is_set():
            disk.write((n % 40) * MiB, 256 * 1024, 0xC0 + n % 16)
            n += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    time.sleep(1.0)
    stop.set()
    writer.join()
    os.kill(disk.daemon.proc.pid, signal.SIGKILL)
    disk.daemon.proc.wait(10)
    disk.qmp.close()
    for image in ("base", "mid", "top"):
        check_consistent(d / f"{image}.qcow2")
    assert disk.matches(d / "top.qcow2")


def test_export_of_an_intermediate_follows_it_onto_base(tmp_path: Path, sock_dir: Path) -> None:
    """mid, opened along with top's chain, is also exported: as in QEMU, which
    replaces mid by base in the graph, the export serves base afterwards (the
    same data) and mid, used by nothing any more, is closed."""
    with serving(tmp_path, sock_dir, explicit=False) as disk:
        nodes = disk.execute("query-named-block-nodes", flat=True)["return"]

        def named(image: str) -> str:
            return next(
                n["node-name"]
                for n in nodes
                if n["drv"] == "qcow2" and n["image"]["filename"].endswith(image)
            )

        mid, base = named("mid.qcow2"), named("base.qcow2")
        export = {"type": "nbd", "id": "m", "node-name": mid, "name": "mid"}
        assert disk.execute("block-export-add", **export) == {"return": {}}
        mid_uri = f"nbd+unix:///mid?socket={disk.nbd_sock}"
        before = io(mid_uri, "read -P 0x21 4M 2M", read_only=True).splitlines()[0]
        disk.commit(**{"top-node": mid})
        disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
        assert backing_of(tmp_path / "top.qcow2") == str(tmp_path / "base.qcow2")
        exports = disk.execute("query-block-exports")["return"]
        assert sorted((e["id"], e["node-name"]) for e in exports) == [("e", "top"), ("m", base)]
        names = [n["node-name"] for n in disk.execute("query-named-block-nodes")["return"]]
        assert mid not in names and base in names
        assert io(mid_uri, "read -P 0x21 4M 2M", read_only=True).splitlines()[0] == before
        assert disk.execute("block-export-del", id="m", mode="hard") == {"return": {}}
        disk.qmp.wait_event("BLOCK_EXPORT_DELETED", id="m")
        names = [n["node-name"] for n in disk.execute("query-named-block-nodes")["return"]]
        assert base in names and "top" in names
        disk.stop()
    for image in ("base", "mid", "top"):
        check(tmp_path / f"{image}.qcow2")
    assert disk.matches(tmp_path / "top.qcow2")


def start_export(
    d: Path, sock_dir: Path, nodes: list[dict[str, Any]]
) -> tuple[DaemonProcess, RawQMP, str]:
    """blockd with ``nodes`` added in order and the last one exported as 'disk'."""
    daemon = start_blockd(sock_dir / "qmp.sock")
    qmp = RawQMP(sock_dir / "qmp.sock")
    qmp.negotiate()
    for node in nodes:
        assert qmp.execute("blockdev-add", node) == {"return": {}}
    nbd_sock = sock_dir / "nbd.sock"
    addr = {"type": "unix", "data": {"path": str(nbd_sock)}}
    assert qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
    export = {"type": "nbd", "id": "e", "node-name": nodes[-1]["node-name"], "name": "disk",
              "writable": True}  # fmt: skip
    assert qmp.execute("block-export-add", export) == {"return": {}}
    return daemon, qmp, f"nbd+unix:///disk?socket={nbd_sock}"


def test_raw_base_smaller_than_top(tmp_path: Path, sock_dir: Path) -> None:
    """A raw base (64 KiB granularity) shorter than top grows to top's size."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * (3 * MiB))
    top = create(tmp_path / "top.qcow2", "8M")
    qemu_io(top, "write -P 0x6b 2M 2M")
    raw = {"driver": "raw", "node-name": "base", "read-only": True,
           "file": {"driver": "file", "filename": str(base)}}  # fmt: skip
    qcow2 = {"driver": "qcow2", "node-name": "top", "backing": "base",
             "file": {"driver": "file", "filename": str(top)}}  # fmt: skip
    daemon, qmp, uri = start_export(tmp_path, sock_dir, [raw, qcow2])
    with qmp:
        io(uri, "write -P 0x7c 6M 1M")
        assert qmp.execute("block-commit", {"job-id": "j", "device": "top"}) == {"return": {}}
        qmp.wait_event("BLOCK_JOB_READY", device="j")
        io(uri, "write -P 0x7d 7M 4k")
        assert qmp.execute("block-job-complete", {"device": "j"}) == {"return": {}}
        qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
        io(uri, "read -P 0x5a 0 2M", "read -P 0x6b 2M 2M", "read -P 0 4M 2M",
           "read -P 0x7c 6M 1M", "read -P 0x7d 7M 4k")  # fmt: skip
    daemon.stop()
    assert base.stat().st_size == 8 * MiB
    data = base.read_bytes()
    assert data[: 2 * MiB] == b"\x5a" * (2 * MiB) and data[2 * MiB : 4 * MiB] == b"\x6b" * (2 * MiB)
    assert (
        data[4 * MiB : 6 * MiB] == bytes(2 * MiB)
        and data[7 * MiB : 7 * MiB + 4096] == b"\x7d" * 4096
    )


def test_empty_top_is_ready_at_once(tmp_path: Path, sock_dir: Path) -> None:
    base = create(tmp_path / "base.qcow2", "0")
    top = create(tmp_path / "top.qcow2", "0", backing="base.qcow2")
    daemon = start_blockd(sock_dir / "qmp.sock")
    with RawQMP(sock_dir / "qmp.sock") as qmp:
        qmp.negotiate()
        args = {"driver": "qcow2", "node-name": "top",
                "file": {"driver": "file", "filename": str(top)}}  # fmt: skip
        assert qmp.execute("blockdev-add", args) == {"return": {}}
        assert qmp.execute("block-commit", {"job-id": "j", "device": "top"}) == {"return": {}}
        ready = qmp.wait_event("BLOCK_JOB_READY", device="j")
        assert ready["data"]["len"] == 0 and ready["data"]["offset"] == 0
        assert qmp.execute("block-job-complete", {"device": "j"}) == {"return": {}}
        qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
    daemon.stop()
    check(base)
    check(top)


# -- blockd and qemu-storage-daemon 7.2 side by side ----------------------------------
#
# The same chain and the same conversation on each daemon, with the same
# expectations.  Bounds are far apart: 4 KiB/s owes minutes for what the job
# copied, a loaded machine costs seconds.

#: Patience for what must happen in seconds; far below what 4 KiB/s would owe.
SOON = 60.0
CRAWL = 4096


@pytest.fixture(params=["blockd", pytest.param("qsd", marks=pytest.mark.qsd)])
def either(request: pytest.FixtureRequest, sock_dir: Path) -> Iterator[DaemonProcess]:
    if request.param == "qsd":
        require_tool("qemu-storage-daemon")
        started = start_qsd(sock_dir / "qsd.sock")
    else:
        started = start_blockd(sock_dir / "qmp.sock")
    try:
        yield started
    finally:
        started.stop()


def chain_with_server(d: Path, qmp: RawQMP, sock_dir: Path) -> Path:
    """base (read-only) <- mid <- top added, an NBD server started; returns its socket."""
    make_chain(d)
    qmp.negotiate()
    add_chain(qmp, d)
    nbd_sock = sock_dir / "nbd.sock"
    addr = {"type": "unix", "data": {"path": str(nbd_sock)}}
    assert qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
    return nbd_sock


def export(qmp: RawQMP, node: str) -> None:
    args = {"type": "nbd", "id": node, "node-name": node, "name": node, "writable": True}
    assert qmp.execute("block-export-add", args) == {"return": {}}


def settled(qmp: RawQMP, length: int) -> dict[str, Any]:
    """The job once ``len`` has reached ``length`` and everything is copied.

    (A write shows in len only once the job looks at its dirty bitmap again.)
    """
    deadline = time.monotonic() + SOON
    while True:
        [info] = qmp.execute("query-block-jobs")["return"]
        if info["len"] >= length and info["offset"] == info["len"]:
            return dict(info)
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


@pytest.mark.parametrize("command", ["block-job-complete", "block-job-cancel"])
def test_a_lowered_speed_does_not_throttle_a_ready_commit(
    either: DaemonProcess, tmp_path: Path, sock_dir: Path, command: str
) -> None:
    """Found by the differential harness: blockd waited on the limiter for bytes
    copied before READY (minutes at 4 KiB/s); QEMU 7.2 ignores the limit in READY."""
    d = tmp_path
    with RawQMP(either.socket_path) as qmp:
        nbd_sock = chain_with_server(d, qmp, sock_dir)
        export(qmp, "top")
        uri = f"nbd+unix:///top?socket={nbd_sock}"
        commit = {"job-id": "j", "device": "top", "speed": 1 << 30}
        assert qmp.execute("block-commit", commit) == {"return": {}}
        ready = qmp.wait_event("BLOCK_JOB_READY", device="j")["data"]
        reply = qmp.execute("block-job-set-speed", {"device": "j", "speed": CRAWL})
        assert reply == {"return": {}}
        # 8 MiB written in READY: 2048 s at the lowered speed, copied at once.
        io(uri, "write -P 0x5e 16M 8M")
        info = settled(qmp, ready["len"] + 8 * MiB)
        assert info["speed"] == CRAWL and info["ready"] is True
        assert qmp.execute(command, {"device": "j"}) == {"return": {}}
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=SOON, device="j")["data"]
        assert "error" not in done and done["offset"] == done["len"] == info["len"]
        assert qmp.execute("quit") == {"return": {}}
    either.wait()
    check(d / "base.qcow2")
    # Nothing was written after the last copy: base holds what top's chain shows.
    assert same_data(guest_view(d / "top.qcow2", d / "top.raw"), d / "base.qcow2")


@pytest.mark.parametrize("force", [True, False])
@pytest.mark.parametrize("user", ["base", "raw", "blkdebug"])
def test_a_writable_export_added_during_the_commit_keeps_working(
    either: DaemonProcess, tmp_path: Path, sock_dir: Path, force: bool, user: str
) -> None:
    """Found by the differential harness: blockd made base read-only again after
    the cancel and the export's next write failed; QSD keeps serving it.

    ``user`` is what the export serves: base itself, or a writable raw or
    blkdebug node added on top of base (a writer the graph knows of, not the
    exports; blkdebug's child edge is named ``image``, not ``file``).
    """
    d = tmp_path
    with RawQMP(either.socket_path) as qmp:
        nbd_sock = chain_with_server(d, qmp, sock_dir)
        assert qmp.execute("block-commit", {"job-id": "j", "device": "top"}) == {"return": {}}
        qmp.wait_event("BLOCK_JOB_READY", device="j")
        # base is read-write while the job holds it
        if user == "raw":
            raw = {"driver": "raw", "node-name": "raw", "file": "base", "read-only": False}
            assert qmp.execute("blockdev-add", raw) == {"return": {}}
        if user == "blkdebug":
            dbg = {"driver": "blkdebug", "node-name": user, "image": "base", "read-only": False}
            assert qmp.execute("blockdev-add", dbg) == {"return": {}}
        export(qmp, user)
        uri = f"nbd+unix:///{user}?socket={nbd_sock}"
        io(uri, "write -P 0x71 60M 1M")
        assert qmp.execute("block-job-cancel", {"device": "j", "force": force}) == {"return": {}}
        qmp.wait_event("BLOCK_JOB_CANCELLED" if force else "BLOCK_JOB_COMPLETED", device="j")
        io(uri, "write -P 0x72 61M 1M", "read -P 0x71 60M 1M", "read -P 0x72 61M 1M")
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})["return"]
        assert next(n["ro"] for n in nodes if n["node-name"] == "base") is False
        assert qmp.execute("quit") == {"return": {}}
    either.wait()
    check(d / "base.qcow2")
    out = qemu_io(d / "base.qcow2", "read -P 0x71 60M 1M", "read -P 0x72 61M 1M")
    assert "failed" not in out, out
