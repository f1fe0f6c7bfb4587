"""``block-stream``: checked in QEMU's order, the job created and started."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockd import logs
from blockd.commands.context import CommandContext
from blockd.commands.jobs import job_options
from blockd.errors import BlockdError
from blockd.jobs.job import check_speed
from blockd.jobs.stream import StreamJob, plan_stream


async def block_stream(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    filter_name = args.get("filter-node-name")

    def check_filter_name() -> None:
        # QEMU inserts a copy-on-read filter above the device here; blockd
        # serialises the copy with the device's writes instead, and only
        # checks the name (or uses up an automatic one, as QEMU's filter does).
        if filter_name is None:
            ctx.graph.auto_name()
            return
        try:
            ctx.graph.check_new_name(filter_name)
        except BlockdError as err:
            raise BlockdError(f"Could not create node: {err.desc}") from err

    plan = plan_stream(
        ctx.graph,
        device=args["device"],
        base=args.get("base"),
        base_node=args.get("base-node"),
        bottom=args.get("bottom"),
        backing_file=args.get("backing-file"),
    )
    options = job_options(args)
    job_id = args.get("job-id", "")
    job = StreamJob(job_id, ctx.events, ctx.graph, plan, ctx.exports.switch_node, **options)
    await job.open_device()
    try:
        check_filter_name()
        ctx.jobs.check_new_id(job_id)
    except BaseException:
        await job.clean()
        raise
    ctx.jobs.add(job)
    # QEMU checks these once the job exists: a client sees it created and gone.
    try:
        check_speed(args.get("speed", 0))
        job.setup()
    except BaseException:
        await job.clean()
        job.dismissed()
        job.early_fail()
        raise
    ctx.jobs.start(job)
    logs.job_started(job_id, "stream", args["device"])
    return {}
