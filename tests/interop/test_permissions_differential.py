"""Permission conflicts between a node's users, against qemu-storage-daemon 7.2.

A qcow2 node opened read-write must be the only writer of its file: an NBD
client writing raw bytes there, or a second format node, would corrupt the
image under it.  QSD refuses such users with a "Permission conflict" error;
blockd must refuse the same ones with the same words, accept the same others,
and leave the image as it was.  Each scenario runs the same requests on both
daemons; generated node names (which differ between them) are replaced by
labels before the replies are compared.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import RawQMP, start_blockd, start_qsd
from tests.images import qemu_img, qemu_io

pytestmark = pytest.mark.qsd

Step = tuple[str, dict[str, Any] | None]
Scenario = Callable[[Path], Generator[Step, Any, None]]


def chain(d: Path, name: str) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(d / f"{name}-base.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / f"{name}-base.qcow2"), "-F", "qcow2",
             str(d / f"{name}.qcow2"))  # fmt: skip


def run(daemon: str, d: Path, scenario: Scenario) -> list[Any]:
    """The replies to the scenario's requests, generated names replaced by labels."""
    sock = d / f"{daemon}.sock"
    proc = start_qsd(sock) if daemon == "qsd" else start_blockd(sock)
    labels: dict[str, str] = {}
    replies: list[Any] = []
    try:
        with RawQMP(sock) as qmp:
            qmp.negotiate()
            steps = scenario(d)
            reply: Any = None
            try:
                while True:
                    command, args = steps.send(reply)
                    reply = qmp.execute(command, args)
                    if command == "query-named-block-nodes":
                        for node in reply["return"]:
                            if node["node-name"].startswith("#"):
                                label = f"<{Path(node['file']).name} {node['drv']}>"
                                labels[node["node-name"]] = label
                        reply = {n["node-name"]: n for n in reply["return"]}
                        continue
                    text = str(reply)
                    for name, label in labels.items():
                        text = text.replace(name, label)
                    replies.append((command, text))
            except StopIteration:
                pass
            assert not any(e["event"] == "BLOCK_IMAGE_CORRUPTED" for e in qmp.events)
    finally:
        proc.stop()
    return replies


def auto(nodes: dict[str, Any], d: Path, file: str, drv: str) -> str:
    for name, node in nodes.items():
        if node["file"] == str(d / file) and node["drv"] == drv:
            return name
    raise AssertionError(f"no {drv} node on {file}")


def nbd(d: Path) -> Step:
    return ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "nbd.sock")}}})


def export(export_id: str, node: str, writable: bool) -> Step:
    args = {"type": "nbd", "id": export_id, "node-name": node, "writable": writable}
    return ("block-export-add", args)


def implicit_children(d: Path) -> Generator[Step, Any, None]:
    """Exports of the children a qcow2 node opened along with itself."""
    yield nbd(d)
    file_options = {"driver": "file", "filename": str(d / "a.qcow2")}
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": file_options})
    nodes = yield ("query-named-block-nodes", {"flat": True})
    file = auto(nodes, d, "a.qcow2", "file")
    backing = auto(nodes, d, "a-base.qcow2", "qcow2")
    backing_file = auto(nodes, d, "a-base.qcow2", "file")
    for i, node in enumerate((file, backing, backing_file, "top")):
        yield export(f"w{i}", node, True)
        yield export(f"r{i}", node, False)
    yield ("query-block-exports", None)


def named_file(d: Path) -> Generator[Step, Any, None]:
    """A file node a client added, used by a qcow2 node, and more users of it."""
    yield nbd(d)
    yield ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": str(d / "b.qcow2")})
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "f1"})
    yield export("e1", "f1", True)
    yield export("e2", "f1", False)
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": "f1"})
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q3", "file": "f1", "read-only": True})
    # a raw node passes its users' needs down to the file
    yield ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "f1"})
    yield export("e3", "r1", True)
    yield export("e4", "r1", False)
    # one with a window onto the file never lets others resize it
    yield ("blockdev-add", {"driver": "raw", "node-name": "r2", "file": "f1", "offset": 512})
    yield ("blockdev-add", {"driver": "raw", "node-name": "r3", "file": "f1", "read-only": True,
                            "size": 512})  # fmt: skip
    yield export("e5", "r3", False)
    yield export("e6", "q1", True)
    yield ("block-export-del", {"id": "e6"})
    # once the qcow2 node is gone, the file is free for others
    yield ("blockdev-del", {"node-name": "q1"})
    yield export("e7", "f1", True)
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q4", "file": "f1"})
    yield ("query-block-exports", None)


def exported_first(d: Path) -> Generator[Step, Any, None]:
    """A file exported before a qcow2 node wants it; then after the export goes."""
    yield nbd(d)
    yield ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": str(d / "c.qcow2")})
    yield export("e1", "f1", True)
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "f1"})
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": "f1", "read-only": True})
    yield ("block-export-del", {"id": "e1"})
    yield export("e2", "f1", False)
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q3", "file": "f1", "read-only": True})
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q4", "file": "f1"})
    yield ("blockdev-del", {"node-name": "q3"})
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q5", "file": "f1"})
    yield ("query-block-exports", None)


def over_blkdebug(d: Path) -> Generator[Step, Any, None]:
    """The same rules through a blkdebug node, whose child is called 'image'."""
    yield nbd(d)
    yield ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": str(d / "a.qcow2")})
    yield ("blockdev-add", {"driver": "blkdebug", "node-name": "dbg", "image": "f1"})
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "dbg"})
    yield export("e1", "f1", False)
    yield export("e2", "dbg", True)
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": "f1"})
    yield ("query-block-exports", None)


def commit_chain(d: Path) -> None:
    """base <- mid <- top with data in base and mid, so a slowed commit stays running."""
    qemu_img("create", "-q", "-f", "qcow2", str(d / "j0.qcow2"), "4M")
    for i in (1, 2):
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / f"j{i - 1}.qcow2"), "-F", "qcow2",
                 str(d / f"j{i}.qcow2"))  # fmt: skip
    for i in (0, 1):
        qemu_io(d / f"j{i}.qcow2", "write -P 0x1 0 4M")


def commit_nodes(d: Path) -> Generator[Step, Any, None]:
    for i, name in enumerate(("base", "mid", "top")):
        args: dict[str, Any] = {"driver": "qcow2", "node-name": name,
                                "file": {"driver": "file", "filename": str(d / f"j{i}.qcow2")}}
        if i:
            args["backing"] = ("base", "mid")[i - 1]
        yield ("blockdev-add", args)


def during_commit(d: Path) -> Generator[Step, Any, None]:
    """A commit of mid into base: base gets a writer, mid is read by nobody new."""
    yield nbd(d)
    yield from commit_nodes(d)
    commit = {"job-id": "j1", "device": "top", "top-node": "mid", "base-node": "base",
              "speed": 1024}  # fmt: skip
    yield export("eb", "base", True)
    yield ("block-commit", commit)
    yield ("block-export-del", {"id": "eb"})
    yield export("em", "mid", False)  # there before the job: behind its filter
    yield ("block-commit", commit)
    yield export("eb2", "base", True)
    yield export("eb3", "base", False)
    yield export("em2", "mid", True)
    yield export("et", "top", True)
    yield ("block-job-cancel", {"device": "j1"})


def during_active_commit(d: Path) -> Generator[Step, Any, None]:
    """An active commit: the nodes between top and base are read by nobody new,
    and a user of top needing consistent reads meets the job through top's backing."""
    yield nbd(d)
    yield from commit_nodes(d)
    commit = {"job-id": "j1", "device": "top", "base-node": "base", "speed": 1024}
    yield export("em", "mid", False)
    yield ("block-commit", commit)
    yield ("block-export-del", {"id": "em"})
    yield ("block-commit", commit)
    yield export("eb", "base", True)
    yield export("em2", "mid", False)
    yield export("et", "top", True)
    yield ("block-job-cancel", {"device": "j1"})


def commit_into_exported_file(d: Path) -> Generator[Step, Any, None]:
    """A commit opens base read-write: then its qcow2 node needs its file to
    itself, which a read-only export of that file (fine until then) refuses."""
    yield nbd(d)
    file_options = {"driver": "file", "filename": str(d / "j2.qcow2")}
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": file_options})
    nodes = yield ("query-named-block-nodes", {"flat": True})
    base_file = auto(nodes, d, "j0.qcow2", "file")
    yield ("block-export-add", {"type": "nbd", "id": "e1", "node-name": base_file, "name": "x"})
    yield ("block-commit", {"job-id": "j1", "device": "top", "top": str(d / "j1.qcow2"),
                            "speed": 1024})  # fmt: skip
    yield ("block-export-del", {"id": "e1"})
    yield ("block-commit", {"job-id": "j1", "device": "top", "top": str(d / "j1.qcow2"),
                            "speed": 1024})  # fmt: skip
    yield ("block-export-add", {"type": "nbd", "id": "e2", "node-name": base_file, "name": "y"})
    yield ("block-job-cancel", {"device": "j1"})


def read_only_file(d: Path) -> Generator[Step, Any, None]:
    """A read-only file takes no writer: a read-write qcow2 node always writes its
    file, a raw node only once its own users write."""
    yield nbd(d)
    raw_image = str(d / "c-base.qcow2")
    yield ("blockdev-add", {"driver": "file", "node-name": "f", "filename": raw_image,
                            "read-only": True})  # fmt: skip
    yield ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
    yield export("e1", "r", True)
    yield export("e2", "r", False)
    yield ("blockdev-add", {"driver": "raw", "node-name": "r2", "file": "r"})
    yield export("e3", "r2", True)
    inline = {"driver": "file", "filename": str(d / "a.qcow2"), "read-only": True}
    yield ("blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": inline})
    yield ("blockdev-add", {"driver": "raw", "node-name": "r3", "file": inline})
    yield ("query-block-exports", None)


@pytest.mark.parametrize(
    "scenario",
    [implicit_children, named_file, exported_first, over_blkdebug, during_commit,
     during_active_commit, commit_into_exported_file, read_only_file],
    ids=lambda s: s.__name__,
)  # fmt: skip
def test_same_conflicts_as_qsd(sock_dir: Path, scenario: Scenario) -> None:
    require_tool("qemu-storage-daemon")
    results = {}
    for daemon in ("qsd", "blockd"):
        d = sock_dir / daemon
        d.mkdir()
        for name in ("a", "b", "c"):
            chain(d, name)
        commit_chain(d)
        results[daemon] = run(daemon, d, scenario)
        for name in ("a", "b", "c"):
            check = subprocess.run(["qemu-img", "check", str(d / f"{name}.qcow2")],
                                   capture_output=True, text=True)  # fmt: skip
            assert check.returncode == 0, check.stdout + check.stderr
    # the same paths on both sides, so the replies can be compared as text
    qsd = [(c, r.replace(str(sock_dir / "qsd"), "D")) for c, r in results["qsd"]]
    blockd = [(c, r.replace(str(sock_dir / "blockd"), "D")) for c, r in results["blockd"]]
    assert blockd == qsd
    assert any("'error'" in r for _, r in qsd)  # each scenario has refusals to compare
