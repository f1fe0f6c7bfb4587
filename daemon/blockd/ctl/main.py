"""The ``blockctl`` command line: argument parsing, sub-commands, and the one
place where failures become a line on stderr and an exit status."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from blockd import __version__
from blockd.ctl import graph
from blockd.ctl.client import (
    DEFAULT_SOCKET,
    CtlError,
    Daemon,
    DaemonError,
    quiet_library_logs,
    socket_path,
)
from blockd.ctl.units import human_rate, human_size, parse_rate
from blockd.ctl.views import (
    chain_tree,
    console,
    event_line,
    exports_table,
    jobs_table,
    nodes_table,
    plan_view,
)
from blockd.ctl.watch import Outcome, Watcher

#: Exit status of a command line blockctl does not understand (argparse's).
USAGE = 2

#: blockd's commit plan, a downstream extension (qemu-storage-daemon has none).
PLAN = "__org.blockd_commit-plan"

EPILOG = f"""\
The socket is --socket, else $BLOCKD_SOCKET, else {DEFAULT_SOCKET} (the systemd units').
Rates take binary suffixes: 100M is 100 MiB/s, 0 is no limit.

Exit status: 0 done (or, for an active commit without --pivot, ready),
1 failed (or the daemon refused, or base's file system lacks room, or cannot
be reached), 2 usage error, 3 cancelled, 130 left running after a second Ctrl-C.

Before every commit blockctl asks blockd for the commit plan
(__org.blockd_commit-plan) and refuses when base's file system lacks room
for base's predicted growth; --force commits anyway, --dry-run prints the
plan and starts nothing.  Not yet available: stream (blockd has no
block-stream).
"""


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockctl",
        description="Manage a running blockd: list nodes, jobs and exports, merge snapshots "
        "(block-commit) and watch them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", metavar="PATH", help="blockd's QMP socket")
    parser.add_argument("--version", action="version", version=f"blockctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("nodes", help="the open nodes as a table")
    chain = sub.add_parser("chain", help="a node's backing chain as a tree")
    chain.add_argument("node")
    sub.add_parser("jobs", help="the jobs and their progress")
    sub.add_parser("exports", help="the block exports (NBD)")
    close = sub.add_parser("close", help="close a node nothing uses any more (blockdev-del), "
                           "e.g. a snapshot merged into its base")
    close.add_argument("node")

    commit = sub.add_parser(
        "commit",
        help="merge the images between --top and --base into base",
        description="Commit (merge) a snapshot into its base.  Without --top the active "
        "layer DEVICE itself is committed: the job then keeps base in sync with new writes "
        "until it is completed (--pivot, or `blockctl complete`), which moves DEVICE's users "
        "(exports) onto base.  With --top, the images from --top down to above --base are "
        "merged into base and DEVICE is re-pointed onto base when the job ends.  "
        "The daemon's commit plan is checked first: blockctl refuses (status 1) when base's "
        "file system has less free space than base's predicted growth plus a margin "
        "(1%% and one cluster), unless --force.",
        epilog="As virsh blockcommit --active --wait: without --pivot an active commit's "
        "--wait returns (status 0) once the job is ready and leaves it running in sync.  "
        "The bar's percent, rate and ETA are progress through the job's whole range: parts "
        "no image above base holds are passed over at once, so the rate may exceed --speed.",
    )
    commit.add_argument("device", help="the top node of the chain (the active layer)")
    commit.add_argument("--top", metavar="NODE", help="the highest image to merge "
                        "(default DEVICE itself: an active commit)")
    commit.add_argument("--base", metavar="NODE", help="the image to merge into "
                        "(default the bottom of the chain)")
    commit.add_argument("--speed", metavar="RATE", type=_rate, help="limit, e.g. 100M")
    commit.add_argument("--job-id", metavar="ID", help="default commit-DEVICE")
    commit.add_argument("--wait", action="store_true", help="show progress until the job ends")
    commit.add_argument("--pivot", action="store_true", help="active commit: once ready, "
                        "move DEVICE's users onto base and end the job (implies --wait)")
    commit.add_argument("--dry-run", action="store_true", help="print the commit plan (what "
                        "each layer gives, how much base grows, the free space) and start "
                        "nothing; exit status 1 if the commit would be refused for room")
    commit.add_argument("--force", action="store_true", help="commit even though base's "
                        "file system seems to lack room for it")

    wait = sub.add_parser("wait", help="show a running job's progress until it ends")
    wait.add_argument("job")
    wait.add_argument("--pivot", action="store_true", help="complete the job once ready")

    cancel = sub.add_parser(
        "cancel",
        help="cancel a job",
        description="Cancel a job; the chain stays as it was.  A ready active commit "
        "stops instead, leaving base a consistent copy (as block-job-cancel does); "
        "--force discards it.  A paused job needs --force.",
    )
    cancel.add_argument("job")
    cancel.add_argument("--force", action="store_true")

    speed = sub.add_parser("set-speed", help="change a job's speed limit")
    speed.add_argument("job")
    speed.add_argument("rate", type=_rate, help="e.g. 100M, 0 for no limit")
    for name, text in (
        ("pause", "pause a job"),
        ("resume", "resume a paused job"),
        ("complete", "complete a ready active commit (pivot onto base)"),
    ):
        sub.add_parser(name, help=text).add_argument("job")

    events = sub.add_parser("events", help="print the daemon's events, one line each")
    events.add_argument("--follow", "-f", action="store_true",
                        help="keep printing until Ctrl-C (default: the next event only)")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


Handler = Callable[[Daemon, argparse.Namespace], Coroutine[Any, Any, int]]


async def cmd_nodes(daemon: Daemon, args: argparse.Namespace) -> int:
    con = console()
    con.print(nodes_table(con, await _graph(daemon)))
    return 0


async def cmd_chain(daemon: Daemon, args: argparse.Namespace) -> int:
    nodes = await _graph(daemon)
    if args.node not in {node.name for node in nodes}:
        raise CtlError(f"no node named {args.node!r} (see `blockctl nodes`)")
    console().print(chain_tree(graph.chain(nodes, args.node)))
    return 0


async def cmd_jobs(daemon: Daemon, args: argparse.Namespace) -> int:
    con = console()
    block_jobs = await daemon.execute("query-block-jobs")
    jobs = await daemon.execute("query-jobs")
    if not jobs:
        con.print("no jobs")
        return 0
    con.print(jobs_table(con, block_jobs, jobs))
    return 0


async def cmd_exports(daemon: Daemon, args: argparse.Namespace) -> int:
    con = console()
    exports = await daemon.execute("query-block-exports")
    if not exports:
        con.print("no exports")
        return 0
    con.print(exports_table(con, exports))
    return 0


async def cmd_close(daemon: Daemon, args: argparse.Namespace) -> int:
    await daemon.execute("blockdev-del", {"node-name": args.node})
    return 0


async def cmd_commit(daemon: Daemon, args: argparse.Namespace) -> int:
    active = args.top is None or args.top == args.device
    if args.pivot and not active:
        raise CtlError("--pivot is for an active commit (DEVICE itself, no other --top)", USAGE)
    selection: dict[str, Any] = {"device": args.device}
    if args.top is not None:
        selection["top-node"] = args.top
    if args.base is not None:
        selection["base-node"] = args.base
    into = args.base or await _bottom(daemon, args.device)
    plan = await _commit_plan(daemon, selection, args.dry_run)
    con = console()
    if args.dry_run:
        assert plan is not None
        for part in plan_view(con, plan, await _file_of(daemon, plan["base-node"])):
            con.print(part)
        return 0 if plan["fits"] else 1
    if plan is not None and not plan["fits"]:
        lacking = await _no_room(daemon, plan)
        if not args.force:
            raise CtlError(f"{lacking}; --force commits anyway")
        print(f"blockctl: warning: {lacking}; committing anyway (--force)", file=sys.stderr)
    listener = daemon.listener()
    job_id = args.job_id or await _free_job_id(daemon, f"commit-{args.device}")
    arguments: dict[str, Any] = {"job-id": job_id, **selection}
    if args.speed is not None:
        arguments["speed"] = args.speed
    await daemon.execute("block-commit", arguments)
    what = args.top or args.device
    limit = f" at up to {human_rate(args.speed)}" if args.speed else ""
    con.print(f"{job_id}: committing {what} into {into}{limit}", markup=False)
    if not (args.wait or args.pivot):
        con.print(f"`blockctl wait {job_id}` shows its progress", markup=False)
        return 0
    watcher = Watcher(daemon, listener, job_id, con, pivot=args.pivot, stop_at_ready=active)
    return int(await watcher.run())


async def cmd_wait(daemon: Daemon, args: argparse.Namespace) -> int:
    listener = daemon.listener()
    if args.job not in {job.get("id") for job in await daemon.execute("query-jobs")}:
        raise CtlError(f"no job named {args.job!r} (see `blockctl jobs`)")
    watcher = Watcher(daemon, listener, args.job, console(), pivot=args.pivot,
                      stop_at_ready=not args.pivot)
    return int(await watcher.run())


async def cmd_cancel(daemon: Daemon, args: argparse.Namespace) -> int:
    await daemon.execute("block-job-cancel", {"device": args.job, "force": args.force})
    return 0


async def cmd_set_speed(daemon: Daemon, args: argparse.Namespace) -> int:
    await daemon.execute("block-job-set-speed", {"device": args.job, "speed": args.rate})
    return 0


async def cmd_pause(daemon: Daemon, args: argparse.Namespace) -> int:
    await daemon.execute("block-job-pause", {"device": args.job})
    return 0


async def cmd_resume(daemon: Daemon, args: argparse.Namespace) -> int:
    await daemon.execute("block-job-resume", {"device": args.job})
    return 0


async def cmd_complete(daemon: Daemon, args: argparse.Namespace) -> int:
    await daemon.execute("block-job-complete", {"device": args.job})
    return 0


async def cmd_events(daemon: Daemon, args: argparse.Namespace) -> int:
    listener = daemon.listener()
    closed = asyncio.ensure_future(daemon.closed())
    try:
        while True:
            get = asyncio.ensure_future(listener.get())
            await asyncio.wait([get, closed], return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise CtlError("blockd closed the connection")
            event = get.result()
            line = json.dumps(dict(event)) if args.json else event_line(event)
            print(line, flush=True)
            if not args.follow:
                return 0
    finally:
        closed.cancel()


HANDLERS: dict[str, Handler] = {
    "nodes": cmd_nodes,
    "chain": cmd_chain,
    "jobs": cmd_jobs,
    "exports": cmd_exports,
    "close": cmd_close,
    "commit": cmd_commit,
    "wait": cmd_wait,
    "cancel": cmd_cancel,
    "set-speed": cmd_set_speed,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "complete": cmd_complete,
    "events": cmd_events,
}


async def _graph(daemon: Daemon) -> list[graph.Node]:
    infos = await daemon.execute("query-named-block-nodes")
    exports = await daemon.execute("query-block-exports")
    return graph.build(infos, exports)


async def _bottom(daemon: Daemon, device: str) -> str:
    """The last open node of DEVICE's chain: what block-commit takes as base."""
    nodes = await _graph(daemon)
    if device not in {node.name for node in nodes}:
        return "base"  # block-commit names the problem in its own words
    return graph.chain(nodes, device)[-1].name


async def _commit_plan(
    daemon: Daemon, selection: dict[str, Any], required: bool
) -> dict[str, Any] | None:
    """The daemon's plan for the commit; None when it has none to give
    (qemu-storage-daemon) or refuses the selection, which block-commit then
    refuses in its own words (the daemon checks both alike)."""
    try:
        plan: dict[str, Any] = await daemon.execute(PLAN, selection)
    except DaemonError as err:
        if err.error_class == "CommandNotFound":
            if required:
                raise CtlError("this daemon computes no commit plan (it has no "
                               f"{PLAN}: is it blockd?)") from None  # fmt: skip
            return None
        if required:
            raise CtlError(f"commit: {err.desc}") from None
        return None
    return plan


async def _file_of(daemon: Daemon, node: str) -> str:
    for found in await _graph(daemon):
        if found.name == node:
            return found.file
    return node


async def _no_room(daemon: Daemon, plan: dict[str, Any]) -> str:
    """The one line that says why a commit does not fit."""
    free = plan.get("free", 0)
    return (
        f"not enough room to commit {plan['top-node']} into {plan['base-node']}: "
        f"{await _file_of(daemon, plan['base-node'])} would grow by about "
        f"{human_size(plan['growth']['total'])} (+{human_size(plan['margin'])} margin), "
        f"its file system has {human_size(free)} free"
    )


async def _free_job_id(daemon: Daemon, wanted: str) -> str:
    taken = {job.get("id") for job in await daemon.execute("query-jobs")}
    candidate, n = wanted, 1
    while candidate in taken:
        n += 1
        candidate = f"{wanted}-{n}"
    return candidate


async def _run(args: argparse.Namespace) -> int:
    async with Daemon(socket_path(args.socket)) as daemon:
        return await HANDLERS[args.command](daemon, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_logs()
    try:
        return asyncio.run(_run(args))
    except CtlError as err:
        print(f"blockctl: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        # Ctrl-C outside a wait: the way to end `events --follow`, or a stuck
        # connect given up; nothing to undo either way.
        return 0 if args.command == "events" else int(Outcome.LEFT_RUNNING)
    except BrokenPipeError:
        # `blockctl events -f | head`: the reader went away, which is no error.
        return 0
