"""Real QMP clients against a real blockd: qemu.qmp, qmp-shell and socat."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd
from tests.images import backing_of, check, create, guest_view, qemu_io, same_data

README = Path(__file__).resolve().parents[2] / "README.md"

#: The socat session the README shows, line for line.
SOCAT_SESSION = [
    '{"execute": "qmp_capabilities"}',
    '{"execute": "query-version"}',
    '{"execute": "quit"}',
]


def test_qemu_qmp_client_conversation(blockd: DaemonProcess) -> None:
    async def conversation() -> None:
        client = QMPClient("blockd-test")
        await client.connect(str(blockd.socket_path))
        try:
            # The client negotiated by itself (and enabled oob, which we offer).
            assert client.greeting is not None
            version = await client.execute("query-version")
            assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
            names = {c["name"] for c in await client.execute("query-commands")}
            assert {"qmp_capabilities", "query-commands", "query-version", "quit"} <= names
            with pytest.raises(ExecuteError) as failure:
                await client.execute("no-such-command")
            assert failure.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as failure:
                await client.execute("query-version", {"bogus": 1})
            assert str(failure.value) == "Parameter 'bogus' is unexpected"
            # Back-to-back commands with no newline between them.
            results = await asyncio.gather(*(client.execute("query-version") for _ in range(20)))
            assert all(r == version for r in results)
            assert await client.execute("quit") == {}
        finally:
            # After quit the daemon closes first (as qemu-storage-daemon does);
            # qemu.qmp then reports the end of the stream from disconnect().
            with contextlib.suppress(EOFError):
                await client.disconnect()

    asyncio.run(conversation())
    assert blockd.wait() == 0


def test_qmp_shell(blockd: DaemonProcess) -> None:
    # qmp-shell comes with the qemu.qmp test dependency, next to this interpreter.
    shell = str(Path(sys.executable).parent / "qmp-shell")
    result = subprocess.run(
        [shell, str(blockd.socket_path)],
        input="query-version\nno-such-command\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Connected to QEMU 7.2.0" in result.stdout
    assert '"package": "blockd' in result.stdout
    assert "The command no-such-command has not been found" in result.stdout


def test_socat_session_from_readme(blockd: DaemonProcess) -> None:
    socat = require_tool("socat")
    readme = README.read_text()
    for line in SOCAT_SESSION:
        assert line in readme, f"README no longer shows {line}"
    result = subprocess.run(
        [socat, "-t", "2", "-", f"UNIX-CONNECT:{blockd.socket_path}"],
        input=("\n".join(SOCAT_SESSION) + "\n").encode(),
        capture_output=True,
        timeout=30,
    )
    lines = result.stdout.split(b"\r\n")
    assert lines[-1] == b"", "every message ends with CRLF"
    messages = [json.loads(line) for line in lines[:-1]]
    assert list(messages[0]) == ["QMP"]
    assert messages[1:] == [
        {"return": {}},
        {
            "return": {
                "qemu": {"micro": 0, "minor": 2, "major": 7},
                "package": messages[2]["return"]["package"],
            }
        },
        {"return": {}},
    ]
    assert blockd.wait() == 0


def readme_block(heading: str) -> list[str]:
    """The lines of the first fenced block after ``heading`` in the README."""
    text = README.read_text()
    after = text[text.index(heading) :]
    fence = after.index("```\n")
    body = after[fence + 4 : after.index("```", fence + 4)]
    return [line for line in body.splitlines() if line.strip()]


def test_readme_commit_session(sock_dir: Path, tmp_path: Path) -> None:
    """The README's snapshot-deletion session, pasted line by line into socat."""
    socat = require_tool("socat")
    base = create(tmp_path / "base.qcow2")
    mid = create(tmp_path / "mid.qcow2", backing="base.qcow2")
    top = create(tmp_path / "top.qcow2", backing="mid.qcow2")
    qemu_io(mid, "write -P 0x21 1M 2M")
    before = guest_view(top, tmp_path / "before.raw")
    daemon = start_blockd(sock_dir / "qmp.sock", cwd=tmp_path)
    try:
        session = subprocess.Popen(
            [socat, "-t", "2", "-", f"UNIX-CONNECT:{daemon.socket_path}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert session.stdin is not None
        watcher = RawQMP(daemon.socket_path)
        watcher.negotiate()
        for line in readme_block("## Deleting a snapshot"):
            session.stdin.write(line.encode() + b"\n")
            session.stdin.flush()
            time.sleep(0.3)
            if '"block-commit"' in line:
                # A person reads the events before going on: the job has ended.
                watcher.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        watcher.close()
        out, _ = session.communicate(timeout=30)
        messages = [json.loads(line) for line in out.split(b"\r\n") if line]
        replies = [m for m in messages if "event" not in m and "QMP" not in m]
        assert all("return" in r for r in replies), replies
        events = [m["event"] for m in messages if "event" in m]
        assert "BLOCK_JOB_COMPLETED" in events
    finally:
        daemon.stop()
    assert backing_of(top) == "base.qcow2"
    assert same_data(before, top)
    check(base)
