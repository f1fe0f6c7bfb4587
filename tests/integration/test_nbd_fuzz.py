"""Malformed NBD traffic over a real socket: the daemon survives, images stay sound.

Hypothesis drives fuzzed handshakes and fuzzed (well-framed or not) requests
at one daemon; afterwards the daemon still answers QMP, a well-behaved client
still reads what it wrote, and ``qemu-img check`` finds nothing wrong.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import RawQMP, start_blockd
from tests.images import create, qemu_io
from tests.integration.test_nbd import check_image, io

IHAVEOPT = 0x49484156454F5054
SIZE = 4 << 20


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def go_bytes(name: bytes, structured: bool) -> bytes:
    out = struct.pack(">I", 3)
    if structured:
        out += struct.pack(">QII", IHAVEOPT, 8, 0)
        query = b"base:allocation"
        meta = (
            struct.pack(">I", len(name))
            + name
            + struct.pack(">I", 1)
            + struct.pack(">I", len(query))
            + query
        )
        out += struct.pack(">QII", IHAVEOPT, 10, len(meta)) + meta
    data = struct.pack(">I", len(name)) + name + b"\x00\x00"
    return out + struct.pack(">QII", IHAVEOPT, 7, len(data)) + data


def drain(sock: socket.socket) -> None:
    """Read whatever the server says until it goes quiet or hangs up."""
    sock.settimeout(0.05)
    with contextlib.suppress(OSError):
        while sock.recv(1 << 20):
            pass


options = st.builds(
    lambda code, payload: struct.pack(">QII", IHAVEOPT, code, len(payload)) + payload,
    st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0, 0xFFFFFFFF]),
    st.binary(max_size=40) | st.just(b"\x00\x00\x00\x04disk\x00\x00"),
)
handshakes = st.tuples(
    st.sampled_from([b"\x00\x00\x00\x03", b"\x00\x00\x00\x01", b"\x00\x00\x00\x07", b""]),
    st.lists(options | st.binary(max_size=30), max_size=6),
).map(lambda t: t[0] + b"".join(t[1]))

requests = st.builds(
    lambda flags, kind, offset, length, payload: (
        struct.pack(">IHHQQI", 0x25609513, flags, kind, 7, offset, length)
        + (payload[:length] if kind == 1 else b"")
    ),
    st.integers(0, 0x1F) | st.integers(0, 0xFFFF),
    st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, 99, 0xFFFF]),
    st.integers(0, SIZE) | st.integers(0, 2**64 - 1),
    st.integers(0, 70000) | st.integers(0, 2**32 - 1),
    st.binary(min_size=0, max_size=70000),
)
traffic = st.lists(requests | st.binary(max_size=40), max_size=8).map(b"".join)


def test_fuzzed_traffic_never_hurts_the_daemon(sock_dir: Path, tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", str(SIZE))
    daemon = start_blockd(sock_dir / "qmp.sock")
    nbd_sock = sock_dir / "nbd.sock"
    uri = f"nbd+unix:///disk?socket={nbd_sock}"
    try:
        with RawQMP(sock_dir / "qmp.sock") as qmp:
            qmp.negotiate()
            qmp.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "disk",
                    "file": {"driver": "file", "filename": str(image)},
                },
            )
            qmp.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}}
            )
            qmp.execute(
                "block-export-add",
                {"type": "nbd", "id": "e", "node-name": "disk", "writable": True},
            )
            # A long-lived good client, connected throughout the fuzzing.
            witness = connect(nbd_sock)
            assert len(witness.recv(18)) == 18
            witness.sendall(go_bytes(b"disk", structured=False))
            drain(witness)

            @settings(
                max_examples=120,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(handshakes)
            def fuzz_handshake(data: bytes) -> None:
                with connect(nbd_sock) as sock:
                    sock.recv(18)
                    with contextlib.suppress(OSError):
                        sock.sendall(data)
                    drain(sock)

            @settings(
                max_examples=120,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(st.booleans(), traffic)
            def fuzz_requests(structured: bool, data: bytes) -> None:
                with connect(nbd_sock) as sock:
                    sock.recv(18)
                    with contextlib.suppress(OSError):
                        sock.sendall(go_bytes(b"disk", structured) + data)
                    drain(sock)

            fuzz_handshake()
            fuzz_requests()

            assert qmp.execute("query-version")["return"]["qemu"]
            # The witness connection still works: write, read back (simple replies).
            witness.settimeout(10)
            witness.sendall(struct.pack(">IHHQQI", 0x25609513, 1, 1, 1, 0, 4) + b"wit!")
            assert witness.recv(16) == struct.pack(">IIQ", 0x67446698, 0, 1)
            io(uri, "write -P 0x61 1M 64k", "read -P 0x61 1M 64k")
            assert qmp.execute("query-block-exports")["return"][0]["id"] == "e"
            witness.close()
            qmp.execute("quit")
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    # Nothing the clients sent was an internal error.
    assert "Traceback" not in daemon.stderr(), daemon.stderr()[-3000:]
    check_image(image)
    qemu_io(image, "read -P 0x61 1M 64k")
