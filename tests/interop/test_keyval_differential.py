"""Start-up options (``--blockdev``, ``--nbd-server``, ``--export``) in QEMU's
key=value and JSON forms, blockd beside qemu-storage-daemon 7.2.

Each case goes to both daemons' command lines as written: either both refuse
it with the same message (the words after the program's own prefix, which
names the option), or both open the same nodes (names, drivers, read-only,
files; names QEMU generates masked) and the same exports.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import RawQMP, blockd_command, listens, spawn
from tests.images import create

pytestmark = pytest.mark.qsd

IMAGE = "driver=qcow2,node-name=x,file.driver=file,file.filename=a.qcow2"
BLKDEBUG = "driver=blkdebug,node-name=x,image.driver=file,image.filename=a.qcow2"
CASES = [
    IMAGE,
    "qcow2,node-name=x,file.driver=file,file.filename=a.qcow2,read-only=yes",  # implied driver
    f"{IMAGE},read-only=on,backing=",  # "" is the old spelling of null
    f"{IMAGE},read-only=off,read-only=on",  # the last one wins
    f"{IMAGE},cache-clean-interval=0x10,",  # C integers; a trailing comma
    "driver=file,node-name=x,filename=a,,b.qcow2",  # ,, is a comma
    f"{BLKDEBUG},inject-error.0.event=read_aio,inject-error.0.errno=5,inject-error.0.once=on",
    # refused
    f"{IMAGE},read-only=1",
    f"{IMAGE},l2-cache-size=1M",
    f"{IMAGE},bogus=1",
    f"{BLKDEBUG},inject-error.1.event=read_aio",
    f"{BLKDEBUG},inject-error.0.event=read_aio,inject-error.0.errno=abc",
    "driver=qcow2,file=x,file.driver=file",
    "driver=qcow2,a.0=1,a.x=2",
    "driver=qcow2,a..b=1",
    "driver=file,foo",
    ",driver=file",
    "driver=qcow2,file=",
]
NBD = "addr.type=unix,addr.path=nbd.sock"
SERVED = [
    # run in the order given, whatever the option
    ["--blockdev", "file,node-name=f,filename=a.qcow2", "--nbd-server", NBD,
     "--export", "nbd,id=e,node-name=f,name=disk,writable=on"],
    ["--nbd-server", '{"addr": {"type": "unix", "path": "nbd.sock"}, "max-connections": 2}',
     "--blockdev", '{"driver": "file", "node-name": "f", "filename": "a.qcow2"}',
     "--export", '{"type": "nbd", "id": "e", "node-name": "f"}'],
    ["--export", "type=nbd,id=e,node-name=f", "--blockdev", "file,node-name=f,filename=a.qcow2"],
    ["--blockdev", "file,node-name=f,filename=a.qcow2", "--export", "type=nbd,id=e,node-name=f"],
    ["--nbd-server", f"{NBD},max-connections=x"],
    ["--nbd-server", NBD, "--nbd-server", "addr.type=unix,addr.path=nbd2.sock"],
    ["--nbd-server", NBD, "--blockdev", "file,node-name=f,filename=a.qcow2",
     "--export", "type=nbd,id=e,node-name=f,writable=maybe"],
]  # fmt: skip


def _state(sock: Path) -> list[Any]:
    with RawQMP(sock) as qmp:
        qmp.negotiate()
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})["return"]
        exports = qmp.execute("query-block-exports")["return"]
        qmp.execute("quit")
    # (a blkdebug node's file name is QSD's json: text of its options: another test's)
    return sorted(
        (re.sub(r"^#block\d+$", "#block", n["node-name"]), n["drv"], n["ro"],
         "-" if n["drv"] == "blkdebug" else n["file"])
        for n in nodes
    ) + exports  # fmt: skip


def _qsd(d: Path, options: list[str]) -> tuple[str, Any]:
    sock = d / "q.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon", *options, "--chardev",
         f"socket,path={sock},server=on,wait=off,id=m", "--monitor", "chardev=m"],
        cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        for _ in range(100):
            if proc.poll() is not None:
                stderr = proc.stderr.read() if proc.stderr else ""
                last = stderr.strip().splitlines()[-1]
                return "refused", re.sub(r"^qemu-storage-daemon: (--[a-z-]+ .*?: )", "", last)
            if listens(sock):  # (the file exists from bind(), before listen())
                return "opened", _state(sock)
            time.sleep(0.05)
        raise AssertionError("QSD neither started nor failed")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _blockd(d: Path, options: list[str]) -> tuple[str, Any]:
    sock = d / "b.sock"
    daemon = spawn(blockd_command(sock, *options), sock, wait=False, cwd=d)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if daemon.proc.poll() is not None:
                last = daemon.stderr().strip().splitlines()[-1]
                message = re.sub(
                    r"^blockd: (--[a-z-]+ '.*?': |start-up node \d+( \(.*?\))?: )", "", last
                )
                return "refused", message
            if sock.exists():
                try:
                    return "opened", _state(sock)
                except (OSError, EOFError):
                    pass  # bound, then start-up failed: the exit tells why
            time.sleep(0.05)
        raise AssertionError("blockd neither started nor failed")
    finally:
        daemon.stop()


def compare(tmp_path: Path, options: list[str]) -> None:
    require_tool("qemu-storage-daemon")
    create(tmp_path / "a.qcow2", "1M")
    create(tmp_path / "a,b.qcow2", "1M")
    with ThreadPoolExecutor() as pool:  # both start at once: half the wait
        qsd_dir, blockd_dir = tmp_path / "q", tmp_path / "b"
        for d in (qsd_dir, blockd_dir):
            d.mkdir()
            for image in ("a.qcow2", "a,b.qcow2"):
                (d / image).write_bytes((tmp_path / image).read_bytes())
        theirs = pool.submit(_qsd, qsd_dir, options)
        ours = pool.submit(_blockd, blockd_dir, options)
        want, got = theirs.result(), ours.result()
    assert got == want, json.dumps([want, got])


@pytest.mark.parametrize("option", CASES)
def test_key_value_blockdev_as_qsd(tmp_path: Path, option: str) -> None:
    compare(tmp_path, ["--blockdev", option])


@pytest.mark.parametrize("options", SERVED, ids=range(len(SERVED)))
def test_nbd_server_and_exports_as_qsd(tmp_path: Path, options: list[str]) -> None:
    compare(tmp_path, options)
