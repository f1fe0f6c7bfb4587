"""The unit files in systemd/: valid for systemd, and consistent with each other.

``systemd-analyze verify`` insists that ExecStart's binary exists, and the
units name the installed path (/usr/local/bin/blockd).  So each unit is
verified from a temporary copy whose ExecStart runs this test's interpreter
with ``-m blockd`` instead; nothing else in the unit is changed.
"""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

UNITS = Path(__file__).resolve().parents[2] / "systemd"
INSTALLED = "/usr/local/bin/blockd"


def _copy_for_verify(dest: Path) -> None:
    for unit in UNITS.iterdir():
        if unit.suffix in (".service", ".socket"):
            text = unit.read_text().replace(
                f"ExecStart={INSTALLED} ", f"ExecStart={sys.executable} -m blockd "
            )
            (dest / unit.name).write_text(text)


def _verify(tmp_path: Path, *names: str) -> None:
    analyze = require_tool("systemd-analyze")
    _copy_for_verify(tmp_path)
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for name in names)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # Warnings (unknown keys, bad values) are printed but do not always fail.
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


@pytest.mark.parametrize("unit", ["blockd.service", "blockd.socket"])
def test_unit_verifies(tmp_path: Path, unit: str) -> None:
    _verify(tmp_path, unit)


def test_template_units_verify(tmp_path: Path) -> None:
    _verify(tmp_path, "blockd@.service", "blockd@.socket")
    # And as an instance, with %i expanded.
    for suffix in ("service", "socket"):
        (tmp_path / f"blockd@vm1.{suffix}").symlink_to(tmp_path / f"blockd@.{suffix}")
    _verify(tmp_path, "blockd@vm1.service", "blockd@vm1.socket")


def _section(unit: str, section: str) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / unit).read_text())
    return dict(parser[section])


@pytest.mark.parametrize(
    ("service", "socket"),
    [("blockd.service", "blockd.socket"), ("blockd@.service", "blockd@.socket")],
)
def test_service_and_socket_agree(service: str, socket: str) -> None:
    """The service's --socket is the socket unit's path, so it works with or without it."""
    argv = shlex.split(_section(service, "Service")["ExecStart"])
    assert argv[0] == INSTALLED
    assert argv[argv.index("--socket") + 1] == _section(socket, "Socket")["ListenStream"]
    assert re.fullmatch(r"/run/blockd/[^/]+\.sock", argv[argv.index("--socket") + 1])
    assert _section(socket, "Socket")["SocketMode"] == "0600"
    svc = _section(service, "Service")
    assert svc["Type"] == "notify"
    assert svc["RuntimeDirectory"] == "blockd"
    # The socket unit's file lives in the runtime directory: keep it on stop.
    assert svc["RuntimeDirectoryPreserve"] == "yes"
