"""Daemon-wide commands: identity and shutdown."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockd.commands.context import CommandContext
from blockd.version import version_info


async def query_version(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    return version_info()


#: How long ``quit`` waits for cancelled jobs before answering anyway.
QUIT_JOB_GRACE_SECONDS = 5.0


async def quit_daemon(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    # As qemu-storage-daemon does: cancel every job (clients see them end),
    # delete the exports, then reply, then close the connections and exit.
    await ctx.jobs.shutdown(grace=QUIT_JOB_GRACE_SECONDS)
    # Exports go before the reply too, each with its BLOCK_EXPORT_DELETED.
    await ctx.exports.shutdown()
    ctx.request_shutdown()
    return {}
