#!/usr/bin/env python3
"""QMP round-trip throughput on an idle daemon, blockd beside qemu-storage-daemon (issue 15).

For each daemon in turn, in one run: a 5-image qcow2 chain (made by qemu-img,
each image holding data of its own) is opened with blockdev-add, then one
client sends --count round trips of ``query-block-jobs`` and then of
``query-named-block-nodes`` (10 nodes: 5 qcow2 and their files, each with its
nested backing-image chain), one at a time, as fast as the replies come.

Printed per daemon and command: round trips per second (wall clock), the
daemon's CPU time per command (user + system from /proc/PID/stat: much less
sensitive to a loaded machine than the wall clock), and the daemon's peak RSS
(VmHWM).  After each daemon stops, every image must pass ``qemu-img check``
and read the same as a copy kept aside (``qemu-img compare``).  The last line
is the throughput ratio blockd / QSD per command (>= 1.0 is the target).

The client is ``qemu.qmp`` (what the issue measured with) by default, or with
--client raw a blocking socket client (bench/qmp_client.py) whose own cost is
smaller; the same client serves both daemons.

    .venv/bin/python bench/qmp_throughput.py [--count 10000] [--client qmp|raw]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    CONTENDERS,
    cpu_seconds,
    image_clean,
    images_equal,
    peak_rss_mib,
    start_daemon,
    tool,
)
from qmp_client import QMP

COMMANDS = ("query-block-jobs", "query-named-block-nodes")
CHAIN = 5
IMAGE_SIZE = 64 << 20


def build_chain(d: Path) -> list[Path]:
    images = [d / f"n{i}.qcow2" for i in range(CHAIN)]
    for i, image in enumerate(images):
        backing = ["-b", images[i - 1].name, "-F", "qcow2"] if i else []
        tool("qemu-img", "create", "-q", "-f", "qcow2", *backing, str(image), str(IMAGE_SIZE))
        tool("qemu-io", "-f", "qcow2", "-c", f"write -P {i + 1} {i << 20} 1M", str(image))
    return images


def node_args(images: list[Path]) -> list[dict[str, Any]]:
    return [
        {
            "driver": "qcow2",
            "node-name": image.stem,
            "read-only": i < len(images) - 1,
            "backing": images[i - 1].stem if i else None,
            "file": {"driver": "file", "filename": str(image)},
        }
        for i, image in enumerate(images)
    ]


Timer = Callable[[str, int], float]


def raw_rounds(sock: Path, nodes: list[dict[str, Any]], run: Callable[[Timer], None]) -> None:
    qmp = QMP(sock)
    for args in nodes:
        qmp.execute("blockdev-add", **args)

    def timed(command: str, count: int) -> float:
        t0 = time.perf_counter()
        for _ in range(count):
            qmp.execute(command)
        return time.perf_counter() - t0

    run(timed)
    qmp.execute("quit")


def qmp_rounds(sock: Path, nodes: list[dict[str, Any]], run: Callable[[Timer], None]) -> None:
    from qemu.qmp import QMPClient

    async def main() -> None:
        qmp = QMPClient("bench")
        await qmp.connect(str(sock))
        for args in nodes:
            await qmp.execute("blockdev-add", args)
        loop = asyncio.get_running_loop()

        def timed(command: str, count: int) -> float:
            async def rounds() -> float:
                t0 = time.perf_counter()
                for _ in range(count):
                    await qmp.execute(command)
                return time.perf_counter() - t0

            # run() is synchronous; the rounds run on this loop in a helper thread's wait
            return asyncio.run_coroutine_threadsafe(rounds(), loop).result()

        await loop.run_in_executor(None, run, timed)
        # the daemon may close the connection before its reply arrives, and
        # qemu.qmp then reports the EOF at the quit or at the disconnect
        with contextlib.suppress(Exception):
            await qmp.execute("quit")
        with contextlib.suppress(EOFError):
            await qmp.disconnect()

    asyncio.run(main())


def measure(name: str, golden: Path, work: Path, client: str, count: int) -> dict[str, Any]:
    d = work / name
    shutil.copytree(golden, d)
    images = [d / f"n{i}.qcow2" for i in range(CHAIN)]
    proc = start_daemon(name, d / "qmp.sock")
    result: dict[str, Any] = {}

    def run(timed: Timer) -> None:
        for command in COMMANDS:
            timed(command, max(count // 20, 50))  # warm up
            cpu0 = cpu_seconds(proc.pid)
            seconds = timed(command, count)
            cpu = cpu_seconds(proc.pid) - cpu0
            result[command] = (count / seconds, cpu / count * 1e6)
        result["rss"] = peak_rss_mib(proc.pid)

    try:
        rounds = raw_rounds if client == "raw" else qmp_rounds
        rounds(d / "qmp.sock", node_args(images), run)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result["verified"] = all(
        image_clean(image) and images_equal(image, golden / image.name) for image in images
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=10000, help="round trips per command")
    parser.add_argument("--client", choices=("qmp", "raw"), default="qmp")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qmp-throughput-", dir=args.workdir) as tmp:
        work = Path(tmp)
        golden = work / "golden"
        golden.mkdir()
        build_chain(golden)
        rows = {name: measure(name, golden, work, args.client, args.count) for name in CONTENDERS}
    print(f"# {args.count} round trips per command, client {args.client}, {CHAIN}-image chain")
    print(f"{'daemon':8} {'command':24} {'round trips/s':>14} {'CPU us/cmd':>11} "
          f"{'peak RSS MiB':>13} {'verified':>9}")  # fmt: skip
    for name, row in rows.items():
        for command in COMMANDS:
            rate, cpu = row[command]
            print(f"{name:8} {command:24} {rate:14.0f} {cpu:11.1f} {row['rss']:13.1f} "
                  f"{'yes' if row['verified'] else 'NO':>9}")  # fmt: skip
    ratios = ", ".join(
        f"{command} {rows['blockd'][command][0] / rows['qsd'][command][0]:.2f}x"
        for command in COMMANDS
    )
    print(f"throughput blockd/QSD: {ratios}")
    return 0 if all(row["verified"] for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
