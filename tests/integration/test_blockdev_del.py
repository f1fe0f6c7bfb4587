"""blockdev-del and shutdown when a flush fails: all or nothing, nothing lost.

A real daemon, qcow2 images made by qemu-img over blkdebug filters whose rule
fails every flush after the first ``flush_to_disk`` event (reads and writes
still work), writes through a real NBD socket, and qemu-io / qemu-img
judging the images afterwards.  The comparison with qemu-storage-daemon is
in tests/interop/test_blockdev_del_differential.py.
"""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.helpers import RawQMP, start_blockd
from tests.images import qemu_img
from tests.interop.test_blkdebug_differential import nbd_connect, nbd_request, recv_exactly

FAILING_FLUSH = [{"event": "flush_to_disk", "iotype": "flush"}]


def add_image(qmp: RawQMP, d: Path, name: str, rules: list[dict[str, Any]] | None) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(d / f"{name}.qcow2"), "4M")
    file: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
    if rules is not None:
        file = {"driver": "blkdebug", "image": file, "inject-error": rules}
    assert qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": name, "file": file}) == {
        "return": {}
    }


def export(qmp: RawQMP, name: str) -> None:
    args = {"type": "nbd", "id": f"e-{name}", "node-name": name, "writable": True}
    assert qmp.execute("block-export-add", args) == {"return": {}}


def unexport(qmp: RawQMP, name: str) -> None:
    """Delete the export once the daemon has seen its NBD client go."""
    deadline = time.monotonic() + 10
    while (reply := qmp.execute("block-export-del", {"id": f"e-{name}"})) != {"return": {}}:
        assert "still in use" in reply["error"]["desc"] and time.monotonic() < deadline, reply
        time.sleep(0.05)
    qmp.wait_event("BLOCK_EXPORT_DELETED", id=f"e-{name}")


def write_pattern(nbd_sock: Path, name: str) -> None:
    """0x5a at 0 and at 1 MiB (nbd_request's payload), not flushed."""
    with nbd_connect(nbd_sock, name) as sock:
        assert nbd_request(sock, 1, ("write", 0, 4096)) == 0
        assert nbd_request(sock, 2, ("write", 1 << 20, 4096)) == 0


def read_back(nbd_sock: Path, name: str) -> bytes:
    """The 4 KiB at 1 MiB, read through NBD."""
    with nbd_connect(nbd_sock, name) as sock:
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 1 << 20, 4096))
        assert struct.unpack(">IIQ", recv_exactly(sock, 16)) == (0x67446698, 0, 1)
        return recv_exactly(sock, 4096)


def has_pattern(image: Path) -> bool:
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 4k", "-c", "read -P 0x5a 1M 4k",
         str(image)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.stdout.count("read 4096/4096") == 2, proc.stdout + proc.stderr
    return "Pattern verification failed" not in proc.stdout


def start(d: Path) -> tuple[Any, RawQMP]:
    daemon = start_blockd(d / "qmp.sock")
    qmp = RawQMP(d / "qmp.sock")
    qmp.negotiate()
    server = {"addr": {"type": "unix", "data": {"path": str(d / "nbd.sock")}}}
    assert qmp.execute("nbd-server-start", server) == {"return": {}}
    return daemon, qmp


def test_failed_flush_leaves_every_node_named_and_usable(sock_dir: Path) -> None:
    daemon, qmp = start(sock_dir)
    try:
        add_image(qmp, sock_dir, "top", FAILING_FLUSH)
        export(qmp, "top")
        write_pattern(sock_dir / "nbd.sock", "top")
        unexport(qmp, "top")
        before = qmp.execute("query-named-block-nodes")
        for _attempt in range(2):
            assert qmp.execute("blockdev-del", {"node-name": "top"}) == {
                "error": {
                    "class": "GenericError",
                    "desc": "Error flushing drive: Input/output error",
                }
            }
            assert qmp.execute("query-named-block-nodes") == before
        assert [n["drv"] for n in before["return"]].count("blkdebug") == 1
        # still the same node, serving what was written
        export(qmp, "top")
        assert read_back(sock_dir / "nbd.sock", "top") == b"\x5a" * 4096
        unexport(qmp, "top")
        # and its children are still its own: neither can be deleted on its own
        for child in before["return"]:
            if child["node-name"] != "top":
                reply = qmp.execute("blockdev-del", {"node-name": child["node-name"]})
                assert (
                    reply["error"]["desc"]
                    == f"Node {child['node-name']} is not owned by the monitor"
                )
    finally:
        qmp.close()
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.stderr()
    assert "closing node top failed: Input/output error" in daemon.stderr()


def test_shutdown_closes_the_others_when_one_close_fails(sock_dir: Path) -> None:
    """The first node's flush fails at exit; the second is still flushed and closed."""
    daemon, qmp = start(sock_dir)
    try:
        add_image(qmp, sock_dir, "bad", FAILING_FLUSH)
        add_image(qmp, sock_dir, "good", None)
        for name in ("bad", "good"):
            export(qmp, name)
            write_pattern(sock_dir / "nbd.sock", name)
            unexport(qmp, name)
    finally:
        qmp.close()
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.stderr()
    assert "closing node bad failed" in daemon.stderr()
    assert has_pattern(sock_dir / "good.qcow2")
    qemu_img("check", "-q", str(sock_dir / "good.qcow2"))
