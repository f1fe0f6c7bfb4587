#!/usr/bin/env python3
"""Where blockd's CPU goes per QMP command: framing, validation, dispatch, handler, encoding.

Runs blockd under cProfile (its main thread: the event loop; thread CPU time) with the
5-image chain of qmp_throughput.py open, sends --count round trips of one
command at a time from a raw socket client, and prints each step's CPU time
per command: the cumulative time of the function that does the step, over
the commands sent.  cProfile inflates code made of many small calls more than
other code, so compare the steps of two versions, not these figures with
un-profiled ones (qmp_throughput.py's "CPU us/cmd").

    .venv/bin/python bench/profile_qmp.py [--count 2000] [--top 25]
"""

from __future__ import annotations

import argparse
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT
from qmp_client import QMP
from qmp_throughput import COMMANDS, build_chain, node_args

#: blockd's main under cProfile timed by the thread's own CPU clock, so that
#: time waiting in the event loop (or for the CPU on a loaded machine) does
#: not count.
RUNNER = """
import cProfile, sys, time
from blockd.cli import main
out, sock = sys.argv[1:3]
sys.argv = ["blockd", "--socket", sock]
profiler = cProfile.Profile(time.thread_time)
try:
    profiler.runcall(main)
except SystemExit:
    pass
profiler.dump_stats(out)
"""

#: Steps of one command, each the function (path suffix, name) whose
#: cumulative time is the step's cost.
STEPS = (
    ("framing + envelope", "qmp/protocol.py", "receive_data"),
    ("  envelope", "qmp/protocol.py", "_envelope"),
    ("dispatch (all below)", "qmp/dispatch.py", "execute"),
    ("  validation", "qmp/schema.py", "check_arguments"),
    ("  handler", "commands/", "HANDLER"),
    ("  encoding (reply)", "qmp/protocol.py", "reply"),
    ("socket write", "qmp/server.py", "_write"),
)


def profile(command: str, d: Path, count: int, top: int) -> dict[str, float]:
    out = d / f"{command}.prof"
    sock = d / "qmp.sock"
    sock.unlink(missing_ok=True)
    argv = [str(ROOT / ".venv/bin/python"), "-c", RUNNER, str(out), str(sock)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not sock.exists():
        if proc.poll() is not None:
            raise SystemExit("blockd did not start")
        time.sleep(0.02)
    qmp = QMP(sock)
    for args in node_args([d / f"n{i}.qcow2" for i in range(5)]):
        qmp.execute("blockdev-add", **args)
    for _ in range(count):
        qmp.execute(command)
    qmp.execute("quit")
    proc.wait(60)
    stats = pstats.Stats(str(out))
    handler = command.replace("-", "_")
    costs: dict[str, float] = {}
    raw = stats.stats  # type: ignore[attr-defined]
    for label, path, name in STEPS:
        name = handler if name == "HANDLER" else name
        costs[label] = sum(
            ct for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items()
            if file.endswith(path) or (path.endswith("/") and path in file)
            if func == name
        ) / count * 1e6  # fmt: skip
    costs["main thread, all CPU"] = stats.total_tt / count * 1e6  # type: ignore[attr-defined]
    if top:
        print(f"--- {command}: top {top} by internal time")
        stats.sort_stats("tottime").print_stats(top)
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--top", type=int, default=0, help="also print the top N functions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-qmp-") as tmp:
        d = Path(tmp)
        build_chain(d)
        table = {command: profile(command, d, args.count, args.top) for command in COMMANDS}
    print(f"# cProfile, blockd main thread, CPU us per command ({args.count} commands)")
    print(f"{'step':24}" + "".join(f"{c:>26}" for c in COMMANDS))
    for label in table[COMMANDS[0]]:
        print(f"{label:24}" + "".join(f"{table[c][label]:26.1f}" for c in COMMANDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
