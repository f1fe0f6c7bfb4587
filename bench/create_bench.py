#!/usr/bin/env python3
"""blockdev-create: how long a qcow2 image takes to make, blockd beside qemu-storage-daemon.

For each option set and each daemon: a file job, a file node, then the timed
qcow2 job (from the command to its ``concluded`` event), and the daemon's CPU
time for it; the two images must be the same bytes (``cmp``) and pass
``qemu-img check``.  Best of --runs.

    .venv/bin/python bench/create_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import CONTENDERS, cpu_seconds, image_clean, start_daemon
from qmp_client import QMP

GiB, TiB = 1 << 30, 1 << 40

CASES: list[tuple[str, dict[str, Any]]] = [
    ("10 GiB overlay", {"size": 10 * GiB, "backing-file": "base.qcow2",
                        "backing-fmt": "qcow2"}),
    ("4 TiB, 4 KiB clusters", {"size": 4 * TiB, "cluster-size": 4096}),
    ("10 GiB, 512 B clusters, 64-bit refcounts",
     {"size": 10 * GiB, "cluster-size": 512, "refcount-bits": 64}),
    ("100 GiB, metadata", {"size": 100 * GiB, "preallocation": "metadata"}),
    ("1 TiB, metadata", {"size": TiB, "preallocation": "metadata"}),
]


def same_bytes(a: Path, b: Path) -> bool:
    """cmp, reading only where either (sparse) file holds data."""
    if a.stat().st_size != b.stat().st_size:
        return False
    ranges: list[tuple[int, int]] = []
    for path in (a, b):
        with open(path, "rb") as f:
            fd, pos, end = f.fileno(), 0, a.stat().st_size
            while pos < end:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                pos = os.lseek(fd, start, os.SEEK_HOLE)
                ranges.append((start, pos))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in ranges:
            for pos in range(start, end, 1 << 20):
                n = min(1 << 20, end - pos)
                if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                    return False
    return True


def one(qmp: QMP, pid: int, d: Path, n: int, options: dict[str, Any]) -> tuple[float, float]:
    path = d / f"img{n}.qcow2"
    qmp.execute("blockdev-create", **{"job-id": f"f{n}", "options": {
        "driver": "file", "filename": str(path), "size": 0}})
    qmp.wait_event("JOB_STATUS_CHANGE", 30)
    while qmp.execute("query-jobs")[0]["status"] != "concluded":
        time.sleep(0.01)
    qmp.execute("job-dismiss", id=f"f{n}")
    qmp.execute("blockdev-add", driver="file", filename=str(path), **{"node-name": f"n{n}"})
    qmp.events.clear()
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    qmp.execute("blockdev-create", **{"job-id": f"q{n}", "options": {
        "driver": "qcow2", "file": f"n{n}", **options}})
    while True:
        event = qmp.wait_event("JOB_STATUS_CHANGE", 600)
        qmp.events.remove(event)
        if event["data"]["status"] == "concluded":
            break
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    [job] = qmp.execute("query-jobs")
    assert "error" not in job, job
    qmp.execute("job-dismiss", id=f"q{n}")
    qmp.execute("blockdev-del", **{"node-name": f"n{n}"})
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="create-bench-"))
    try:
        results: dict[tuple[str, str], tuple[float, float]] = {}
        for name in CONTENDERS:
            d = work / name
            d.mkdir()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"),
                            str(10 * GiB)], check=True)
            proc = start_daemon(name, d / "qmp.sock")
            try:
                qmp = QMP(d / "qmp.sock")
                for i, (label, options) in enumerate(CASES):
                    best = min(one(qmp, proc.pid, d, i * 100 + r, options)
                               for r in range(args.runs))
                    results[(name, label)] = best
            finally:
                proc.terminate()
                proc.wait()
        print("| image | blockd s (CPU s) | QSD s (CPU s) | same bytes | check |")
        print("|---|---:|---:|---|---|")
        for i, (label, _options) in enumerate(CASES):
            ours = work / "blockd" / f"img{i * 100}.qcow2"
            theirs = work / "qsd" / f"img{i * 100}.qcow2"
            same = same_bytes(ours, theirs)
            b, q = results[("blockd", label)], results[("qsd", label)]
            print(f"| {label} | {b[0]:.3f} ({b[1]:.2f}) | {q[0]:.3f} ({q[1]:.2f}) | "
                  f"{'yes' if same else 'NO'} | {'clean' if image_clean(ours) else 'NOT CLEAN'} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
