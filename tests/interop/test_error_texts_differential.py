"""Error replies whose wording depends on the order QEMU checks things in, against QSD 7.2.

Each case runs the same conversation on a fresh qcow2 chain n0 <- n1 <- n2
(node-names n0.., inline file children f-n0..) in each daemon; every reply
must be the same, byte for byte once the case's directory is masked.  The
cases came from a randomized differential harness.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import negotiated, start_blockd, start_qsd
from tests.images import create, qemu_io

pytestmark = pytest.mark.qsd

Step = tuple[str, dict[str, Any]]
#: (images in the chain, the steps after the prologue)
Case = tuple[int, Callable[[Path], list[Step]]]
SLOW = 1024  # bytes a second: a commit that runs for the whole conversation


def file_child(d: Path, image: str, name: str) -> dict[str, Any]:
    return {"driver": "file", "node-name": name, "filename": str(d / image)}


def prologue(d: Path, count: int) -> list[Step]:
    steps: list[Step] = []
    for i in range(count):
        args = {"driver": "qcow2", "node-name": f"n{i}", "backing": f"n{i - 1}" if i else None,
                "file": file_child(d, f"n{i}.qcow2", f"f-n{i}")}  # fmt: skip
        steps.append(("blockdev-add", args))
    return steps


def qcow2(name: str, file: Any, **more: Any) -> Step:
    return ("blockdev-add", {"driver": "qcow2", "node-name": name, "file": file, **more})


def duplicates(d: Path) -> list[Step]:
    """QEMU opens the file child before it names the parent, and locks the
    child's file only when the parent takes it (after the parent's name)."""
    return [
        qcow2("n1", file_child(d, "n1.qcow2", "f-n1")),  # both taken: the child's
        qcow2("n1", file_child(d, "n1.qcow2", "f-new")),  # the parent's, not the lock
        qcow2("nX", file_child(d, "n1.qcow2", "f-n1")),  # the child's
        qcow2("n1", file_child(d, "n0.qcow2", "f-n0")),  # the child's
        qcow2("n1", "f-n1"),
        qcow2("n1", "nosuch"),  # the missing reference first
        qcow2("nY", file_child(d, "n1.qcow2", "nY")),  # the child took the name
        qcow2("n2", file_child(d, "nosuch.qcow2", "f-z")),  # the child's open error
        qcow2("n2", file_child(d, "nosuch.qcow2", "f-n1")),
        qcow2("nZ", file_child(d, "n1.qcow2", "f-z")),  # a lock conflict
        # the parent's name before its backing child is opened
        qcow2("n2", file_child(d, "n1.qcow2", "f-z"),
              backing={"driver": "qcow2", "node-name": "n0",
                       "file": file_child(d, "n0.qcow2", "f-q")}),
        qcow2("nZ", file_child(d, "n1.qcow2", "f-n1"),
              backing={"driver": "qcow2", "node-name": "n0",
                       "file": file_child(d, "n0.qcow2", "f-q")}),
        ("blockdev-del", {"node-name": "n2"}),
        ("blockdev-add", {"driver": "file", "node-name": "n1",
                          "filename": str(d / "nosuch")}),
    ]


def deletes(count: int) -> list[Step]:
    names = [f"n{i}" for i in range(count)] + ["f-n1"]
    return [("blockdev-del", {"node-name": name}) for name in names]


def wait_status(job: str, status: str) -> Step:
    return ("wait", {"event": "JOB_STATUS_CHANGE", "data": {"id": job, "status": status}})


def commit_steps(count: int, top: str | None, *, cancel: bool, **more: Any) -> list[Step]:
    """blockdev-del of every node while a commit runs, once it concluded
    (cancelled or done, not dismissed: the job still holds its nodes), and
    once it is dismissed."""
    args = {"job-id": "j", "device": f"n{count - 1}", "base-node": "n0", "auto-dismiss": False,
            **({"top-node": top} if top else {}), **more}  # fmt: skip
    steps: list[Step] = [("block-commit", args)]
    if cancel:
        steps += [*deletes(count), ("block-job-cancel", {"device": "j", "force": True})]
    elif top is None:
        steps += [("wait", {"event": "BLOCK_JOB_READY"}), *deletes(count),
                  ("job-complete", {"id": "j"})]  # fmt: skip
    steps += [wait_status("j", "concluded"), *deletes(count), ("job-dismiss", {"id": "j"})]
    return [*steps, *deletes(count)]


def commit_case(count: int, top: str | None, *, cancel: bool, **more: Any) -> Case:
    return count, lambda d: commit_steps(count, top, cancel=cancel, **more)


def commit(job: str, device: str, **more: Any) -> Step:
    return ("block-commit", {"job-id": job, "device": device, **more})


def busy_base(d: Path) -> list[Step]:
    """A second commit whose chain reaches the nodes a running commit holds:
    QEMU asks each node from top down to base whether a job holds it, before
    anything else about the pair (and before the write conflict on base)."""
    create(d / "x1.qcow2", "16M", backing="n0.qcow2")
    create(d / "x2.qcow2", "16M", backing="x1.qcow2")
    create(d / "y1.qcow2", "16M", backing="n1.qcow2")
    return [
        commit("j1", "n2", **{"top-node": "n1", "base-node": "n0", "speed": SLOW}),
        qcow2("x1", file_child(d, "x1.qcow2", "f-x1"), backing="n0"),
        qcow2("x2", file_child(d, "x2.qcow2", "f-x2"), backing="x1"),
        qcow2("y1", file_child(d, "y1.qcow2", "f-y1"), backing="n1"),
        commit("j2", "x2", **{"top-node": "x1", "base-node": "n0"}),
        commit("j2", "x2", **{"top-node": "x1"}),
        commit("j2", "x2", **{"base-node": "n0"}),
        commit("j2", "x2", **{"base-node": "n0", "backing-file": "x"}),
        commit("j2", "x2", **{"top-node": "n0", "base-node": "n0"}),
        commit("j2", "y1", **{"base-node": "n0"}),
        commit("j2", "y1", **{"base-node": "n1"}),
        commit("j2", "y1", **{"top-node": "n1", "base-node": "n1"}),
        commit("j2", "y1", **{"top-node": "n0"}),
        commit("j2", "x1"),
        ("block-job-cancel", {"device": "j1", "force": True}),
        wait_status("j1", "null"),
    ]


def device_held(d: Path) -> list[Step]:
    """A commit that concluded but is not dismissed still holds its device
    ("Need a root block node" comes first); a cancelled one, or a finished
    active commit, does not."""
    held = [
        commit("j2", "n2"),
        commit("j2", "n2", **{"top-node": "n1"}),
        commit("j2", "n2", **{"top-node": "nosuch"}),
        commit("j2", "n2", **{"top-node": "n0", "base-node": "n0"}),
        commit("j2", "n2", **{"base-node": "n1", "backing-file": "x"}),
        commit("j2", "n0"),
    ]
    # nothing holds n2: each goes past the root check (no job started)
    free = [
        commit("j2", "n2", **{"top-node": "nosuch"}),
        commit("j2", "n2", **{"top-node": "n2", "base-node": "n2"}),
        commit("j2", "n2", **{"base-node": "n2"}),
    ]
    return [
        commit("k", "n2", **{"top-node": "n1", "base-node": "n0", "auto-dismiss": False}),
        wait_status("k", "concluded"), *held, ("job-dismiss", {"id": "k"}),
        ("blockdev-del", {"node-name": "n1"}),  # dropped from the chain: n2 reads n0
        commit("c", "n2", **{"speed": SLOW, "auto-dismiss": False}),
        ("block-job-cancel", {"device": "c", "force": True}), wait_status("c", "concluded"),
        *free, ("job-dismiss", {"id": "c"}),
        commit("a", "n2", **{"auto-dismiss": False}), ("wait", {"event": "BLOCK_JOB_READY"}),
        ("job-complete", {"id": "a"}), wait_status("a", "concluded"), *free,
    ]


CASES: dict[str, Case] = {
    "duplicate-node-names": (3, duplicates),
    # top n1 under the device n2; then top n2 with the overlay n3 under the device n4
    "del-while-commit-runs-3": commit_case(3, "n1", cancel=True, speed=SLOW),
    "del-while-commit-runs-5": commit_case(5, "n2", cancel=True, speed=SLOW),
    "del-while-active-commit-runs": commit_case(4, None, cancel=True, speed=SLOW),
    "del-after-commit-3": commit_case(3, "n1", cancel=False),
    "del-after-commit-4": commit_case(4, "n2", cancel=False),
    "del-after-commit-5": commit_case(5, "n2", cancel=False),
    "del-after-active-commit": commit_case(4, None, cancel=False),
    "commit-into-busy-base": (3, busy_base),
    "commit-on-held-device": (3, device_held),
}


def make_chain(d: Path, count: int) -> None:
    d.mkdir()
    for i in range(count):
        image = create(d / f"n{i}.qcow2", "16M", backing=f"n{i - 1}.qcow2" if i else None)
        qemu_io(image, f"write -P {0x10 + i} 0 8M")


def converse(kind: str, d: Path, count: int, steps: Callable[[Path], list[Step]]) -> list[str]:
    make_chain(d, count)
    daemon = (start_qsd if kind == "qsd" else start_blockd)(d / "qmp.sock")
    replies: list[str] = []
    try:
        # QSD's monitor may still be held by the start-up probe: negotiated() retries
        with negotiated(daemon) as qmp:
            for command, args in [*prologue(d, count), *steps(d)]:
                if command == "wait":
                    qmp.wait_event(args["event"], timeout=60, **args.get("data", {}))
                    continue
                reply = qmp.execute(command, args)
                replies.append(f"{command} {json.dumps(reply)}".replace(str(d), "D"))
    finally:
        daemon.stop()
    return replies


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    require_tool("qemu-storage-daemon")
    require_tool("qemu-io")
    path = Path(tempfile.mkdtemp(prefix="etx-"))  # short: AF_UNIX paths
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("case", CASES)
def test_same_replies_as_qsd(root: Path, case: str) -> None:
    count, steps = CASES[case]
    qsd = converse("qsd", root / f"{case}-qsd", count, steps)
    ours = converse("blockd", root / f"{case}-blockd", count, steps)
    assert ours == qsd
