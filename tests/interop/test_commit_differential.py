"""block-commit and the job commands against qemu-storage-daemon 7.2.

Each daemon gets its own fresh copy of the same chain and the same
conversation.  Compared: every reply, and every event (without its
timestamp) in order.  Masked: what legitimately differs (random names of
implicit nodes, actual-size, and progress at the moment of a cancel).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import backing_of, check, create, qemu_img, qemu_io

pytestmark = pytest.mark.qsd

MiB = 1 << 20


def make_chain(d: Path) -> None:
    d.mkdir()
    base = create(d / "base.qcow2")
    mid = create(d / "mid.qcow2", backing="base.qcow2")
    top = create(d / "top.qcow2", backing="mid.qcow2")
    qemu_io(base, "write -P 0x11 0 1M", "write -P 0x12 8M 1M")
    qemu_io(mid, "write -P 0x21 1M 2M", "write -P 0x22 32M 4M")
    qemu_io(top, "write -P 0x31 2M 1M")


def chain_nodes(d: Path) -> list[tuple[str, dict[str, Any], Any]]:
    steps: list[tuple[str, dict[str, Any], Any]] = []
    for name, backing, ro in (("base", None, True), ("mid", "base", True), ("top", "mid", False)):
        file = {"driver": "file", "filename": str(d / f"{name}.qcow2"), "node-name": f"f-{name}"}
        arguments = {"driver": "qcow2", "node-name": name, "read-only": ro, "backing": backing}
        steps.append(("blockdev-add", {**arguments, "file": file}, None))
    return steps


def commit(**args: Any) -> dict[str, Any]:
    return {"job-id": "job0", "device": "top", **args}


ERRORS: list[tuple[str, dict[str, Any], Any]] = [
    ("block-commit", {"job-id": "j", "device": "nosuch"}, None),
    ("block-commit", {"job-id": "j", "device": "nosuch", "speed": -5}, None),
    ("block-commit", {"job-id": "j", "device": "mid"}, None),
    ("block-commit", {"job-id": "j", "device": "f-top"}, None),
    ("block-commit", {"job-id": "j", "device": "top", "top-node": "mid", "top": "x"}, None),
    ("block-commit", {"job-id": "j", "device": "top", "top-node": "nosuch"}, None),
    ("block-commit", {"job-id": "j", "device": "top", "top-node": "f-mid"}, None),
    ("block-commit", {"job-id": "j", "device": "top", "top-node": "mid", "base-node": "top"}, None),
    (
        "block-commit",
        {"job-id": "j", "device": "top", "top-node": "mid", "base-node": "nosuch"},
        None,
    ),
    (
        "block-commit",
        {"job-id": "j", "device": "top", "top-node": "base", "base-node": "base"},
        None,
    ),
    ("block-commit", {"job-id": "j", "device": "top", "top-node": "mid", "base-node": "mid"}, None),
    ("block-commit", {"device": "top", "top-node": "mid"}, None),
    ("block-commit", {"job-id": "1x", "device": "top", "top-node": "mid"}, None),
    ("block-commit", {"job-id": "j", "device": "top", "top-node": "mid", "speed": -1}, None),
    ("block-commit", {"job-id": "j", "device": "top", "backing-file": "x"}, None),
    ("block-commit", {"job-id": "j", "device": "top", "top": "nosuch.qcow2"}, None),
    (
        "block-commit",
        {"job-id": "j", "device": "top", "top-node": "mid", "base": "nosuch.qcow2"},
        None,
    ),
    (
        "block-commit",
        {"job-id": "j", "device": "top", "top-node": "mid", "base": "b", "base-node": "base"},
        None,
    ),
    (
        "block-commit",
        {"job-id": "j", "device": "top", "top-node": "mid", "filter-node-name": "top"},
        None,
    ),
    (
        "block-commit",
        {"job-id": "j", "device": "top", "top-node": "mid", "on-error": "bogus"},
        None,
    ),
    ("block-commit", {"job-id": "j", "device": "top", "top-node": "mid", "speed": "fast"}, None),
    ("block-commit", {"job-id": "j", "top-node": "mid"}, None),
]

SUCCESS = [
    (
        "block-commit",
        commit(**{"top-node": "mid", "base-node": "base"}),
        ("JOB_STATUS_CHANGE", {"status": "null"}),
    ),
    ("query-block-jobs", {}, None),
    ("query-jobs", {}, None),
    ("blockdev-del", {"node-name": "base"}, None),
    ("blockdev-del", {"node-name": "mid"}, None),
    ("blockdev-del", {"node-name": "f-mid"}, None),
]

CANCEL = [
    ("block-commit", commit(**{"top-node": "mid", "speed": MiB, "auto-dismiss": False}), None),
    ("block-commit", commit(**{"top-node": "mid"}), None),
    ("block-commit", {"job-id": "job1", "device": "top", "top-node": "mid"}, None),
    ("blockdev-del", {"node-name": "top"}, None),
    # the job works on mid and base: "in use", not "busy"
    ("blockdev-del", {"node-name": "mid"}, None),
    ("blockdev-del", {"node-name": "base"}, None),
    ("blockdev-del", {"node-name": "f-mid"}, None),
    ("block-job-complete", {"device": "job0"}, None),
    ("block-job-finalize", {"id": "job0"}, None),
    ("block-job-dismiss", {"id": "job0"}, None),
    ("block-job-resume", {"device": "job0"}, None),
    ("block-job-set-speed", {"device": "job0", "speed": -1}, None),
    ("block-job-set-speed", {"device": "job0", "speed": MiB // 2}, None),
    ("block-job-pause", {"device": "job0"}, ("JOB_STATUS_CHANGE", {"status": "paused"})),
    ("block-job-pause", {"device": "job0"}, None),
    ("block-job-cancel", {"device": "job0"}, None),
    ("block-job-resume", {"device": "job0"}, ("JOB_STATUS_CHANGE", {"status": "running"})),
    ("block-job-cancel", {"device": "job0"}, ("JOB_STATUS_CHANGE", {"status": "concluded"})),
    ("query-jobs", {}, None),
    ("query-block-jobs", {}, None),
    ("block-job-cancel", {"device": "job0"}, None),
    ("job-dismiss", {"id": "job0"}, ("JOB_STATUS_CHANGE", {"status": "null"})),
    ("query-jobs", {}, None),
]

MANUAL_FINALIZE = [
    ("block-commit", commit(**{"top-node": "mid", "auto-finalize": False, "auto-dismiss": False}),
     ("BLOCK_JOB_PENDING", {})),
    ("query-jobs", {}, None),
    ("job-dismiss", {"id": "job0"}, None),
    ("job-finalize", {"id": "job0"}, ("JOB_STATUS_CHANGE", {"status": "concluded"})),
    ("query-block-jobs", {}, None),
    ("job-dismiss", {"id": "job0"}, ("JOB_STATUS_CHANGE", {"status": "null"})),
]  # fmt: skip

CONVERSATIONS = {
    "errors": ERRORS,
    "success": SUCCESS,
    "cancel": CANCEL,
    "manual finalize": MANUAL_FINALIZE,
}


def mask(value: Any) -> Any:
    """Hide what legitimately differs between the two daemons."""
    if isinstance(value, list):
        return [mask(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if key in ("offset", "current-progress", "actual-size", "timestamp"):
            continue
        if key == "node-name" and str(item).startswith("#block"):
            item = "<auto>"
        out[key] = mask(item)
    return out


def converse(daemon: DaemonProcess, steps: list[tuple[str, dict[str, Any], Any]]) -> list[Any]:
    transcript: list[Any] = []
    with RawQMP(daemon.socket_path) as client:
        client.negotiate()
        for command, arguments, wait in steps:
            before = len(client.events)
            reply = client.execute(command, arguments)
            if wait is not None:
                name, data = wait
                event = client.wait_event(name, **data)
                # Everything emitted up to the awaited event belongs to this step.
                upto = client.events.index(event) + 1
            else:
                upto = len(client.events)
            transcript.append((command, mask(reply), mask(client.events[before:upto])))
            del client.events[before:upto]
        assert client.execute("quit") == {"return": {}}
    assert daemon.wait() == 0
    return transcript


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_same_commit_conversation(tmp_path: Path, sock_dir: Path, name: str) -> None:
    make_chain(tmp_path / "chain")
    transcripts = []
    for which, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = tmp_path / which
        shutil.copytree(tmp_path / "chain", d)
        steps = chain_nodes(d) + CONVERSATIONS[name]
        daemon = start(sock_dir / f"{which}.sock")
        try:
            transcripts.append(converse(daemon, steps))
        finally:
            daemon.stop()
    qsd, ours = transcripts
    for want, got in zip(qsd, ours, strict=True):
        assert got == want
    # The same chain on disk, and the same data in every image of it.
    for image in ("base", "mid", "top"):
        theirs, mine = tmp_path / "qsd" / f"{image}.qcow2", tmp_path / "blockd" / f"{image}.qcow2"
        qsd_backing = backing_of(theirs)
        assert backing_of(mine) == (
            None
            if qsd_backing is None
            else qsd_backing.replace(str(tmp_path / "qsd"), str(tmp_path / "blockd"))
        )
        # A cancelled job leaves however much it copied in base (timing),
        # so base alone is compared only when the job ran to its end.
        if image == "top" or name != "cancel":
            assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(theirs), str(mine))
        check(mine)


def make_shared_mid(d: Path) -> None:
    """base <- mid <- top, and top2 also backed by mid (each image with its own data)."""
    make_chain(d)
    top2 = create(d / "top2.qcow2", backing="mid.qcow2")
    qemu_io(top2, "write -P 0x41 1M 64k", "write -P 0x42 40M 1M")


def shared_mid_steps(
    d: Path, *, backing_file: str | None, top2_read_only: bool, export_mid: bool
) -> list[tuple[str, dict[str, Any], Any]]:
    steps = chain_nodes(d)
    top2 = {"driver": "file", "filename": str(d / "top2.qcow2"), "node-name": "f-top2"}
    steps.append(
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "top2",
                "read-only": top2_read_only,
                "backing": "mid",
                "file": top2,
            },
            None,
        )
    )
    if export_mid:
        addr = {"type": "unix", "data": {"path": str(d / "nbd.sock")}}
        steps.append(("nbd-server-start", {"addr": addr}, None))
        steps.append(("block-export-add", {"type": "nbd", "id": "e0", "node-name": "mid"}, None))
    args = commit(**{"top-node": "mid", "base-node": "base"})
    if backing_file is not None:
        args["backing-file"] = backing_file
    steps.append(("block-commit", args, ("JOB_STATUS_CHANGE", {"id": "job0", "status": "null"})))
    steps.append(("query-block-jobs", {}, None))
    if export_mid:
        steps.append(("query-block-exports", {}, None))
        steps.append(("block-export-del", {"id": "e0"}, ("BLOCK_EXPORT_DELETED", {"id": "e0"})))
    # With every parent of mid gone to base, the client may close mid now.
    steps.append(("blockdev-del", {"node-name": "mid"}, None))
    steps.append(("blockdev-del", {"node-name": "top2"}, None))
    return steps


@pytest.mark.parametrize(
    ("backing_file", "top2_read_only", "export_mid"),
    [(None, False, False), ("base.qcow2", True, False), (None, True, True)],
)
def test_commit_moves_every_parent_of_top_onto_base(
    tmp_path: Path,
    sock_dir: Path,
    backing_file: str | None,
    top2_read_only: bool,
    export_mid: bool,
) -> None:
    """Issue 11 defect 2: the other overlay of mid, and mid's export, follow as in QEMU."""
    make_shared_mid(tmp_path / "chain")
    views = {}
    for image in ("top", "top2"):
        views[image] = tmp_path / f"{image}.raw"
        qemu_img(
            "convert", "-O", "raw", str(tmp_path / "chain" / f"{image}.qcow2"), str(views[image])
        )
    transcripts = []
    for which, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = tmp_path / which
        shutil.copytree(tmp_path / "chain", d)
        steps = shared_mid_steps(
            d, backing_file=backing_file, top2_read_only=top2_read_only, export_mid=export_mid
        )
        daemon = start(sock_dir / f"{which}.sock")
        try:
            transcripts.append(converse(daemon, steps))
        finally:
            daemon.stop()
    qsd, ours = transcripts
    for want, got in zip(qsd, ours, strict=True):
        assert got == want
    for image in ("base", "mid", "top", "top2"):
        theirs, mine = tmp_path / "qsd" / f"{image}.qcow2", tmp_path / "blockd" / f"{image}.qcow2"
        qsd_backing = backing_of(theirs)
        assert backing_of(mine) == (
            None
            if qsd_backing is None
            else qsd_backing.replace(str(tmp_path / "qsd"), str(tmp_path / "blockd"))
        )
        assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(theirs), str(mine))
        check(mine)
    # The backing-file argument went into both overlays, as with QSD.
    expected = backing_file or str(tmp_path / "blockd" / "base.qcow2")
    for image in ("top", "top2"):
        mine = tmp_path / "blockd" / f"{image}.qcow2"
        assert backing_of(mine) == expected
        # What each overlay shows is what it showed before, mid deleted or not.
        (tmp_path / "blockd" / "mid.qcow2").rename(tmp_path / "blockd" / "mid.gone")
        try:
            qemu_img("compare", "-f", "raw", "-F", "qcow2", str(views[image]), str(mine))
        finally:
            (tmp_path / "blockd" / "mid.gone").rename(tmp_path / "blockd" / "mid.qcow2")
