#!/usr/bin/env python3
"""A commit while clients poll query-block-jobs flat out, blockd beside QSD (issue 15).

For each daemon and each client count of --clients (default 1 and 64), on a
fresh copy of one chain base <- mid <- top (mid holds --fill of --size, made
by qemu-io): the polling clients connect and start sending
``query-block-jobs`` one after another as fast as the replies come, then an
unthrottled ``block-commit`` of mid into base runs to BLOCK_JOB_COMPLETED.
Client 0 starts the commit and then polls too, until it sees that event;
with --clients 64 there are 64 connections in all, blockd's limit.  QSD
gets one monitor socket per client (a QSD monitor serves one at a time).

Printed per case: commit seconds and MB/s, the daemon's CPU seconds (all
threads) over the commit, the pollers' round trips per second, their latency
p50/p99 (over all pollers' round trips during the commit), the daemon's peak
RSS (VmHWM) and whether the result is right: qemu-img check of base and
top, and top reading exactly as before the commit (qemu-img compare with the
untouched copy).  The last line is the commit speed ratio blockd / QSD per
client count (target: >= 1.0 with one client, >= 0.8 with 64; QMP p99 < 5 ms
with one).

Each case runs --runs times (default 3) and the daemons take turns going
first: on this 2-CPU virtual machine whichever daemon runs first after the
images are copied pays for the page cache the copy grows (the same commit
measured 2.8-3.2 s first and 1.5-1.9 s second, for either daemon), so one
run each measures the order, not the daemons.  Rows give the median of
the runs with their spread; the ratio is of the medians.

The pollers are raw socket clients (no QMP library: their own cost must not
be what is measured), spread over a few processes so that 64 of them are
not limited by one interpreter lock; the same pollers serve both daemons.

    .venv/bin/python bench/qmp_polling.py [--size 1G] [--fill 1.0] [--clients 1,64] [--runs 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    CONTENDERS,
    MiB,
    cpu_seconds,
    image_clean,
    images_equal,
    monitor_path,
    parse_size,
    peak_rss_mib,
    start_daemon,
    tool,
)
from qmp_client import QMP

POLL = b'{"execute": "query-block-jobs"}'


def build(d: Path, size: int, fill: float) -> int:
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        opts = ["-b", f"{backing}.qcow2", "-F", "qcow2"] if backing else []
        tool("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(d / f"{name}.qcow2"), str(size))
    data = int(size * fill) // MiB * MiB
    tool("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data}", str(d / "mid.qcow2"))
    tool("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {size // 8}", str(d / "base.qcow2"))
    tool("qemu-io", "-f", "qcow2", "-c", f"write -P 0x33 {size // 2} {size // 16}",
         str(d / "top.qcow2"))  # fmt: skip
    return data


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    sock.sendall(b'{"execute": "qmp_capabilities"}')
    buf = b""
    while buf.count(b"\r\n") < 2:  # greeting, then the capabilities reply
        buf += sock.recv(65536)
    return sock


def _poll_worker(
    paths: list[Path],
    ready: multiprocessing.synchronize.Barrier,
    stop: multiprocessing.synchronize.Event,
    out: Any,
) -> None:
    """A connection to each path, each with one query in flight at all times."""
    import selectors

    socks = [_connect(path) for path in paths]
    sel = selectors.DefaultSelector()
    sent: dict[socket.socket, float] = {}
    pending: dict[socket.socket, bytes] = {}
    latencies: list[float] = []
    ready.wait()
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        pending[sock] = b""
        sent[sock] = time.perf_counter()
        sock.sendall(POLL)
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(65536)
            if not data:
                raise SystemExit("daemon closed a polling connection")
            buf = pending[sock] + data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                if line.startswith(b'{"return"'):
                    now = time.perf_counter()
                    latencies.append(now - sent[sock])
                    sent[sock] = now
                    sock.sendall(POLL)
            pending[sock] = buf
    out.send(latencies)
    for sock in socks:
        sock.close()


def measure(name: str, golden: Path, work: Path, clients: int) -> dict[str, Any]:
    """Client 0 runs the commit and polls itself; clients 1.. poll from workers."""
    d = work / f"{name}-{clients}"
    shutil.copytree(golden, d)
    os.sync()  # the copy's writeback must not land on whichever daemon runs first
    sock = d / "qmp.sock"
    proc = start_daemon(name, sock, max(clients, 1))
    row: dict[str, Any] = {"daemon": name, "clients": clients}
    workers: list[multiprocessing.Process] = []
    try:
        qmp = QMP(sock)
        for node, backing, ro in (("base", None, True), ("mid", "base", True),
                                  ("top", "mid", False)):  # fmt: skip
            qmp.execute("blockdev-add", driver="qcow2", backing=backing,
                        file={"driver": "file", "filename": str(d / f"{node}.qcow2")},
                        **{"node-name": node, "read-only": ro})  # fmt: skip
        others = [monitor_path(name, sock, i) for i in range(1, clients)]
        shares = [others[i::4] for i in range(min(len(others), 4))]
        ready = multiprocessing.Barrier(len(shares) + 1)
        stop = multiprocessing.Event()
        pipes = []
        for share in shares:
            receiver, sender = multiprocessing.Pipe(duplex=False)
            worker = multiprocessing.Process(target=_poll_worker, args=(share, ready, stop, sender))
            worker.start()
            workers.append(worker)
            pipes.append(receiver)
        ready.wait(120)
        time.sleep(0.5)  # the pollers are at full rate
        cpu0 = cpu_seconds(proc.pid)
        start = time.perf_counter()
        qmp.execute("block-commit", **{"job-id": "j", "device": "top", "top-node": "mid"})
        latencies = []
        if not clients:  # the commit alone, for reference
            qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=1800)
        while clients and not any(e["event"] == "BLOCK_JOB_COMPLETED" for e in qmp.events):
            t0 = time.perf_counter()
            qmp.execute("query-block-jobs")
            latencies.append(time.perf_counter() - t0)
        row["commit_s"] = time.perf_counter() - start
        row["cpu_s"] = cpu_seconds(proc.pid) - cpu0
        [done] = [e for e in qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"]
        row["error"] = done["data"].get("error")
        stop.set()
        latencies += [x for pipe in pipes for x in pipe.recv()]
        row["polls_per_s"] = len(latencies) / row["commit_s"]
        ms = sorted(x * 1000 for x in latencies) or [float("nan")]
        row["p50_ms"] = statistics.median(ms)
        row["p99_ms"] = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        row["rss_mib"] = peak_rss_mib(proc.pid)
        qmp.execute("quit")
        proc.wait(60)
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    row["verified"] = (
        row["error"] is None
        and image_clean(d / "base.qcow2")
        and image_clean(d / "top.qcow2")
        and images_equal(d / "top.qcow2", golden / "top.qcow2")
    )
    shutil.rmtree(d)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--fill", type=float, default=1.0, help="share of mid that holds data")
    parser.add_argument(
        "--clients", default="1,64", help="polling client counts, comma-separated (0: no polling)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="qmp-polling-", dir=args.workdir) as tmp:
        work = Path(tmp)
        golden = work / "golden"
        golden.mkdir()
        data = build(golden, args.size, args.fill)
        for i in range(args.runs):
            for clients in counts:
                for name in sorted(CONTENDERS, reverse=i % 2 == 1):
                    row = measure(name, golden, work, clients)
                    print(f"# run {i + 1} {name} {clients} clients: "
                          f"commit {row['commit_s']:.2f} s, cpu {row['cpu_s']:.2f} s, "
                          f"{row['polls_per_s']:.0f} polls/s",
                          flush=True)  # fmt: skip
                    rows.setdefault((name, clients), []).append(row)
    print(f"# commit of mid ({data // MiB} MiB of data, {args.size // MiB} MiB virtual) "
          f"into base while clients poll query-block-jobs; {os.cpu_count()} CPUs; median of "
          f"{args.runs} runs (min-max), the daemons taking turns going first")  # fmt: skip
    print(f"{'daemon':7} {'clients':>7} {'commit s':>17} {'MB/s':>7} {'cpu s':>6} "
          f"{'polls/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'RSS MiB':>8} {'verified':>8}")  # fmt: skip
    for (name, clients), runs in rows.items():
        secs = sorted(float(r["commit_s"]) for r in runs)
        med = {k: statistics.median(float(r[k]) for r in runs)
               for k in ("commit_s", "cpu_s", "polls_per_s", "p50_ms")}  # fmt: skip
        print(f"{name:7} {clients:7d} {med['commit_s']:5.2f} ({secs[0]:.2f}-{secs[-1]:.2f}) "
              f"{data / med['commit_s'] / 1e6:7.0f} {med['cpu_s']:6.2f} {med['polls_per_s']:8.0f} "
              f"{med['p50_ms']:7.2f} {max(r['p99_ms'] for r in runs):7.2f} "
              f"{max(r['rss_mib'] for r in runs):8.1f} "
              f"{'yes' if all(r['verified'] for r in runs) else 'NO':>8}")  # fmt: skip

    def ratio(c: int) -> str:
        qsd = statistics.median(r["commit_s"] for r in rows["qsd", c])
        blockd = statistics.median(r["commit_s"] for r in rows["blockd", c])
        return f"{c} client{'' if c == 1 else 's'} {qsd / blockd:.2f}x"

    print(f"commit speed blockd/QSD while polling: {', '.join(ratio(c) for c in counts)}")
    return 0 if all(r["verified"] for runs in rows.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
