"""blockdev-create through a real daemon on its socket: images clients can use
at once, the job's life, a full disk, and the daemon answering meanwhile.

(The differential test in tests/interop compares all of this with QSD 7.2.)
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.diskfull import SmallFs
from tests.helpers import DaemonProcess, RawQMP, check_event, negotiated

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


def create(qmp: RawQMP, job: str, options: dict[str, Any]) -> dict[str, Any]:
    """Run a create job to its end; its query-jobs entry (then dismissed)."""
    assert qmp.execute("blockdev-create", {"job-id": job, "options": options}) == {"return": {}}
    qmp.wait_event("JOB_STATUS_CHANGE", id=job, status="concluded", timeout=120)
    [entry] = [j for j in qmp.execute("query-jobs")["return"] if j["id"] == job]
    assert qmp.execute("job-dismiss", {"id": job}) == {"return": {}}
    return dict(entry)


def image_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def test_made_image_is_opened_and_read(blockd: DaemonProcess, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", str(base)],
                   check=True, capture_output=True)
    top = tmp_path / "top.qcow2"
    qmp = negotiated(blockd)
    assert create(qmp, "f", {"driver": "file", "filename": str(top), "size": 0}) == {
        "id": "f", "type": "create", "status": "concluded",
        "current-progress": 1, "total-progress": 1}
    assert qmp.execute("blockdev-add", {"driver": "file", "node-name": "top-file",
                                        "filename": str(top)}) == {"return": {}}
    entry = create(qmp, "q", {"driver": "qcow2", "file": "top-file", "size": 64 * MiB,
                              "backing-file": str(base), "backing-fmt": "qcow2"})
    assert "error" not in entry
    statuses = [e["data"]["status"] for e in qmp.events
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == "q"]
    assert statuses == ["created", "running", "waiting", "pending", "concluded", "null"]
    for event in qmp.events:
        assert event["event"] == "JOB_STATUS_CHANGE", event  # no BLOCK_JOB_* events
        check_event(event["event"], event["data"])
    # the image is usable at once, on the same file node
    assert qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                        "file": "top-file"}) == {"return": {}}
    nodes = {n["node-name"]: n for n in
             qmp.execute("query-named-block-nodes", {"flat": True})["return"]}
    assert nodes["top"]["image"]["virtual-size"] == 64 * MiB
    assert nodes["top"]["backing_file"] == str(base)
    assert qmp.execute("blockdev-del", {"node-name": "top"}) == {"return": {}}
    assert qmp.execute("blockdev-del", {"node-name": "top-file"}) == {"return": {}}
    qmp.close()
    info = image_info(top)
    assert info["backing-filename-format"] == "qcow2" and info["virtual-size"] == 64 * MiB
    subprocess.run(["qemu-img", "check", "-q", str(top)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x61 0 1M", str(top)], check=True,
                   capture_output=True)


def test_create_job_is_not_a_block_job(blockd: DaemonProcess, tmp_path: Path) -> None:
    qmp = negotiated(blockd)
    reply = qmp.execute("blockdev-create", {"job-id": "c", "options": {
        "driver": "file", "filename": str(tmp_path / "x"), "size": MiB}})
    assert reply == {"return": {}}
    qmp.wait_event("JOB_STATUS_CHANGE", id="c", status="concluded")
    assert qmp.execute("query-block-jobs") == {"return": []}
    assert qmp.execute("block-job-dismiss", {"id": "c"}) == {"error": {
        "class": "DeviceNotActive", "desc": "Block job 'c' not found"}}
    # concluded until dismissed (QEMU makes it with manual dismiss)
    assert [j["status"] for j in qmp.execute("query-jobs")["return"]] == ["concluded"]
    assert qmp.execute("job-dismiss", {"id": "c"}) == {"return": {}}
    assert qmp.execute("query-jobs") == {"return": []}
    qmp.close()


def test_daemon_answers_while_it_creates(blockd: DaemonProcess, tmp_path: Path) -> None:
    """A 1 TiB image with its metadata preallocated (128 MiB of L2 tables) is
    made in the background: the reply comes first, the job is seen running,
    and a cancel, as in QEMU, ends it as cancelled once the image is made."""
    path = tmp_path / "big.qcow2"
    qmp = negotiated(blockd)
    create(qmp, "f", {"driver": "file", "filename": str(path), "size": 0})
    assert qmp.execute("blockdev-add", {"driver": "file", "node-name": "big",
                                        "filename": str(path)}) == {"return": {}}
    reply = qmp.execute("blockdev-create", {"job-id": "big", "options": {
        "driver": "qcow2", "file": "big", "size": TiB, "preallocation": "metadata"}})
    assert reply == {"return": {}}
    assert qmp.execute("query-jobs")["return"] == [{
        "id": "big", "type": "create", "status": "running",
        "current-progress": 0, "total-progress": 1}]
    assert "return" in qmp.execute("query-version")
    assert qmp.execute("blockdev-del", {"node-name": "big"}) == {"error": {
        "class": "GenericError", "desc": "Node big is in use"}}
    assert qmp.execute("job-cancel", {"id": "big"}) == {"return": {}}
    qmp.wait_event("JOB_STATUS_CHANGE", id="big", status="concluded", timeout=240)
    [entry] = qmp.execute("query-jobs")["return"]
    assert entry["error"] == "Operation canceled"
    assert qmp.job_statuses("big") == ["created", "running", "aborting", "concluded"]
    assert qmp.execute("blockdev-del", {"node-name": "big"}) == {"return": {}}
    qmp.close()
    assert image_info(path)["virtual-size"] == TiB
    subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)


def test_full_disk_leaves_no_image(small_fs: SmallFs, blockd: DaemonProcess) -> None:
    """A create that runs out of room fails with QEMU's words, and what it
    leaves is no image: cluster 0 is only written once all the rest is in."""
    qmp = negotiated(blockd)
    cases = [
        ("a", {"size": 64 * MiB, "preallocation": "full", "cluster-size": 4096},
         "Could not resize image: Failed to resize underlying file: Could not write zeros "
         "for preallocation: No space left on device"),
        ("b", {"size": 64 * MiB, "preallocation": "metadata", "cluster-size": 512},
         "Could not resize image: Allocating clusters failed: No space left on device"),
    ]
    for name, options, error in cases:
        path = small_fs.path / f"{name}.qcow2"
        create(qmp, f"f{name}", {"driver": "file", "filename": str(path), "size": 0})
        assert qmp.execute("blockdev-add", {"driver": "file", "node-name": name,
                                            "filename": str(path)}) == {"return": {}}
        entry = create(qmp, name, {"driver": "qcow2", "file": name, **options})
        assert entry["error"] == error
        assert qmp.job_statuses(name)[-3:] == ["aborting", "concluded", "null"]
        reply = qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": f"{name}-img",
                                             "file": name})
        assert reply == {"error": {"class": "GenericError",
                                   "desc": "Image is not in qcow2 format"}}
        assert qmp.execute("blockdev-del", {"node-name": name}) == {"return": {}}
        assert path.read_bytes()[:4] != b"QFI\xfb"
        path.unlink()
    # with the room back, the same create succeeds
    path = small_fs.path / "ok.qcow2"
    create(qmp, "fok", {"driver": "file", "filename": str(path), "size": 0})
    assert qmp.execute("blockdev-add", {"driver": "file", "node-name": "ok",
                                        "filename": str(path)}) == {"return": {}}
    assert "error" not in create(qmp, "ok", {"driver": "qcow2", "file": "ok", "size": GiB})
    assert qmp.execute("blockdev-del", {"node-name": "ok"}) == {"return": {}}
    qmp.close()
    subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)


def test_sigkill_mid_create_leaves_no_half_image(blockd: DaemonProcess, tmp_path: Path) -> None:
    """Killed while it writes a big image, blockd leaves either the whole image
    (clean) or a file without qcow2 magic, never a half-made image."""
    path = tmp_path / "killed.qcow2"
    qmp = negotiated(blockd)
    create(qmp, "f", {"driver": "file", "filename": str(path), "size": 0})
    assert qmp.execute("blockdev-add", {"driver": "file", "node-name": "k",
                                        "filename": str(path)}) == {"return": {}}
    reply = qmp.execute("blockdev-create", {"job-id": "k", "options": {
        "driver": "qcow2", "file": "k", "size": TiB, "preallocation": "metadata"}})
    assert reply == {"return": {}}
    # wait until it has begun writing (the file grows past its zeroed cluster 0)
    while path.stat().st_size <= 65536 and qmp.execute("query-jobs")["return"][0][
            "status"] == "running":
        time.sleep(0.001)
    blockd.proc.kill()
    blockd.proc.wait()
    qmp.close()
    with open(path, "rb") as f:
        head = f.read(65536)  # the file is sparse and up to 1 TiB long
    if head[:4] == b"QFI\xfb":
        subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)
        assert image_info(path)["virtual-size"] == TiB
    else:
        assert not any(head)
