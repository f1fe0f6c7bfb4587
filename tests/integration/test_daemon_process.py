"""A real ``blockd`` process: its socket file, its signals, its clients."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, RawQMP, blockd_command, start_blockd


def test_socket_is_private_by_default(blockd: DaemonProcess) -> None:
    mode = stat.S_IMODE(os.lstat(blockd.socket_path).st_mode)
    assert mode == 0o600


def test_socket_mode_option(sock_dir: Path) -> None:
    daemon = start_blockd(sock_dir / "m.sock", "--socket-mode", "0660")
    try:
        assert stat.S_IMODE(os.lstat(daemon.socket_path).st_mode) == 0o660
    finally:
        daemon.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(blockd: DaemonProcess, signum: int) -> None:
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        blockd.signal(signum)
        assert blockd.wait() == 0
        client.assert_closed()
    assert not blockd.socket_path.exists()


def test_quit_replies_then_exits(blockd: DaemonProcess) -> None:
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        assert client.execute("quit", id="bye") == {"return": {}, "id": "bye"}
        client.assert_closed()
    assert blockd.wait() == 0
    assert not blockd.socket_path.exists()
    assert "Traceback" not in blockd.stderr()


def test_python_m_blockd_is_the_same_program(sock_dir: Path) -> None:
    out = subprocess.run(
        blockd_command(sock_dir / "x.sock", "--help"), capture_output=True, text=True, check=True
    )
    assert "--socket-mode" in out.stdout


def test_stale_socket_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: a dead daemon's leftover
    daemon = start_blockd(path)
    try:
        with RawQMP(path) as client:
            assert client.negotiate()["QMP"]["version"]["qemu"]["major"] == 7
    finally:
        daemon.stop()


def test_live_socket_is_refused(blockd: DaemonProcess) -> None:
    second = subprocess.run(
        blockd_command(blockd.socket_path), capture_output=True, text=True, timeout=10
    )
    assert second.returncode == 1
    assert "in use" in second.stderr
    # The first daemon still owns its socket and answers.
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()


def test_regular_file_is_never_replaced(sock_dir: Path) -> None:
    path = sock_dir / "precious"
    path.write_text("data")
    result = subprocess.run(blockd_command(path), capture_output=True, text=True, timeout=10)
    assert result.returncode == 1
    assert "not a socket" in result.stderr
    assert path.read_text() == "data"


def test_unusable_socket_path_fails_clearly(sock_dir: Path) -> None:
    result = subprocess.run(
        blockd_command(sock_dir / "no" / "such" / "dir.sock"),
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr


def test_several_clients_at_once_are_independent(blockd: DaemonProcess) -> None:
    clients = [RawQMP(blockd.socket_path) for _ in range(5)]
    try:
        for c in clients:
            assert "QMP" in c.read()
        clients[0].execute("qmp_capabilities")
        # Negotiation is per connection.
        assert clients[1].execute("query-version", id=1)["error"]["class"] == "CommandNotFound"
        errors: list[BaseException] = []

        def worker(c: RawQMP, n: int) -> None:
            try:
                if n != 0:
                    c.execute("qmp_capabilities")
                for i in range(50):
                    assert c.execute("query-version", id=[n, i])["id"] == [n, i]
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(c, n)) for n, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    finally:
        for c in clients:
            c.close()


def test_client_vanishing_mid_message_does_not_disturb_others(blockd: DaemonProcess) -> None:
    with RawQMP(blockd.socket_path) as other:
        other.negotiate()
        rude = RawQMP(blockd.socket_path)
        rude.read()
        rude.send('{"execute": "qmp_capabilities"}{"execute": "query-ver')
        rude.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        rude.close()  # a reset, not a clean close
        assert other.execute("query-version", id=1)["id"] == 1


def test_huge_message_is_refused_and_connection_stays_usable(blockd: DaemonProcess) -> None:
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        client.send(
            '{"execute": "query-version", "arguments": {"x": "' + "A" * (3 << 20) + '"}, "id": 1}'
        )
        reply = client.read()
        assert reply == {
            "error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}
        }
        assert client.execute("query-version", id=2)["id"] == 2
