#!/usr/bin/env python3
"""What a guest feels of an external snapshot, blockd beside QSD (issue 17).

For each daemon, --runs times on fresh images: base.qcow2 (--size, its first
half written by qemu-io) exported writable over NBD, an overlay created
naming it (as libvirt does) and added with ``backing: null``.  A libnbd
client (Debian's system python) keeps 8 random 4 KiB writes in flight for
one second, then ``blockdev-snapshot`` (or, with --sync,
``blockdev-snapshot-sync`` creating the overlay) runs, and the client goes on
for another second.

Printed per run: the command's round trip (ms), the longest write latency
among the writes in flight while the command ran (what the guest waited
for the switch), the writes' p50 / p99 latency over the whole run, and the
writes per second before and after the switch.  Correctness is checked too:
qemu-img check of both images, and the overlay's view holding every write
(qemu-img compare against a raw replay of the client's log).

    .venv/bin/python bench/snapshot_pause.py [--size 256M] [--runs 5] [--sync]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CONTENDERS, image_clean, parse_size, start_daemon, tool
from qmp_client import QMP

WRITER = """
import nbd, os, random, sys, time
uri, seconds_before, size, marks = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
h = nbd.NBD(); h.connect_uri(uri)
rng = random.Random(7)
slots = list(range(size // 4096)); rng.shuffle(slots)
inflight, log, n = {}, [], 0
start = time.monotonic()
while not os.path.exists(marks + ".stop"):
    while len(inflight) < 8:
        off = slots[n % len(slots)] * 4096; n += 1
        data = rng.randbytes(4096)
        inflight[h.aio_pwrite(data, off)] = (off, data, time.monotonic())
    h.poll(-1)
    for c in [c for c in inflight if h.aio_command_completed(c)]:
        off, data, sent = inflight.pop(c)
        log.append((off, data, sent, time.monotonic()))
    if time.monotonic() - start > seconds_before and not os.path.exists(marks + ".go"):
        open(marks + ".go", "w").close()
while inflight:
    h.poll(-1)
    for c in [c for c in inflight if h.aio_command_completed(c)]:
        off, data, sent = inflight.pop(c)
        log.append((off, data, sent, time.monotonic()))
h.flush(); h.shutdown()
with open(marks + ".log", "wb") as f:
    for off, data, sent, done in log:
        f.write(off.to_bytes(8, "little") + repr((sent, done)).encode().ljust(64) + data)
"""


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.01)


def read_log(path: Path) -> list[tuple[int, bytes, float, float]]:
    raw = path.read_bytes()
    out = []
    pos = 0
    while pos < len(raw):
        off = int.from_bytes(raw[pos : pos + 8], "little")
        sent, done = eval(raw[pos + 8 : pos + 72].decode().strip())
        out.append((off, raw[pos + 72 : pos + 72 + 4096], sent, done))
        pos += 72 + 4096
    return out


def run(name: str, d: Path, size: int, sync: bool) -> dict[str, float]:
    base, ov = d / "base.qcow2", d / "ov.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size))
    tool("qemu-io", "-c", f"write -P 0x11 0 {size // 2}", str(base))
    if not sync:
        tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
             str(ov))  # fmt: skip
    sock = d / "qmp.sock"
    proc = start_daemon(name, sock)
    try:
        qmp = QMP(sock)
        file = {"driver": "file", "filename": str(base)}
        qmp.execute("blockdev-add", driver="qcow2", **{"node-name": "base"}, file=file)
        if not sync:
            file = {"driver": "file", "filename": str(ov)}
            qmp.execute("blockdev-add", driver="qcow2", **{"node-name": "ov"}, file=file,
                        backing=None)  # fmt: skip
        nbd = d / "nbd.sock"
        qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}})
        qmp.execute("block-export-add", type="nbd", id="e", **{"node-name": "base"},
                    name="disk", writable=True)  # fmt: skip
        script = d / "writer.py"
        script.write_text(WRITER)
        marks = d / "marks"
        writer = subprocess.Popen(["/usr/bin/python3", str(script),
                                   f"nbd+unix:///disk?socket={nbd}", "1.0", str(size),
                                   str(marks)])  # fmt: skip
        wait_for(Path(f"{marks}.go"))
        t0 = time.monotonic()
        if sync:
            qmp.execute("blockdev-snapshot-sync", **{"node-name": "base",
                        "snapshot-file": str(ov), "snapshot-node-name": "ov"})  # fmt: skip
        else:
            qmp.execute("blockdev-snapshot", node="base", overlay="ov")
        t1 = time.monotonic()
        time.sleep(1.0)
        Path(f"{marks}.stop").touch()
        if writer.wait(60) != 0:
            raise SystemExit("the NBD client failed (disconnected?)")
        qmp.execute("block-export-del", id="e", mode="hard")
    finally:
        proc.terminate()
        proc.wait(30)
    log = read_log(Path(f"{marks}.log"))
    latencies = sorted(done - sent for _, _, sent, done in log)
    spanning = [done - sent for _, _, sent, done in log if sent <= t1 and done >= t0]
    before = [x for x in log if x[3] < t0]
    after = [x for x in log if x[2] > t1]
    first = min(x[2] for x in log)
    last = max(x[3] for x in log)
    # correctness: the overlay's chain holds base's data and every write (each
    # slot is written once per pass over the shuffled slots, so order is clear)
    expect = bytearray(b"\x11" * (size // 2) + bytes(size - size // 2))
    for off, data, _, _ in sorted(log, key=lambda x: x[3]):
        expect[off : off + 4096] = data
    (d / "expect.bin").write_bytes(expect)
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                           str(d / "expect.bin"), str(ov)], capture_output=True).returncode == 0
    ok = same and image_clean(base) and image_clean(ov)
    overlay = json.loads(tool("qemu-img", "info", "--output=json", str(ov)).stdout)
    return {
        "command_ms": (t1 - t0) * 1000,
        "max_wait_ms": max(spanning, default=0.0) * 1000,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "iops_before": len(before) / max(t0 - first, 1e-9),
        "iops_after": len(after) / max(last - t1, 1e-9),
        "ok": float(ok and "backing-filename" in overlay),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sync", action="store_true")
    args = parser.parse_args()
    size = parse_size(args.size)
    results: dict[str, list[dict[str, float]]] = {}
    for name in CONTENDERS:
        for i in range(args.runs):
            d = Path(tempfile.mkdtemp(prefix=f"snap-{name}-"))
            try:
                r = run(name, d, size, args.sync)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            results.setdefault(name, []).append(r)
            print(f"{name} run {i}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()),
                  flush=True)  # fmt: skip
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name} median: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    if not all(r["ok"] for runs in results.values() for r in runs):
        sys.exit("a run left a wrong or unclean image")


if __name__ == "__main__":
    main()
