"""query-named-block-nodes lists nodes in QSD's order: newest first.

QEMU creates a format node after its file and before the backing chain it
opens from its header, and lists the nodes newest first; clients that take
the first entry for an image (or diff listings) see the same thing from blockd.
Generated names differ between the daemons (QEMU's are random), so entries are
compared as (name or '#', file, driver, backing depth, has backing-image);
a backing given inline makes the overlay's file a ``json:`` pseudo-filename.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import qemu_img

pytestmark = pytest.mark.qsd


def make_chains(d: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(d / "c0.qcow2"), "1M")
    for chain in ("a", "b"):
        qemu_img("create", "-q", "-f", "qcow2", str(d / f"{chain}0.qcow2"), "1M")
        for i in (1, 2):
            below = str(d / f"{chain}{i - 1}.qcow2")
            qemu_img("create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2",
                     str(d / f"{chain}{i}.qcow2"))  # fmt: skip


def listings(start: Callable[[Path], DaemonProcess], d: Path) -> list[list[Any]]:
    def file(name: str) -> dict[str, Any]:
        return {"driver": "file", "filename": str(d / name)}

    steps: list[tuple[str, dict[str, Any]]] = [
        ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": file("a2.qcow2")}),
        ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(d / "b0.qcow2")}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "backing": "q0",
                          "file": file("b1.qcow2")}),
        ("blockdev-add", {"driver": "raw", "node-name": "r",
                          "file": {**file("b2.qcow2"), "node-name": "rf"}}),
        ("blockdev-del", {"node-name": "q1"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": file("b1.qcow2"),
                          "backing": {"driver": "qcow2", "file": file("c0.qcow2"),
                                      "read-only": True, "backing": None}}),
    ]
    out = []
    sock = d / "qmp.sock"
    daemon = start(sock)
    try:
        with RawQMP(sock) as qmp:
            qmp.negotiate()
            for command, args in steps:
                assert qmp.execute(command, args) == {"return": {}}, (command, args)
                for flat in (True, False):
                    reply = qmp.execute("query-named-block-nodes", {"flat": flat})["return"]
                    out.append([
                        ("#" if n["node-name"].startswith("#") else n["node-name"],
                         n["file"].replace(str(d), "D"), n["drv"], n["backing_file_depth"],
                         "backing-image" in n["image"])
                        for n in reply
                    ])  # fmt: skip
    finally:
        daemon.stop()
    return out


def test_named_nodes_newest_first_as_qsd(sock_dir: Path) -> None:
    require_tool("qemu-storage-daemon")
    results = []
    for name, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = sock_dir / name
        d.mkdir()
        make_chains(d)
        results.append(listings(start, d))
    qsd, blockd = results
    assert blockd == qsd
    # newest first: the raw node added last leads the list after its blockdev-add
    assert [entry[0] for entry in qsd[8][:2]] == ["r", "rf"]
