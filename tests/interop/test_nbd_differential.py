"""The export commands against qemu-storage-daemon 7.2 and blockd, side by side.

Same images, same commands, NBD clients connected at the same moments: the
replies, errors and BLOCK_EXPORT_DELETED events (in order, timestamps masked)
must agree.  Known, deliberate differences (blockd has no vsock, no
allocation-depth, no iothreads or TLS objects) are left out or noted.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import create

pytestmark = pytest.mark.qsd

Step = tuple[str, Any]


def unix(path: str) -> dict[str, Any]:
    return {"addr": {"type": "unix", "data": {"path": path}}}


def node(name: str, image: str, read_only: bool = False) -> dict[str, Any]:
    args: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": name,
        "file": {"driver": "file", "filename": image},
    }
    if read_only:
        args["read-only"] = True
    return args


def export(export_id: str, node_name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "nbd", "id": export_id, "node-name": node_name, **extra}


def script(d: str) -> list[Step]:
    """The conversation; ``d`` is the daemon's own directory."""
    nbd = f"{d}/nbd.sock"
    return [
        ("nbd-server-stop", None),
        ("block-export-add", export("e", "d")),
        ("nbd-server-start", {"addr": {"type": "unix", "path": nbd}}),
        ("nbd-server-start", {}),
        ("nbd-server-start", {"addr": {"type": "bogus", "data": {}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd, "x": 1}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": 5}}}),
        ("nbd-server-start", {**unix(nbd), "tls-creds": "x"}),
        ("nbd-server-start", {**unix(nbd), "max-connections": -1}),
        ("nbd-server-start", {**unix(nbd), "max-connections": "x"}),
        ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1"}}}),
        ("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "3"}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/nonexistent/x/s"}}}),
        ("blockdev-add", node("d", f"{d}/d.qcow2")),
        ("blockdev-add", node("ro", f"{d}/ro.qcow2", read_only=True)),
        ("block-export-add", export("e", "d")),
        ("nbd-server-start", {**unix(nbd), "tls-authz": "authz0", "max-connections": 4}),
        ("nbd-server-start", unix(nbd)),
        ("block-export-add", export("e", "nonode")),
        ("block-export-add", export("", "d")),
        ("block-export-add", export("1e", "d")),
        ("block-export-add", {"type": "nbd", "node-name": "d"}),
        ("block-export-add", {"type": "nbd", "id": "e"}),
        ("block-export-add", {"id": "e", "node-name": "d"}),
        ("block-export-add", {**export("e", "d"), "type": "bogus"}),
        ("block-export-add", export("e", "d", bitmaps=["b"])),
        ("block-export-add", export("e", "d", **{"tls-creds": "x"})),
        ("block-export-add", export("e", "d", iothread="nope")),
        ("block-export-add", export("e", "d", writable="yes")),
        ("block-export-add", export("w", "ro", writable=True)),
        ("block-export-add", export("e", "d", name="x" * 4097)),
        ("block-export-add", export("e", "d", description="y" * 4097)),
        ("block-export-add", export("e", "d", writable=True, description="my disk")),
        ("block-export-add", export("e", "ro")),
        ("block-export-add", export("e2", "ro", name="d")),
        ("block-export-add", export("e2", "ro", **{"fixed-iothread": True})),
        ("block-export-add", export("e3", "d", name="other", writethrough=True)),
        ("query-block-exports", None),
        ("blockdev-del", {"node-name": "d"}),
        ("blockdev-del", {"node-name": "ro"}),
        ("block-export-del", {}),
        ("block-export-del", {"id": "nope"}),
        ("block-export-del", {"id": "e3", "mode": "bogus"}),
        ("block-export-del", {"id": "e3"}),
        ("block-export-del", {"id": "e3"}),
        ("query-block-exports", None),
        ("client", "d"),
        ("block-export-del", {"id": "e"}),
        ("block-export-del", {"id": "e", "mode": "safe"}),
        ("query-block-exports", None),
        ("block-export-del", {"id": "e", "mode": "hard"}),
        ("wait", None),
        ("query-block-exports", None),
        ("block-export-add", export("e", "d", writable=True)),
        ("client", "d"),
        ("nbd-server-stop", None),
        ("wait", None),
        ("query-block-exports", None),
        ("nbd-server-stop", None),
        ("blockdev-del", {"node-name": "d"}),
        ("nbd-server-start", unix(nbd)),
        ("block-export-add", export("last", "ro")),
        ("client", "ro"),
        ("quit", None),
    ]


def nbd_client(path: str, name: str) -> socket.socket:
    """Connect and choose an export with NBD_OPT_GO, then stay connected."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    assert len(sock.recv(18)) == 18
    sock.sendall(struct.pack(">I", 3))
    raw = name.encode()
    data = struct.pack(">I", len(raw)) + raw + b"\x00\x00"
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    buf = b""
    while not (len(buf) >= 20 and buf.endswith(struct.pack(">II", 1, 0))):
        part = sock.recv(4096)
        assert part, "server closed during GO"
        buf += part
    return sock


def mask(message: dict[str, Any], d: str) -> dict[str, Any]:
    message = dict(message)
    message.pop("timestamp", None)
    text = repr(message).replace(d, "DIR")
    return {"masked": text}


def run(daemon_dir: Path, qmp: RawQMP) -> list[dict[str, Any]]:
    d = str(daemon_dir)
    out: list[dict[str, Any]] = []
    clients: list[socket.socket] = []
    for command, arguments in script(d):
        if command == "client":
            clients.append(nbd_client(f"{d}/nbd.sock", arguments))
            continue
        if command == "wait":
            time.sleep(0.3)
            continue
        reply = qmp.execute(command, arguments)
        out.extend(mask(e, d) for e in qmp.events)
        qmp.events.clear()
        out.append(mask(reply, d))
        out[-1]["command"] = command
    if clients:
        for sock in clients:
            sock.close()
    return out


def prepare(directory: Path) -> None:
    directory.mkdir()
    create(directory / "d.qcow2", "4M")
    create(directory / "ro.qcow2", "4M")


@pytest.fixture
def both(tmp_path: Path) -> tuple[Path, Path]:
    require_tool("qemu-storage-daemon")
    require_tool("qemu-img")
    # Short directories: the NBD socket path must fit in sun_path.
    import tempfile

    qsd_dir = Path(tempfile.mkdtemp(prefix="q-"))
    blockd_dir = Path(tempfile.mkdtemp(prefix="b-"))
    qsd_dir.rmdir()
    blockd_dir.rmdir()
    prepare(qsd_dir)
    prepare(blockd_dir)
    return qsd_dir, blockd_dir


def converse(start: Any, directory: Path) -> list[dict[str, Any]]:
    daemon: DaemonProcess = start(directory / "qmp.sock")
    try:
        with RawQMP(directory / "qmp.sock") as qmp:
            qmp.negotiate()
            out = run(directory, qmp)
        daemon.wait()
    finally:
        daemon.stop()
    return out


def test_export_commands_match_qsd(both: tuple[Path, Path]) -> None:
    qsd_dir, blockd_dir = both
    expected = converse(start_qsd, qsd_dir)
    got = converse(start_blockd, blockd_dir)
    for index, (want, have) in enumerate(zip(expected, got, strict=False)):
        assert have == want, f"message {index} differs"
    assert len(got) == len(expected)
