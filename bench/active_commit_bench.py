#!/usr/bin/env python3
"""Active commit under a steady writer: does the job reach READY, and what does the guest feel?

For blockd and for qemu-storage-daemon in turn: base <- top (top holds
--fill of --size), top exported over NBD; a libnbd client writes 1 MiB
blocks at a steady --rate to random places while the job commits top into
base.  Measured: seconds to READY, the job's len/offset at READY, seconds
from block-job-complete to BLOCK_JOB_COMPLETED, and the writer's achieved
rate and worst write latency (the pivot holds its requests briefly).  Then
base alone must read as the guest wrote (initial view plus every write) and
qemu-img check must find every image clean.

    .venv/bin/python bench/active_commit_bench.py [--size 1G] [--fill 0.5] [--rate 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qmp_client import QMP

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]

WRITER = r"""
import json, nbd, os, random, sys, time
uri, size, rate, stop, out = sys.argv[1:6]
size, rate = int(size), float(rate)
block = 1 << 20
rng = random.Random(7)
h = nbd.NBD(); h.connect_uri(uri)
last = {}
latencies = []
start = time.monotonic(); due = start; seq = 0
while not os.path.exists(stop):
    now = time.monotonic()
    if now < due:
        time.sleep(due - now)
    index = rng.randrange(size // block)
    seq += 1
    data = (seq.to_bytes(8, "little") * (block // 8))
    t0 = time.monotonic()
    h.pwrite(data, index * block)
    latencies.append(time.monotonic() - t0)
    last[index] = seq
    due += block / rate
h.flush(); h.shutdown()
elapsed = time.monotonic() - start
latencies.sort()
json.dump({"last": last, "writes": seq, "seconds": elapsed, "max_ms": latencies[-1] * 1000,
           "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}, open(out, "w"))
"""


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not start: {proc.args}")
        time.sleep(0.02)


def build(d: Path, size: int, fill: float) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), str(size))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        str(d / "top.qcow2"), str(size))  # fmt: skip
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {size // 2}", str(d / "base.qcow2"))
    step = 8 * MiB
    commands: list[str] = []
    for offset in range(0, size, step):
        if (offset // step) % 100 < fill * 100:
            commands += ["-c", f"write -P 0x22 {offset} {step}"]
    run("qemu-io", "-f", "qcow2", *commands, str(d / "top.qcow2"))


def contender(name: str, d: Path, sock: Path) -> subprocess.Popen[bytes]:
    if name == "blockd":
        argv = [str(ROOT / ".venv/bin/blockd"), "--socket", str(sock)]
    else:
        argv = ["qemu-storage-daemon", "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                "--monitor", "chardev=m"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def verify(d: Path, golden_view: Path, size: int) -> bool:
    """Base alone reads as the guest wrote: the start view, then every write."""
    log = json.loads((d / "writer.json").read_text())
    last = {int(k): v for k, v in log["last"].items()}
    view = d / "base.raw"
    run("qemu-img", "convert", "-O", "raw", str(d / "base.qcow2"), str(view))
    with open(view, "rb") as got, open(golden_view, "rb") as want:
        for index in range(size // MiB):
            block = got.read(MiB)
            expected = want.read(MiB)
            if index in last:
                expected = last[index].to_bytes(8, "little") * (MiB // 8)
            if block != expected:
                return False
    view.unlink()
    for image in ("base", "top"):
        report = json.loads(subprocess.run(
            ["qemu-img", "check", "--output=json", str(d / f"{image}.qcow2")],
            capture_output=True, text=True).stdout)  # fmt: skip
        if report.get("corruptions", 0) or report.get("leaks", 0):
            return False
    return True


def measure(name: str, golden: Path, work: Path, size: int, rate: float) -> dict[str, Any]:
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(golden, d)
    qmp_sock, nbd_sock = d / "qmp.sock", d / "nbd.sock"
    proc = contender(name, d, qmp_sock)
    writer: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"contender": name}
    try:
        wait_socket(qmp_sock, proc)
        qmp = QMP(qmp_sock)
        for node, backing, ro in (("base", None, True), ("top", "base", False)):
            qmp.execute("blockdev-add", driver="qcow2", **{"node-name": node}, backing=backing,
                        **{"read-only": ro},
                        file={"driver": "file", "filename": str(d / f"{node}.qcow2")})  # fmt: skip
        qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd_sock)}})
        qmp.execute("block-export-add", type="nbd", id="e", **{"node-name": "top"}, writable=True)
        script = d / "writer.py"
        script.write_text(WRITER)
        writer = subprocess.Popen(
            ["/usr/bin/python3", str(script), f"nbd+unix:///top?socket={nbd_sock}", str(size),
             str(rate), str(d / "stop"), str(d / "writer.json")]
        )
        time.sleep(1.0)
        start = time.monotonic()
        qmp.execute("block-commit", **{"job-id": "j", "device": "top"})
        ready = qmp.wait_event("BLOCK_JOB_READY", timeout=300)
        result["ready_s"] = time.monotonic() - start
        result["len_at_ready"] = ready["data"]["len"]
        time.sleep(2.0)
        t0 = time.monotonic()
        qmp.execute("block-job-complete", device="j")
        qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120)
        result["complete_s"] = time.monotonic() - t0
        [export] = qmp.execute("query-block-exports")
        result["export_on"] = export["node-name"]
        time.sleep(1.0)
    finally:
        (d / "stop").touch()
        if writer is not None:
            writer.wait(60)
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
    log = json.loads((d / "writer.json").read_text())
    result["writer_MBps"] = log["writes"] * MiB / log["seconds"] / 1e6
    result["write_p99_ms"] = log["p99_ms"]
    result["write_max_ms"] = log["max_ms"]
    result["verified"] = verify(d, golden / "view.raw", size)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 30, help="virtual size in bytes")
    parser.add_argument("--fill", type=float, default=0.5)
    parser.add_argument("--rate", type=float, default=50.0, help="writer MB/s (10^6 bytes)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        golden = work / "golden"
        golden.mkdir()
        build(golden, args.size, args.fill)
        run("qemu-img", "convert", "-O", "raw", str(golden / "top.qcow2"), str(golden / "view.raw"))
        rows = [measure(n, golden, work, args.size, args.rate * 1e6) for n in ("blockd", "qsd")]
    columns = ["contender", "ready_s", "len_at_ready", "complete_s", "writer_MBps",
               "write_p99_ms", "write_max_ms", "export_on", "verified"]  # fmt: skip
    print(" ".join(f"{c:>13}" for c in columns))
    for row in rows:
        cells = [f"{row[c]:13.2f}" if isinstance(row[c], float) else f"{row[c]!s:>13}"
                 for c in columns]  # fmt: skip
        print(" ".join(cells))
    return 0 if all(row["verified"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
