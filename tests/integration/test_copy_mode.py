"""``__org.blockd_copy-mode`` of an active commit, through real NBD clients.

A libnbd client (Debian's python3 bindings) writes at depth 16 to random,
overlapping 4 KiB-aligned ranges (never two overlapping ones in flight at
once, so each block's last write is defined), with FUA writes, zero writes
and flushes among them, while qemu-io writes elsewhere; the job runs, goes
READY, completes and pivots, in every mode.  Every 4 KiB block a write
leaves carries (write number, block number), so the judge (qemu-img convert
of the image after the daemon stopped) tells exactly which write a block
holds.  A SIGKILL at a random moment must leave every image readable
(qemu-img check) and every acknowledged-and-flushed write in the image the
export used at that moment (during the pivot, that is top or base: one of
them must hold every such write).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.images import check, check_consistent, guest_view
from tests.integration.test_active_commit import SIZE, Disk, serving
from tests.integration.test_nbd import nbdsh

MiB = 1 << 20
BLOCK = 4096
#: the libnbd writer's region; qemu-io writes above it
WRITER_END = 48 * MiB
MODES = ["background", "write-blocking", "auto"]
#: a safety net, not a measure: auto mode may take a few of its one-second
#: windows before it switches, and the machine may be loaded
READY_TIMEOUT = 120.0

#: argv: uri, seed, end, stop file, log file, seconds between writes (0: none).
#: Logs one JSON line per event in the order they happened: ["w", seq, offset,
#: length, zero] at submission, ["d", seq, fua] when acknowledged (FUA writes
#: count as flushed then), ["F", seq] when flush ``seq`` is sent, ["f", seq]
#: when it is acknowledged.
WRITER = r"""
import json, nbd, os, random, struct, sys, time
uri, seed, end, stop, out, pace = sys.argv[1:7]
pace = float(pace)
rng = random.Random(int(seed))
end = int(end)
B = 4096
h = nbd.NBD(); h.connect_uri(uri)
log = open(out, "w", buffering=1)
busy = set()
inflight = 0
seq = 0

def block_data(seq, first, n):
    return b"".join(struct.pack("<qq", seq, b) * (B // 16) for b in range(first, first + n))

def done(s, blocks, fua, err):
    global inflight
    busy.difference_update(blocks)
    inflight -= 1
    if err.value == 0:  # (after a kill every request left fails)
        log.write(json.dumps(["d", s, fua]) + "\n")
    return 1

def flushed(s, err):
    global inflight
    inflight -= 1
    if err.value == 0:
        log.write(json.dumps(["f", s]) + "\n")
    return 1

while not os.path.exists(stop):
    while inflight < 16:
        roll = rng.random()
        if roll < 0.05:
            seq += 1
            inflight += 1
            log.write(json.dumps(["F", seq]) + "\n")
            h.aio_flush(completion=lambda err, s=seq: flushed(s, err))
            continue
        n = rng.choice([1, 1, 2, 4, 16, 40])
        first = rng.randrange(end // B - n)
        blocks = set(range(first, first + n))
        if blocks & busy:
            continue
        seq += 1
        busy |= blocks
        inflight += 1
        zero = roll < 0.15
        fua = 0.15 <= roll < 0.25
        if pace:
            time.sleep(pace)
        log.write(json.dumps(["w", seq, first * B, n * B, zero]) + "\n")
        cb = lambda err, s=seq, b=blocks, f=fua: done(s, b, f, err)
        if zero:
            h.aio_zero(n * B, first * B, completion=cb)
        else:
            h.aio_pwrite(block_data(seq, first, n), first * B,
                         completion=cb, flags=nbd.CMD_FLAG_FUA if fua else 0)
    h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
log.write(json.dumps(["f", seq]) + "\n")
h.shutdown()
"""


def start_writer(disk: Disk, seed: int, pace: float = 0.0) -> subprocess.Popen[bytes]:
    nbdsh("import nbd")  # fails loudly if the bindings are missing
    script = disk.dir / "writer.py"
    script.write_text(WRITER)
    argv = ["/usr/bin/python3", str(script), disk.uri, str(seed), str(WRITER_END),
            str(disk.dir / "stop"), str(disk.dir / "writer.log"), str(pace)]  # fmt: skip
    return subprocess.Popen(argv, stderr=subprocess.PIPE)


def stop_writer(disk: Disk, writer: subprocess.Popen[bytes], *, check_exit: bool = True) -> None:
    (disk.dir / "stop").touch()
    _, err = writer.communicate(timeout=120)
    if check_exit:
        assert writer.returncode == 0, err


def read_log(path: Path) -> list[list[Any]]:
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the last line of a writer cut short
    return out


def block_of(seq: int, index: int) -> bytes:
    return (seq.to_bytes(8, "little", signed=True) + index.to_bytes(8, "little")) * (BLOCK // 16)


def apply_writes(model: bytearray, log: list[list[Any]]) -> int:
    """Every write the writer sent, in order (none overlapped another in flight)."""
    count = 0
    for entry in log:
        if entry[0] != "w":
            continue
        _, seq, offset, length, zero = entry
        if zero:
            model[offset : offset + length] = bytes(length)
        else:
            for index in range(offset // BLOCK, (offset + length) // BLOCK):
                model[index * BLOCK : (index + 1) * BLOCK] = block_of(seq, index)
        count += 1
    return count


def job_mode(disk: Disk) -> str:
    mode: str = disk.job()["__org.blockd_copy-mode"]
    return mode


@pytest.mark.parametrize("mode", MODES)
def test_writers_through_ready_and_pivot(tmp_path: Path, sock_dir: Path, mode: str) -> None:
    with serving(tmp_path, sock_dir) as disk:
        # a background copy can only converge if the guest lets it: paced
        writer = start_writer(disk, MODES.index(mode), 0.003 if mode == "background" else 0.0)
        time.sleep(0.3)
        disk.commit(**{"__org.blockd_copy-mode": mode})
        if mode == "write-blocking":
            assert job_mode(disk) == "write-blocking"
        else:
            assert job_mode(disk) in ("background", "write-blocking")
        for n in range(4):  # a second client meanwhile, above the writer's region
            disk.write(WRITER_END + n * 3 * MiB + n * 4096, 2 * MiB, 0x60 + n)
        disk.qmp.wait_event("BLOCK_JOB_READY", timeout=READY_TIMEOUT, device="j")
        if mode == "background":
            assert job_mode(disk) == "background"
        disk.write(WRITER_END + 13 * MiB, 1 * MiB, 0x70)
        assert disk.execute("block-job-complete", device="j") == {"return": {}}
        disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
        assert disk.export_node() == "base"
        disk.write(WRITER_END + 14 * MiB, 1 * MiB, 0x71)
        time.sleep(0.2)
        stop_writer(disk, writer)
        disk.stop()
    writes = apply_writes(disk.model, read_log(tmp_path / "writer.log"))
    assert writes > 50
    for image in ("base", "mid", "top"):
        check(tmp_path / f"{image}.qcow2")
    assert disk.matches(tmp_path / "base.qcow2")


def wait_for_a_flush(path: Path) -> None:
    """Until the writer has had a flush (or FUA write) acknowledged."""
    deadline = time.monotonic() + 60
    while not durable_floor(read_log(path)):
        assert time.monotonic() < deadline, "the writer got no flush acknowledged"
        time.sleep(0.05)


def durable_floor(log: list[list[Any]]) -> dict[int, int]:
    """For each 4 KiB block, the newest write to it that the writer knew durable
    (acknowledged with FUA, or acknowledged before a flush it sent that was
    acknowledged): the image must hold that write or a newer one there."""
    written: dict[int, tuple[int, int, bool]] = {}
    acked: list[int] = []
    durable: set[int] = set()
    flushes: dict[int, list[int]] = {}
    for entry in log:
        kind = entry[0]
        if kind == "w":
            written[entry[1]] = (entry[2], entry[3], entry[4])
        elif kind == "d":
            acked.append(entry[1])
            if entry[2]:
                durable.add(entry[1])
        elif kind == "F":
            flushes[entry[1]] = list(acked)
        elif kind == "f" and entry[1] in flushes:
            durable.update(flushes.pop(entry[1]))
    floor: dict[int, int] = {}
    for seq in sorted(durable):
        offset, length, _zero = written[seq]
        for index in range(offset // BLOCK, (offset + length) // BLOCK):
            floor[index] = seq
    return floor


def holds_at_least(view: bytes, log: list[list[Any]], floor: dict[int, int]) -> None:
    last_zero: dict[int, int] = {}
    for entry in log:
        if entry[0] == "w" and entry[4]:
            for index in range(entry[2] // BLOCK, (entry[2] + entry[3]) // BLOCK):
                last_zero[index] = entry[1]
    zeros = bytes(BLOCK)
    for index, seq in floor.items():
        got = view[index * BLOCK : (index + 1) * BLOCK]
        if got == zeros:
            # a zero write: the durable one or a newer one
            assert last_zero.get(index, 0) >= seq, (index, seq)
            continue
        found = int.from_bytes(got[:8], "little", signed=True)
        assert got == block_of(found, index), (index, got[:16])
        assert found >= seq, f"block {index}: write {found}, but {seq} was flushed"


@pytest.mark.parametrize("moment", ["running", "ready", "pivoting", "pivoted"])
@pytest.mark.parametrize("mode", MODES)
def test_sigkill_keeps_flushed_writes(
    tmp_path: Path, sock_dir: Path, mode: str, moment: str
) -> None:
    rng = random.Random(f"{mode}-{moment}")
    with serving(tmp_path, sock_dir) as disk:
        pace = 0.003 if mode == "background" else 0.0
        writer = start_writer(disk, rng.randrange(1 << 30), pace)
        time.sleep(0.2)
        # A speed limit holds until READY, in background mode too: under this
        # writer only an unthrottled background copy converges (as in QSD).
        speed = 0 if mode == "background" and moment != "running" else 16 * MiB
        disk.commit(speed=speed, **{"__org.blockd_copy-mode": mode})
        if moment != "running":
            disk.qmp.wait_event("BLOCK_JOB_READY", timeout=READY_TIMEOUT, device="j")
        if moment == "pivoting":
            # killed during the final sync or just after the switch, with the
            # writer still going: which image the export used is not known
            wait_for_a_flush(tmp_path / "writer.log")
            assert disk.execute("block-job-complete", device="j") == {"return": {}}
            time.sleep(rng.uniform(0.0, 0.04))
        else:
            if moment == "pivoted":
                assert disk.execute("block-job-complete", device="j") == {"return": {}}
                completed = disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
                assert "error" not in completed["data"], completed
                assert disk.export_node() == "base"
            time.sleep(rng.uniform(0.05, 0.6))
            wait_for_a_flush(tmp_path / "writer.log")
        os.kill(disk.daemon.proc.pid, signal.SIGKILL)
        disk.daemon.proc.wait(10)
        (tmp_path / "daemon.log").write_text(disk.daemon.stderr())
        stop_writer(disk, writer, check_exit=False)
    for image in ("base", "mid", "top"):
        check_consistent(tmp_path / f"{image}.qcow2")
    log = read_log(tmp_path / "writer.log")
    floor = durable_floor(log)
    assert floor, "no write was flushed before the kill"
    used = {"running": ["top"], "ready": ["top"], "pivoted": ["base"]}.get(moment, ["top", "base"])
    failures: list[AssertionError] = []
    for name in used:
        view = guest_view(tmp_path / f"{name}.qcow2", tmp_path / f"{name}.raw").read_bytes()
        try:
            holds_at_least(view, log, floor)
            # the rest of the disk (qemu-io's region, untouched) is as it was
            assert view[WRITER_END:] == bytes(disk.model[WRITER_END:SIZE])
        except AssertionError as failure:
            failures.append(failure)
    # Mid-pivot: top until the switch, base from then on (base was synced and
    # flushed before the switch), so one of them holds every flushed write.
    assert len(failures) < len(used), failures


def test_copy_mode_of_an_intermediate_commit_is_refused(tmp_path: Path, sock_dir: Path) -> None:
    with serving(tmp_path, sock_dir) as disk:
        for mode in ("write-blocking", "auto"):
            reply = disk.execute("block-commit", **{"job-id": "j", "device": "top",
                                 "top-node": "mid", "__org.blockd_copy-mode": mode})  # fmt: skip
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"] == (
                f"Copy mode '{mode}' applies only to an active commit "
                "(top is the device's active layer)"
            )
            assert disk.execute("query-block-jobs") == {"return": []}
        reply = disk.execute("block-commit", **{"job-id": "j", "device": "top",
                             "__org.blockd_copy-mode": "fast"})  # fmt: skip
        assert reply["error"]["class"] == "GenericError"
        assert "__org.blockd_copy-mode" in reply["error"]["desc"]
        assert disk.execute("query-block-jobs") == {"return": []}
        # background is every commit's mode: accepted, and not reported for
        # an intermediate commit (nothing to keep up with)
        disk.commit(**{"top-node": "mid", "__org.blockd_copy-mode": "background"})
        [info] = disk.execute("query-block-jobs")["return"]
        assert "__org.blockd_copy-mode" not in info
        disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
        disk.stop()


@pytest.mark.parametrize("asked", [False, True])
def test_default_mode_is_background_and_reported_when_asked(
    tmp_path: Path, sock_dir: Path, asked: bool
) -> None:
    """Without the argument the job is QSD's, and so are the queries' members."""
    with serving(tmp_path, sock_dir) as disk:
        disk.commit(**({"__org.blockd_copy-mode": "background"} if asked else {}))
        disk.qmp.wait_event("BLOCK_JOB_READY", timeout=READY_TIMEOUT, device="j")
        [block_job] = disk.execute("query-block-jobs")["return"]
        [job] = disk.execute("query-jobs")["return"]
        if asked:
            assert job_mode(disk) == "background"
            assert job["__org.blockd_copy-mode"] == "background"
        else:
            assert "__org.blockd_copy-mode" not in block_job
            assert "__org.blockd_copy-mode" not in job
        disk.write(3 * MiB, 1 * MiB, 0x44)
        assert disk.execute("block-job-complete", device="j") == {"return": {}}
        disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
        disk.stop()
    assert disk.matches(tmp_path / "base.qcow2")
