"""A commit interrupted by SIGKILL or SIGTERM never damages an image or the guest view.

After a SIGKILL, qemu-img may find leaked clusters (allocated but not yet
referenced: harmless, `qemu-img check -r leaks` reclaims them), never
corruption; and the top of the chain reads exactly what it read before,
whether the crash came before or after the chain was stitched.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.helpers import DaemonProcess, RawQMP
from tests.images import (
    MiB,
    backing_of,
    check,
    check_consistent,
    guest_view,
    same_data,
)


def chain(d: Path) -> tuple[Path, Path, Path]:
    return images.chain(
        d,
        base=("write -P 0x11 0 4M", "write -P 0x12 40M 4M"),
        mid=("write -P 0x21 2M 8M", "write -z 40M 1M", "write -P 0x22 50M 8M"),
        top=("write -P 0x31 6M 1M",),
    )


def add_chain(client: RawQMP, d: Path, *, base_read_only: bool) -> None:
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        args: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": name,
            "read-only": base_read_only if name == "base" else name == "mid",
            "backing": backing,
            "file": {"driver": "file", "filename": str(d / f"{name}.qcow2")},
        }
        assert client.execute("blockdev-add", args) == {"return": {}}


def judge(d: Path, before: Path) -> None:
    base, mid, top = (d / f"{n}.qcow2" for n in ("base", "mid", "top"))
    for image in (base, mid, top):
        check_consistent(image)
    assert backing_of(top) in ("mid.qcow2", str(base))
    assert same_data(before, top)


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_at_a_random_moment(blockd: DaemonProcess, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    chain(tmp_path)
    before = guest_view(tmp_path / "top.qcow2", tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_chain(client, tmp_path, base_read_only=rng.random() < 0.5)
        args = {"job-id": "job0", "device": "top", "top-node": "mid", "speed": 16 * MiB}
        assert client.execute("block-commit", args) == {"return": {}}
        time.sleep(rng.uniform(0.0, 1.6))
        blockd.signal(signal.SIGKILL)
        blockd.wait()
    judge(tmp_path, before)


@pytest.mark.parametrize("moment", ["running", "waiting", "pending", "concluded", "null", "after"])
def test_sigkill_at_each_stage_of_the_end(
    blockd: DaemonProcess, tmp_path: Path, moment: str
) -> None:
    """Including after the job is gone, with base still open read-write."""
    chain(tmp_path)
    before = guest_view(tmp_path / "top.qcow2", tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_chain(client, tmp_path, base_read_only=False)
        args = {"job-id": "job0", "device": "top", "top-node": "mid"}
        assert client.execute("block-commit", args) == {"return": {}}
        wanted = "null" if moment == "after" else moment
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status=wanted)
        if moment == "after":
            assert client.execute("query-jobs") == {"return": []}
        blockd.signal(signal.SIGKILL)
        blockd.wait()
    judge(tmp_path, before)
    if moment in ("null", "after"):
        assert backing_of(tmp_path / "top.qcow2") == str(tmp_path / "base.qcow2")


def test_sigterm_mid_commit_cancels_and_exits_cleanly(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    base, mid, top = chain(tmp_path)
    before = guest_view(top, tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_chain(client, tmp_path, base_read_only=True)
        args = {"job-id": "job0", "device": "top", "top-node": "mid", "speed": 4 * MiB}
        assert client.execute("block-commit", args) == {"return": {}}
        time.sleep(0.5)
        start = time.monotonic()
        blockd.signal(signal.SIGTERM)
        assert blockd.wait(timeout=15) == 0
        assert time.monotonic() - start < 10
        # The client heard how the job ended before the connection closed.
        client.wait_event("BLOCK_JOB_CANCELLED", device="job0")
    assert not blockd.socket_path.exists()
    assert backing_of(top) == "mid.qcow2"
    assert same_data(before, top)
    for image in (base, mid, top):
        check(image)


def test_sigterm_cancels_a_ready_active_commit_for_real(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    """A READY active commit may be cancelled softly (it then ends as
    completed, without the pivot); stopping the daemon cancels it for real,
    as qemu-storage-daemon 7.2 does (seen by hand: after READY, ``aborting``,
    BLOCK_JOB_CANCELLED, ``concluded``, ``null``)."""
    base, mid, top = chain(tmp_path)
    before = guest_view(top, tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_chain(client, tmp_path, base_read_only=False)
        assert client.execute("block-commit", {"job-id": "job0", "device": "top"}) == {"return": {}}
        client.wait_event("BLOCK_JOB_READY", device="job0")
        blockd.signal(signal.SIGTERM)
        assert blockd.wait(timeout=15) == 0
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        after_ready = client.job_statuses("job0")
        after_ready = after_ready[after_ready.index("BLOCK_JOB_READY") + 1 :]
        assert [s for s in after_ready if s not in ("standby", "ready")] == [
            "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"
        ]  # fmt: skip
    assert backing_of(top) == "mid.qcow2"
    assert same_data(before, top)
    for image in (base, mid, top):
        check(image)
