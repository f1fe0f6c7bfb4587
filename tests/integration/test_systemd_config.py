"""A real daemon started from a configuration file and --blockdev options."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TIMEOUT, RawQMP
from tests.systemd_helpers import NotifySocket, blockd_argv, spawn

NOT_YET = "The command blockdev-add has not been found"


def _write(sock_dir: Path, text: str) -> Path:
    path = sock_dir / "blockd.toml"
    path.write_text(text)
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(blockd_argv(*args), capture_output=True, text=True, timeout=TIMEOUT)


def test_daemon_starts_as_configured(sock_dir: Path) -> None:
    config = _write(sock_dir, 'socket = "conf.sock"\nsocket-mode = "0640"\nlog-level = "debug"\n')
    path = sock_dir / "conf.sock"
    daemon = spawn(blockd_argv("--config", str(config)), path)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
        with RawQMP(path) as client:
            client.negotiate()
            assert client.execute("quit") == {"return": {}}
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    assert not path.exists()
    assert "DEBUG" in daemon.stderr()


def test_command_line_overrides_the_file(sock_dir: Path) -> None:
    config = _write(sock_dir, 'socket = "conf.sock"\nsocket-mode = "0640"\nlog-level = "debug"\n')
    path = sock_dir / "cli.sock"
    argv = blockd_argv("--config", str(config), "--socket", str(path), "--socket-mode", "0600")
    daemon = spawn([*argv, "--log-level", "warning"], path)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert not (sock_dir / "conf.sock").exists()
    finally:
        daemon.stop()
    assert daemon.wait() == 0
    assert "INFO" not in daemon.stderr()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('socket = "bad.sock"\nlog-level = info\n', "(at line 2, column 16)"),
        ('socket = "bad.sock"\nsocket-mode = 0o600\n', "line 2: key 'socket-mode': expected a"),
        ('socket = "bad.sock"\nlisten = "x"\n', "line 2: key 'listen': unknown key"),
        ('socket = "bad.sock"\nlog-level = "loud"\n', "key 'log-level': 'loud' is not one of"),
    ],
)
def test_broken_file_is_refused_before_anything_is_created(
    sock_dir: Path, text: str, message: str
) -> None:
    config = _write(sock_dir, text)
    result = _run("--config", str(config))
    assert result.returncode != 0
    assert f"blockd: {config}: " in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (sock_dir / "bad.sock").exists()


def test_configured_blockdev_runs_through_the_dispatcher(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until blockdev-add exists, a start-up node fails with its QMP error text."""
    notify = NotifySocket(sock_dir / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    config = _write(
        sock_dir,
        'socket = "bd.sock"\n[[blockdev]]\ndriver = "file"\nnode-name = "f0"\n'
        'filename = "/nonexistent.img"\n',
    )
    try:
        result = _run("--config", str(config))
        assert result.returncode == 1
        assert f"blockd: start-up node 1 (f0): {NOT_YET}" in result.stderr
        assert not (sock_dir / "bd.sock").exists()
        # Never ready; systemctl status shows why.
        messages = [fields for _, fields in notify.collect(0.1)]
        assert all("READY" not in fields for fields in messages)
        assert {"STATUS": f"Start-up failed: start-up node 1 (f0): {NOT_YET}"} in messages
    finally:
        notify.close()


def test_blockdev_option_runs_after_the_files_nodes(sock_dir: Path) -> None:
    node = json.dumps({"driver": "file", "node-name": "cli0", "filename": "/nonexistent.img"})
    result = _run("--socket", str(sock_dir / "bd.sock"), "--blockdev", node)
    assert result.returncode == 1
    assert f"blockd: start-up node 1 (cli0): {NOT_YET}" in result.stderr
    assert not (sock_dir / "bd.sock").exists()


def test_bad_blockdev_option_is_refused(sock_dir: Path) -> None:
    result = _run("--socket", str(sock_dir / "bd.sock"), "--blockdev", "driver=file")
    assert result.returncode == 1
    assert "give the node as a JSON object" in result.stderr
    assert not (sock_dir / "bd.sock").exists()


def test_no_socket_at_all_is_a_usage_error() -> None:
    result = _run()
    assert result.returncode == 2
    assert "--socket is required" in result.stderr
