#!/usr/bin/env python3
"""How fast blockd answers QMP while a commit copies at full speed.

Builds base <- mid <- top (mid holds --fill of --size), starts an unthrottled
intermediate commit of mid (with --active: an active commit of top and mid,
timed until READY), and times query-block-jobs round trips meanwhile.
Prints the latency distribution and the job's throughput.

    .venv/bin/python bench/qmp_latency.py [--size 1G] [--fill 0.5] [--active]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qmp_client import QMP

MiB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--fill", type=float, default=0.5)
    parser.add_argument("--active", action="store_true", help="commit the active layer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blockd-lat-") as scratch:
        d = Path(scratch)
        qemu_img("create", "-f", "qcow2", str(d / "base.qcow2"), args.size)
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "mid.qcow2"))
        qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
        size = int(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(d / "mid.qcow2")],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.split('"virtual-size": ')[1]
            .split(",")[0]
        )
        data = int(size * args.fill) // MiB * MiB
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data}", str(d / "mid.qcow2")],
            check=True,
            capture_output=True,
        )
        sock = d / "qmp.sock"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "blockd", "--socket", str(sock)], stderr=subprocess.DEVNULL
        )
        try:
            while not sock.exists():
                time.sleep(0.01)
            client = QMP(sock)
            for name, backing, ro in (
                ("base", None, True),
                ("mid", "base", True),
                ("top", "mid", False),
            ):
                client.execute(
                    "blockdev-add",
                    driver="qcow2",
                    backing=backing,
                    file={"driver": "file", "filename": str(d / f"{name}.qcow2")},
                    **{"node-name": name, "read-only": ro},
                )
            start = time.monotonic()
            top = {} if args.active else {"top-node": "mid"}
            client.execute("block-commit", **{"job-id": "j", "device": "top", **top})
            latencies = []
            while True:
                t0 = time.monotonic()
                reply = client.execute("query-block-jobs")
                latencies.append(time.monotonic() - t0)
                if not reply or reply[0]["ready"]:
                    break
                time.sleep(0.005)
            elapsed = time.monotonic() - start
            client.execute("quit")
        finally:
            daemon.wait(timeout=30)
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    print(f"commit of {data / MiB:.0f} MiB: {elapsed:.2f} s ({data / elapsed / 1e6:.0f} MB/s)")
    print(
        f"query-block-jobs during the job: n={len(ms)} median={statistics.median(ms):.2f} ms "
        f"p99={ms[int(len(ms) * 0.99) - 1]:.2f} ms max={ms[-1]:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
