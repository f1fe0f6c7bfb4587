"""The export commands against qemu-storage-daemon 7.2 and blockd, side by side.

Same images, same commands, NBD clients connected at the same moments: the
replies, errors and BLOCK_EXPORT_DELETED events (in order, timestamps masked)
must agree.  Known, deliberate differences (blockd has no vsock, no
allocation-depth, no iothreads or TLS objects) are left out or noted.
"""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
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
        # (a non-integer max-connections is worded differently: blockd's schema says
        # "expected: integer" where QEMU's uint visitor says "expects uint64")
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


def legacy_script(d: str) -> list[Step]:
    """nbd-server-add/remove, the deprecated forms QSD 7.2 still answers."""
    add, remove = "nbd-server-add", "nbd-server-remove"
    return [
        ("blockdev-add", node("d", f"{d}/d.qcow2")),
        ("blockdev-add", node("ro", f"{d}/ro.qcow2", read_only=True)),
        (add, {"device": "d"}),  # no server yet
        (add, {"device": "nosuch"}),  # the device is looked up first
        ("nbd-server-start", unix(f"{d}/nbd.sock")),
        (add, {}),
        (add, {"device": "d", "extra": 1}),
        (add, {"device": "d", "writable": "yes"}),
        (add, {"device": "nosuch"}),
        (add, {"device": "ro", "writable": True}),  # exported read-only, no error
        (add, {"device": "ro"}),
        (add, {"device": "d", "name": ""}),
        (add, {"device": "d", "name": "x", "bitmap": "bm"}),
        (add, {"device": "d", "name": "w", "description": "disk", "writable": True}),
        ("query-block-exports", None),
        ("client", "w"),
        (remove, {}),
        (remove, {"name": "nosuch"}),
        (remove, {"name": "w", "mode": "bogus"}),
        (remove, {"name": "w"}),  # a client is connected
        (remove, {"name": "w", "mode": "hard"}),
        ("wait", None),
        (remove, {"name": "ro", "mode": "safe"}),
        ("query-block-exports", None),
        ("block-export-add", export("e", "d")),
        (remove, {"name": "e"}),
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


def run(daemon_dir: Path, qmp: RawQMP, steps: Callable[[str], list[Step]]) -> list[dict[str, Any]]:
    d = str(daemon_dir)
    out: list[dict[str, Any]] = []
    clients: list[socket.socket] = []
    for command, arguments in steps(d):
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
def both() -> Iterator[tuple[Path, Path]]:
    require_tool("qemu-storage-daemon")
    require_tool("qemu-img")
    # Short directories: the NBD socket path must fit in sun_path.
    root = Path(tempfile.mkdtemp(prefix="nd-"))
    try:
        qsd_dir, blockd_dir = root / "q", root / "b"
        prepare(qsd_dir)
        prepare(blockd_dir)
        yield qsd_dir, blockd_dir
    finally:
        shutil.rmtree(root, ignore_errors=True)


def converse(
    start: Any, directory: Path, steps: Callable[[str], list[Step]] = script
) -> list[dict[str, Any]]:
    daemon: DaemonProcess = start(directory / "qmp.sock")
    try:
        with RawQMP(directory / "qmp.sock") as qmp:
            qmp.negotiate()
            out = run(directory, qmp, steps)
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


def test_deprecated_export_commands_match_qsd(both: tuple[Path, Path]) -> None:
    qsd_dir, blockd_dir = both
    expected = converse(start_qsd, qsd_dir, legacy_script)
    got = converse(start_blockd, blockd_dir, legacy_script)
    for index, (want, have) in enumerate(zip(expected, got, strict=False)):
        assert have == want, f"message {index} differs"
    assert len(got) == len(expected)


# -- the NBD wire itself ---------------------------------------------------------------

IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def info(name: bytes, *items: int) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(items))
        + b"".join(struct.pack(">H", i) for i in items)
    )


def meta(name: bytes, *queries: bytes) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def req(kind: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQ, flags, kind, 0x1234, offset, length) + data


class WireClient:
    """Sends raw messages and reads exactly one complete answer to each."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""
        self.structured = False

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            part = self.sock.recv(1 << 20)
            if not part:
                raise EOFError
            self.buf += part
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def option(self, message: bytes) -> list[bytes]:
        """Option replies up to and including the final ACK or error."""
        self.sock.sendall(message)
        out = []
        while True:
            try:
                header = self.take(20)
            except EOFError:
                return [*out, b"EOF"]
            length = struct.unpack_from(">I", header, 16)[0]
            out.append(header + self.take(length))
            rep = struct.unpack_from(">I", header, 12)[0]
            if rep == 1 or rep & 0x80000000:
                return out

    def request(self, message: bytes, read_length: int = 0) -> list[bytes]:
        """One reply: a simple reply (with data for a good READ), or chunks up to DONE."""
        self.sock.sendall(message)
        out = []
        while True:
            magic = struct.unpack(">I", self.take(4))[0]
            if magic == 0x67446698:
                rest = self.take(12)
                error = struct.unpack_from(">I", rest)[0]
                data = self.take(read_length) if read_length and not error else b""
                return [b"simple" + rest + data]
            rest = self.take(16)
            flags, _kind, _handle, length = struct.unpack(">HHQI", rest)
            out.append(rest + self.take(length))
            if flags & 1:
                return out


def wire_conversations(sock: str) -> list[Any]:
    log: list[Any] = []
    c = WireClient(sock)
    log.append(c.take(18))
    c.sock.sendall(struct.pack(">I", 3))
    for message in [
        opt(3),
        opt(3, b"x"),
        opt(6, info(b"disk", 1, 3)),
        opt(6, info(b"nope")),
        opt(6, info(b"")),
        opt(6, info(b"ro")),
        opt(5),
        opt(11),
        opt(10, meta(b"disk", b"base:allocation")),
        opt(8, b"x"),
        opt(8),
        opt(8),
        opt(9, meta(b"disk")),
        opt(9, meta(b"disk", b"base:")),
        opt(9, meta(b"disk", b"qemu:", b"nope:x")),
        opt(9, meta(b"nope", b"base:allocation")),
        opt(10, meta(b"disk", b"base:")),
        opt(10, meta(b"disk", b"base:allocation", b"base:allocation")),
        opt(7, info(b"disk")),
    ]:
        log.append(c.option(message))
    for message, length in [
        (req(0, 0, 256 * 1024), 256 * 1024),
        (req(0, 0, 4096, flags=4), 4096),
        (req(0, (4 << 20) - 512, 1024), 0),
        (req(1, (4 << 20) - 512, 4, data=b"abcd"), 0),
        (req(99), 0),
        (req(7, 0, 4 << 20), 0),
        (req(7, 0, 4 << 20, flags=8), 0),
        (req(7, 65536, 100), 0),
        (req(7, 0, 0), 0),
        (req(0, 0, 16, flags=2), 0),
        (req(6, 2 << 20, 65536, flags=0x10), 0),
        (req(6, 2 << 20, 65536, flags=0x12), 0),
        (req(1, 3 << 20, 5, data=b"trim!"), 0),
        (req(4, 3 << 20, 65536), 0),
        # the node was opened without discard: unmap, so TRIM leaves the data
        (req(0, 3 << 20, 5), 0),
        (req(7, 3 << 20, 65536), 0),
        (req(3), 0),
        (req(5, 0, 65536), 0),
        (req(1, 65536 * 5, 5, flags=1, data=b"hello"), 0),
        (req(0, 65536 * 5, 5), 5),
        (req(0, 0, (32 << 20) + 1), 0),
    ]:
        log.append(c.request(message, length))
    c.sock.sendall(req(2))
    log.append(c.closed())
    # a backing chain exported with qemu:allocation-depth
    c = WireClient(sock)
    c.take(18)
    c.sock.sendall(struct.pack(">I", 3))
    for message in [
        opt(8),
        opt(9, meta(b"chain")),
        opt(9, meta(b"chain", b"qemu:")),
        opt(9, meta(b"chain", b"qemu:allocation-depth", b"qemu:dirty-bitmap:x")),
        opt(10, meta(b"chain", b"qemu:allocation-depth", b"base:allocation")),
        opt(7, info(b"chain")),
    ]:
        log.append(c.option(message))
    for message, length in [
        (req(7, 0, 4 << 20), 0),
        (req(7, 0, 4 << 20, flags=8), 0),
        (req(7, 1 << 20, 8192), 0),
        (req(0, 0, 2 << 20), 0),
        (req(0, 960 * 1024, 128 * 1024), 0),
    ]:
        log.append(c.request(message, length))
    c.sock.sendall(req(2))
    log.append(c.closed())
    # plain: no structured replies, EXPORT_NAME with the zero padding
    c = WireClient(sock)
    c.take(18)
    c.sock.sendall(struct.pack(">I", 1) + opt(1, b"ro"))
    log.append(c.take(8 + 2 + 124))
    for message, length in [
        (req(0, 0, 4096), 4096),
        (req(0, (4 << 20) - 512, 1024), 0),
        (req(1, 0, 1, data=b"x"), 0),
        (req(7, 0, 4096), 0),
        (req(99), 0),
    ]:
        log.append(c.request(message, length))
    c.sock.sendall(req(2))
    log.append(c.closed())
    # odd starts: unknown client flags; meta context before structured; abort; bad export name
    for start in [
        struct.pack(">I", 0x10),
        struct.pack(">I", 3) + opt(10, meta(b"disk", b"base:allocation")),
        struct.pack(">I", 3) + opt(2),
        struct.pack(">I", 3) + opt(1, b"nope"),
    ]:
        c = WireClient(sock)
        c.take(18)
        c.sock.sendall(start)
        try:
            log.append(c.take(20 + 73) if b"\x00\x00\x00\x0a" in start[4:20] else b"")
        except EOFError:
            log.append(b"EOF")
        if start.endswith(opt(2)):
            log.append(c.take(20))
        log.append(
            c.closed() if not start.endswith(opt(10, meta(b"disk", b"base:allocation"))) else None
        )
    return log


def wire_setup(directory: Path) -> None:
    from tests.images import qemu_io

    qemu_io(directory / "d.qcow2", "write -P 0x11 0 64k", "write -z 1M 64k", "write -P 0x22 1M 4k")
    base = create(directory / "base.qcow2", "4M")
    qemu_io(base, "write -P 0x33 1M 128k", "write -P 0x34 3M 64k")
    mid = create(directory / "mid.qcow2", "4M", backing="base.qcow2")
    qemu_io(mid, "write -P 0x35 2M 64k")
    top = create(directory / "top.qcow2", "4M", backing="mid.qcow2")
    qemu_io(top, "write -P 0x36 0 64k", "write -z 1M 64k")


def wire_run(start: Any, directory: Path) -> list[Any]:
    d = str(directory)
    wire_setup(directory)
    daemon: DaemonProcess = start(directory / "qmp.sock")
    try:
        with RawQMP(directory / "qmp.sock") as qmp:
            qmp.negotiate()
            for command, arguments in [
                ("blockdev-add", node("d", f"{d}/d.qcow2")),
                ("blockdev-add", node("ro", f"{d}/ro.qcow2", read_only=True)),
                ("nbd-server-start", unix(f"{d}/nbd.sock")),
                (
                    "block-export-add",
                    export("e", "d", name="disk", writable=True, description="my disk"),
                ),
                ("block-export-add", export("f", "ro")),
                ("blockdev-add", node("t", f"{d}/top.qcow2")),
                ("block-export-add", export("g", "t", name="chain", **{"allocation-depth": True})),
            ]:
                assert qmp.execute(command, arguments) == {"return": {}}
            return wire_conversations(f"{d}/nbd.sock")
    finally:
        daemon.stop()


def test_nbd_wire_matches_qsd(both: tuple[Path, Path]) -> None:
    qsd_dir, blockd_dir = both
    expected = wire_run(start_qsd, qsd_dir)
    got = wire_run(start_blockd, blockd_dir)
    for index, (want, have) in enumerate(zip(expected, got, strict=False)):
        assert have == want, f"exchange {index} differs"
    assert len(got) == len(expected)


# -- issue 12, defect 7: FLUSH ranges and sizes that are not whole sectors ------------------


def odd_sized_qcow2(path: Path, size: int) -> Path:
    """A qcow2 whose header says ``size`` bytes (qemu-img itself rounds sizes up)."""
    create(path, "1024")
    with open(path, "r+b") as f:
        f.seek(24)  # the header's size field
        f.write(struct.pack(">Q", size))
    return path


def sizes_and_flushes(start: Any, directory: Path) -> list[Any]:
    d = str(directory)
    odd_sized_qcow2(directory / "odd.qcow2", 1000)
    odd_sized_qcow2(directory / "odd2.qcow2", 1537)
    log: list[Any] = []
    daemon: DaemonProcess = start(directory / "qmp.sock")
    try:
        with RawQMP(directory / "qmp.sock") as qmp:
            qmp.negotiate()
            for command, arguments in [
                ("blockdev-add", node("o", f"{d}/odd.qcow2")),
                ("blockdev-add", node("o2", f"{d}/odd2.qcow2")),
                ("nbd-server-start", unix(f"{d}/nbd.sock")),
                ("block-export-add", export("e", "o", name="odd", writable=True)),
                ("block-export-add", export("f", "o2", name="odd2")),
            ]:
                assert qmp.execute(command, arguments) == {"return": {}}
            for name in (b"odd", b"odd2"):
                for structured in (False, True):
                    c = WireClient(f"{d}/nbd.sock")
                    c.take(18)
                    c.sock.sendall(struct.pack(">I", 3))
                    if structured:
                        log.append(c.option(opt(8)))
                    log.append(c.option(opt(6, info(name, 3))))
                    log.append(c.option(opt(7, info(name))))
                    for message, length in [
                        (req(3), 0),
                        (req(3, 1), 0),
                        (req(3, 0, 1), 0),
                        (req(3, 511, 1), 0),
                        (req(3, 512, 0), 0),
                        (req(3, 512, 1), 0),
                        (req(3, 513), 0),
                        (req(3, 1000), 0),
                        (req(3, 0, 2**32 - 1), 0),
                        (req(3, 2**63, 0), 0),
                        (req(3, 2**64 - 1, 1), 0),
                        (req(3, 2**64 - 2**31, 2**31 + 5), 0),
                        (req(3, flags=1), 0),
                        (req(3, flags=2), 0),
                        (req(0, 0, 512), 512),
                        (req(0, 0, 1000), 1000),
                        (req(0, 512, 1), 1),
                        (req(5, 0, 1000), 0),
                    ]:
                        log.append(c.request(message, length))
                    c.sock.sendall(req(2))
                    log.append(c.closed())
    finally:
        daemon.stop()
    return log


def test_flush_ranges_and_odd_sizes_match_qsd(both: tuple[Path, Path]) -> None:
    """QEMU checks a FLUSH's range like any other (past the end: EINVAL, else
    ignored) and exports whole sectors only."""
    qsd_dir, blockd_dir = both
    expected = sizes_and_flushes(start_qsd, qsd_dir)
    got = sizes_and_flushes(start_blockd, blockd_dir)
    for index, (want, have) in enumerate(zip(expected, got, strict=False)):
        assert have == want, f"exchange {index} differs"
    assert len(got) == len(expected)


# -- options read field by field, and request flags, as QEMU does (found by tests/fuzz) -------

ODD_OPTIONS = [
    (9, meta(b"disk", b"base:allocation")),  # LIST_META_CONTEXT needs no structured replies
    (9, meta(b"nope", b"base:allocation")),
    (10, meta(b"disk", b"base:allocation")),  # ...SET does
    (5, b"x"),
    (8, b""),
    (6, info(b"disk\x00", 1)),
    (6, info(b"disk") + b"x"),
    (6, info(b"disk")[:-1]),
    (6, b"\x00\x00\x10\x01"),
    (6, b"\x00\x00\x00\x04di"),
    (6, struct.pack(">I", 5000) + b"x" * 5000 + b"\x00\x00"),
    (6, info(b"y" * 100)),
    (9, meta(b"disk", b"base:allocation")[:-3]),
    (9, meta(b"nope", b"base:allocation")[:-3]),
    (9, meta(b"disk", b"base:alloc\x00ation")),
    (9, struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 5000) + b"x" * 5000),
    (9, struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 5000) + b"x" * 10),
    (9, meta(b"x" * 100)),
    (9, b""),
    (9, meta(b"disk")[:-2]),
    (9, meta(b"\xff\xfe")),
    (7, info(b"disk")),
]


def odd_conversation(sock: str) -> list[Any]:
    c = WireClient(sock)
    log: list[Any] = [c.take(18)]
    c.sock.sendall(struct.pack(">I", 3))
    for code, data in ODD_OPTIONS:
        log.append(c.option(opt(code, data)))
    for flags in (0x20, 0x2345, 0x8000):
        for kind in (0, 1, 3, 6):
            data = b"abcd" if kind == 1 else b""
            log.append(c.request(req(kind, 4096, len(data) or 512, flags, data), 0))
    log.append(c.request(req(0, (4 << 20) - 1, 0, flags=4), 0))  # DF, nothing to read
    c.sock.sendall(req(2))
    log.append(c.closed())
    return log


def odd_run(start: Any, directory: Path) -> list[Any]:
    d = str(directory)
    daemon: DaemonProcess = start(directory / "qmp.sock")
    try:
        with RawQMP(directory / "qmp.sock") as qmp:
            qmp.negotiate()
            for command, arguments in [
                ("blockdev-add", node("d", f"{d}/d.qcow2")),
                ("nbd-server-start", unix(f"{d}/nbd.sock")),
                ("block-export-add", export("e", "d", name="disk", writable=True)),
            ]:
                assert qmp.execute(command, arguments) == {"return": {}}
            return odd_conversation(f"{d}/nbd.sock")
    finally:
        daemon.stop()


def test_option_fields_and_request_flags_match_qsd(both: tuple[Path, Path]) -> None:
    qsd_dir, blockd_dir = both
    expected = odd_run(start_qsd, qsd_dir)
    got = odd_run(start_blockd, blockd_dir)
    for index, (want, have) in enumerate(zip(expected, got, strict=False)):
        assert have == want, f"exchange {index} differs"
    assert len(got) == len(expected)
