#!/usr/bin/env python3
"""Does a base grow over repeated commits?  blockd beside qemu-storage-daemon.

For each daemon in turn, on its own copy of one base: --rounds times, an
overlay is made on base with qemu-img, --write bytes of random data are
written into it at the same guest range (and, every other round, --zero
bytes of that range zeroed, so base has clusters to give back), and the
overlay is committed into base through the daemon (block-commit of the
active layer, then block-job-complete; with --intermediate, of the overlay
below an empty active layer).  After each round: base's allocated
size (du) and its file size.  Finally qemu-img check must find base clean
and both daemons' bases must read the same.

    .venv/bin/python bench/commit_growth.py [--rounds 20] [--write 4M] [--zero 1M]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MiB, parse_size, tool
from qmp_client import QMP

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256 * MiB  # virtual size of base
OFFSET = 16 * MiB  # where every round writes


def start(name: str, sock: Path) -> subprocess.Popen[bytes]:
    if name == "blockd":
        argv = [str(ROOT / ".venv/bin/blockd"), "--socket", str(sock)]
    else:
        argv = ["qemu-storage-daemon", "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                "--monitor", "chardev=m"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not start")
        time.sleep(0.02)
    return proc


def fill_overlay(top: Path, data: Path, round_no: int, write: int, zero: int) -> None:
    rng = random.Random(round_no)
    data.write_bytes(rng.randbytes(write))
    commands = ["-c", f"write -s {data} {OFFSET} {write}"]
    if zero and round_no % 2:
        commands += ["-c", f"write -z {OFFSET} {zero}"]
    tool("qemu-io", "-f", "qcow2", *commands, str(top))


def commit_round(qmp: QMP, base: Path, top: Path, discard: str, active: Path | None) -> None:
    """Commit ``top`` into base: as the active layer, or (``active`` given: an
    empty overlay on top) as an intermediate image."""
    layers = [("base", base, None, True), ("top", top, "base", active is not None)]
    if active is not None:
        layers.append(("active", active, "top", False))
    for node, path, backing, ro in layers:
        file = {"driver": "file", "filename": str(path)}
        qmp.execute("blockdev-add", driver="qcow2", **{"node-name": node, "read-only": ro},
                    backing=backing, discard=discard, file=file)  # fmt: skip
    if active is None:
        qmp.execute("block-commit", **{"job-id": "j", "device": "top"})
        qmp.wait_event("BLOCK_JOB_READY", timeout=120)
        qmp.execute("block-job-complete", device="j")
    else:
        qmp.execute("block-commit", **{"job-id": "j", "device": "active", "top-node": "top"})
    qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120)
    for node, *_rest in reversed(layers):
        qmp.execute("blockdev-del", **{"node-name": node})
    qmp.events.clear()


def measure(
    name: str, work: Path, rounds: int, write: int, zero: int, discard: str, intermediate: bool
) -> list[tuple[int, int]]:
    d = work / name
    d.mkdir()
    base = d / "base.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
    proc = start(name, d / "qmp.sock")
    sizes: list[tuple[int, int]] = []
    try:
        qmp = QMP(d / "qmp.sock")
        for r in range(rounds):
            top = d / f"top{r}.qcow2"
            tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 str(top))  # fmt: skip
            fill_overlay(top, d / "data.bin", r, write, zero)
            active = None
            if intermediate:
                active = d / f"active{r}.qcow2"
                tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", top.name, "-F", "qcow2",
                     str(active))  # fmt: skip
            commit_round(qmp, base, top, discard, active)
            top.unlink()
            if active is not None:
                active.unlink()
            st = os.stat(base)
            sizes.append((st.st_blocks * 512, st.st_size))
    finally:
        proc.terminate()
        proc.wait(30)
    check = subprocess.run(["qemu-img", "check", str(base)], capture_output=True, text=True,
                           check=False)  # fmt: skip
    if check.returncode != 0:
        raise SystemExit(f"{name}: base is not clean: {check.stdout}{check.stderr}")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--write", type=parse_size, default=4 * MiB)
    parser.add_argument("--zero", type=parse_size, default=MiB)
    parser.add_argument("--discard", choices=("unmap", "ignore"), default="unmap",
                        help="the nodes' discard option (QEMU frees zeroed clusters with unmap)")
    parser.add_argument("--intermediate", action="store_true",
                        help="commit the overlay as an intermediate image (below an empty one)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        results = {n: measure(n, work, args.rounds, args.write, args.zero, args.discard,
                              args.intermediate)
                   for n in ("blockd", "qsd")}  # fmt: skip
        same = subprocess.run(["qemu-img", "compare", str(work / "blockd/base.qcow2"),
                               str(work / "qsd/base.qcow2")], capture_output=True, check=False)
    print(f"base {SIZE // MiB} MiB; each round writes {args.write / MiB:g} MiB at "
          f"{OFFSET // MiB} MiB, odd rounds then zero its first {args.zero / MiB:g} MiB; "
          f"discard={args.discard}; {'intermediate' if args.intermediate else 'active'} commit")
    print("round | blockd du MiB | blockd file MiB | qsd du MiB | qsd file MiB")
    for r in range(args.rounds):
        (bd, bf), (qd, qf) = results["blockd"][r], results["qsd"][r]
        print(f"{r + 1:5} | {bd / MiB:13.2f} | {bf / MiB:15.2f} | "
              f"{qd / MiB:10.2f} | {qf / MiB:12.2f}")
    print("bases read the same" if same.returncode == 0 else "BASES DIFFER")
    return 0 if same.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
