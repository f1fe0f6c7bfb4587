#!/usr/bin/env python3
"""What NBD clients that stop reading their replies cost: blockd beside qemu-storage-daemon.

Each daemon serves one fully written qcow2 image as an NBD export on a Unix
socket.  Stuck clients (``tests/fuzz/nbd_clients.stuck_reader``) then connect
one after another, each pipelining 1 MiB READs (simple replies, so each reply
carries all its data) until the daemon stops taking its requests, and never
read a reply.  The daemon's RSS (VmRSS, once it stops growing) is taken before
the first client and after each stage; "per client" is the growth divided by
the clients.  After the last stage a well-behaved client reads 16 MiB and its
time is shown: the others must still be served.

usage: python bench/nbd_memory.py [--stages 1,8,64] [--length 1M] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO / "daemon"), *filter(None, [os.environ.get("PYTHONPATH")])]
)

from common import MiB, parse_size  # noqa: E402
from tests.fuzz.nbd_clients import (  # noqa: E402
    close_all,
    connect,
    negotiate,
    receive_exactly,
    request,
    settled_rss,
    stuck_reader,
)
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd  # noqa: E402

SPAN = 64 * MiB


def good_client_seconds(path: Path) -> float:
    """A well-behaved client reads 16 MiB, 1 MiB at a time; how long it took."""
    sock = connect(path, timeout=60)
    negotiate(sock)
    started = time.monotonic()
    for i in range(16):
        sock.sendall(request(0, i * MiB, MiB, handle=i))
        assert receive_exactly(sock, 16)[4:8] == b"\0\0\0\0"
        receive_exactly(sock, MiB)
    took = time.monotonic() - started
    sock.close()
    return took


def measure(which: str, workdir: Path, stages: list[int], length: int) -> list[tuple[int, int]]:
    d = workdir / which
    d.mkdir()
    image = d / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SPAN)], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {SPAN}", str(image)],
        check=True,
        capture_output=True,
    )
    daemon: DaemonProcess = (start_qsd if which == "qsd" else start_blockd)(d / "qmp.sock")
    socks = []
    rows = []
    try:
        with RawQMP(d / "qmp.sock", timeout=60) as qmp:
            qmp.negotiate()
            file = {"driver": "file", "filename": str(image)}
            for command, args in [
                ("blockdev-add", {"driver": "qcow2", "node-name": "d", "file": file}),
                ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "n")}}}),
                ("block-export-add", {"type": "nbd", "id": "e", "node-name": "d", "name": "disk"}),
            ]:
                assert qmp.execute(command, args) == {"return": {}}, command
            good_client_seconds(d / "n")  # warm the page cache and the daemon
            rows.append((0, settled_rss(daemon.proc.pid)))
            for stage in stages:
                while len(socks) < stage:
                    socks.append(stuck_reader(d / "n", SPAN, length))
                rows.append((stage, settled_rss(daemon.proc.pid)))
            took = good_client_seconds(d / "n")
            print(f"{which}: a good client read 16 MiB in {took:.2f} s beside {len(socks)} stuck")
            close_all(socks)
            qmp.execute("quit")
        daemon.wait(60)
    finally:
        close_all(socks)
        daemon.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="1,8,64")
    parser.add_argument("--length", default="1M")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    length = parse_size(args.length)
    with tempfile.TemporaryDirectory(prefix="nbdmem-", dir=args.workdir) as tmp:
        results = {which: measure(which, Path(tmp), stages, length) for which in ("qsd", "blockd")}
    print(f"\nstuck clients pipelining {length // 1024} KiB READs; RSS in MiB (growth per client)")
    print(f"{'clients':>8} {'qsd':>20} {'blockd':>20}")
    for index, (count, _rss) in enumerate(results["qsd"]):
        cells = []
        for which in ("qsd", "blockd"):
            base = results[which][0][1]
            rss = results[which][index][1]
            per = f" ({(rss - base) / count / MiB:5.1f})" if count else ""
            cells.append(f"{rss / MiB:7.1f}{per}")
        print(f"{count:>8} {cells[0]:>20} {cells[1]:>20}")


if __name__ == "__main__":
    main()
