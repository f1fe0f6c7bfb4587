#!/usr/bin/env python3
"""Commit of a huge, sparsely written image: blockd beside qemu-storage-daemon (issue 15).

For each virtual size: base <- mid <- top, all of that size; mid holds
--writes scattered 4 KiB writes (made with qemu-io, seeded), base and top
nothing.  Mid is committed into base (block-commit, top-node mid, base-node
base, device top) by each daemon in turn, --runs times, each run on a fresh
copy and verified with qemu-img (top's guest view unchanged, base reads as
mid did, every image clean).  Reported: seconds from block-commit until the
nodes are closed, the daemon's CPU time over that span, its peak RSS, and
for blockd the number of L2 tables it read from disk (its debug log).
The last line gives, per size, blockd's speed relative to QSD.

    .venv/bin/python bench/commit_sparse.py [--sizes 256G,1T,4T] [--writes 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from pathlib import Path

from commit_compare import compare, qemu_io_writes, summary
from common import GiB, KiB, tool

CHAIN = ["base", "mid", "top"]


def size_arg(text: str) -> int:
    units = {"G": GiB, "T": 1024 * GiB}
    return int(text[:-1]) * units[text[-1].upper()]


def build(golden: Path, size: int, writes: int) -> None:
    golden.mkdir()
    below = None
    for stem in CHAIN:
        backing = ["-b", f"{below}.qcow2", "-F", "qcow2"] if below else []
        tool("qemu-img", "create", "-q", "-f", "qcow2", *backing, str(golden / f"{stem}.qcow2"),
             str(size))  # fmt: skip
        below = stem
    rng = random.Random(size)
    offsets = sorted(rng.sample(range(size // (4 * KiB)), writes))
    qemu_io_writes(golden / "mid.qcow2", [(o * 4 * KiB, 4 * KiB) for o in offsets], seed=1)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sizes", default="256G,1T,4T")
    p.add_argument("--writes", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    args = p.parse_args()
    lines = [f"# load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory(prefix="commit-sparse-", dir=args.workdir) as tmp:
        for label in args.sizes.split(","):
            golden = Path(tmp) / "golden"
            build(golden, size_arg(label), args.writes)
            print(f"{label}: {args.writes} writes of 4 KiB in mid; commit it", flush=True)
            samples = compare(golden, Path(tmp), CHAIN, "mid", "base", args.runs)
            lines.append(summary(f"{label} x{args.runs}", samples))
            shutil.rmtree(golden)
    print(f"# load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(" || ".join(lines[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
