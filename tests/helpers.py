"""Test helpers that talk to daemons the way a client does: over a real socket."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

TIMEOUT = 10.0
#: How long a daemon may take to listen: on a loaded machine (two cores shared
#: by parallel test runs) Python's start-up alone has taken over 10 s.
STARTUP_TIMEOUT = 30.0

#: The blockd processes started through :func:`spawn` during the current test;
#: conftest fails the test if one of them logged a traceback.
STARTED: list[DaemonProcess] = []

#: What an uncaught exception leaves in the log (``Internal error`` is what the
#: client was told; the log has the traceback).
INTERNAL_ERROR_MARKS = ("Traceback (most recent call last)", "Internal error")


def _wait_until(
    ready: Callable[[], bool], path: Path, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before listening")
        if ready():
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {path}")


def wait_for_socket(
    path: Path, proc: subprocess.Popen[bytes], timeout: float = STARTUP_TIMEOUT
) -> None:
    """Until a connection to ``path`` is accepted."""

    def accepts() -> bool:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
            return True
        return False

    _wait_until(accepts, path, proc, timeout)


def wait_for_listener(
    path: Path, proc: subprocess.Popen[bytes], timeout: float = STARTUP_TIMEOUT
) -> None:
    """Until a socket listens on ``path``, seen in /proc/net/unix without
    connecting: QSD's monitor serves one connection at a time, and a probe's
    connection, closed at once, could still hold it when the test connects
    (QSD then closes the test's connection before the greeting)."""
    _wait_until(lambda: listens(path), path, proc, timeout)


def listens(path: Path) -> bool:
    """Whether a socket listens on ``path`` (/proc/net/unix): the socket
    file appears at bind(), before listen(), so a connection then is refused."""
    listening = 0x10000  # __SO_ACCEPTCON in the Flags column
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & listening:
            return True
    return False


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    stderr_path: Path
    _stopped: bool = field(default=False)
    #: Kept open so the log can be read after the test's directory is gone.
    _log: IO[bytes] | None = field(default=None)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def internal_errors(self) -> list[str]:
        """Log lines that show an uncaught exception (and close the kept log)."""
        if self._log is None:
            return []
        with self._log:
            self._log.seek(0)
            text = self._log.read().decode(errors="replace")
        self._log = None
        lines = text.splitlines()
        found: list[str] = []
        for i, line in enumerate(lines):
            if any(mark in line for mark in INTERNAL_ERROR_MARKS):
                # The log line before (what failed) and the exception's last line.
                end = next((j for j in range(i + 1, len(lines)) if not lines[j][:1].isspace()), i)
                found += [*lines[max(i - 1, 0) : i + 1], lines[end]]
        return found

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def blockd_command(socket_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blockd", "--socket", str(socket_path), *extra]


def spawn(
    argv: list[str], socket_path: Path, *, wait: bool = True, **popen: object
) -> DaemonProcess:
    """Start a daemon, stderr to a file next to ``socket_path``."""
    stderr_path = socket_path.with_suffix(".stderr")
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(  # type: ignore[call-overload]
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, **popen
        )
    daemon = DaemonProcess(proc, socket_path, stderr_path, _log=open(stderr_path, "rb"))  # noqa: SIM115
    STARTED.append(daemon)
    if wait:
        try:
            wait_for_socket(socket_path, proc)
        except Exception:
            daemon.stop()
            raise
    return daemon


def start_blockd(
    socket_path: Path, *extra: str, wait: bool = True, cwd: Path | None = None
) -> DaemonProcess:
    return spawn(blockd_command(socket_path, *extra), socket_path, wait=wait, cwd=cwd)


def start_qsd(socket_path: Path) -> DaemonProcess:
    stderr_path = socket_path.with_suffix(".stderr")
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--chardev",
                f"socket,path={socket_path},server=on,wait=off,id=mon0",
                "--monitor",
                "chardev=mon0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    daemon = DaemonProcess(proc, socket_path, stderr_path)
    wait_for_listener(socket_path, proc)
    return daemon


class RawQMP:
    """A byte-level QMP client: sends exactly what a test says, reads lines.

    The daemon under test must also survive the probe connection made by
    :func:`wait_for_socket`, which is part of what a server has to put up with.
    """

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buffer = b""
        #: Events seen while waiting for replies, in arrival order.
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def read_line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def read(self) -> dict[str, Any]:
        message = json.loads(self.read_line())
        assert isinstance(message, dict)
        return message

    def read_reply(self) -> dict[str, Any]:
        """The next message that is not an event (events are kept in ``events``)."""
        while True:
            message = self.read()
            if "event" not in message:
                return message
            self.events.append(message)

    def wait_event(self, name: str, timeout: float = TIMEOUT, **data: Any) -> dict[str, Any]:
        """The first event called ``name`` whose data has these members (waiting for it)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["event"] == name and all(
                    event.get("data", {}).get(k) == v for k, v in data.items()
                ):
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} {data} event; saw {self.events}")
            self.sock.settimeout(left)
            try:
                self.events.append(self.read())
            finally:
                self.sock.settimeout(TIMEOUT)

    def job_statuses(self, job_id: str) -> list[str]:
        """The job's JOB_STATUS_CHANGE statuses and block-job events seen so far."""
        out = []
        for event in self.events:
            data = event.get("data", {})
            if event["event"] == "JOB_STATUS_CHANGE" and data.get("id") == job_id:
                out.append(data["status"])
            elif data.get("device") == job_id or (
                event["event"] == "BLOCK_JOB_PENDING" and data.get("id") == job_id
            ):
                out.append(event["event"])
        return out

    def execute(self, command: str, arguments: dict[str, Any] | None = None, **extra: Any) -> Any:
        request: dict[str, Any] = {"execute": command, **extra}
        if arguments is not None:
            request["arguments"] = arguments
        self.send(json.dumps(request))
        return self.read_reply()

    def negotiate(self) -> dict[str, Any]:
        greeting = self.read()
        assert self.execute("qmp_capabilities") == {"return": {}}
        return greeting

    def assert_closed(self, timeout: float = TIMEOUT) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return
        assert data == b"", f"expected the daemon to close the connection, got {data!r}"


def negotiated(daemon: DaemonProcess, attempts: int = 14) -> RawQMP:
    """A client past ``qmp_capabilities``.  QSD's monitor serves one connection at
    a time, and a connection just closed may still hold it: then ours is
    closed before the greeting, and is made again (for about 20 s in all)."""
    for attempt in range(attempts):
        client = RawQMP(daemon.socket_path)
        try:
            client.negotiate()
            return client
        except (EOFError, ConnectionError):
            client.close()
            if attempt == attempts - 1 or daemon.proc.poll() is not None:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def serving(start: Callable[[Path], DaemonProcess], sock: Path) -> Iterator[RawQMP]:
    """A daemon started by ``start`` on ``sock`` (blockd or QSD, for a
    differential test), a client past ``qmp_capabilities``, and the daemon
    stopped afterwards whatever happened."""
    daemon = start(sock)
    try:
        with negotiated(daemon) as qmp:
            yield qmp
    finally:
        daemon.stop()


def on_both(
    sock_dir: Path, run: Callable[[Callable[[Path], DaemonProcess], Path], Any]
) -> tuple[Any, Any]:
    """(QSD's result, blockd's) of ``run(start, directory)``, each daemon in a
    directory of its own under ``sock_dir`` (QSD first)."""
    results = []
    for side, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = sock_dir / side
        d.mkdir()
        results.append(run(start, d))
    return results[0], results[1]


SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schema"


def check_event(name: str, data: Any) -> None:
    """Assert that an event's data matches ``schema/events/<name>.json``."""
    import jsonschema

    schema = json.loads((SCHEMA_DIR / "events" / f"{name}.json").read_text())
    jsonschema.validate(data, schema)
