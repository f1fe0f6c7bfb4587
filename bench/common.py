"""Helpers the benchmarks share: sizes, tools, source data."""

from __future__ import annotations

import random
import struct
import subprocess

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def parse_size(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": GiB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stdout}{proc.stderr}")
    return proc


def make_source(raw: str, size: int, tag: bytes) -> None:
    """Non-zero pseudo-random data, every 4 KiB stamped with ``tag`` and its offset."""
    block = random.Random(1).randbytes(MiB)
    with open(raw, "wb") as f:
        for off in range(0, size, MiB):
            buf = bytearray(block)
            for pos in range(0, MiB, 4 * KiB):
                struct.pack_into("<8sQ", buf, pos, tag, off + pos)
            f.write(buf[: min(MiB, size - off)])
