"""A disk that fills up under a commit or an NBD client: blockd against qemu-storage-daemon 7.2.

Each daemon gets its own small tmpfs (``tests/diskfull.py``) holding base,
filled by a filler file until too little is left for what the job or the
client writes, and the same conversation.  Compared: every reply and event
(timestamps and progress offsets masked; QSD sends one BLOCK_JOB_ERROR per
request in flight, blockd one per failure, so repeats count once until the
job runs again),
and what the NBD client is told.  Judged on each side: base is consistent
while the job is paused (``qemu-img check``, the image still open), the
guest view of the disk is what it was, and the chain is as the outcome
says: moved onto base after a resume, unchanged after a ``report``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_system_module, require_tool
from tests.diskfull import MiB, SmallFs, small_fs
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import backing_of, check, check_consistent, create, guest_view, qemu_io, same_data

pytestmark = pytest.mark.qsd

#: What is left free on the small file system: less than a commit writes.
LEFT = 1 * MiB

Transcript = list[Any]


@dataclass
class Side:
    """One daemon, kept for the whole module (a blockd start costs a second or
    two), with its QMP connection and NBD server."""

    name: str
    dir: Path
    daemon: DaemonProcess
    qmp: RawQMP

    @property
    def nbd_sock(self) -> Path:
        return self.dir / "nbd.sock"


@pytest.fixture(scope="module")
def sides() -> Iterator[tuple[Side, Side]]:
    require_tool("qemu-storage-daemon")
    with tempfile.TemporaryDirectory(prefix="bd-") as name:  # short: sockets live in it
        root = Path(name)
        made: list[Side] = []
        try:
            for side, start in (("blockd", start_blockd), ("qsd", start_qsd)):
                (root / side).mkdir()
                daemon = start(root / side / "qmp.sock")
                qmp = RawQMP(daemon.socket_path)
                made.append(Side(side, root / side, daemon, qmp))
                qmp.negotiate()
                nbd = {"addr": {"type": "unix", "data": {"path": str(made[-1].nbd_sock)}}}
                assert qmp.execute("nbd-server-start", nbd) == {"return": {}}
            yield made[0], made[1]
        finally:
            for side in made:
                side.qmp.close()
                side.daemon.stop()
        # a blockd started here is not watched by the per-test check (conftest)
        assert not made[0].daemon.internal_errors()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base (in small/, which each scenario mounts as its small file system) <- mid
    <- top, mid and top holding 3 MiB between them, by relative names so that
    copies work anywhere; and the guest view, before.raw."""
    d = tmp_path_factory.mktemp("chain")
    (d / "small").mkdir()
    base = create(d / "small" / "base.qcow2", "16M")
    qemu_io(base, "write -P 0x11 0 64k")
    mid = create(d / "mid.qcow2", "16M", backing="small/base.qcow2")
    qemu_io(mid, "write -P 0x22 0 2M")
    top = create(d / "top.qcow2", "16M", backing="mid.qcow2")
    qemu_io(top, "write -P 0x33 1M 2M")
    guest_view(top, d / "before.raw")
    return d


def make_chain(template: Path, d: Path) -> tuple[Path, Path, Path]:
    """A copy of the template chain in ``d``, base on the small file system ``d/small``."""
    for name in ("small/base.qcow2", "mid.qcow2", "top.qcow2"):
        shutil.copyfile(template / name, d / name)
    return d / "small" / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"


def add_chain(qmp: RawQMP, base: Path, mid: Path, top: Path) -> None:
    for name, backing, image in (("base", None, base), ("mid", "base", mid), ("top", "mid", top)):
        args = {"driver": "qcow2", "node-name": name, "read-only": name != "top",
                "backing": backing, "file": {"driver": "file", "filename": str(image)}}  # fmt: skip
        assert qmp.execute("blockdev-add", args) == {"return": {}}


def close_chain(qmp: RawQMP) -> None:
    """Close the scenario's nodes (and export), so that its file system can go."""
    if qmp.execute("query-block-exports")["return"]:
        qmp.execute("block-export-del", {"id": "e", "mode": "hard"})
        qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
    for name in ("top", "mid", "base"):
        assert qmp.execute("blockdev-del", {"node-name": name}) == {"return": {}}
    qmp.events.clear()


def masked(message: dict[str, Any]) -> Any:
    """A reply or event without what legitimately differs: timestamps, and how far
    the job had got (blockd copies in bigger steps than QSD's 512 KiB)."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: "*" if k in ("offset", "current-progress") else strip(v)
                    for k, v in value.items() if k != "timestamp"}  # fmt: skip
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(message)


def events(qmp: RawQMP) -> Transcript:
    """The events so far (then forgotten), each BLOCK_JOB_ERROR once until the job
    runs again: QSD reports every request that was in flight when the disk
    filled, and one finishing after the job paused comes after the pause."""
    out: Transcript = []
    reported: list[Any] = []
    for event in qmp.events:
        entry = masked(event)
        if entry["event"] == "BLOCK_JOB_ERROR":
            if entry in reported:
                continue
            reported.append(entry)
        elif entry == {"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "j"}}:
            reported.clear()
        out.append(entry)
    qmp.events.clear()
    return out


def commit_conversation(
    qmp: RawQMP, fs: SmallFs, base: Path, policy: str, active: bool
) -> Transcript:
    seen: Transcript = []

    def do(command: str, args: dict[str, Any] | None = None) -> None:
        seen.append([command, masked(qmp.execute(command, args))])

    job = {"job-id": "j", "device": "top", "on-error": policy}
    do("block-commit", job if active else {**job, "top-node": "mid"})
    qmp.wait_event("BLOCK_JOB_ERROR", device="j")
    if policy == "report":
        qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="null")
        do("query-block-jobs")
    else:
        qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="paused")
        do("query-block-jobs")
        # consistent while paused on the full disk, the image still open
        check_consistent_shared(base)
        fs.give_all()
        do("block-job-resume", {"device": "j"})
        if active:
            qmp.wait_event("BLOCK_JOB_READY", device="j")
            do("query-block-jobs")
            do("block-job-complete", {"device": "j"})
        qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="null")
    seen += events(qmp)
    do("query-block-jobs")
    if active:
        do("query-block-exports")
    return seen


def check_consistent_shared(image: Path) -> None:
    """qemu-img check of an image a daemon has open: leaks at most."""
    result = subprocess.run(
        [require_tool("qemu-img"), "check", "-U", "--output=json", str(image)],
        capture_output=True,
        text=True,
    )
    report = json.loads(result.stdout)
    assert result.returncode in (0, 3) and report.get("corruptions", 0) == 0, report


def run_commit(side: Side, template: Path, d: Path, policy: str, active: bool) -> Transcript:
    d.mkdir()
    qmp = side.qmp
    qmp.events.clear()
    before = template / "before.raw"
    with small_fs(d / "small") as fs:
        base, mid, top = make_chain(template, d)
        fs.leave(LEFT)
        add_chain(qmp, base, mid, top)
        try:
            if active:
                export = {"type": "nbd", "id": "e", "node-name": "top", "writable": True}
                assert qmp.execute("block-export-add", export) == {"return": {}}
            seen = commit_conversation(qmp, fs, base, policy, active)
        finally:
            close_chain(qmp)
        if policy == "report":
            assert backing_of(top) == "mid.qcow2"  # the chain as it was
            check_consistent(base)
            assert same_data(before, top)
        elif active:
            check(base)
            assert same_data(before, base)  # base serves the disk now
        else:
            check(base)
            assert backing_of(top) == str(base)
            assert same_data(before, top)
        return seen


@pytest.mark.parametrize("active", [False, True], ids=["intermediate", "active"])
@pytest.mark.parametrize("policy", ["enospc", "stop", "report"])
def test_commit_onto_a_full_disk_matches_qsd(
    sides: tuple[Side, Side], template: Path, tmp_path: Path, policy: str, active: bool
) -> None:
    ours, theirs = (run_commit(side, template, tmp_path / side.name, policy, active)
                    for side in sides)  # fmt: skip
    assert ours == theirs
    error = [e for e in ours if isinstance(e, dict) and e["event"] == "BLOCK_JOB_ERROR"]
    action = "report" if policy == "report" else "stop"
    assert error == [{"event": "BLOCK_JOB_ERROR",
                      "data": {"device": "j", "operation": "write", "action": action}}]  # fmt: skip
    if policy == "report":
        [done] = [e for e in ours if isinstance(e, dict) and e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done["data"]["error"] == "No space left on device"
    else:
        paused = next(reply for command, reply in ours[1:] if command == "query-block-jobs")
        [info] = paused["return"]
        assert (info["status"], info["paused"], info["io-status"]) == ("paused", True, "nospace")


#: The NBD client: writes 64 KiB pieces until the disk is full, then reads back
#: what it wrote and flushes, connects a second time, waits for the test to free
#: space (a line on stdin), and writes again where it failed.
NBD_CLIENT = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
piece = 64 * 1024
off = 0
while True:
    try:
        h.pwrite(bytes([1 + off // piece % 250]) * piece, off)
    except nbd.Error as e:
        print("write", e.errno)
        break
    off += piece
ok = all(h.pread(piece, o) == bytes([1 + o // piece % 250]) * piece for o in range(0, off, piece))
print("read back", ok)
h.flush()
print("flush ok")
h2 = nbd.NBD()
h2.connect_uri(sys.argv[1])
print("second client reads", h2.pread(piece, 0) == bytes([1]) * piece, flush=True)
sys.stdin.readline()
h.pwrite(b"\\xee" * 2 * piece, off)
h.flush()
print("after freeing", h.pread(2 * piece, off) == b"\\xee" * 2 * piece)
print("written", off)
"""


def nbd_client(uri: str, free_space: Callable[[], None]) -> list[str]:
    """Run :data:`NBD_CLIENT`; ``free_space`` is called when it waits for space."""
    client = subprocess.Popen(
        [require_system_module("nbd"), "-c", textwrap.dedent(NBD_CLIENT), uri],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    lines = [client.stdout.readline().strip() for _ in range(4)]
    free_space()
    out, err = client.communicate("go\n", timeout=60)
    assert client.returncode == 0, (lines, err)
    return lines + out.splitlines()


def run_nbd(side: Side, d: Path) -> tuple[list[str], int]:
    d.mkdir()
    qmp = side.qmp
    with small_fs(d / "small", 2 * MiB) as fs:
        image = create(fs.path / "disk.qcow2", "16M")
        fs.leave(1 * MiB)
        node = {"driver": "qcow2", "node-name": "d",
                "file": {"driver": "file", "filename": str(image)}}  # fmt: skip
        assert qmp.execute("blockdev-add", node) == {"return": {}}
        try:
            export = {"type": "nbd", "id": "e", "node-name": "d", "writable": True}
            assert qmp.execute("block-export-add", export) == {"return": {}}
            lines = nbd_client(f"nbd+unix:///d?socket={side.nbd_sock}", fs.give_all)
            [exported] = qmp.execute("query-block-exports")["return"]
            assert exported["id"] == "e"
        finally:
            qmp.execute("block-export-del", {"id": "e", "mode": "hard"})
            qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
            assert qmp.execute("blockdev-del", {"node-name": "d"}) == {"return": {}}
            qmp.events.clear()
        check(image)
        return lines[:-1], int(lines[-1].split()[1])


def test_nbd_writes_onto_a_full_disk_match_qsd(sides: tuple[Side, Side], tmp_path: Path) -> None:
    (ours, written), (theirs, _) = (run_nbd(side, tmp_path / side.name) for side in sides)
    assert ours == theirs == [
        "write ENOSPC",
        "read back True",
        "flush ok",
        "second client reads True",
        "after freeing True",
    ]
    assert 512 * 1024 < written < 1 * MiB


def run_grow(side: Side, d: Path, active: bool) -> Transcript:
    """A commit into a base smaller than top on a full disk: growing base (a bigger
    L1 table) fails, and with it the job, whatever on-error says (QEMU's commit
    fails on a failed truncate)."""
    d.mkdir()
    qmp = side.qmp
    qmp.events.clear()
    with small_fs(d / "small") as fs:
        base = create(fs.path / "base.qcow2", "1M", options="cluster_size=512")
        mid = create(d / "mid.qcow2", "48M", backing=str(base))
        top = create(d / "top.qcow2", "48M", backing="mid.qcow2")
        qemu_io(mid, "write -P 0x22 40M 64k")
        fs.leave(0)
        add_chain(qmp, base, mid, top)
        try:
            job = {"job-id": "j", "device": "top", "on-error": "enospc"}
            reply = qmp.execute("block-commit", job if active else {**job, "top-node": "mid"})
            qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="null")
            seen = [masked(reply), *events(qmp)]
        finally:
            close_chain(qmp)
        check(base)
        assert backing_of(top) == "mid.qcow2"
        return seen


@pytest.mark.parametrize("active", [False, True], ids=["intermediate", "active"])
def test_commit_that_must_grow_a_full_base_fails_as_in_qsd(
    sides: tuple[Side, Side], tmp_path: Path, active: bool
) -> None:
    ours, theirs = (run_grow(side, tmp_path / side.name, active) for side in sides)
    assert ours == theirs
    [done] = [e for e in ours if e.get("event") == "BLOCK_JOB_COMPLETED"]
    assert done["data"]["error"] == "No space left on device"
