"""NBD fuzzing through a real daemon, compared with qemu-storage-daemon where that is cheap.

Chaos trials (:func:`tests.fuzz.nbd_fuzz.run_chaos`: handshakes, options and
requests with lying lengths, bad magic, unknown codes, overflowing ranges,
payloads cut short, disconnects at any byte) go to blockd; every
:data:`SENTINEL_EVERY` trials a sentinel checks that it still answers QMP and
serves a well-behaved NBD client.  Lockstep trials
(:func:`tests.fuzz.nbd_fuzz.run_lockstep`) go to blockd and QSD alike and
their answers must be equal.  Stuck clients (pipelining 1 MiB READs, never
reading) are added now and then, with the daemon's RSS measured.  At the end
the daemon quits cleanly, its log holds no internal error, and ``qemu-img
check`` passes on every image.

Short profile by default (well under a minute); ``BLOCKD_FUZZ_EXAMPLES=N``
runs N chaos trials and N/4 lockstep ones, ``BLOCKD_FUZZ_SEED`` picks the
first seed (trial i uses seed + i).  Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.fuzz.nbd_clients import (
    MiB,
    close_all,
    connect,
    negotiate,
    receive_exactly,
    request,
    settled_rss,
    stuck_reader,
)
from tests.fuzz.nbd_fuzz import SIZE, run_chaos, run_lockstep
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import create, qemu_img, qemu_io

pytestmark = pytest.mark.qsd

EXAMPLES = int(os.environ.get("BLOCKD_FUZZ_EXAMPLES", "0"))
CHAOS = EXAMPLES or 600
LOCKSTEP = EXAMPLES // 4 or 150
SEED = int(os.environ.get("BLOCKD_FUZZ_SEED", "20261202"))
SENTINEL_EVERY = 50
STUCK_EVERY = 500
STUCK_CLIENTS = 4


@dataclass
class Daemon:
    process: DaemonProcess
    qmp: RawQMP
    nbd: Path
    images: list[Path]


def setup(start: Any, d: Path) -> Daemon:
    d.mkdir()
    images = []
    for name in ("disk", "ro", "chaos"):
        image = create(d / f"{name}.qcow2", str(SIZE))
        # data, zeroes and holes in the first half, for reads and block status to differ
        qemu_io(image, "write -P 0x11 0 64k", "write -z 1M 64k", "write -P 0x22 1536k 300k")
        images.append(image)
    process = start(d / "qmp.sock")
    qmp = RawQMP(d / "qmp.sock")
    qmp.negotiate()
    nbd = d / "nbd.sock"
    for command, arguments in [
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}}),
        *[
            (
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": name,
                    "read-only": name == "ro",
                    "file": {"driver": "file", "filename": str(d / f"{name}.qcow2")},
                },
            )
            for name in ("disk", "ro", "chaos")
        ],
        *[
            (
                "block-export-add",
                {
                    "type": "nbd",
                    "id": name,
                    "node-name": name,
                    "writable": name != "ro",
                    "allocation-depth": True,
                },
            )
            for name in ("disk", "ro", "chaos")
        ],
    ]:
        assert qmp.execute(command, arguments) == {"return": {}}, command
    return Daemon(process, qmp, nbd, images)


@pytest.fixture
def daemons() -> Iterator[tuple[Daemon, Daemon]]:
    require_tool("qemu-storage-daemon")
    root = Path(tempfile.mkdtemp(prefix="nf-"))  # short: sun_path holds 108 bytes
    try:
        qsd = setup(start_qsd, root / "q")
        try:
            blockd = setup(start_blockd, root / "b")
        except BaseException:
            qsd.qmp.close()
            qsd.process.stop()
            raise
        try:
            yield qsd, blockd
        finally:
            for daemon in (qsd, blockd):
                daemon.qmp.close()
                daemon.process.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sentinel(daemon: Daemon, index: int) -> None:
    """The daemon is up, answers QMP and serves a good NBD client on the chaos export."""
    assert daemon.process.proc.poll() is None, f"blockd died by trial {index}"
    assert "qemu" in daemon.qmp.execute("query-version")["return"]
    sock = connect(daemon.nbd)
    negotiate(sock, b"chaos")
    stamp = index.to_bytes(4, "big") * 128
    sock.sendall(request(1, 3 * MiB, 512, handle=1) + stamp)
    assert receive_exactly(sock, 16)[4:8] == b"\0\0\0\0"
    # (only now: requests in flight together may run in any order)
    sock.sendall(request(0, 3 * MiB, 512, handle=2))
    reply = receive_exactly(sock, 16 + 512)
    assert reply[4:8] == b"\0\0\0\0" and reply[16:] == stamp
    sock.close()


def stuck_round(daemon: Daemon) -> tuple[int, int]:
    """Some stuck clients at once: RSS before and with them."""
    pid = daemon.process.proc.pid
    before = settled_rss(pid, quiet=0.5)
    socks = [stuck_reader(daemon.nbd, SIZE, name=b"chaos") for _ in range(STUCK_CLIENTS)]
    try:
        with_them = settled_rss(pid, quiet=0.5)
    finally:
        close_all(socks)
    # each holds at most its 8 MiB budget; 16 MiB each is the target, with margin
    assert with_them - before <= STUCK_CLIENTS * 16 * MiB, (before, with_them)
    return before, with_them


def test_nbd_fuzz(daemons: tuple[Daemon, Daemon]) -> None:
    qsd, blockd = daemons
    started = time.monotonic()
    stages: collections.Counter[str] = collections.Counter()
    rss: list[tuple[int, int]] = [stuck_round(blockd)]
    for i in range(CHAOS):
        stages[run_chaos(blockd.nbd, SEED + i)] += 1
        if (i + 1) % SENTINEL_EVERY == 0:
            sentinel(blockd, i)
        if (i + 1) % STUCK_EVERY == 0:
            rss.append(stuck_round(blockd))
    sentinel(blockd, CHAOS)
    differences = []
    for j in range(LOCKSTEP):
        seed = SEED + CHAOS + j
        want = run_lockstep(qsd.nbd, seed)
        got = run_lockstep(blockd.nbd, seed)
        if got != want:
            differences.append((seed, want, got))
    sentinel(blockd, CHAOS + LOCKSTEP)
    took = time.monotonic() - started
    print(
        f"\nNBD fuzz: seed {SEED}, {CHAOS} chaos trials {dict(stages)}, {LOCKSTEP} lockstep "
        f"trials against QSD, {len(rss)} stuck rounds of {STUCK_CLIENTS} clients (RSS MiB "
        f"{[(round(a / MiB), round(b / MiB)) for a, b in rss]}), {took:.1f} s"
    )
    assert not differences, differences[:3]
    assert blockd.qmp.execute("quit") == {"return": {}}
    assert blockd.process.wait() == 0
    log = blockd.process.stderr()
    assert "Internal error" not in log and "Traceback" not in log, log[-3000:]
    for image in blockd.images:
        out = qemu_img("check", "--output=json", str(image))
        assert '"corruptions"' not in out or '"corruptions": 0' in out, out
