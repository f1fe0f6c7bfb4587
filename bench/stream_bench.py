#!/usr/bin/env python3
"""block-stream, unthrottled, on blockd and on qemu-storage-daemon in turn.

The chain is base <- mid <- top of --size: base holds the first half, mid a
quarter from a quarter on, and every 16th MiB of the rest in 64 KiB pieces
(many runs), top a sixteenth.  Each daemon streams a fresh copy into top,
once with base-node base (only mid comes up) and once without base (the
whole chain comes up).  Reported: seconds from block-stream to
BLOCK_JOB_COMPLETED, MiB/s of what came up, the daemon's CPU seconds; then
top must read as before (qemu-img compare) and qemu-img check must find it
clean.

    .venv/bin/python bench/stream_bench.py [--size 1G] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import CONTENDERS, MiB, cpu_seconds, image_clean, images_equal, parse_size, tool
from common import start_daemon as start
from qmp_client import QMP


def build(d: Path, size: int) -> None:
    backing = None
    for name in ("base", "mid", "top"):
        argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing:
            argv += ["-b", backing, "-F", "qcow2"]
        tool(*argv, str(d / f"{name}.qcow2"), str(size))
        backing = f"{name}.qcow2"
    tool("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {size // 2}", str(d / "base.qcow2"))
    pieces = [f"write -P 0x21 {size // 4} {size // 4}"]
    pieces += [f"write -P 0x22 {off} 64k" for off in range(size // 2, size, 16 * MiB)]
    commands = [arg for piece in pieces for arg in ("-c", piece)]
    tool("qemu-io", "-f", "qcow2", *commands, str(d / "mid.qcow2"))
    tool("qemu-io", "-f", "qcow2", "-c", f"write -P 0x31 0 {size // 16}", str(d / "top.qcow2"))


def one(name: str, chain: Path, work: Path, base: bool) -> tuple[float, float, bool]:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(chain, work)
    sock = work / "qmp.sock"
    proc = start(name, sock)
    try:
        qmp = QMP(sock)
        backing = None
        for node in ("base", "mid", "top"):
            file = {"driver": "file", "filename": str(work / f"{node}.qcow2")}
            qmp.execute("blockdev-add", driver="qcow2", **{"node-name": node},
                        backing=backing, file=file, **{"read-only": node != "top"})  # fmt: skip
            backing = node
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        args = {"job-id": "j", "device": "top", **({"base-node": "base"} if base else {})}
        qmp.execute("block-stream", **args)
        event = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=600)
        seconds, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
        assert "error" not in event["data"], event
        qmp.execute("quit")
    finally:
        proc.wait(60)
    ok = images_equal(chain / "top.qcow2", work / "top.qcow2") and image_clean(work / "top.qcow2")
    return seconds, cpu, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        chain = Path(tmp) / "chain"
        chain.mkdir()
        build(chain, size)
        print(f"chain of {size // MiB} MiB; median of {args.runs} runs")
        print(f"{'daemon':8} {'base':5} {'seconds':>8} {'MiB/s':>8} {'cpu s':>7}  ok")
        for base in (True, False):
            # what comes up: mid's share (and base's half when there is no base)
            moved = (size // 4 + size // 2 // 16 // 16) + (0 if base else size // 2)
            for name in CONTENDERS:
                runs = [one(name, chain, Path(tmp) / name, base) for _ in range(args.runs)]
                secs = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                ok = all(r[2] for r in runs)
                rate = moved / MiB / secs
                shown = "yes" if base else "no"
                print(f"{name:8} {shown:5} {secs:8.2f} {rate:8.1f} {cpu:7.2f}  {ok}")


if __name__ == "__main__":
    main()
