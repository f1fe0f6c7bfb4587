"""Job commands: the ``block-job-*`` family (missing job: DeviceNotActive) and
the ``job-*`` family (missing job: GenericError), as QEMU distinguishes them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockd import logs
from blockd.commands.context import CommandContext
from blockd.errors import BlockdError
from blockd.jobs.active_commit import ActiveCommitJob, ActiveCommitPlan, CopyMode
from blockd.jobs.commit import CommitJob, CommitPlan, plan_commit
from blockd.jobs.job import JobOptions, OnError, check_speed


async def query_jobs(ctx: CommandContext, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [job.job_info() for job in reversed(ctx.jobs.jobs())]


async def query_block_jobs(ctx: CommandContext, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [job.block_job_info() for job in reversed(ctx.jobs.block_jobs())]


async def block_job_set_speed(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.block_job(args["device"]).set_speed(args["speed"])
    return {}


async def block_job_cancel(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    job = ctx.jobs.block_job(args["device"])
    force = args.get("force", False)
    if job.user_paused and not force:
        raise BlockdError(f"The block job for device '{args['device']}' is currently paused")
    job.user_cancel(force)
    return {}


async def block_job_pause(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.block_job(args["device"]).user_pause()
    return {}


async def block_job_resume(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.block_job(args["device"]).user_resume()
    return {}


async def block_job_complete(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.block_job(args["device"]).complete()
    return {}


async def block_job_finalize(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.block_job(args["id"]).finalize()
    return {}


async def block_job_dismiss(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.block_job(args["id"]).dismiss()
    return {}


async def job_pause(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.job(args["id"]).user_pause()
    return {}


async def job_resume(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.job(args["id"]).user_resume()
    return {}


async def job_cancel(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.job(args["id"]).user_cancel(force=True)
    return {}


async def job_complete(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.job(args["id"]).complete()
    return {}


async def job_finalize(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.job(args["id"]).finalize()
    return {}


async def job_dismiss(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    ctx.jobs.job(args["id"]).dismiss()
    return {}


def job_options(args: Mapping[str, Any]) -> JobOptions:
    """The options every block job's command takes, with QEMU's defaults."""
    return {
        "speed": max(args.get("speed", 0), 0),
        "on_error": OnError(args.get("on-error", "report")),
        "auto_finalize": args.get("auto-finalize", True),
        "auto_dismiss": args.get("auto-dismiss", True),
    }


def resolve_commit(ctx: CommandContext, args: Mapping[str, Any]) -> CommitPlan | ActiveCommitPlan:
    """block-commit's selection (device, top, base) resolved and checked, in
    its order and words; shared with the commit plan, which must agree (the
    plan also calls :func:`~blockd.jobs.commit.refuse_writable_top`)."""
    plan = plan_commit(
        ctx.graph,
        device=args["device"],
        top_node=args.get("top-node"),
        top=args.get("top"),
        base_node=args.get("base-node"),
        base=args.get("base"),
        backing_file=args.get("backing-file"),
        has_writer=ctx.writers,
    )
    return plan


async def block_commit(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    plan = resolve_commit(ctx, args)
    filter_name = args.get("filter-node-name")
    active = isinstance(plan, ActiveCommitPlan)
    if active and filter_name is not None:
        # QEMU inserts an active commit's filter before it creates the job.
        ctx.graph.check_new_name(filter_name)
    requested = args.get("__org.blockd_copy-mode")
    copy_mode = None if requested is None else CopyMode(requested)
    if not active and copy_mode not in (None, CopyMode.BACKGROUND):
        # nothing writes to an intermediate image: there is nothing to keep up with
        raise BlockdError(
            f"Copy mode '{copy_mode}' applies only to an active commit "
            "(top is the device's active layer)"
        )
    job_id = args.get("job-id", "")
    ctx.jobs.check_new_id(job_id)
    options = job_options(args)
    job: CommitJob | ActiveCommitJob
    if isinstance(plan, ActiveCommitPlan):
        job = ActiveCommitJob(
            job_id,
            ctx.events,
            ctx.graph,
            plan,
            ctx.exports.switch_node,
            ctx.writers,
            copy_mode,
            **options,
        )
    else:
        job = CommitJob(
            job_id, ctx.events, ctx.graph, plan, ctx.exports.switch_node, ctx.writers, **options
        )
    ctx.jobs.add(job)
    # QEMU checks these once the job exists: a client sees it created and gone.
    try:
        check_speed(args.get("speed", 0))
        if filter_name is not None and not active:
            ctx.graph.check_new_name(filter_name)
        await job.setup()
    except BaseException:
        job.early_fail()
        raise
    ctx.jobs.start(job)
    logs.job_started(job_id, "commit", args["device"])
    return {}
