"""block-job-set-speed on a commit that sleeps in the rate limiter, on the real clock.

Each scenario runs on blockd and on qemu-storage-daemon 7.2 alike: the same
chain, the same commands, the same expectations, so the rate semantics are
QEMU's and not only ours.  The bounds are far apart on purpose: a job at
4 KiB/s owes 128 s for its first 512 KiB chunk, so a speed change that does
not wake it shows up as minutes, while a loaded machine costs seconds; and
lower bounds on elapsed time (a limit that is applied) only get safer under load.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import MiB, backing_of, check, create, guest_view, qemu_io, same_data

#: What one step of a throttled commit copies (QEMU's COMMIT_BUFFER_SIZE, ours too).
CHUNK = 512 * 1024
SIZE = 8 * MiB
#: The first chunk at this speed puts the job to sleep for 128 s.
CRAWL = 4096
#: Patience for what must happen in seconds; far below the 128 s of CRAWL's debt.
SOON = 60.0


@pytest.fixture(params=["blockd", pytest.param("qsd", marks=pytest.mark.qsd)])
def daemon(request: pytest.FixtureRequest, sock_dir: Path) -> Iterator[DaemonProcess]:
    if request.param == "qsd":
        require_tool("qemu-storage-daemon")
        started = start_qsd(sock_dir / "qsd.sock")
    else:
        started = start_blockd(sock_dir / "qmp.sock")
    try:
        yield started
    finally:
        started.stop()


def start_commit(client: RawQMP, d: Path, speed: int) -> tuple[Path, Path]:
    """base <- mid (8 MiB, all data) <- top; commit mid into base at ``speed``.

    Returns top and the chain's guest view before the commit.
    """
    create(d / "base.qcow2", size="8M")
    mid = create(d / "mid.qcow2", size="8M", backing="base.qcow2")
    top = create(d / "top.qcow2", size="8M", backing="mid.qcow2")
    qemu_io(mid, "write -P 0x5a 0 8M")
    qemu_io(top, "write -P 0x33 1M 64k")
    before = guest_view(top, d / "before.raw")
    client.negotiate()
    for name, backing, ro in (("base", None, True), ("mid", "base", True), ("top", "mid", False)):
        args: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": name,
            "read-only": ro,
            "backing": backing,
            "file": {"driver": "file", "filename": str(d / f"{name}.qcow2")},
        }
        assert client.execute("blockdev-add", args) == {"return": {}}
    args = {"job-id": "job0", "device": "top", "top-node": "mid", "base-node": "base"}
    assert client.execute("block-commit", {**args, "speed": speed}) == {"return": {}}
    return top, before


def job(client: RawQMP) -> dict[str, Any] | None:
    jobs = client.execute("query-block-jobs")["return"]
    return jobs[0] if jobs else None


def wait_for_offset(client: RawQMP, at_least: int) -> None:
    deadline = time.monotonic() + SOON
    while (info := job(client)) is not None and info["offset"] < at_least:
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    assert info is not None, "the job ended early"


def set_speed(client: RawQMP, speed: int) -> None:
    reply = client.execute("block-job-set-speed", {"device": "job0", "speed": speed})
    assert reply == {"return": {}}


def completed(client: RawQMP) -> dict[str, Any]:
    data: dict[str, Any] = client.wait_event("BLOCK_JOB_COMPLETED", timeout=SOON)["data"]
    return data


def judge(client: RawQMP, daemon: DaemonProcess, d: Path, top: Path, before: Path) -> None:
    assert client.execute("quit") == {"return": {}}
    daemon.wait()
    assert backing_of(top) == str(d / "base.qcow2")
    assert same_data(before, top)
    check(d / "base.qcow2")
    check(top)


def test_raising_the_speed_of_a_throttled_commit(daemon: DaemonProcess, tmp_path: Path) -> None:
    """The report of issue 11: 64 KiB/s, 1.5 s later 2 MiB/s; the job once failed."""
    with RawQMP(daemon.socket_path) as client:
        top, before = start_commit(client, tmp_path, 65536)
        time.sleep(1.5)
        set_speed(client, 2 * MiB)
        done = completed(client)
        assert done == {"device": "job0", "len": SIZE, "offset": SIZE, "speed": 2 * MiB,
                        "type": "commit"}  # fmt: skip
        judge(client, daemon, tmp_path, top, before)


def test_a_raised_speed_wakes_the_sleeping_job_and_then_limits_it(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    with RawQMP(daemon.socket_path) as client:
        top, before = start_commit(client, tmp_path, CRAWL)
        wait_for_offset(client, CHUNK)
        time.sleep(1.0)  # asleep in the limiter, 127 s to go
        info = job(client)
        assert info is not None and info["offset"] == CHUNK and info["busy"] is False
        raised = time.monotonic()
        set_speed(client, 2 * MiB)
        done = completed(client)
        elapsed = time.monotonic() - raised
        assert "error" not in done and done["offset"] == SIZE
        # Woken at once: not the 127 s the old speed still owed.
        assert elapsed < SOON
        # And limited: 15 more chunks at 2 MiB/s sleep 14 x 0.25 s in between.
        assert elapsed >= 2.5
        judge(client, daemon, tmp_path, top, before)


def test_zero_speed_wakes_the_sleeping_job(daemon: DaemonProcess, tmp_path: Path) -> None:
    with RawQMP(daemon.socket_path) as client:
        top, before = start_commit(client, tmp_path, CRAWL)
        wait_for_offset(client, CHUNK)
        time.sleep(1.0)
        set_speed(client, 0)
        done = completed(client)
        assert "error" not in done and done["offset"] == SIZE and done["speed"] == 0
        judge(client, daemon, tmp_path, top, before)


def test_a_lowered_speed_applies_to_the_sleep_in_progress(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    with RawQMP(daemon.socket_path) as client:
        top, before = start_commit(client, tmp_path, 1 * MiB)  # a chunk every 0.5 s
        wait_for_offset(client, 2 * CHUNK)
        set_speed(client, CRAWL)
        lowered = job(client)
        assert lowered is not None and lowered["speed"] == CRAWL
        time.sleep(3.0)
        later = job(client)
        assert later is not None, "the job finished at the old speed"
        # At most the chunk in flight when the speed fell; the old speed
        # would have copied six more in these 3 s.
        assert later["offset"] - lowered["offset"] <= CHUNK, (lowered, later)
        assert later["offset"] < SIZE
        set_speed(client, 0)
        done = completed(client)
        assert "error" not in done and done["offset"] == SIZE
        judge(client, daemon, tmp_path, top, before)
