"""Daemon-wide commands: identity and shutdown."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio

from blockd.commands.context import CommandContext
from blockd.version import version_info

log = logging.getLogger(__name__)


async def query_version(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    return version_info()


#: How long ``quit`` waits for cancelled jobs before answering anyway.
QUIT_JOB_GRACE_SECONDS = 5.0
#: How long ``quit`` waits for the exports to close before answering anyway.
QUIT_EXPORT_GRACE_SECONDS = 5.0


async def quit_daemon(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    # As qemu-storage-daemon does: cancel every job (clients see them end),
    # delete the exports, then reply, then close the connections and exit.
    await ctx.jobs.shutdown(grace=QUIT_JOB_GRACE_SECONDS)
    # Exports go before the reply too, each with its BLOCK_EXPORT_DELETED;
    # bounded, so that no NBD client can keep the daemon from stopping.
    with trio.move_on_after(QUIT_EXPORT_GRACE_SECONDS) as waited:
        await ctx.exports.shutdown()
    if waited.cancelled_caught:
        log.error("quit: the NBD server did not stop within %s s", QUIT_EXPORT_GRACE_SECONDS)
    ctx.request_shutdown()
    return {}
