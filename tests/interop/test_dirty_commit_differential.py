"""Committing into a dirty base, blockd beside qemu-storage-daemon 7.2.

* A base made dirty as a crash makes it (qemu-io writing with lazy refcounts,
  then SIGKILL), opened read-write by name: both daemons repair it at the
  open and end with the same guest views and clean images.
* Opened from the header instead, read-only until the job reopens it, the
  same base, or one whose counters for four data clusters are really lost
  (zeroed on disk) with the dirty bit set: QSD 7.2 repairs only at a
  read-write open, not at this reopen, so it hands those clusters out again
  and corrupts base; blockd rebuilds the counters first and base is right.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import check, create, guest_view, qemu_img, qemu_io

pytestmark = pytest.mark.qsd

MiB = 1 << 20


def is_dirty(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(72)
        return bool(struct.unpack(">Q", f.read(8))[0] & 1)


def crash_base(d: Path) -> None:
    """base.qcow2 dirty the way a crash leaves it: written with lazy refcounts, killed."""
    base = create(d / "base.qcow2", "16M", options="lazy_refcounts=on")
    qemu_io(base, "write -P 0x11 0 1M")
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x12 1M 2M", "-c", "write -P 0x13 8M 512k",
         "-c", "sigraise 9", str(base)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr


def lost_refcounts_base(d: Path) -> None:
    """base.qcow2 with the counters of its four data clusters zeroed and the dirty bit set."""
    base = create(d / "base.qcow2", "16M")
    qemu_io(base, "write -P 0x21 0 256k")
    buf = bytearray(base.read_bytes())
    # a fresh 64 KiB-cluster image: refcount block at 0x20000, data from cluster 5
    assert struct.unpack_from(">Q", buf, 0x10000)[0] == 0x20000
    for cluster in range(5, 9):
        assert struct.unpack_from(">H", buf, 0x20000 + 2 * cluster)[0] == 1
        struct.pack_into(">H", buf, 0x20000 + 2 * cluster, 0)
    struct.pack_into(">Q", buf, 72, 1)  # dirty
    base.write_bytes(bytes(buf))


def commit(daemon: DaemonProcess, d: Path, *, base_read_write: bool) -> dict[str, Any]:
    """Open the chain and commit top into base; the job's end event.

    ``base_read_write``: base is opened read-write by name first (both daemons
    repair it then); else top alone, base found from its header, read-only.
    """
    with RawQMP(daemon.socket_path) as qmp:
        qmp.negotiate()
        top: dict[str, Any] = {
            "driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": str(d / "top.qcow2")},
        }  # fmt: skip
        if base_read_write:
            reply = qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "base", "read-only": False,
                "file": {"driver": "file", "filename": str(d / "base.qcow2")},
            })  # fmt: skip
            assert reply == {"return": {}}, reply
            top["backing"] = "base"
        reply = qmp.execute("blockdev-add", top)
        assert reply == {"return": {}}, reply
        reply = qmp.execute("block-commit", {"job-id": "j", "device": "top"})
        assert reply == {"return": {}}, reply
        qmp.wait_event("BLOCK_JOB_READY", timeout=60)
        assert qmp.execute("block-job-complete", {"device": "j"}) == {"return": {}}
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert qmp.execute("quit") == {"return": {}}
    daemon.wait()
    return done


def run_both(tmp_path: Path, make_base: Any, *, base_read_write: bool) -> dict[str, Path]:
    """The same chain for each daemon, committed; returns each one's directory."""
    golden = tmp_path / "golden"
    golden.mkdir()
    make_base(golden)
    assert is_dirty(golden / "base.qcow2")
    top = create(golden / "top.qcow2", "", backing="base.qcow2")
    qemu_io(top, "write -P 0x31 512k 1M", "write -P 0x32 12M 2M")  # opens base read-only
    assert is_dirty(golden / "base.qcow2")
    guest_view(top, golden / "view.raw")
    dirs = {}
    for name, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = tmp_path / name
        shutil.copytree(golden, d)
        daemon = start(d / "qmp.sock")
        try:
            done = commit(daemon, d, base_read_write=base_read_write)
        finally:
            daemon.stop()
        assert "error" not in done["data"], (name, done)
        if name == "blockd":
            assert "Traceback" not in daemon.stderr()
        dirs[name] = d
    return dirs


def test_commit_into_dirty_base_opened_read_write(tmp_path: Path) -> None:
    """The ordinary case: both repair at the read-write open, and agree."""
    dirs = run_both(tmp_path, crash_base, base_read_write=True)
    golden = tmp_path / "golden" / "view.raw"
    for name, d in dirs.items():
        base = d / "base.qcow2"
        assert not is_dirty(base), name
        check(base)
        qemu_img("compare", "-f", "raw", "-F", "qcow2", str(golden), str(base))
    qemu_img("compare", str(dirs["qsd"] / "base.qcow2"), str(dirs["blockd"] / "base.qcow2"))


@pytest.mark.parametrize("make_base", [crash_base, lost_refcounts_base],
                         ids=["crashed", "lost-refcounts"])  # fmt: skip
def test_commit_reopens_dirty_base(tmp_path: Path, make_base: Any) -> None:
    """Base opened read-only from the header, reopened read-write by the job."""
    dirs = run_both(tmp_path, make_base, base_read_write=False)
    golden = tmp_path / "golden" / "view.raw"
    base = dirs["blockd"] / "base.qcow2"
    assert not is_dirty(base)
    check(base)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", str(golden), str(base))
    # QSD 7.2 wrote top's data into base's clusters whose counters were missing
    qsd_base = dirs["qsd"] / "base.qcow2"
    report = subprocess.run(["qemu-img", "check", str(qsd_base)], capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert report.returncode == 2, report.stdout  # corruptions found
    assert "reference=2" in report.stdout + report.stderr, report.stdout
    if make_base is lost_refcounts_base:
        same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(golden),
                               str(qsd_base)], capture_output=True, check=False)  # fmt: skip
        assert same.returncode == 1  # its guest view changed
