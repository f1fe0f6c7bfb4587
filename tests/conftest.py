"""Shared fixtures: real blockd processes on temporary sockets, and tool checks."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, start_blockd, start_qsd


def require_tool(name: str) -> str:
    """The path of an external tool; in CI a missing tool fails the test."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: see .ci/run)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets: AF_UNIX paths must fit in 108 bytes."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="blockd-") as name:
        yield Path(name)


@pytest.fixture
def blockd(sock_dir: Path) -> Iterator[DaemonProcess]:
    daemon = start_blockd(sock_dir / "qmp.sock")
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def qsd(sock_dir: Path) -> Iterator[DaemonProcess]:
    """qemu-storage-daemon 7.2 on a temporary socket, for differential tests."""
    require_tool("qemu-storage-daemon")
    daemon = start_qsd(sock_dir / "qsd.sock")
    try:
        yield daemon
    finally:
        daemon.stop()
