"""Daemons and a byte-level client for the QMP fuzzers.

Replies are kept as raw lines: blockd, like qemu-storage-daemon, echoes an
``id`` of 1e999 as ``inf``, which no JSON library reads.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_tool
from tests.fuzz.qmp_corpus import IMAGES
from tests.helpers import DaemonProcess, blockd_command, spawn
from tests.images import create, qemu_img

TIMEOUT = 20.0
_CLASS = re.compile(rb'"class": "(\w+)"')


def make_images(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    create(directory / "base.qcow2", size="4M")
    create(directory / "top.qcow2", size="", backing="base.qcow2")
    create(directory / "spare.qcow2", size="1M")
    qemu_img("create", "-q", "-f", "raw", str(directory / "raw.img"), "1M")
    assert sorted(p.name for p in directory.iterdir()) == sorted(IMAGES)
    return directory


def start(kind: str, sock_dir: Path, cwd: Path) -> DaemonProcess:
    """blockd or qemu-storage-daemon, serving QMP in ``cwd`` (images by relative name)."""
    path = sock_dir / f"{kind}.sock"
    if kind == "blockd":
        return spawn(blockd_command(path), path, cwd=cwd)
    argv = [
        require_tool("qemu-storage-daemon"),
        "--chardev",
        f"socket,path={path},server=on,wait=off,id=m0",
        "--monitor",
        "chardev=m0",
    ]
    return spawn(argv, path, cwd=cwd)


def reply_class(line: bytes) -> str:
    """``return``, or the error class: what the fuzzers compare."""
    match = _CLASS.search(line)
    if line.startswith(b'{"return"'):
        return "return"
    return match.group(1).decode() if match else "?"


def is_event(line: bytes) -> bool:
    return line.startswith(b'{"timestamp"')


@dataclass
class Line:
    """One connection to a daemon, read line by line."""

    sock: socket.socket
    buffer: bytes = b""

    @classmethod
    def connect(cls, path: Path, timeout: float = TIMEOUT) -> Line:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(path))
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until_id(self, marker: bytes) -> list[bytes]:
        """Every line up to and including the reply that carries ``marker`` as id."""
        lines = []
        needle = b'"id": "' + marker + b'"'
        while True:
            line = self.read_line()
            lines.append(line)
            if needle in line and not is_event(line):
                return lines


def open_session(path: Path, negotiate: bool) -> Line:
    conn = Line.connect(path)
    greeting = conn.read_line()
    assert greeting.startswith(b'{"QMP"'), greeting
    if negotiate:
        conn.send(b'{"execute": "qmp_capabilities", "id": "neg"}')
        assert conn.until_id(b"neg")[-1] == b'{"return": {}, "id": "neg"}'
    return conn


def send_input(conn: Line, chunks: list[bytes], marker: bytes) -> list[bytes]:
    """Send one fuzzed input, then resynchronise and ask the sentinel.

    A 0xFF byte is a lexical error in every lexer state, for QEMU and blockd
    alike, so whatever the input left half-open is dropped and the sentinel
    that follows is always a message of its own.
    """
    for i, chunk in enumerate(chunks):
        if i:
            time.sleep(0.001)  # separate reads on the daemon's side
        conn.send(chunk)
    conn.send(b'\xff\n{"execute": "query-version", "id": "' + marker + b'"}')
    return conn.until_id(marker)


def collapse(classes: list[str]) -> list[str]:
    """Runs of one class as one: QEMU reports each bracket left over after
    a nesting-limit error separately, blockd skips the rest of the message."""
    out: list[str] = []
    for name in classes:
        if not out or out[-1] != name:
            out.append(name)
    return out
