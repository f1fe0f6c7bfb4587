#!/usr/bin/env python3
"""Commit through a deep backing chain: blockd beside qemu-storage-daemon (issue 15).

img0 <- img1 <- ... <- img47, each --virtual bytes; every image from img1 on
holds 2 MiB of its own: 32 writes of 64 KiB at seeded, scattered places
(qemu-io), so the layers overlap here and there.  img46 is committed into
img0 (device img47) by each daemon in turn, --runs times, each run on a
fresh copy and verified with qemu-img (img47's guest view unchanged, img0
reads as img46 did, every image left clean).  Reported as in
bench/commit_sparse.py; the last line gives blockd's speed relative to QSD.

    .venv/bin/python bench/commit_chain.py [--images 48] [--virtual 1G] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

from commit_compare import compare, qemu_io_writes, summary
from common import KiB, MiB, parse_size, tool


def build(golden: Path, images: int, size: int) -> list[str]:
    golden.mkdir()
    chain = [f"img{i}" for i in range(images)]
    rng = random.Random(48)
    for i, stem in enumerate(chain):
        backing = ["-b", f"{chain[i - 1]}.qcow2", "-F", "qcow2"] if i else []
        tool("qemu-img", "create", "-q", "-f", "qcow2", *backing, str(golden / f"{stem}.qcow2"),
             str(size))  # fmt: skip
        if i:
            slots = sorted(rng.sample(range(size // (64 * KiB)), 2 * MiB // (64 * KiB)))
            qemu_io_writes(golden / f"{stem}.qcow2", [(s * 64 * KiB, 64 * KiB) for s in slots], i)
    return chain


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--virtual", type=parse_size, default=1024 * MiB)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    args = p.parse_args()
    print(f"# load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="commit-chain-", dir=args.workdir) as tmp:
        chain = build(Path(tmp) / "golden", args.images, args.virtual)
        top, base = chain[-2], chain[0]
        print(f"{args.images} images x 2 MiB; commit {top} into {base}", flush=True)
        samples = compare(Path(tmp) / "golden", Path(tmp), chain, top, base, args.runs)
    print(f"# load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(summary(f"{args.images} images x{args.runs}", samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
