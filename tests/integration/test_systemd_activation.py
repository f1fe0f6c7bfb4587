"""Socket activation: blockd serves the sockets systemd passes, and only those."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.helpers import TIMEOUT, RawQMP, spawn, wait_for_listener
from tests.systemd_helpers import blockd_argv


def _activate(sock_dir: Path, *paths: Path, extra: tuple[str, ...] = ()) -> list[str]:
    tool = require_tool("systemd-socket-activate")
    listen = [arg for path in paths for arg in ("-l", str(path))]
    # systemd-socket-activate passes only the variables it is told to (-E).
    return [tool, "-E", "PYTHONPATH", *listen, *blockd_argv(*extra)]


def test_serves_the_inherited_socket(sock_dir: Path) -> None:
    path = sock_dir / "act.sock"
    daemon = spawn(_activate(sock_dir, path), path)
    try:
        with RawQMP(path) as client:
            assert client.negotiate()["QMP"]["version"]["qemu"] == {
                "micro": 0,
                "minor": 2,
                "major": 7,
            }
            assert client.execute("query-version", id=1)["return"]["package"].startswith("blockd")
            assert client.execute("quit") == {"return": {}}
            client.assert_closed()
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    # The file is systemd's (here: systemd-socket-activate's): left in place.
    assert path.exists()
    assert "QMP on " + str(path) in daemon.stderr()


def test_socket_option_is_not_created_when_activated(sock_dir: Path) -> None:
    """The units pass --socket as well; with a socket from systemd it is not bound."""
    path = sock_dir / "act.sock"
    daemon = spawn(_activate(sock_dir, path, extra=("--socket", str(path))), path)
    try:
        with RawQMP(path) as client:
            client.negotiate()
        daemon.stop()
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    assert path.exists()
    assert "in use" not in daemon.stderr()


def test_serves_every_inherited_socket(sock_dir: Path) -> None:
    first, second = sock_dir / "a.sock", sock_dir / "b.sock"
    daemon = spawn(_activate(sock_dir, first, second), first)
    try:
        # systemd-socket-activate binds them one after the other: the first
        # may take a connection before the second listens (a CI run)
        wait_for_listener(second, daemon.proc)
        with RawQMP(first) as a, RawQMP(second) as b:
            a.negotiate()
            b.negotiate()
            assert a.execute("query-version", id="a")["id"] == "a"
            assert b.execute("query-version", id="b")["id"] == "b"
    finally:
        daemon.stop()
    assert daemon.wait() == 0


# Runs in the child: put the test's descriptor at fd 3, claim LISTEN_PID (exec
# keeps the pid), then become blockd.
_WRAPPER = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="qmp")
os.execv(sys.executable, [sys.executable, "-m", "blockd", *sys.argv[2:]])
"""


def _unix_stream_unbound() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def _unix_datagram() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)


def _tcp_listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    ("make", "detail"),
    [
        (_unix_stream_unbound, "family Unix, type stream, not listening"),
        (_unix_datagram, "family Unix, type datagram"),
        (_tcp_listening, "family IPv4, type stream, listening"),
    ],
)
def test_unusable_inherited_socket_is_refused(sock_dir: Path, make: object, detail: str) -> None:
    path = sock_dir / "never.sock"
    assert callable(make)
    with make() as sock:
        result = _run_with_fd3(sock.fileno(), path)
    assert result.returncode == 1
    assert "inherited fd 3 (qmp) is not a listening Unix stream socket" in result.stderr
    assert detail in result.stderr
    assert not path.exists()


def test_inherited_non_socket_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "never.sock"
    read_end, write_end = os.pipe()
    try:
        result = _run_with_fd3(read_end, path)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 1
    assert "inherited fd 3 (qmp) is not a listening Unix stream socket (not a socket" in (
        result.stderr
    )
    assert not path.exists()


def _run_with_fd3(fd: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(fd), "--socket", str(path)],
        pass_fds=(fd,),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
