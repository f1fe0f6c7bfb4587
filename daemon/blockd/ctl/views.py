"""What the listing sub-commands print: tables and trees made with rich.

On a terminal they have colour and box lines; through a pipe rich writes no
escape codes, and the console is made wide enough that rows never wrap, so
``grep``/``awk`` see one row per line.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from blockd.ctl.graph import Node
from blockd.ctl.units import human_rate, human_size

#: Width of the console when stdout is not a terminal: rows stay on one line.
PIPE_WIDTH = 1000


def console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(file=stream, highlight=False)
    return Console(file=stream, width=PIPE_WIDTH, highlight=False, no_color=True)


def _size(value: int | None) -> str:
    return "-" if value is None else human_size(value)


def _table(con: Console, *headers: str) -> Table:
    return Table(
        *headers,
        box=box.SIMPLE_HEAD if con.is_terminal else None,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if con.is_terminal else "",
    )


def _row(table: Table, *cells: str) -> None:
    """Cells as plain text: a node or file name holding ``[`` is not rich markup."""
    table.add_row(*(Text(cell) for cell in cells))


def nodes_table(con: Console, nodes: Sequence[Node]) -> Table:
    table = _table(con, "node", "driver", "file", "backing", "size", "allocated", "read-only",
                   "users")
    for node in nodes:
        _row(
            table,
            node.name,
            node.driver,
            node.file,
            node.backing or "-",
            _size(node.size),
            _size(node.allocated),
            "yes" if node.read_only else "no",
            ", ".join(node.users) or "-",
        )
    return table


def chain_tree(nodes: Sequence[Node]) -> Tree:
    """The backing chain, top at the root, each layer under the one it backs."""

    def label(node: Node) -> Text:
        mode = "read-only" if node.read_only else "read-write"
        text = Text(node.name, style="bold")
        text.append(
            f" {node.driver} {node.file} "
            f"({_size(node.size)}, {_size(node.allocated)} allocated, {mode})"
        )
        return text

    tree = Tree(label(nodes[0]))
    branch = tree
    for node in nodes[1:]:
        branch = branch.add(label(node))
    last = nodes[-1]
    if last.backing and not last.backing_is_node:
        branch.add(Text(f"{last.backing} (backing file, not open as a node)"))
    return tree


def jobs_table(
    con: Console, block_jobs: Sequence[Mapping[str, Any]], jobs: Sequence[Mapping[str, Any]]
) -> Table:
    """One row per job: ``query-jobs`` has every job, ``query-block-jobs`` the details."""
    details = {str(j.get("device")): j for j in block_jobs}
    table = _table(con, "job", "type", "status", "progress", "done", "speed limit", "error")
    for job in jobs:
        job_id = str(job.get("id"))
        detail = details.get(job_id, {})
        done, total = int(job.get("current-progress", 0)), int(job.get("total-progress", 0))
        percent = f"{100 * done / total:.0f}%" if total else "-"
        speed = int(detail.get("speed", 0))
        _row(
            table,
            job_id,
            str(job.get("type", "")),
            state_text(detail) if detail else str(job.get("status", "")),
            percent,
            f"{human_size(done)} / {human_size(total)}",
            human_rate(speed) if speed else "none",
            str(job.get("error", "")) or "-",
        )
    return table


def state_text(block_job: Mapping[str, Any]) -> str:
    """running / ready / paused, with why it is paused (a person or an I/O error)."""
    status = str(block_job.get("status", ""))
    io_status = str(block_job.get("io-status", "ok"))
    if status in ("paused", "standby"):
        if io_status != "ok":
            return f"{status} (I/O error: {io_status})"
        return f"{status} (by request)"
    return status


def exports_table(con: Console, exports: Sequence[Mapping[str, Any]]) -> Table:
    table = _table(con, "export", "type", "node", "state")
    for export in exports:
        _row(
            table,
            str(export.get("id")),
            str(export.get("type")),
            str(export.get("node-name")),
            "shutting down" if export.get("shutting-down") else "serving",
        )
    return table


def event_line(event: Mapping[str, Any]) -> str:
    """One event as a line: time, name, then its data as key=value."""
    stamp = event.get("timestamp", {})
    seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    when = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    data = event.get("data", {})
    fields = " ".join(f"{key}={value}" for key, value in data.items())
    return f"{when} {event.get('event')} {fields}".rstrip()


def plan_view(con: Console, plan: Mapping[str, Any], base_file: str) -> list[Any]:
    """A commit plan: a summary line, what each layer gives, and what base's file
    grows by, item by item (plain rows through a pipe, for grep and awk)."""
    growth = plan["growth"]
    free = plan.get("free")
    verdict = "fits" if plan["fits"] else "does NOT fit"
    where = f"{human_size(free)} free" if free is not None else "free space unknown"
    bound = " at most" if plan["upper-bound"] else " about"
    change = "grows" if growth["total"] >= 0 else "shrinks"
    summary = Text(
        f"commit {plan['top-node']} into {plan['base-node']} ({base_file}): {change} by{bound} "
        f"{human_size(abs(growth['total']))}, {where}: {verdict}"
    )
    if con.is_terminal:
        summary.stylize("bold green" if plan["fits"] else "bold red")
    layers = _table(con, "layer", "file", "data", "zeros", "runs")
    for layer in plan["layers"]:
        _row(layers, layer["node-name"], layer["filename"], human_size(layer["data"]),
             human_size(layer["zero"]), str(layer["runs"]))  # fmt: skip
    cluster = plan["cluster-size"]
    items = _table(con, "base", "bytes", "size")
    new = sum(growth[k] for k in ("data", "l2-tables", "refcount-blocks", "refcount-table",
                                  "l1-table"))  # fmt: skip
    clusters = f" ({plan['clusters']} clusters of {human_size(cluster)})" if cluster else ""
    for label, value, note in (
        ("data", growth["data"], clusters),
        ("l2-tables", growth["l2-tables"], ""),
        ("refcount-blocks", growth["refcount-blocks"], ""),
        ("refcount-table", growth["refcount-table"], ""),
        ("l1-table", growth["l1-table"], ""),
        ("reused", -growth["reused"], " (free clusters inside the file)"),
        ("freed", growth["total"] - new + growth["reused"],
         " (punched out, less punched holes filled)"),
        ("growth", growth["total"], ""),
        ("peak", growth["peak"], " (the most at any moment)"),
        ("margin", plan["margin"], " (1% + one cluster)"),
        ("virtual-growth", plan["virtual-growth"], ""),
        ("free", free, ""),
    ):
        if value is not None:
            _row(items, label, str(value), human_size(value) + note)
    return [summary, layers, items]
