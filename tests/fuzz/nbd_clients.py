"""NBD clients for the fuzzers and the memory bounds: raw sockets, no library.

Shared by ``tests/fuzz/test_nbd_*.py`` and ``bench/nbd_memory.py``, so the
stuck clients a test bounds are the very ones the bench reports on.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from pathlib import Path

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
MiB = 1 << 20


def connect(path: Path | str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go_option(name: bytes) -> bytes:
    return option(7, struct.pack(">I", len(name)) + name + b"\x00\x00")


def structured_options(name: bytes) -> bytes:
    """STRUCTURED_REPLY, then SET_META_CONTEXT base:allocation for ``name``."""
    query = b"base:allocation"
    meta = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query
    return option(8) + option(10, meta)


def request(kind: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 1) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, kind, handle, offset, length)


def receive_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += part
    return data


def negotiate(sock: socket.socket, name: bytes = b"disk") -> None:
    """The fixed-newstyle greeting, then GO: returns once transmission starts."""
    assert receive_exactly(sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
    sock.sendall(struct.pack(">I", 3) + go_option(name))
    while True:
        _magic, _opt, kind, length = struct.unpack(">QIII", receive_exactly(sock, 20))
        receive_exactly(sock, length)
        if kind == 1:
            return
        if kind & 0x80000000:
            raise ConnectionError(f"GO refused: 0x{kind:x}")


def stuck_reader(
    path: Path | str,
    span: int,
    length: int = MiB,
    name: bytes = b"disk",
    quiet: float = 0.1,
    write: bool = False,
) -> socket.socket:
    """A client that pipelines READs (or WRITEs) of ``length`` bytes and never
    reads a reply.  (A stuck writer is slow to get stuck: the server's socket
    buffer takes many small replies, so it writes on for a long while.)

    It sends until the server has stopped taking requests for ``quiet``
    seconds (the socket buffers are full because the server throttles it),
    and is returned connected, still stuck.
    """
    sock = connect(path)
    negotiate(sock, name)
    sock.setblocking(False)
    handle = 0
    pending = b""
    payload = bytes([0x77]) * length if write else b""
    last_progress = time.monotonic()
    while time.monotonic() - last_progress < quiet:
        if not pending:
            handle += 1
            offset = (handle * length) % (span - length + 1)
            pending = request(int(write), offset, length, handle=handle) + payload
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        pending = pending[sent:]
        last_progress = time.monotonic()
    return sock


def rss_bytes(pid: int) -> int:
    """The process's resident set, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def settled_rss(pid: int, quiet: float = 1.0, limit: float = 30.0) -> int:
    """RSS once it has stopped growing for ``quiet`` seconds (at most ``limit``)."""
    deadline = time.monotonic() + limit
    peak = rss_bytes(pid)
    since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = rss_bytes(pid)
        if now > peak:
            peak, since = now, time.monotonic()
    return peak


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
