"""blockd's NBD export driven by real clients: qemu-io, qemu-img and nbdsh (libnbd).

Data written through the export is checked against a model, and every image
is judged by ``qemu-img check`` once the daemon has stopped.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_system_module, require_tool
from tests.helpers import DaemonProcess, RawQMP, check_event, start_blockd
from tests.images import create, qemu_img, qemu_io

MiB = 1 << 20
SIZE = 8 * MiB


@dataclass
class Served:
    daemon: DaemonProcess
    qmp: RawQMP
    image: Path
    nbd_sock: Path

    def uri(self, name: str = "disk") -> str:
        return f"nbd+unix:///{name}?socket={self.nbd_sock}"


def start_served(
    sock_dir: Path, image: Path, *, writable: bool = True, name: str = "disk", **node: Any
) -> Served:
    daemon = start_blockd(sock_dir / "qmp.sock")
    qmp = RawQMP(sock_dir / "qmp.sock")
    qmp.negotiate()
    nbd_sock = sock_dir / "nbd.sock"
    assert qmp.execute(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "d",
            "file": {"driver": "file", "filename": str(image)},
            **node,
        },
    ) == {"return": {}}
    assert qmp.execute(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}}
    ) == {"return": {}}
    assert qmp.execute(
        "block-export-add",
        {"type": "nbd", "id": "e", "node-name": "d", "name": name, "writable": writable},
    ) == {"return": {}}
    return Served(daemon, qmp, image, nbd_sock)


@pytest.fixture
def served(sock_dir: Path, tmp_path: Path) -> Iterator[Served]:
    image = create(tmp_path / "disk.qcow2", str(SIZE))
    s = start_served(sock_dir, image)
    try:
        yield s
    finally:
        s.qmp.close()
        s.daemon.stop()
    # No client, however rude, caused an internal error.
    assert "Traceback" not in s.daemon.stderr(), s.daemon.stderr()[-3000:]


def check_image(image: Path) -> None:
    out = json.loads(qemu_img("check", "--output=json", str(image)))
    assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0, out


def io(uri: str, *commands: str, read_only: bool = False) -> str:
    argv = [require_tool("qemu-io"), "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "failed" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result.stdout


def nbdsh(script: str, timeout: float = 60) -> str:
    """Run a libnbd script with Debian's system python (the venv has no bindings)."""
    python = require_system_module("nbd")
    result = subprocess.run(
        [python, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def dump(uri: str, out: Path) -> bytes:
    qemu_img("convert", "-f", "raw", "-O", "raw", uri, str(out))
    return out.read_bytes()


def test_qemu_io_patterns_match_a_model(served: Served, tmp_path: Path) -> None:
    rng = random.Random(6)
    model = bytearray(SIZE)
    # TRIM is a hint: whatever it covered may read as before or as zeros
    undefined = bytearray(SIZE)
    commands = []
    for _ in range(40):
        op = rng.choice(["write", "write", "zero", "discard", "flush"])
        offset = rng.randrange(0, SIZE // 512) * 512
        length = min(rng.randrange(1, 300) * 512, SIZE - offset)
        if op == "write":
            pattern = rng.randrange(1, 256)
            commands.append(f"write -P {pattern} {offset} {length}")
            model[offset : offset + length] = bytes([pattern]) * length
            undefined[offset : offset + length] = bytes(length)
        elif op == "zero":
            commands.append(f"write -z {offset} {length}")
            model[offset : offset + length] = bytes(length)
            undefined[offset : offset + length] = bytes(length)
        elif op == "discard":
            commands.append(f"discard {offset} {length}")
            undefined[offset : offset + length] = b"\x01" * length
        else:
            commands.append("flush")
    # FUA writes too (qemu-io -f: write with FUA)
    commands.append("write -f -P 0x5a 4096 8192")
    model[4096 : 4096 + 8192] = b"\x5a" * 8192
    undefined[4096 : 4096 + 8192] = bytes(8192)
    io(served.uri(), *commands)

    def masked(data: bytes) -> bytes:
        return bytes(0 if u else b for b, u in zip(data, undefined, strict=True))

    expected = masked(bytes(model))
    assert masked(dump(served.uri(), tmp_path / "through-nbd.raw")) == expected
    served.qmp.execute("quit")
    served.daemon.wait()
    check_image(served.image)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(served.image), str(tmp_path / "img.raw"))
    assert masked((tmp_path / "img.raw").read_bytes()) == expected


def test_qemu_img_info_and_map(served: Served) -> None:
    io(served.uri(), "write -P 1 0 64k", "write -z 1M 64k", "write -P 2 2M 128k")
    info = json.loads(qemu_img("info", "--output=json", "-f", "raw", served.uri()))
    assert info["virtual-size"] == SIZE
    extents = json.loads(qemu_img("map", "--output=json", "-f", "raw", served.uri()))
    simplified = [(e["start"], e["length"], e["data"], e["zero"]) for e in extents]
    assert simplified == [
        (0, 64 * 1024, True, False),
        (64 * 1024, 2 * MiB - 64 * 1024, False, True),
        (2 * MiB, 128 * 1024, True, False),
        (2 * MiB + 128 * 1024, SIZE - 2 * MiB - 128 * 1024, False, True),
    ]


def test_block_status_covers_the_backing_chain(sock_dir: Path, tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 7 1M 128k")
    top = create(tmp_path / "top.qcow2", "4M", backing="base.qcow2")
    qemu_io(top, "write -P 8 0 64k", "write -z 1M 64k")
    s = start_served(sock_dir, top)
    try:
        out = nbdsh(
            f"""
            import nbd
            h = nbd.NBD()
            h.add_meta_context("base:allocation")
            h.connect_uri({s.uri()!r})
            assert h.can_meta_context("base:allocation")
            got = []
            def cb(ctx, offset, entries, err):
                got.append((ctx, list(entries)))
                return 0
            h.block_status(4 << 20, 0, cb)
            print(got)
            """
        )
    finally:
        s.qmp.close()
        s.daemon.stop()
    [(ctx, entries)] = eval(out)
    assert ctx == "base:allocation"
    pairs = list(zip(entries[::2], entries[1::2], strict=True))
    k64 = 65536
    # top's data; a hole; top's zero cluster hiding base's data; base's data; a hole
    assert pairs == [(k64, 0), (MiB, 3), (k64, 0), (4 * MiB - MiB - 2 * k64, 3)]


def test_nbdsh_structured_replies_and_every_command(served: Served) -> None:
    out = nbdsh(
        f"""
        import nbd
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri({served.uri()!r})
        assert h.get_structured_replies_negotiated()
        print("size", h.get_size())
        print("flags", h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(),
              h.can_fast_zero(), h.can_df(), h.can_multi_conn(), h.can_cache(),
              h.is_read_only())
        print("bs", h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
              h.get_block_size(nbd.SIZE_MAXIMUM))
        h.pwrite(b"a" * 4096, 8192, nbd.CMD_FLAG_FUA)
        h.pwrite(b"b" * 100000, 1 << 20)
        h.zero(65536, 4 << 20, nbd.CMD_FLAG_NO_HOLE)
        h.zero(4096, 2 << 20)
        h.trim(4096, 3 << 20)
        h.flush()
        h.cache(4096, 8192)  # over the FUA write, read back below: CACHE writes nothing
        assert h.pread(4096, 8192) == b"a" * 4096
        assert h.pread(100000, 1 << 20) == b"b" * 100000
        chunks = []
        def chunk(buf, offset, status, err):
            chunks.append((offset, status, len(buf)))
            return 0
        h.pread_structured(256 * 1024, 0, chunk)
        print("chunks", chunks)
        try:
            h.pread(1024, (8 << 20) - 512)
        except nbd.Error as e:
            print("eof", e.errno)
        h.shutdown()
        """
    )
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["size"] == str(SIZE)
    assert lines["flags"] == "True True True True True True True True False"
    assert lines["bs"] == "1 4096 33554432"
    chunks = eval(lines["chunks"])
    assert chunks[0] == (0, 1, 65536)  # the 4k of 'a' at 8192 sit in the first granule
    assert all(status == 2 for _, status, _ in chunks[1:])
    assert lines["eof"] == "EINVAL"


def test_read_only_export_refuses_writes(sock_dir: Path, tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", "1M")
    s = start_served(sock_dir, image, writable=False)
    try:
        out = nbdsh(
            f"""
            import nbd
            h = nbd.NBD()
            h.connect_uri({s.uri()!r})
            print(h.is_read_only(), h.can_trim(), h.can_zero())
            h.set_strict_mode(0)
            try:
                h.pwrite(b"x", 0)
            except nbd.Error as e:
                print(e.errno)
            """
        )
    finally:
        s.qmp.close()
        s.daemon.stop()
    # QEMU refuses requests it will not run with EINVAL, read-only writes included
    assert out.split() == ["True", "False", "False", "EINVAL"]


def test_many_requests_in_flight_on_several_clients(served: Served) -> None:
    out = nbdsh(
        f"""
        import nbd
        handles = []
        for c in range(4):
            h = nbd.NBD()
            h.connect_uri({served.uri()!r})
            handles.append(h)
        # each client owns a 2 MiB quarter and keeps 32 writes in flight
        for c, h in enumerate(handles):
            for i in range(32):
                h.aio_pwrite(bytes([c * 32 + i + 1]) * 65536, c * (2 << 20) + i * 65536)
        for h in handles:
            while h.aio_in_flight() > 0:
                h.poll(-1)
        for c, h in enumerate(handles):
            for i in range(32):
                assert h.pread(65536, c * (2 << 20) + i * 65536) == bytes([c * 32 + i + 1]) * 65536
            h.flush()
        bufs = [nbd.Buffer(4096) for _ in range(64)]
        for i, b in enumerate(bufs):
            handles[0].aio_pread(b, i * 65536)
        while handles[0].aio_in_flight() > 0:
            handles[0].poll(-1)
        assert all(b.to_bytearray() == bytes([i + 1]) * 4096 for i, b in enumerate(bufs))
        print("ok")
        """
    )
    assert out.strip() == "ok"
    served.qmp.execute("quit")
    served.daemon.wait()
    check_image(served.image)


def raw_client(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(path))
    assert sock.recv(18) == b"NBDMAGICIHAVEOPT\x00\x03"
    return sock


def go(sock: socket.socket, name: bytes = b"disk") -> None:
    sock.sendall(struct.pack(">I", 3))
    data = struct.pack(">I", len(name)) + name + b"\x00\x00"
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    buf = b""
    while not buf.endswith(struct.pack(">II", 1, 0)) or len(buf) < 20:
        part = sock.recv(4096)
        assert part
        buf += part


def test_garbage_and_vanishing_clients_drop_only_themselves(served: Served) -> None:
    good = raw_client(served.nbd_sock)
    go(good)
    bad = raw_client(served.nbd_sock)
    go(bad)
    bad.sendall(b"\xde\xad\xbe\xef" * 20)
    assert bad.recv(100) == b""
    # a write cut off half-way, then gone
    half = raw_client(served.nbd_sock)
    go(half)
    half.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 65536) + b"z" * 1000)
    half.close()
    # the good client still works, on the same connection
    good.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 77, 0, 4) + b"good")
    assert good.recv(16) == struct.pack(">IIQ", 0x67446698, 0, 77)
    good.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 78, 0, 4))
    reply = b""
    while len(reply) < 20:
        reply += good.recv(100)
    assert reply == struct.pack(">IIQ", 0x67446698, 0, 78) + b"good"
    good.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 79, 0, 0))
    assert good.recv(100) == b""
    assert served.qmp.execute("query-block-exports")["return"][0]["id"] == "e"


def test_fua_write_survives_sigkill(served: Served, tmp_path: Path) -> None:
    io(served.uri(), "write -f -P 0x33 0 64k", "write -P 0x44 1M 64k", "flush")
    served.daemon.signal(signal.SIGKILL)
    served.daemon.wait()
    qemu_io(served.image, "read -P 0x33 0 64k", "read -P 0x44 1M 64k")
    out = json.loads(qemu_img("check", "--output=json", str(served.image)))
    assert out.get("corruptions", 0) == 0


def test_export_lifecycle_and_events(served: Served) -> None:
    qmp = served.qmp
    assert qmp.execute("blockdev-del", {"node-name": "d"})["error"]["desc"] == "Node d is in use"
    client = raw_client(served.nbd_sock)
    go(client)
    assert qmp.execute("block-export-del", {"id": "e"})["error"]["desc"] == (
        "export 'e' still in use"
    )
    assert qmp.execute("block-export-del", {"id": "e", "mode": "hard"}) == {"return": {}}
    assert client.recv(100) == b""
    event = qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
    check_event("BLOCK_EXPORT_DELETED", event["data"])
    assert qmp.execute("query-block-exports") == {"return": []}
    # the node is free again, and a new export can take the name
    assert qmp.execute(
        "block-export-add", {"type": "nbd", "id": "e2", "node-name": "d", "name": "disk"}
    ) == {"return": {}}
    assert qmp.execute("nbd-server-stop") == {"return": {}}
    qmp.wait_event("BLOCK_EXPORT_DELETED", id="e2")
    assert not served.nbd_sock.exists()
    assert qmp.execute("blockdev-del", {"node-name": "d"}) == {"return": {}}


def test_quit_deletes_exports_before_replying(served: Served) -> None:
    client = raw_client(served.nbd_sock)
    go(client)
    served.qmp.send(json.dumps({"execute": "quit"}))
    first = served.qmp.read()
    assert first["event"] == "BLOCK_EXPORT_DELETED" and first["data"] == {"id": "e"}
    assert served.qmp.read() == {"return": {}}
    assert served.daemon.wait() == 0
    check_image(served.image)


def test_sigterm_with_a_busy_client(served: Served) -> None:
    proc = subprocess.Popen(
        [require_tool("qemu-io"), "-f", "raw", "-c", "write -P 9 0 4M", served.uri()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.2)
    served.daemon.signal(signal.SIGTERM)
    assert served.daemon.wait() == 0
    proc.wait(timeout=30)
    check_image(served.image)


def test_tcp_listener(sock_dir: Path, tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", "1M")
    daemon = start_blockd(sock_dir / "qmp.sock")
    try:
        with RawQMP(sock_dir / "qmp.sock") as qmp:
            qmp.negotiate()
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            qmp.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "d",
                    "file": {"driver": "file", "filename": str(image)},
                },
            )
            assert qmp.execute(
                "nbd-server-start",
                {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}},
            ) == {"return": {}}
            qmp.execute(
                "block-export-add", {"type": "nbd", "id": "e", "node-name": "d", "writable": True}
            )
            io(f"nbd://127.0.0.1:{port}/d", "write -P 3 0 4k", "read -P 3 0 4k")
    finally:
        daemon.stop()
    assert os.path.exists(image)


def test_concurrent_unaligned_writes_keep_the_image_sound(served: Served, tmp_path: Path) -> None:
    """Many sub-cluster writes in flight at once, many into still unallocated clusters."""
    model_path = tmp_path / "model.raw"
    nbdsh(
        f"""
        import nbd, random
        h = nbd.NBD()
        h.connect_uri({served.uri()!r})
        rng = random.Random(1)
        size = {SIZE}
        model = bytearray(size)
        slot = 1 << 17
        for rnd in range(20):
            # distinct 128 KiB slots per round: no two writes in flight overlap
            for s in rng.sample(range(size // slot), 48):
                off = s * slot + rng.randrange(0, 128) * 512
                n = rng.randrange(1, 129) * 512
                data = bytes([rng.randrange(1, 256)]) * n
                h.aio_pwrite(data, off)
                model[off:off + n] = data
            while h.aio_in_flight() > 0:
                h.poll(-1)
        for i in range(16):  # 16 x 4k into one fresh cluster, all at once
            h.aio_pwrite(bytes([i + 1]) * 4096, (6 << 20) + i * 4096)
            model[(6 << 20) + i * 4096:(6 << 20) + (i + 1) * 4096] = bytes([i + 1]) * 4096
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
        open({str(model_path)!r}, "wb").write(model)
        """
    )
    served.qmp.execute("quit")
    served.daemon.wait()
    check_image(served.image)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(served.image), str(tmp_path / "img.raw"))
    assert (tmp_path / "img.raw").read_bytes() == model_path.read_bytes()


def test_max_connections_holds_extra_clients_back(sock_dir: Path, tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", "1M")
    daemon = start_blockd(sock_dir / "qmp.sock")
    nbd_sock = sock_dir / "nbd.sock"
    try:
        with RawQMP(sock_dir / "qmp.sock") as qmp:
            qmp.negotiate()
            assert qmp.execute(
                "nbd-server-start",
                {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}, "max-connections": 1},
            ) == {"return": {}}
            first = raw_client(nbd_sock)
            second = socket.socket(socket.AF_UNIX)
            second.connect(str(nbd_sock))  # waits in the backlog
            second.settimeout(0.3)
            with pytest.raises(TimeoutError):
                second.recv(18)
            first.close()
            second.settimeout(10)
            assert second.recv(18) == b"NBDMAGICIHAVEOPT\x00\x03"
            second.close()
            assert qmp.execute("nbd-server-stop") == {"return": {}}
            assert not nbd_sock.exists()
            assert qmp.execute("query-block-exports") == {"return": []}
            del image
    finally:
        daemon.stop()


@pytest.mark.parametrize("discard", [None, "ignore", "unmap"])
def test_trim_follows_the_discard_option(
    sock_dir: Path, tmp_path: Path, discard: str | None
) -> None:
    """As in QEMU, a node a client opens ignores discards unless opened with
    ``discard: unmap``; TRIM succeeds either way."""
    image = create(tmp_path / "disk.qcow2", str(SIZE))
    options = {} if discard is None else {"discard": discard}
    s = start_served(sock_dir, image, **options)
    try:
        io(s.uri(), "write -P 0x5e 0 1M", "discard 0 1M", "flush")
        kept = discard != "unmap"
        io(s.uri(), f"read -P {0x5E if kept else 0} 0 1M")
        s.qmp.close()
        s.daemon.stop()
    finally:
        s.qmp.close()
        s.daemon.stop()
    mapped = json.loads(qemu_img("map", "--output=json", str(image)))
    assert mapped[0]["data"] is kept
    check_image(image)
