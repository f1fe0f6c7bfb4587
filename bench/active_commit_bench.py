#!/usr/bin/env python3
"""Active commit under a guest writing as fast as it can: READY or not, what the guest feels.

For blockd (in each ``__org.blockd_copy-mode``) and for qemu-storage-daemon in
turn: base <- top (top holds --fill of --size), top exported over NBD; a
libnbd client writes --write-size blocks at random 4 KiB-aligned offsets,
--depth requests in flight (never two overlapping ones, so the last write of
each 4 KiB block is well defined), while the job commits top into base.

Cases (issue 16):

* ``unthrottled``: no speed limit;
* ``outrun``: the job's ``speed`` is --outrun-speed, a fraction of what the
  writer does, so a background copy can never catch up;
* ``fsync``: like ``unthrottled``, and the writer flushes every --flush-every writes.

Measured per run: seconds to READY (or "-" when none came within
--ready-limit), the writer's MB/s before the job (alone), from block-commit
to READY (or to the limit), write latency p50/p99 during that time; then
block-job-complete and, after the pivot, base alone must read as the guest
wrote (initial view plus the last write of every block) and qemu-img check
must find both images clean.  A run without READY is cancelled instead and
only the images' check counts.

    .venv/bin/python bench/active_commit_bench.py --case unthrottled [--runs 3]
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
from typing import Any

from qmp_client import QMP

MiB = 1 << 20
BLOCK = 4096
ROOT = Path(__file__).resolve().parents[1]

#: The writer: libnbd's asynchronous API, --depth requests in flight.  Every
#: write's 4 KiB blocks carry (sequence number, block index), so the last
#: write of each block is known; completions are timed on CLOCK_MONOTONIC,
#: which the bench shares, to cut the run into phases.
WRITER = r"""
import array, json, nbd, os, random, struct, sys, time
uri, size, wsize, depth, flush_every, stop, out = sys.argv[1:8]
size, wsize, depth, flush_every = int(size), int(wsize), int(depth), int(flush_every)
B = 4096
rng = random.Random(7)
h = nbd.NBD(); h.connect_uri(uri)
blocks = size // B
per = wsize // B
last = array.array("q", [0]) * blocks
busy = bytearray(blocks)
done_at = []; latency = []
failed = 0
seq = 0
inflight = 0

def finished(first, t0, err):
    global inflight, failed
    failed += bool(err.value)
    for b in range(first, first + per):
        busy[b] = 0
    now = time.monotonic()
    done_at.append(now); latency.append(now - t0)
    inflight -= 1
    return 1

while not os.path.exists(stop):
    while inflight < depth:
        first = rng.randrange(blocks - per + 1)
        if any(busy[first:first + per]):
            continue
        seq += 1
        data = b"".join(struct.pack("<qq", seq, b) * (B // 16) for b in range(first, first + per))
        for b in range(first, first + per):
            busy[b] = 1
            last[b] = seq
        t0 = time.monotonic()
        inflight += 1
        h.aio_pwrite(data, first * B,
                     completion=lambda err, first=first, t0=t0: finished(first, t0, err))
        if flush_every and seq % flush_every == 0:
            h.aio_flush()
    h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush(); h.shutdown()
with open(out + ".last", "wb") as f:
    last.tofile(f)
json.dump({"done_at": done_at, "latency": latency, "failed": failed}, open(out, "w"))
"""


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not start: {proc.args}")
        time.sleep(0.02)


def connect(sock: Path) -> QMP:
    """The monitor, once it listens (QSD creates its socket before it does)."""
    for _ in range(100):
        try:
            return QMP(sock)
        except (ConnectionRefusedError, EOFError):
            time.sleep(0.05)
    return QMP(sock)


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
    if commands:
        run("qemu-io", "-f", "qcow2", *commands, str(d / "top.qcow2"))


def contender(name: str, sock: Path, log: Path | None) -> subprocess.Popen[bytes]:
    if name == "qsd":
        argv = ["qemu-storage-daemon", "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                "--monitor", "chardev=m"]  # fmt: skip
    else:
        argv = [str(ROOT / ".venv/bin/blockd"), "--socket", str(sock)]
    err = subprocess.DEVNULL if log is None else open(log, "ab")  # noqa: SIM115
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)


def verify(d: Path, golden_view: Path, size: int) -> bool:
    """Base alone reads as the guest wrote, and both images are clean."""
    with open(d / "writer.json.last", "rb") as f:
        last = f.read()
    seqs = memoryview(last).cast("q")
    view = d / "base.raw"
    run("qemu-img", "convert", "-O", "raw", str(d / "base.qcow2"), str(view))
    ok = True
    with open(view, "rb") as got, open(golden_view, "rb") as want:
        for index in range(size // BLOCK):
            block = got.read(BLOCK)
            expected = want.read(BLOCK)
            if seqs[index]:
                expected = (seqs[index].to_bytes(8, "little", signed=True)
                            + index.to_bytes(8, "little")) * (BLOCK // 16)  # fmt: skip
            if block != expected:
                print(f"base differs at block {index}: {block[:16].hex()} for "
                      f"{expected[:16].hex()}", file=sys.stderr)  # fmt: skip
                ok = False
                break
    view.unlink()
    return ok and checked(d)


def checked(d: Path) -> bool:
    for image in ("base", "top"):
        report = json.loads(subprocess.run(
            ["qemu-img", "check", "--output=json", str(d / f"{image}.qcow2")],
            capture_output=True, text=True).stdout)  # fmt: skip
        if report.get("corruptions", 0) or report.get("leaks", 0):
            print(f"qemu-img check {image}: {report}", file=sys.stderr)
            return False
    return True


def phase(done_at: list[float], latency: list[float], start: float, end: float,
          wsize: int) -> tuple[float, float, float]:  # fmt: skip
    """Writer MB/s, p50 and p99 latency (ms) of the writes completed in [start, end)."""
    picked = sorted(lat for t, lat in zip(done_at, latency, strict=True) if start <= t < end)
    if not picked or end <= start:
        return 0.0, 0.0, 0.0
    mbps = len(picked) * wsize / (end - start) / 1e6
    return mbps, picked[len(picked) // 2] * 1e3, picked[int(len(picked) * 0.99)] * 1e3


def measure(name: str, mode: str | None, golden: Path, work: Path,
            args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    d = work / f"{name}-{mode}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(golden, d)
    qmp_sock, nbd_sock = d / "qmp.sock", d / "nbd.sock"
    proc = contender(name, qmp_sock, Path(args.daemon_log) if args.daemon_log else None)
    writer: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"contender": name if mode is None else f"{name}:{mode}"}
    try:
        wait_socket(qmp_sock, proc)
        qmp = connect(qmp_sock)
        for node, backing, ro in (("base", None, True), ("top", "base", False)):
            qmp.execute("blockdev-add", driver="qcow2", **{"node-name": node}, backing=backing,
                        **{"read-only": ro},
                        file={"driver": "file", "filename": str(d / f"{node}.qcow2")})  # fmt: skip
        qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd_sock)}})
        qmp.execute("block-export-add", type="nbd", id="e", **{"node-name": "top"}, writable=True)
        script = d / "writer.py"
        script.write_text(WRITER)
        flush_every = args.flush_every if args.case == "fsync" else 0
        writer = subprocess.Popen(
            ["/usr/bin/python3", str(script), f"nbd+unix:///top?socket={nbd_sock}",
             str(args.size), str(args.write_size), str(args.depth), str(flush_every),
             str(d / "stop"), str(d / "writer.json")]
        )  # fmt: skip
        warm = time.monotonic()
        time.sleep(args.warmup)
        start = time.monotonic()
        options: dict[str, Any] = {"job-id": "j", "device": "top"}
        if args.case == "outrun":
            options["speed"] = args.outrun_speed
        if mode not in (None, "default"):
            options["__org.blockd_copy-mode"] = mode
        qmp.execute("block-commit", **options)
        try:
            qmp.wait_event("BLOCK_JOB_READY", timeout=args.ready_limit)
            ready_at: float | None = time.monotonic()
        except TimeoutError:
            ready_at = None
        end = ready_at if ready_at is not None else time.monotonic()
        result["ready_s"] = None if ready_at is None else ready_at - start
        if ready_at is not None:
            qmp.execute("block-job-complete", device="j")
            qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=300)
            [export] = qmp.execute("query-block-exports")
            result["export_on"] = export["node-name"]
        else:
            qmp.execute("block-job-cancel", device="j", force=True)
            qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=300)
            result["export_on"] = "top"
        (d / "stop").touch()
        writer.wait(120)
    finally:
        (d / "stop").touch()
        if writer is not None and writer.poll() is None:
            writer.kill()
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
    log = json.loads((d / "writer.json").read_text())
    done_at, latency = log["done_at"], log["latency"]
    if log["failed"]:  # the model counts every write: a failed one is a finding too
        print(f"{result['contender']}: {log['failed']} writes failed", file=sys.stderr)
    result["alone_MBps"] = phase(done_at, latency, warm + 0.5, start, args.write_size)[0]
    mbps, p50, p99 = phase(done_at, latency, start, end, args.write_size)
    result.update(job_MBps=mbps, p50_ms=p50, p99_ms=p99)
    result["kept"] = mbps / result["alone_MBps"] if result["alone_MBps"] else 0.0
    if result["export_on"] == "base":
        result["verified"] = verify(d, golden / "view.raw", args.size)
    else:
        result["verified"] = checked(d)
    shutil.rmtree(d, ignore_errors=True)
    return result


def summary(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Median and spread (min-max) of each measure over the runs."""
    out: dict[str, str] = {"contender": rows[0]["contender"]}
    readies = [r["ready_s"] for r in rows]
    got = sorted(r for r in readies if r is not None)
    out["READY"] = f"{len(got)}/{len(rows)}"
    out["ready_s"] = (f"{statistics.median(got):.2f} ({got[0]:.2f}-{got[-1]:.2f})"
                      if got else "-")  # fmt: skip
    for key in ("alone_MBps", "job_MBps", "kept", "p50_ms", "p99_ms"):
        values = sorted(r[key] for r in rows)
        out[key] = f"{statistics.median(values):.2f} ({values[0]:.2f}-{values[-1]:.2f})"
    out["verified"] = str(all(r["verified"] for r in rows))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--case", choices=("unthrottled", "outrun", "fsync"), default="unthrottled")
    parser.add_argument("--size", type=int, default=512 * MiB, help="virtual size in bytes")
    parser.add_argument("--fill", type=float, default=0.5)
    parser.add_argument("--write-size", type=int, default=BLOCK, help="bytes per write (x 4 KiB)")
    parser.add_argument("--depth", type=int, default=16, help="writes in flight")
    parser.add_argument("--flush-every", type=int, default=16, help="fsync case: writes per flush")
    parser.add_argument("--outrun-speed", type=int, default=4 * MiB, help="outrun case: job speed")
    parser.add_argument(
        "--ready-limit",
        type=float,
        help="seconds to wait for READY (default 30; in the outrun case 30 more than a"
        " copy of the whole disk takes at --outrun-speed: the writer's warm-up alone"
        " allocates much of top, a 64 KiB cluster per 4 KiB write, so only the guest's"
        " writes during the job can keep it from READY)",
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="writer alone, seconds")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="background,write-blocking,auto,qsd",
                        help="blockd copy modes to run, and 'qsd'")  # fmt: skip
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--json", help="also write every run's row here")
    parser.add_argument("--daemon-log", help="append the daemons' stderr here")
    args = parser.parse_args()
    if args.ready_limit is None:
        bulk = args.size / args.outrun_speed if args.case == "outrun" else 0.0
        args.ready_limit = 30.0 + bulk
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        golden = work / "golden"
        golden.mkdir()
        build(golden, args.size, args.fill)
        run("qemu-img", "convert", "-O", "raw", str(golden / "top.qcow2"), str(golden / "view.raw"))
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(args.runs):  # interleaved, so load drifts hit every contender alike
            for m in modes:
                row = measure("qsd", None, golden, work, args) if m == "qsd" else measure(
                    "blockd", m, golden, work, args)  # fmt: skip
                print(json.dumps(row), file=sys.stderr, flush=True)
                runs[m].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    table = [summary(rows) for rows in runs.values()]
    columns = list(table[0])
    print(f"case {args.case}: size {args.size // MiB} MiB, fill {args.fill}, {args.write_size} B "
          f"writes at depth {args.depth}, READY limit {args.ready_limit:.0f} s, "
          f"{args.runs} runs: median (min-max)")  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in table:
        print("| " + " | ".join(row[c] for c in columns) + " |")
    return 0 if all(row["verified"] == "True" for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
