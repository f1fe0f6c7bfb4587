#!/usr/bin/env python3
"""CPU per step of one QMP command, in-process and without a profiler (issue 15).

Times each step of the per-command path on its own, in CPU time (process
time, so a loaded machine inflates it little): framing a request, framing
plus the envelope check, argument validation, encoding the reply, and the
query-named-block-nodes handler itself on the 5-image chain of
qmp_throughput.py (its event loop and worker-thread hop included).  Run it
against another build to compare, e.g. an older commit's tree:

    PYTHONPATH=daemon .venv/bin/python bench/qmp_steps.py [--count 2000]
    git archive OLD daemon schema | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/daemon .venv/bin/python bench/qmp_steps.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from qmp_throughput import CHAIN, build_chain

from blockd.block.graph import BlockGraph
from blockd.block.open import open_node
from blockd.commands import block as commands
from blockd.commands.context import CommandContext
from blockd.qmp.json_stream import JSONStreamParser
from blockd.qmp.protocol import QMPConnection
from blockd.qmp.schema import load_command_schemas

REQUEST = b'{"execute": "query-block-jobs", "id": "__qmp#00001"}\n'


def cpu_us(fn: Callable[[], object], count: int) -> float:
    t0 = time.process_time()
    for _ in range(count):
        fn()
    return (time.process_time() - t0) / count * 1e6


async def handler(d: Path, count: int) -> tuple[Any, float]:
    """query-named-block-nodes' reply and CPU per call, on the chain in ``d``."""
    graph = BlockGraph()
    for i in range(CHAIN):
        options = {"driver": "qcow2", "node-name": f"n{i}", "read-only": i < CHAIN - 1,
                   "backing": f"n{i - 1}" if i else None,
                   "file": {"driver": "file", "filename": str(d / f"n{i}.qcow2")}}  # fmt: skip
        await open_node(graph, options)
    # the handler reads only the graph
    ctx = CommandContext(events=None, graph=graph, jobs=None, request_shutdown=None,
                         exports=None)  # type: ignore[arg-type]  # fmt: skip
    reply = await commands.query_named_block_nodes(ctx, {})
    t0 = time.process_time()
    for _ in range(count):
        await commands.query_named_block_nodes(ctx, {})
    cost = (time.process_time() - t0) / count * 1e6
    await graph.close_all()
    return reply, cost


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    n = args.count
    with tempfile.TemporaryDirectory(prefix="qmp-steps-") as tmp:
        build_chain(Path(tmp))
        reply, handler_us = trio.run(handler, Path(tmp), max(n // 10, 10))
    schemas = load_command_schemas()
    conn = QMPConnection({"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""})
    conn.enter_command_mode([])
    stream = JSONStreamParser()
    rows = {
        "framing (JSONStreamParser.feed)": cpu_us(lambda: list(stream.feed(REQUEST)), n),
        "framing + envelope (receive_data)": cpu_us(lambda: conn.receive_data(REQUEST), n),
        "validation, query-block-jobs {}": cpu_us(
            lambda: schemas["query-block-jobs"].check_arguments({}), n
        ),
        "validation, query-named-block-nodes {}": cpu_us(
            lambda: schemas["query-named-block-nodes"].check_arguments({}), n
        ),
        "encoding, reply []": cpu_us(lambda: conn.reply("__qmp#00001", []), n),
        "encoding, query-named-block-nodes reply": cpu_us(
            lambda: conn.reply("__qmp#00001", reply), max(n // 10, 10)
        ),
        "handler, query-named-block-nodes": handler_us,
    }
    print(f"# CPU us per call; the named-nodes reply is {len(conn.reply(1, reply))} bytes")
    for label, us in rows.items():
        print(f"{label:42} {us:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
