"""One intermediate commit over QMP, blockd beside qemu-storage-daemon: what
bench/commit_sparse.py and bench/commit_chain.py share.

The chain is built once (``golden``); every run commits a fresh sparse copy
of it, then checks the result with qemu-img: the guest view of the active
image is unchanged, base reads as the committed image read before, and
qemu-img check finds every image left in the chain clean.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import cpu_seconds, image_clean, images_equal, peak_rss_mib, start_daemon, tool
from qmp_client import QMP

#: blockd logs, at debug level, how many L2 tables each qcow2 node read from disk
L2_READS = re.compile(r"qcow2 '[^']*': (\d+) L2 tables read")


def qemu_io_writes(image: Path, writes: list[tuple[int, int]], seed: int) -> None:
    """Write each (offset, length) with a pattern byte, in batches of one qemu-io each."""
    rng = random.Random(seed)
    for i in range(0, len(writes), 2000):
        argv = ["qemu-io", "-f", "qcow2"]
        for off, n in writes[i : i + 2000]:
            argv += ["-c", f"write -q -P {rng.randrange(1, 256)} {off} {n}"]
        tool(*argv, str(image))


@dataclass
class Sample:
    #: block-commit until the nodes are closed (the result durable)
    seconds: float
    #: block-commit until BLOCK_JOB_COMPLETED
    job: float
    cpu: float
    rss_mib: float
    l2_reads: int | None


def commit(name: str, run: Path, chain: list[str], top: str, base: str) -> Sample:
    """Commit ``top`` into ``base`` (node names = file stems) below the active
    image ``chain[-1]``; ``chain`` lists the images bottom up."""
    sock = run / "qmp.sock"
    log = run / "daemon.log"
    extra = ["--log-level", "debug"] if name == "blockd" else []
    proc = start_daemon(name, sock, args=extra, stderr=log)
    try:
        qmp = QMP(sock)
        below = None
        for stem in chain:
            qmp.execute(
                "blockdev-add", driver="qcow2", backing=below,
                **{"node-name": stem, "read-only": stem != chain[-1],
                   "file": {"driver": "file", "filename": str(run / f"{stem}.qcow2")}},
            )  # fmt: skip
            below = stem
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        qmp.execute("block-commit", **{"job-id": "j", "device": chain[-1],
                                       "top-node": top, "base-node": base})  # fmt: skip
        event = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=3600)
        job = time.perf_counter() - t0
        if "error" in event["data"]:
            raise SystemExit(f"{name}: the commit failed: {event['data']}")
        for stem in reversed(chain):
            qmp.execute("blockdev-del", **{"node-name": stem})
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        rss = peak_rss_mib(proc.pid)
        qmp.execute("quit")
    finally:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reads = [int(m) for m in L2_READS.findall(log.read_text())] if name == "blockd" else []
    return Sample(seconds, job, cpu, rss, sum(reads) if reads else None)


def verify(golden: Path, run: Path, chain: list[str], top: str, base: str) -> list[str]:
    """What is wrong with the chain after committing ``top`` into ``base``."""
    problems = []
    active = chain[-1]
    if not images_equal(golden / f"{active}.qcow2", run / f"{active}.qcow2"):
        problems.append(f"the guest view of {active} changed")
    if not images_equal(golden / f"{top}.qcow2", run / f"{base}.qcow2"):
        problems.append(f"{base} does not read as {top} did")
    keep = chain[: chain.index(base) + 1] + chain[chain.index(top) + 1 :]
    problems += [f"qemu-img check: {s} is not clean" for s in keep
                 if not image_clean(run / f"{s}.qcow2")]  # fmt: skip
    above = run / f"{chain[chain.index(top) + 1]}.qcow2"
    info = json.loads(tool("qemu-img", "info", "-U", "--output=json", str(above)).stdout)
    if not info.get("backing-filename", "").endswith(f"/{base}.qcow2"):
        problems.append(f"{chain[chain.index(top) + 1]} is not backed by {base}")
    return problems


def fresh_copy(golden: Path, run: Path, chain: list[str]) -> None:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    for stem in chain:
        tool("cp", "--sparse=always", str(golden / f"{stem}.qcow2"), str(run / f"{stem}.qcow2"))


def compare(
    golden: Path, work: Path, chain: list[str], top: str, base: str, runs: int
) -> dict[str, list[Sample]]:
    """``runs`` rounds of both daemons, each verified; exits 1 on a wrong result."""
    samples: dict[str, list[Sample]] = {"blockd": [], "qsd": []}
    for i in range(runs):
        # the daemons take turns going first, each on images already on disk:
        # the copy's writeback must not run into the commit's own flushes
        for name in sorted(samples, reverse=i % 2 == 1):
            run = work / "run"
            fresh_copy(golden, run, chain)
            os.sync()
            s = commit(name, run, chain, top, base)
            problems = verify(golden, run, chain, top, base)
            if problems:
                print(f"{name} run {i + 1}: WRONG: {'; '.join(problems)}", file=sys.stderr)
                raise SystemExit(1)
            l2 = f", {s.l2_reads} L2 tables read" if s.l2_reads is not None else ""
            print(f"  run {i + 1} {name:6} {s.seconds:8.2f} s (job {s.job:.2f} s)  "
                  f"cpu {s.cpu:7.2f} s  "
                  f"rss {s.rss_mib:5.1f} MiB{l2}  verified", flush=True)  # fmt: skip
            samples[name].append(s)
    shutil.rmtree(work / "run", ignore_errors=True)
    return samples


def summary(label: str, samples: dict[str, list[Sample]]) -> str:
    """One line: medians with their spread (min-max), and blockd's speed relative
    to QSD, until closed and for the job alone."""

    def med(name: str, key: str) -> str:
        values = [getattr(s, key) for s in samples[name]]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    def ratio(key: str) -> str:
        b = statistics.median(getattr(s, key) for s in samples["blockd"])
        q = statistics.median(getattr(s, key) for s in samples["qsd"])
        pairs = zip(samples["blockd"], samples["qsd"], strict=True)
        each = sorted(getattr(qs, key) / getattr(bs, key) for bs, qs in pairs)
        return f"{q / b:.2f}x (runs {each[0]:.2f}-{each[-1]:.2f})"

    l2 = samples["blockd"][0].l2_reads
    return (f"{label}: blockd {med('blockd', 'seconds')} s, job {med('blockd', 'job')} s, "
            f"cpu {med('blockd', 'cpu')} s, rss {max(s.rss_mib for s in samples['blockd']):.1f} "
            f"MiB, L2 read {l2} | qsd {med('qsd', 'seconds')} s, job {med('qsd', 'job')} s, "
            f"cpu {med('qsd', 'cpu')} s | blockd/qsd speed {ratio('seconds')}, "
            f"job alone {ratio('job')}")  # fmt: skip
