#!/usr/bin/env python3
"""NBD export throughput: blockd beside qemu-storage-daemon, same clients, one run.

Each daemon serves a fresh qcow2 image (``--cluster-size``, ``--size``) as a
writable NBD export on a Unix socket, set up through QMP exactly alike.  The
same client programs then run against both:

  seq write   ``qemu-img convert -n -t writeback`` of a raw source file into
              the export: allocating writes into the fresh image, ending with
              a FLUSH, so the time includes making the data durable.  Checked
              with ``qemu-img compare`` of the source against the export.
  seq read    ``qemu-img convert`` of the export into a null-co target.
  rand read   4 KiB reads at random aligned offsets, ``--depth`` in flight, by
              a libnbd client (the system python3's ``nbd`` module).
  rand write  4 KiB writes the same way, to distinct offsets (so the result
              does not depend on completion order) of the now allocated
              image; the FLUSH that follows is not timed.
  32M read    the whole export in 32 MiB READs (NBD's largest), 4 in flight,
              by libnbd with structured replies; "32M simple" the same with
              simple replies, where each reply is one frame of 32 MiB.

Both images must pass ``qemu-img check`` and read back identical afterwards.
The daemons take turns going first (use an even ``--runs`` for balance).
The daemon is the worktree's blockd (``python -m blockd`` with this
repository's ``daemon`` first on ``PYTHONPATH``).  MB/s = 10^6 B/s.

usage: python bench/nbd_bench.py [--size 1G] [--runs 4] [--ops 50000] [--depth 32]
       [--cluster-size 64K] [--workdir DIR] [--keep] [--keep-caches]

Each daemon's turn starts with the page cache dropped (then the source read
back in), so that what the last turn left there does not decide the result:
that takes root; --keep-caches runs without.
Exit status 0 when every result was verified, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GiB, KiB, MiB, make_source, parse_size, tool
from qmp_client import QMP

REPO = Path(__file__).resolve().parent.parent
DAEMONS = ("qsd", "blockd")
CASES = ("seq write", "seq read", "rand read", "rand write", "32M read", "32M simple")
EXPORT = "disk"

#: The random-I/O client; it runs under the system python3 that has libnbd's
#: bindings.  Completion callbacks retire commands as they finish so the
#: number in flight stays at ``depth``.
RANDOM_CLIENT = r"""
import random, sys, time
import nbd
uri, op, count, depth, seed = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
offsets = [b * 4096 for b in random.Random(seed).sample(range(blocks), count)]
if op == "write":
    rng = random.Random(seed + 1)
    bufs = [nbd.Buffer.from_bytearray(bytearray(rng.randbytes(4096))) for _ in range(64)]
else:
    bufs = [nbd.Buffer(4096) for _ in range(depth)]
failed = []
def retire(err):
    if err.value:
        failed.append(err.value)
    return 1
issue = h.aio_pwrite if op == "write" else h.aio_pread
i = 0
start = time.perf_counter()
while i < count or h.aio_in_flight():
    while i < count and h.aio_in_flight() < depth:
        issue(bufs[i % len(bufs)], offsets[i], completion=retire)
        i += 1
    h.poll(-1)
elapsed = time.perf_counter() - start
if op == "write":
    h.flush()
h.shutdown()
if failed:
    sys.exit(f"{len(failed)} requests failed, first errno {failed[0]}")
print(elapsed)
"""


#: The big-read client: the whole export in 32 MiB READs, 4 in flight; the
#: last argument turns structured replies off.
BIG_READ_CLIENT = r"""
import sys, time
import nbd
uri, structured = sys.argv[1], sys.argv[2] == "1"
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(uri)
assert h.get_structured_replies_negotiated() == structured
size, step, depth = h.get_size(), 32 << 20, 4
bufs = [nbd.Buffer(step) for _ in range(depth)]
failed = []
def retire(err):
    if err.value:
        failed.append(err.value)
    return 1
offset = 0
i = 0
start = time.perf_counter()
while offset < size or h.aio_in_flight():
    while offset < size and h.aio_in_flight() < depth:
        buf = bufs[i % depth] if size - offset >= step else nbd.Buffer(size - offset)
        h.aio_pread(buf, offset, completion=retire)
        offset += step
        i += 1
    h.poll(-1)
elapsed = time.perf_counter() - start
h.shutdown()
if failed:
    sys.exit(f"{len(failed)} requests failed, first errno {failed[0]}")
print(elapsed)
"""


def libnbd_python() -> str:
    """A Python interpreter that can import libnbd's bindings (not always ours)."""
    for candidate in ("/usr/bin/python3", "python3", sys.executable):
        found = shutil.which(candidate)
        if found and subprocess.run([found, "-c", "import nbd"], capture_output=True,
                                    check=False).returncode == 0:
            return found
    raise SystemExit("no python3 with libnbd bindings (python3-libnbd) found")


class Daemon:
    """One daemon process serving ``image`` as export ``disk`` on ``nbd_socket``."""

    def __init__(self, kind: str, work: Path, image: Path) -> None:
        self.qmp_socket = work / f"{kind}-qmp.sock"
        self.nbd_socket = work / f"{kind}-nbd.sock"
        if kind == "qsd":
            argv = ["qemu-storage-daemon", "--chardev",
                    f"socket,path={self.qmp_socket},server=on,wait=off,id=mon0",
                    "--monitor", "chardev=mon0"]
            env = None
        else:
            argv = [sys.executable, "-m", "blockd", "--socket", str(self.qmp_socket),
                    "--log-level", "warning"]
            env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.qmp_socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{kind} did not start")
            time.sleep(0.02)
        self.qmp = QMP(self.qmp_socket)
        self.qmp.execute("blockdev-add", **{
            "driver": "qcow2", "node-name": "n0",
            "file": {"driver": "file", "filename": str(image)}})
        self.qmp.execute("nbd-server-start",
                         addr={"type": "unix", "data": {"path": str(self.nbd_socket)}})
        self.qmp.execute("block-export-add", **{"type": "nbd", "id": "e0", "node-name": "n0",
                                                "name": EXPORT, "writable": True})
        self.uri = f"nbd+unix:///{EXPORT}?socket={self.nbd_socket}"

    def stop(self) -> None:
        self.qmp.execute("quit")
        self.proc.wait(timeout=60)


def timed(*argv: str) -> float:
    t = time.perf_counter()
    tool(*argv)
    return time.perf_counter() - t


def check_image(image: Path) -> bool:
    check = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                           capture_output=True, text=True, check=False)
    result = json.loads(check.stdout or "{}")
    return check.returncode == 0 and not any(
        result.get(k, 0) for k in ("corruptions", "leaks", "check-errors"))


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def run_daemon(kind: str, work: Path, raw: Path, args: argparse.Namespace,
               py: str, seed: int) -> tuple[dict[str, float], bool]:
    """One daemon through every case; (seconds per case, verified)."""
    image = work / f"{kind}.qcow2"
    image.unlink(missing_ok=True)
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={args.cluster_size}",
         str(image), str(args.size))
    os.sync()
    if args.drop_caches:
        # The same page cache for every turn: only the source in it.  Without
        # this, writing into the pages the last turn's deleted image freed
        # is far quicker than into new ones, and the order decides seq write.
        DROP_CACHES.write_text("3\n")
        warm(raw)
    daemon = Daemon(kind, work, image)
    times: dict[str, float] = {}
    try:
        times["seq write"] = timed("qemu-img", "convert", "-n", "-t", "writeback", "-f", "raw",
                                   "-O", "raw", str(raw), daemon.uri)
        ok = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                             str(raw), daemon.uri], check=False).returncode == 0
        times["seq read"] = timed("qemu-img", "convert", "-n", "-f", "raw", daemon.uri,
                                  "--target-image-opts", f"driver=null-co,size={args.size}")
        for op in ("read", "write"):
            out = tool(py, "-c", RANDOM_CLIENT, daemon.uri, op, str(args.ops),
                       str(args.depth), str(seed)).stdout
            times[f"rand {op}"] = float(out)
        for case, structured in (("32M read", "1"), ("32M simple", "0")):
            times[case] = float(tool(py, "-c", BIG_READ_CLIENT, daemon.uri, structured).stdout)
    finally:
        daemon.stop()
    return times, ok and check_image(image)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=GiB)
    p.add_argument("--cluster-size", type=parse_size, default=64 * KiB)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--ops", type=int, default=50000, help="4 KiB requests per random case")
    p.add_argument("--depth", type=int, default=32, help="random requests in flight")
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true")
    p.add_argument("--keep-caches", dest="drop_caches", action="store_false",
                   help="do not drop the page cache before each turn (it takes root)")
    args = p.parse_args()
    if args.drop_caches and not os.access(DROP_CACHES, os.W_OK):
        raise SystemExit(f"nbd_bench: cannot write {DROP_CACHES} (run as root, or --keep-caches)")
    args.ops = min(args.ops, args.size // (4 * KiB))
    py = libnbd_python()
    work = Path(tempfile.mkdtemp(prefix="nbd-bench-", dir=args.workdir))
    raw = work / "src.raw"
    results: dict[tuple[str, str], list[float]] = {(d, c): [] for d in DAEMONS for c in CASES}
    ok = True
    try:
        make_source(str(raw), args.size, b"nbdbench")
        warm(raw)
        print(f"# size {args.size >> 20} MiB, cluster {args.cluster_size >> 10} KiB,"
              f" random: {args.ops} x 4 KiB, depth {args.depth}, {os.cpu_count()} CPUs,"
              f" {tool('qemu-img', '--version').stdout.splitlines()[0]},"
              f" page cache {'dropped before each turn' if args.drop_caches else 'kept'}")
        for run in range(1, args.runs + 1):
            # whoever goes second finds the page cache fuller and the disk
            # still busy with the first one's data: take turns
            for kind in DAEMONS if run % 2 else DAEMONS[::-1]:
                times, good = run_daemon(kind, work, raw, args, py, seed=run)
                ok &= good
                for case, t in times.items():
                    results[kind, case].append(t)
                print(f"run {run}: {kind:6} " + ", ".join(
                    f"{c} {t:.3f} s" for c, t in times.items())
                    + f"; verified: {'yes' if good else 'NO'}")
            same = subprocess.run(["qemu-img", "compare", "-q", str(work / "qsd.qcow2"),
                                   str(work / "blockd.qcow2")], check=False).returncode == 0
            ok &= same
            if not same:
                print(f"run {run}: the two images differ")
    finally:
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'case':18} {'seconds':>8} {'MB/s':>8} {'IOPS':>8} {'blockd/qsd':>10}")
    for case in CASES:
        ref = statistics.median(results["qsd", case])
        for kind in DAEMONS:
            t = statistics.median(results[kind, case])
            rate = (f"{args.size / t / 1e6:8.1f} {'':>8}" if not case.startswith("rand")
                    else f"{'':>8} {args.ops / t:8.0f}")
            ratio = f"{ref / t:10.2f}" if kind == "blockd" else ""
            print(f"{case + ' ' + kind:18} {t:8.3f} {rate} {ratio}")
    print("verified" if ok else "VERIFICATION FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
