"""A minimal blocking QMP client for the benchmarks (no dependency beyond the stdlib,
so a benchmark runs with any Python, against blockd or qemu-storage-daemon)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QMPError(RuntimeError):
    pass


class QMP:
    """Connects and negotiates; :meth:`execute` returns the ``return`` member."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.read()
        self.execute("qmp_capabilities")

    def read(self) -> dict[str, Any]:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode())
        while True:
            message = self.read()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                raise QMPError(f"{command}: {message['error']}")
            return message["return"]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if event["event"] == name:
                    return event
            seen = len(self.events)
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.events.append(self.read())
            except TimeoutError:
                break
            finally:
                self.sock.settimeout(None)
        raise TimeoutError(f"no {name} within {timeout} s")
