"""Test helpers for the systemd side: a notify socket, and daemons started bare."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from tests.helpers import TIMEOUT


class NotifySocket:
    """What systemd listens on for ``sd_notify``: an AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        #: Every message received so far, with its arrival time (monotonic).
        self.messages: list[tuple[float, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float = TIMEOUT) -> dict[str, str] | None:
        """The next notification, as a dict of its ``KEY=value`` lines."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, timeout: float = TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None and key in fields:
                return fields
        raise TimeoutError(f"no {key} notification within {timeout} s")

    def collect(self, seconds: float) -> list[tuple[float, dict[str, str]]]:
        """Everything that arrives in the next ``seconds``."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.receive(left)
        return self.messages[start:]


def blockd_argv(*args: str) -> list[str]:
    """``python -m blockd`` with exactly these arguments (no implied --socket)."""
    return [sys.executable, "-m", "blockd", *args]
