"""A real daemon started from a configuration file and --blockdev options."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.helpers import TIMEOUT, RawQMP, spawn
from tests.systemd_helpers import NotifySocket, blockd_argv


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


def _chain(directory: Path) -> tuple[Path, Path]:
    base, top = directory / "base.qcow2", directory / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)],
        check=True,
    )
    return base, top


def test_configured_chain_opens_before_ready(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Config-file nodes, then --blockdev nodes, in order, before READY=1."""
    require_tool("qemu-img")
    base, top = _chain(sock_dir)
    notify = NotifySocket(sock_dir / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    config = _write(
        sock_dir,
        'socket = "bd.sock"\n'
        f'[[blockdev]]\ndriver = "qcow2"\nnode-name = "base"\n'
        f'file = {{ driver = "file", filename = "{base}" }}\n',
    )
    # The overlay from --blockdev names the file's node, which works only if
    # that one opened first.
    overlay = json.dumps(
        {
            "driver": "qcow2",
            "node-name": "top",
            "backing": "base",
            "file": {"driver": "file", "filename": str(top)},
        }
    )
    path = sock_dir / "bd.sock"
    daemon = spawn(blockd_argv("--config", str(config), "--blockdev", overlay), path)
    try:
        messages = [fields for _, fields in notify.collect(1.0)]
        ready = [fields for fields in messages if fields.get("READY") == "1"]
        assert ready and ready[0]["STATUS"].startswith("4 nodes open")
        with RawQMP(path) as client:
            client.negotiate()
            nodes = client.execute("query-named-block-nodes", {"flat": True})["return"]
            by_name = {n["node-name"]: n for n in nodes}
            assert by_name["top"]["backing_file"] == str(base)
            assert by_name["base"]["ro"] is False
            assert client.execute("quit") == {"return": {}}
        assert daemon.wait() == 0
    finally:
        daemon.stop()
        notify.close()
    # Closed cleanly: qemu-img can take the images again.
    subprocess.run(["qemu-img", "check", "-q", str(top)], check=True)


def test_failing_startup_node_stops_startup(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("qemu-img")
    base, _ = _chain(sock_dir)
    notify = NotifySocket(sock_dir / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    config = _write(
        sock_dir,
        'socket = "bd.sock"\n'
        f'[[blockdev]]\ndriver = "file"\nnode-name = "ok"\nfilename = "{base}"\n'
        '[[blockdev]]\ndriver = "file"\nnode-name = "f0"\nfilename = "/nonexistent.img"\n',
    )
    try:
        result = _run("--config", str(config))
        missing = "Could not open '/nonexistent.img': No such file or directory"
        assert result.returncode == 1
        assert f"blockd: start-up node 2 (f0): {missing}" in result.stderr
        assert not (sock_dir / "bd.sock").exists()
        # Never ready; systemctl status shows why.
        messages = [fields for _, fields in notify.collect(0.1)]
        assert all("READY" not in fields for fields in messages)
        assert {"STATUS": f"Start-up failed: start-up node 2 (f0): {missing}"} in messages
    finally:
        notify.close()
    # The node that did open was closed again: its image is not locked.
    subprocess.run(["qemu-io", "-c", "write 0 512", str(base)], check=True, capture_output=True)


def test_blockdev_option_error_names_the_node(sock_dir: Path) -> None:
    node = json.dumps({"driver": "file", "node-name": "cli0", "filename": "/nonexistent.img"})
    result = _run("--socket", str(sock_dir / "bd.sock"), "--blockdev", node)
    assert result.returncode == 1
    assert "blockd: start-up node 1 (cli0): Could not open '/nonexistent.img'" in result.stderr
    assert not (sock_dir / "bd.sock").exists()


def test_bad_blockdev_option_is_refused(sock_dir: Path) -> None:
    result = _run("--socket", str(sock_dir / "bd.sock"), "--blockdev", "driver=file,read-only=1")
    assert result.returncode == 1
    assert "Parameter 'read-only' expects 'on' or 'off'" in result.stderr
    assert not (sock_dir / "bd.sock").exists()


def test_no_socket_at_all_is_a_usage_error() -> None:
    result = _run()
    assert result.returncode == 2
    assert "--socket is required" in result.stderr


def test_configured_export_serves_before_ready(sock_dir: Path) -> None:
    """A restart brings the NBD server and the exports back, from the file."""
    require_tool("qemu-io")
    base, _ = _chain(sock_dir)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", str(base)], check=True,
                   capture_output=True)  # fmt: skip
    nbd = sock_dir / "nbd.sock"
    config = _write(
        sock_dir,
        'socket = "bd.sock"\n'
        f'[[blockdev]]\ndriver = "qcow2"\nnode-name = "disk0"\n'
        f'file = {{ driver = "file", filename = "{base}" }}\n'
        f'[nbd-server]\naddr = {{ type = "unix", path = "{nbd}" }}\n'
        '[[export]]\ntype = "nbd"\nid = "exp0"\nnode-name = "disk0"\nwritable = true\n',
    )
    path = sock_dir / "bd.sock"
    daemon = spawn(blockd_argv("--config", str(config)), path)
    try:
        with RawQMP(path) as client:
            client.negotiate()  # the greeting comes once start-up is done
            read = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k",
                 f"nbd+unix:///disk0?socket={nbd}"],
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert read.returncode == 0 and "read 65536/65536" in read.stdout, read.stderr
            exports = client.execute("query-block-exports")["return"]
            assert [(e["id"], e["node-name"]) for e in exports] == [("exp0", "disk0")]
            assert client.execute("quit")["return"] == {}
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    assert not nbd.exists()


def test_configured_export_that_fails_stops_startup(sock_dir: Path) -> None:
    nbd = sock_dir / "nbd.sock"
    config = _write(
        sock_dir,
        f'[nbd-server]\naddr = {{ type = "unix", path = "{nbd}" }}\n'
        '[[export]]\ntype = "nbd"\nid = "exp0"\nnode-name = "nosuch"\n',
    )
    result = _run("--config", str(config), "--socket", str(sock_dir / "bd.sock"))
    assert result.returncode == 1
    assert (
        "blockd: the configuration file's export[0]: "
        "Cannot find device='' nor node-name='nosuch'" in result.stderr
    )
    assert not nbd.exists()  # the server started, then stopped with the daemon
