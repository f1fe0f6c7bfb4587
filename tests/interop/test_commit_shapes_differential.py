"""Intermediate commits on chain shapes the other commit tests do not build,
against QSD 7.2: what a client sees (the job's end), and the headers and
guest view left behind.

- a commit deep in a chain: the overlay re-pointed is the image right above
  top, however many images lie above that one;
- a base that cannot grow to top's size (a version 2 image with an internal
  snapshot): the job ends with errno's words, as QEMU's truncate is asked for
  no message;
- top named by the deprecated ``top`` argument with the ``json:`` file name
  it shows (its file is a blkdebug filter), which matches as it is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, on_both, serving
from tests.images import backing_of, create, guest_view, qemu_img, qemu_io

pytestmark = pytest.mark.qsd


#: the node a shape's image is filtered through blkdebug for (no rules)
FILTERED = "filtered"


@dataclass(frozen=True)
class FileNameOf:
    """An argument that is a node's file name as query-named-block-nodes shows it."""

    node: str


def add(d: Path, name: str, backing: str | None) -> dict[str, Any]:
    file: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
    if name == FILTERED:
        file = {"driver": "blkdebug", "image": file}
    return {"driver": "qcow2", "node-name": name, "backing": backing, "file": file}


def deep_chain(d: Path) -> tuple[list[str], dict[str, Any]]:
    """n0 <- n1 <- n2 <- n3 <- n4, each image with its own data; n1 into n0."""
    names = [f"n{i}" for i in range(5)]
    for i, name in enumerate(names):
        create(d / f"{name}.qcow2", size="8M", backing=f"{names[i - 1]}.qcow2" if i else None)
        qemu_io(d / f"{name}.qcow2", f"write -P {i + 1} {i}M 1M")
    return names, {"device": "n4", "top-node": "n1", "base-node": "n0"}


def v2_base_with_a_snapshot(d: Path) -> tuple[list[str], dict[str, Any]]:
    """base (1M, compat 0.10, snapshot s1) <- mid (4M) <- top: base must grow."""
    create(d / "base.qcow2", size="1M", options="compat=0.10")
    qemu_io(d / "base.qcow2", "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s1", str(d / "base.qcow2"))
    create(d / "mid.qcow2", size="4M", backing="base.qcow2")
    qemu_io(d / "mid.qcow2", "write -P 2 3M 64k")
    create(d / "top.qcow2", size="4M", backing="mid.qcow2")
    return ["base", "mid", "top"], {"device": "top", "top-node": "mid"}


def json_named_top(d: Path) -> tuple[list[str], dict[str, Any]]:
    """base <- filtered <- top; top named by its json: file name."""
    create(d / "base.qcow2", size="4M")
    create(d / f"{FILTERED}.qcow2", size="4M", backing="base.qcow2")
    qemu_io(d / f"{FILTERED}.qcow2", "write -P 2 1M 64k")
    create(d / "top.qcow2", size="4M", backing=f"{FILTERED}.qcow2")
    return ["base", FILTERED, "top"], {"device": "top", "top": FileNameOf(FILTERED)}


def run(start: Callable[[Path], DaemonProcess], d: Path, shape: Callable[[Path], Any]) -> list[Any]:
    names, commit = shape(d)
    seen: list[Any] = []
    with serving(start, d / "qmp.sock") as qmp:
        below = None
        for name in names:
            assert qmp.execute("blockdev-add", add(d, name, below)) == {"return": {}}
            below = name
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})["return"]
        files = {n["node-name"]: n["file"] for n in nodes}
        args = {k: files[v.node] if isinstance(v, FileNameOf) else v for k, v in commit.items()}
        assert qmp.execute("block-commit", {"job-id": "j", **args}) == {"return": {}}
        done = qmp.wait_event("BLOCK_JOB_COMPLETED")
        error = done["data"].get("error")
        seen.append(error.replace(str(d), "D") if error else error)
        assert qmp.execute("quit") == {"return": {}}
    for name in names:
        backing = backing_of(d / f"{name}.qcow2")
        seen.append((name, backing.replace(f"{d}/", "") if backing else backing))
    guest_view(d / f"{names[-1]}.qcow2", d / "view.raw")
    seen.append((d / "view.raw").read_bytes())
    return seen


@pytest.mark.parametrize(
    "shape", [deep_chain, v2_base_with_a_snapshot, json_named_top], ids=lambda f: f.__name__
)
def test_the_commit_ends_and_leaves_the_chain_as_qsd(
    sock_dir: Path, shape: Callable[[Path], Any]
) -> None:
    require_tool("qemu-storage-daemon")
    theirs, ours = on_both(sock_dir, lambda start, d: run(start, d, shape))
    assert ours == theirs
    if shape is deep_chain:
        assert ours[0] is None
        assert ours[1:6] == [("n0", None), ("n1", "n0.qcow2"), ("n2", "n0.qcow2"),
                             ("n3", "n2.qcow2"), ("n4", "n3.qcow2")]  # fmt: skip
    elif shape is v2_base_with_a_snapshot:
        assert ours[0] == "Operation not supported"
    else:
        assert ours[0] is None and ours[3] == ("top", "base.qcow2")
