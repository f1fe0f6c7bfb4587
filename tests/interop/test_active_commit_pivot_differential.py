"""What an active commit's completion changes around base, against QSD 7.2.

QEMU replaces top by base under every parent when the job completes, and
base takes top's open mode with it: a read-only top leaves a read-only base
(and file node), and an overlay added on top while the job ran reads base
afterwards (its header still names top, so its file name shows the
override).  Found by the random differential runs (seeds 500104, 300486).
A node opened on top itself (a raw node over it) moves to base as well.
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


def run(
    start: Callable[[Path], DaemonProcess], d: Path, top_read_only: bool, added: str | None
) -> list[Any]:
    create(d / "n0.qcow2", size="8M")
    create(d / "n1.qcow2", size="8M", backing="n0.qcow2")
    create(d / "o0.qcow2", size="8M", backing="n1.qcow2")
    qemu_io(d / "n0.qcow2", "write -P 1 0 1M")
    qemu_io(d / "n1.qcow2", "write -P 2 1M 1M")
    seen: list[Any] = []
    with serving(start, d / "qmp.sock") as qmp:
        for args in (add(d, "n0", None, not top_read_only), add(d, "n1", "n0", top_read_only)):
            assert qmp.execute("blockdev-add", args) == {"return": {}}
        assert qmp.execute("block-commit", {"job-id": "j0", "device": "n1"}) == {"return": {}}
        qmp.wait_event("BLOCK_JOB_READY")
        if added == "overlay":
            reply = qmp.execute("blockdev-add", add(d, "o0", "n1", False))
            assert reply == {"return": {}}
        if added == "raw":
            raw = {"driver": "raw", "node-name": "r0", "file": "n1", "read-only": False}
            assert qmp.execute("blockdev-add", raw) == {"return": {}}
        assert qmp.execute("job-complete", {"id": "j0"}) == {"return": {}}
        qmp.wait_event("BLOCK_JOB_COMPLETED")
        qmp.wait_event("JOB_STATUS_CHANGE", status="null")
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})["return"]
        for n in sorted(nodes, key=lambda n: str(n["node-name"])):
            if not n["node-name"].startswith("#"):
                seen.append((n["node-name"], n["ro"], n["file"], n.get("backing_file")))
        # nobody uses top any more: it goes (and a raw node on it moved to base)
        seen.append(qmp.execute("blockdev-del", {"node-name": "n1"}))
        assert qmp.execute("quit") == {"return": {}}
    seen.append(("o0 header", backing_of(d / "o0.qcow2")))
    return [str(x).replace(str(d), "D") for x in seen]


@pytest.mark.parametrize(
    ("top_read_only", "added"),
    [(True, None), (False, "overlay"), (True, "overlay"), (False, "raw")],
    ids=["read-only top", "overlay added on top", "both", "raw node added on top"],
)
def test_completion_moves_mode_and_overlays_to_base_as_qsd(
    sock_dir: Path, top_read_only: bool, added: str | None
) -> None:
    require_tool("qemu-storage-daemon")
    theirs, ours = on_both(sock_dir, lambda start, d: run(start, d, top_read_only, added))
    assert ours == theirs
    if top_read_only:
        assert "('n0', True, 'D/n0.qcow2', None)" in ours
    if added == "overlay":
        assert "('o0 header', 'n1.qcow2')" in ours
        assert any(x.startswith("('o0', False, 'json:") and "'D/n0.qcow2')" in x for x in ours)
