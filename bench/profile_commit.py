#!/usr/bin/env python3
"""Profile an in-process commit of mid into base (chain built like commit_bench.py).

usage: PYTHONPATH=daemon python bench/profile_commit.py [--size 1G] [--profile] [--keep DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import trio

from blockd.block.graph import BlockGraph
from blockd.block.open import open_node
from blockd.jobs.commit import CommitJob, plan_commit

BENCH = "/work/shared/bench/commit_bench.py"


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("commit_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["commit_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


class _Sink:
    def emit(self, event: Any) -> None:
        pass


async def _commit(directory: str) -> float:
    graph = BlockGraph()
    top = os.path.join(directory, "top.qcow2")
    await open_node(graph, {"driver": "qcow2", "node-name": "top",
                            "file": {"driver": "file", "filename": top}})
    plan = plan_commit(graph, device="top", top_node=[n.node_name for n in graph.chain(
        graph.get("top"))][1], base_node=None)
    job = CommitJob("j", _Sink(), graph, plan)  # type: ignore[arg-type]
    await job.setup()
    t0 = time.perf_counter()
    await job.run()
    t1 = time.perf_counter()
    await plan.base.flush()
    dt = time.perf_counter() - t0
    print(f"run {t1 - t0:.3f} s, flush {dt - (t1 - t0):.3f} s")
    await job.clean()
    await graph.close_all()
    return dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1G")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--dir")
    p.add_argument("--empty-base", action="store_true",
                   help="commit into an empty base (every cluster allocated by the commit)")
    args = p.parse_args()
    bench = _load_bench()
    size = bench.parse_size(args.size)
    layout = bench.make_layout(size, 0.5, 64 * 1024)
    pristine = args.dir or tempfile.mkdtemp(prefix="profile-commit-")
    os.makedirs(pristine, exist_ok=True)
    if not os.path.exists(os.path.join(pristine, "top.qcow2")):
        bench.build_chain(pristine, layout)
    work = tempfile.mkdtemp(prefix="profile-commit-run-")
    try:
        for name in ("base", "mid", "top"):
            shutil.copy(os.path.join(pristine, f"{name}.qcow2"), work)
        if args.empty_base:
            base = os.path.join(work, "base.qcow2")
            os.unlink(base)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(size)], check=True)
        os.sync()
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
        dt = trio.run(_commit, work)
        if args.profile:
            prof.disable()
            stats = pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime"))
            stats.print_stats(int(os.environ.get("TOP", "25")))
        print(f"commit: {dt:.3f} s, {size // 2 / dt / 1e6:.1f} MB/s (chain in {pristine})")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
