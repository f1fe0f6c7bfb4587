"""Shared fixtures: real blockd processes on temporary sockets, and tool checks."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import STARTED, DaemonProcess, start_blockd, start_qsd

if TYPE_CHECKING:
    from tests.diskfull import SmallFs

#: Debian's interpreter, which has the system's Python bindings (libnbd's) that
#: the virtualenv does not.
SYSTEM_PYTHON = "/usr/bin/python3"


def in_ci() -> bool:
    """The one rule for "running in CI" (CI=true, as .ci/run sets it; any case,
    or 1/yes as other CI systems set it): then a missing tool fails, never skips."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing(message: str) -> None:
    """A test cannot run for want of something installed: fail in CI, else skip."""
    message += " (Debian: scripts/bootstrap --system installs it)"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """The path of an external tool; in CI a missing tool fails the test."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
        raise AssertionError("unreachable: missing() fails or skips")
    return path


def require_system_module(module: str) -> str:
    """Debian's python3, checked to import ``module`` (tests/unit/test_bootstrap.py
    maps the module to its Debian package)."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", f"import {module}"], capture_output=True)
    if probe.returncode != 0:
        missing(f"{SYSTEM_PYTHON} cannot import {module}")
    return SYSTEM_PYTHON


@pytest.fixture(autouse=True)
def _no_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose blockd logged an uncaught exception (``Internal error``).

    Torn down after every other fixture, so daemons have been stopped and
    their last words are in the log.
    """
    STARTED.clear()
    yield
    daemons = list(STARTED)
    STARTED.clear()
    found = [line for daemon in daemons for line in daemon.internal_errors()]
    if found:
        pytest.fail("blockd logged an internal error:\n" + "\n".join(found[:20]), pytrace=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """A 4 MiB tmpfs (``tests/diskfull.py``); request it before any daemon fixture,
    so that the daemons stop before it is unmounted."""
    from tests import diskfull  # it uses in_ci() from here

    with diskfull.small_fs(tmp_path / "small") as fs:
        yield fs


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
