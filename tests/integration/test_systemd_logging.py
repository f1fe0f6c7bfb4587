"""Log lines for the journal (priority prefixes, no timestamps) or for a terminal."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import RawQMP, start_blockd
from tests.systemd_helpers import blockd_argv

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _journal_stream(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def _run_and_quit(sock_dir: Path) -> str:
    daemon = start_blockd(sock_dir / "qmp.sock")
    try:
        with RawQMP(daemon.socket_path) as client:
            client.negotiate()
            client.execute("quit")
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    return daemon.stderr()


def test_journal_lines_have_priorities_and_no_timestamps(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr_path = sock_dir / "qmp.stderr"  # where start_blockd sends stderr
    stderr_path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(stderr_path))
    lines = _run_and_quit(sock_dir).splitlines()
    assert lines[0].startswith("<6>blockd 0.1.0 started; QMP on ")
    assert "<6>stopping (quit command)" in lines
    assert lines[-1] == "<6>stopped"
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert not any(TIMESTAMP.search(line) for line in lines), lines


def test_other_streams_get_timestamps(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A JOURNAL_STREAM inherited from a parent whose stderr was the journal.
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    lines = _run_and_quit(sock_dir).splitlines()
    assert TIMESTAMP.match(lines[0]), lines
    assert "INFO blockd 0.1.0 started; QMP on " in lines[0]
    assert not any(line.startswith("<") for line in lines)


def test_start_up_failure_is_an_error_in_the_journal(sock_dir: Path) -> None:
    stderr_path = sock_dir / "err"
    with open(stderr_path, "wb") as stderr:
        env = {**os.environ, "JOURNAL_STREAM": _journal_stream(stderr_path)}
        result = subprocess.run(
            blockd_argv("--socket", str(sock_dir / "no" / "dir.sock")),
            stderr=stderr,
            env=env,
            timeout=10,
        )
    assert result.returncode == 1
    assert stderr_path.read_text().startswith("<3>blockd: cannot listen on ")
