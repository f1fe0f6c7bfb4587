#!/usr/bin/env python3
"""Block-layer throughput of blockd's qcow2 driver beside qemu-img convert (issue 3).

  read   a fully allocated qcow2 image is read sequentially through a blockd
         node (large requests, data discarded); the reference is
         ``qemu-img convert -n -f qcow2 src.qcow2 --target-image-opts driver=null-co``
  write  a qcow2 image made by ``qemu-img create`` is written sequentially
         through a blockd node with the content of a raw file (read through a
         blockd raw node); the reference is
         ``qemu-img convert -f raw -O qcow2 src.raw dst.qcow2``.  Both results
         are fsynced before the clock stops, checked with ``qemu-img check``
         and compared with the source by ``qemu-img compare``.

Page cache warm (the source is read once before timing).  MB/s = 10^6 B/s.

usage: PYTHONPATH=daemon python bench/block_bench.py [--size 1G] [--request 8M] [--depth 4]
       [--read-depth CPUS]
       [--cluster-size 64K] [--runs 1] [--workdir /tmp] [--keep]
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

import trio
from common import GiB, KiB, MiB, make_source, parse_size, tool

from blockd.block.graph import BlockGraph
from blockd.block.open import open_node


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)





async def blockd_read(image: str, request: int, depth: int) -> int:
    graph = BlockGraph()
    node = await open_node(graph, {"driver": "qcow2", "read-only": True,
                                   "file": {"driver": "file", "filename": image}})
    total = 0
    offsets = iter(range(0, node.size, request))

    async def worker() -> None:  # sequential requests, ``depth`` in flight
        nonlocal total
        buf = memoryview(bytearray(request))  # one buffer per worker, reused
        for off in offsets:
            n = min(request, node.size - off)
            await node.readinto(off, buf[:n])
            total += n

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(depth):
                nursery.start_soon(worker)
    finally:
        await graph.close_all()
    return total


async def blockd_write(raw: str, image: str, request: int, depth: int) -> None:
    graph = BlockGraph()
    src = await open_node(graph, {"driver": "raw", "read-only": True,
                                  "file": {"driver": "file", "filename": raw}})
    dst = await open_node(graph, {"driver": "qcow2",
                                  "file": {"driver": "file", "filename": image}})
    try:
        size = src.size
        offsets = iter(range(0, size, request))

        async def worker() -> None:  # sequential requests, ``depth`` in flight
            for off in offsets:
                await dst.write(off, await src.read(off, min(request, size - off)))

        async with trio.open_nursery() as nursery:
            for _ in range(depth):
                nursery.start_soon(worker)
        await dst.flush()
    finally:
        await graph.close_all()


def timed(fn: object, *args: object) -> float:
    t = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - t


def verify(image: str, raw: str) -> bool:
    check = subprocess.run(["qemu-img", "check", "--output=json", image],
                           capture_output=True, text=True, check=False)
    result = json.loads(check.stdout or "{}")
    clean = check.returncode == 0 and not any(
        result.get(k, 0) for k in ("corruptions", "leaks", "check-errors"))
    same = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", image, raw],
                          capture_output=True, check=False).returncode == 0
    return clean and same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=GiB)
    p.add_argument("--request", type=parse_size, default=8 * MiB)
    p.add_argument("--cluster-size", type=parse_size, default=64 * KiB)
    p.add_argument("--depth", type=int, default=4,
                   help="blockd write requests in flight (qemu-img convert uses 8)")
    p.add_argument("--read-depth", type=int, default=os.cpu_count() or 2,
                   help="blockd read requests in flight (default: one per CPU; more only "
                        "adds contention for the interpreter lock)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    size, cs = args.size, args.cluster_size
    work = tempfile.mkdtemp(prefix="block-bench-", dir=args.workdir)
    raw = os.path.join(work, "src.raw")
    src = os.path.join(work, "src.qcow2")
    dst = os.path.join(work, "dst.qcow2")
    results: dict[str, list[float]] = {k: [] for k in
                                       ("read qemu-img", "read blockd",
                                        "write qemu-img", "write blockd")}
    ok = True
    try:
        make_source(raw, size, b"blkbench")
        tool("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
             "-o", f"cluster_size={cs}", raw, src)
        for path in (raw, src):
            fsync(path)
            with open(path, "rb") as f:  # warm the page cache
                while f.read(8 * MiB):
                    pass
        print(f"# size {size >> 20} MiB, cluster {cs >> 10} KiB, request {args.request >> 20} MiB,"
              f" read depth {args.read_depth}, write depth {args.depth},"
              f" {os.cpu_count()} CPUs, {tool('qemu-img', '--version').stdout.splitlines()[0]}")
        for run in range(1, args.runs + 1):
            t = timed(tool, "qemu-img", "convert", "-n", "-f", "qcow2", src,
                      "--target-image-opts", f"driver=null-co,size={size}")
            results["read qemu-img"].append(t)
            t0 = time.perf_counter()
            got = trio.run(blockd_read, src, args.request, args.read_depth)
            results["read blockd"].append(time.perf_counter() - t0)
            ok &= got == size

            for who in ("qemu-img", "blockd"):
                if os.path.exists(dst):
                    os.unlink(dst)
                os.sync()
                t0 = time.perf_counter()
                if who == "qemu-img":
                    tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                         "-o", f"cluster_size={cs}", raw, dst)
                else:
                    tool("qemu-img", "create", "-q", "-f", "qcow2",
                         "-o", f"cluster_size={cs}", dst, str(size))
                    trio.run(blockd_write, raw, dst, args.request, args.depth)
                fsync(dst)
                results[f"write {who}"].append(time.perf_counter() - t0)
                good = verify(dst, raw)
                ok &= good
                print(f"run {run}: write {who:8} {results[f'write {who}'][-1]:.3f} s,"
                      f" verified: {'yes' if good else 'NO'}")
            print(f"run {run}: read  qemu-img {results['read qemu-img'][-1]:.3f} s,"
                  f" blockd {results['read blockd'][-1]:.3f} s")
    finally:
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'case':16} {'seconds':>8} {'MB/s':>8} {'x qemu-img':>10}")
    for op in ("read", "write"):
        ref = statistics.median(results[f"{op} qemu-img"])
        for who in ("qemu-img", "blockd"):
            t = statistics.median(results[f"{op} {who}"])
            print(f"{op + ' ' + who:16} {t:8.3f} {size / t / 1e6:8.1f} {ref / t:10.2f}")
    print("verified" if ok else "VERIFICATION FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
