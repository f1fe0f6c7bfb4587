"""A file whose length is not a multiple of 512, against qemu-storage-daemon 7.2.

QEMU counts every node in whole 512-byte sectors: a 1000-byte file is a
1024-byte file node, raw node and NBD export; the 24 bytes past the end read
as zeros and a write there grows the file only as far as the write goes.  A
raw node with an ``offset`` rounds its own length up too, and its ``size``
option must be whole sectors.  The same requests go to both daemons, each on
its own copy of the images; qemu-img is the third judge of the node's size.

One deliberate difference (README): a write from a raw node's rounded-up tail
that would go past its file's last sector makes QSD abort (an assertion);
blockd refuses it with EIO.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import RawQMP, start_blockd, start_qsd
from tests.images import qemu_img
from tests.interop.test_blkdebug_differential import recv_exactly

pytestmark = pytest.mark.qsd

Options = Callable[[Path], list[dict[str, Any]]]
ODD = 1000


def file_opts(d: Path, name: str = "odd.raw", **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": str(d / name), **extra}


# the blockdev-add arguments; the last node added is the one exported
SETUPS: dict[str, Options] = {
    "file": lambda d: [{**file_opts(d), "node-name": "f"}],
    "raw-inline": lambda d: [{"driver": "raw", "node-name": "r", "file": file_opts(d)}],
    "raw-over-file": lambda d: [
        {**file_opts(d), "node-name": "f"},
        {"driver": "raw", "node-name": "r", "file": "f"},
    ],
    "qcow2-over-odd-file": lambda d: [
        {"driver": "qcow2", "node-name": "q", "file": file_opts(d, "odd.qcow2")}
    ],
}

# (request, offset, length): inside the file, across its end, in the tail,
# past the last sector, then the tail read back
REQUESTS = (
    ("read", 990, 34),
    ("write", 1010, 4),
    ("read", 992, 32),
    ("write", 1000, 8),
    ("read", 1000, 24),
    ("write", 1020, 8),
    ("read", 1020, 8),
    ("flush", 0, 0),
)
COMMANDS = {"read": 0, "write": 1, "flush": 3}


def make_images(d: Path) -> None:
    (d / "odd.raw").write_bytes(b"\x11" * ODD)
    qemu_img("create", "-q", "-f", "qcow2", str(d / "odd.qcow2"), "1M")
    with open(d / "odd.qcow2", "ab") as f:  # a qcow2 file with a partial last sector
        f.write(b"\x22" * ODD)


def nbd_go(path: Path, name: str) -> tuple[socket.socket, int]:
    """Handshake with NBD_OPT_GO; the socket and the export size it announced."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(str(path))
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 1))
    raw = name.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    size = -1
    while True:
        _magic, _option, reply, length = struct.unpack(">QIII", recv_exactly(sock, 20))
        body = recv_exactly(sock, length)
        if reply == 3 and struct.unpack(">H", body[:2])[0] == 0:  # NBD_INFO_EXPORT
            size = struct.unpack(">Q", body[2:10])[0]
        if reply == 1:
            return sock, size
        assert not reply & 0x80000000, (reply, body)


def nbd(sock: socket.socket, handle: int, command: str, offset: int, length: int) -> Any:
    """The request's errno, and for a read the bytes, as hex."""
    payload = bytes([0x30 + handle]) * length if command == "write" else b""
    header = struct.pack(">IHHQQI", 0x25609513, 0, COMMANDS[command], handle, offset, length)
    sock.sendall(header + payload)
    magic, error, got = struct.unpack(">IIQ", recv_exactly(sock, 16))
    assert (magic, got) == (0x67446698, handle)
    if command == "read" and not error:
        return [error, recv_exactly(sock, length).hex()]
    return [error]


def node_sizes(qmp: RawQMP) -> list[Any]:
    nodes = qmp.execute("query-named-block-nodes", {"flat": True})["return"]
    return sorted(
        ["#" if n["node-name"].startswith("#") else n["node-name"], n["drv"],
         n["image"]["virtual-size"], n["image"]["actual-size"]]
        for n in nodes
    )  # fmt: skip


def converse(kind: str, root: Path, setup: str) -> dict[str, Any]:
    d = root / f"{kind}-{setup}"
    d.mkdir()
    make_images(d)
    daemon = (start_qsd if kind == "qsd" else start_blockd)(d / "qmp.sock")
    out: dict[str, Any] = {}
    try:
        with RawQMP(d / "qmp.sock") as qmp:
            qmp.negotiate()
            server = {"addr": {"type": "unix", "data": {"path": str(d / "nbd.sock")}}}
            assert qmp.execute("nbd-server-start", server) == {"return": {}}
            options = SETUPS[setup](d)
            for args in options:
                assert qmp.execute("blockdev-add", args) == {"return": {}}
            out["opened"] = node_sizes(qmp)
            top = options[-1]["node-name"]
            export = {"type": "nbd", "id": "e", "node-name": top, "writable": True}
            assert qmp.execute("block-export-add", export) == {"return": {}}
            sock, out["export-size"] = nbd_go(d / "nbd.sock", top)
            with sock:
                out["requests"] = [nbd(sock, h, *r) for h, r in enumerate(REQUESTS, 1)]
            out["after"] = node_sizes(qmp)
    finally:
        daemon.stop()
    out["file-lengths"] = [(d / n).stat().st_size for n in ("odd.raw", "odd.qcow2")]
    out["qemu-img"] = qemu_img_size(d / "odd.raw")
    return out


def qemu_img_size(path: Path) -> int:
    proc = subprocess.run(["qemu-img", "info", "--output=json", "-f", "raw", str(path)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(json.loads(proc.stdout)["virtual-size"])


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    require_tool("qemu-storage-daemon")
    with tempfile.TemporaryDirectory(prefix="odd-") as name:  # short: AF_UNIX paths
        yield Path(name)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_same_sizes_reads_and_writes(root: Path, setup: str) -> None:
    qsd = converse("qsd", root, setup)
    ours = converse("blockd", root, setup)
    assert ours == qsd
    if setup != "qcow2-over-odd-file":
        # not vacuous: the node is whole sectors, the tail reads as zeros, a write
        # there grows the file only as far as it goes, one past the last sector fails
        assert ours["export-size"] == 1024 == ours["qemu-img"]
        assert ours["requests"][0] == [0, "11" * 10 + "00" * 24]
        assert ours["requests"][5] == [22]  # EINVAL: past the export's end
        assert ours["file-lengths"][0] == 1014


def raw_add(qmp: RawQMP, d: Path, n: int, extra: dict[str, Any]) -> Any:
    args = {"driver": "raw", "node-name": f"r{n}", "read-only": True, **extra,
            "file": file_opts(d, locking="off")}  # fmt: skip
    reply = qmp.execute("blockdev-add", args)
    if "error" in reply:
        return reply
    sizes = [s for s in node_sizes(qmp) if s[0] == f"r{n}"]
    return [reply, sizes]


RAW_OPTIONS = [
    {"offset": 2000},
    {"offset": 1024},
    {"offset": 1020},
    {"offset": 100},
    {"size": 2048},
    {"size": 1000},
    {"size": 1024},
    {"offset": 100, "size": 1024},
    {"offset": 100, "size": 924},
    {"offset": 100, "size": 512},
    {"offset": 2000, "size": 512},
    {"offset": 1000, "size": 0},
]


def test_raw_offset_and_size_over_an_odd_file(root: Path) -> None:
    """Which windows open, their sizes, and the errors, word for word."""
    results = {}
    for kind in ("qsd", "blockd"):
        d = root / f"{kind}-raw-options"
        d.mkdir()
        make_images(d)
        daemon = (start_qsd if kind == "qsd" else start_blockd)(d / "qmp.sock")
        try:
            with RawQMP(d / "qmp.sock") as qmp:
                qmp.negotiate()
                results[kind] = [raw_add(qmp, d, n, o) for n, o in enumerate(RAW_OPTIONS)]
        finally:
            daemon.stop()
    assert results["blockd"] == results["qsd"]
    assert results["blockd"][3][1][0][2] == 1024  # offset 100: 924 bytes, rounded up


def test_raw_offset_tail_reads_as_zeros(root: Path) -> None:
    """offset=100 over 1000 bytes: a 1024-byte node whose last 124 bytes are zeros
    (QSD agrees: read-only here, since QSD aborts on a write there)."""
    results = {}
    for kind in ("qsd", "blockd"):
        d = root / f"{kind}-raw-offset"
        d.mkdir()
        make_images(d)
        daemon = (start_qsd if kind == "qsd" else start_blockd)(d / "qmp.sock")
        try:
            with RawQMP(d / "qmp.sock") as qmp:
                qmp.negotiate()
                server = {"addr": {"type": "unix", "data": {"path": str(d / "nbd.sock")}}}
                assert qmp.execute("nbd-server-start", server) == {"return": {}}
                node = {"driver": "raw", "node-name": "r", "offset": 100, "file": file_opts(d)}
                assert qmp.execute("blockdev-add", node) == {"return": {}}
                export = {"type": "nbd", "id": "e", "node-name": "r"}
                assert qmp.execute("block-export-add", export) == {"return": {}}
                sock, size = nbd_go(d / "nbd.sock", "r")
                with sock:
                    reads = [nbd(sock, 1, "read", o, n) for o, n in ((880, 40), (900, 124))]
                results[kind] = [size, reads]
        finally:
            daemon.stop()
    assert results["blockd"] == results["qsd"]
    assert results["blockd"] == [1024, [[0, "11" * 20 + "00" * 20], [0, "00" * 124]]]


def test_raw_offset_tail_write_is_refused(sock_dir: Path, tmp_path: Path) -> None:
    """The deliberate difference: blockd's answer where QSD aborts.  Nothing is
    written, the file keeps its length, and the daemon goes on serving."""
    make_images(tmp_path)
    daemon = start_blockd(sock_dir / "qmp.sock")
    try:
        with RawQMP(sock_dir / "qmp.sock") as qmp:
            qmp.negotiate()
            server = {"addr": {"type": "unix", "data": {"path": str(sock_dir / "nbd.sock")}}}
            assert qmp.execute("nbd-server-start", server) == {"return": {}}
            node = {"driver": "raw", "node-name": "r", "offset": 100, "file": file_opts(tmp_path)}
            assert qmp.execute("blockdev-add", node) == {"return": {}}
            export = {"type": "nbd", "id": "e", "node-name": "r", "writable": True}
            assert qmp.execute("block-export-add", export) == {"return": {}}
            sock, size = nbd_go(sock_dir / "nbd.sock", "r")
            with sock:
                assert size == 1024
                assert nbd(sock, 1, "write", 920, 8) == [5]  # EIO: past the file's last sector
                assert nbd(sock, 2, "write", 890, 30) == [0]  # inside: the file grows to 1020
                assert nbd(sock, 3, "read", 880, 48) == [0, "11" * 10 + "32" * 30 + "00" * 8]
            assert "return" in qmp.execute("query-named-block-nodes")
    finally:
        daemon.stop()
    assert (tmp_path / "odd.raw").stat().st_size == 1020
