"""What an intermediate commit keeps holding, and whom it moves, against QSD 7.2.

QEMU's commit job keeps its claim on the nodes between top and base (no new
consistent reader) until the job is dismissed, when it completed; and it
moves onto base only the overlays that were on top when it started (its
filter sits under those), while an overlay added on top later stays there.
Found by the random differential runs (seeds 800202, 900101).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, on_both, serving
from tests.images import backing_of, create, qemu_io

pytestmark = pytest.mark.qsd


def add(d: Path, name: str, backing: str | None, read_only: bool) -> dict[str, Any]:
    file = {"driver": "file", "filename": str(d / f"{name}.qcow2"), "node-name": f"f-{name}"}
    return {"driver": "qcow2", "node-name": name, "read-only": read_only, "backing": backing,
            "file": file}  # fmt: skip


def run(start: Callable[[Path], DaemonProcess], d: Path) -> list[Any]:
    for i in range(3):
        create(d / f"n{i}.qcow2", size="8M", backing=f"n{i - 1}.qcow2" if i else None)
        qemu_io(d / f"n{i}.qcow2", f"write -P {i + 1} {i}M 1M")
    create(d / "o0.qcow2", size="8M", backing="n1.qcow2")
    seen: list[Any] = []
    with serving(start, d / "qmp.sock") as qmp:
        for args in (add(d, "n0", None, True), add(d, "n1", "n0", True),
                     add(d, "n2", "n1", False)):  # fmt: skip
            assert qmp.execute("blockdev-add", args) == {"return": {}}
        assert "return" in qmp.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "nbd")}}}
        )
        commit = {"job-id": "j0", "device": "n2", "top-node": "n1", "base-node": "n0",
                  "speed": 1, "auto-dismiss": False}  # fmt: skip
        assert qmp.execute("block-commit", commit) == {"return": {}}
        seen.append(qmp.execute("blockdev-add", add(d, "o0", "n1", False)))
        assert qmp.execute("block-job-set-speed", {"device": "j0", "speed": 0}) == {"return": {}}
        qmp.wait_event("JOB_STATUS_CHANGE", status="concluded")
        export = {"type": "nbd", "node-name": "n1", "writable": False}
        seen.append(qmp.execute("block-export-add", {**export, "id": "e0"}))
        assert qmp.execute("job-dismiss", {"id": "j0"}) == {"return": {}}
        seen.append(qmp.execute("block-export-add", {**export, "id": "e1"}))
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})["return"]
        for n in sorted(nodes, key=lambda n: str(n["node-name"])):
            if n["node-name"] in ("o0", "n2"):
                seen.append((n["node-name"], n["file"], n.get("backing_file")))
        assert qmp.execute("quit") == {"return": {}}
    seen += [("header", name, backing_of(d / f"{name}.qcow2")) for name in ("n2", "o0")]
    return [str(x).replace(str(d), "D") for x in seen]


def test_commit_holds_and_moves_as_qsd(sock_dir: Path) -> None:
    require_tool("qemu-storage-daemon")
    theirs, ours = on_both(sock_dir, run)
    assert ours == theirs
    assert "Permission conflict on node 'n1'" in ours[1]  # held until dismissed
    assert ours[2] == "{'return': {}}"
    assert "('header', 'o0', 'n1.qcow2')" in ours
    assert "('header', 'n2', 'D/n0.qcow2')" in ours
