"""sd_notify against a real datagram socket: READY, STATUS, WATCHDOG, STOPPING."""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RawQMP, start_blockd
from tests.systemd_helpers import NotifySocket


@pytest.fixture
def notify(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    listener = NotifySocket(sock_dir / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield listener
    finally:
        listener.close()


def test_ready_only_once_socket_accepts_then_stopping_on_sigterm(
    sock_dir: Path, notify: NotifySocket
) -> None:
    path = sock_dir / "qmp.sock"
    daemon = start_blockd(path, wait=False)
    try:
        ready = notify.wait_for("READY")
        # The moment READY=1 is out, a client must be able to connect and talk.
        with RawQMP(path) as client:
            client.negotiate()
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "0 nodes open, 0 jobs running"
        daemon.signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    assert not path.exists()
    # READY came once, and before STOPPING.
    keys = [key for _, fields in notify.messages for key in fields if key in ("READY", "STOPPING")]
    assert keys == ["READY", "STOPPING"]


def test_abstract_notify_socket(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"blockd-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        daemon = start_blockd(sock_dir / "qmp.sock", wait=False)
        try:
            assert b"READY=1" in listener.recv(4096).splitlines()
        finally:
            daemon.stop()


def test_watchdog_pings_at_half_the_timeout(
    sock_dir: Path, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    daemon = start_blockd(sock_dir / "qmp.sock", wait=False)
    try:
        notify.wait_for("READY")
        pings = [at for at, fields in notify.collect(1.0) if "WATCHDOG" in fields]
    finally:
        daemon.stop()
    # About 5; loose bounds so a loaded machine does not fail the test.
    assert 3 <= len(pings) <= 9, pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.1 < statistics.median(gaps) < 0.4, gaps


def test_no_watchdog_pings_for_another_pid(
    sock_dir: Path, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    daemon = start_blockd(sock_dir / "qmp.sock", wait=False)
    try:
        notify.wait_for("READY")
        messages = notify.collect(0.4)
    finally:
        daemon.stop()
    assert not [fields for _, fields in messages if "WATCHDOG" in fields]


def test_stop_is_bounded_with_a_client_that_never_reads(
    sock_dir: Path, notify: NotifySocket
) -> None:
    path = sock_dir / "qmp.sock"
    daemon = start_blockd(path, wait=False)
    try:
        notify.wait_for("READY")
        stuck = RawQMP(path)
        stuck.negotiate()
        # Pile up replies it never reads, until neither side's buffers take more.
        stuck.sock.settimeout(0.3)
        request = b'{"execute": "query-version"}' * 64
        with contextlib.suppress(TimeoutError, BlockingIOError):
            for _ in range(100_000):
                stuck.sock.sendall(request)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        notify.wait_for("STOPPING")
        assert daemon.wait(timeout=15) == 0
        elapsed = time.monotonic() - started
        stuck.close()
    finally:
        daemon.stop()
    assert elapsed < 12, elapsed
    assert not path.exists()
    assert "Traceback" not in daemon.stderr()
