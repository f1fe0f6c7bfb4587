"""Job commands: the ``block-job-*`` family (missing job: DeviceNotActive) and
the ``job-*`` family (missing job: GenericError), as QEMU distinguishes them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockd.commands.context import CommandContext
from blockd.errors import BlockdError


async def query_jobs(ctx: CommandContext, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [job.job_info() for job in reversed(ctx.jobs.jobs())]


async def query_block_jobs(ctx: CommandContext, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [job.block_job_info() for job in reversed(ctx.jobs.jobs())]


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
