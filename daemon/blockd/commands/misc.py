"""Daemon-wide commands: identity and shutdown."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio

from blockd.commands.context import CommandContext
from blockd.export.exports import ExportRegistry
from blockd.jobs.registry import JobRegistry
from blockd.version import version_info

log = logging.getLogger(__name__)


async def query_version(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    return version_info()


#: How long stopping waits for cancelled jobs to finish their clean-up.
JOB_GRACE_SECONDS = 5.0
#: How long stopping waits for the exports to close (NBD clients' requests).
EXPORT_GRACE_SECONDS = 5.0


async def wind_down(jobs: JobRegistry, exports: ExportRegistry) -> None:
    """What every way of stopping does first (``quit``, a signal, the socket gone).

    Jobs end first, so clients still hear how they ended; then the exports,
    each with its BLOCK_EXPORT_DELETED, once the NBD requests running finish,
    so no request still uses a node when the nodes close.  Both are bounded:
    no job and no NBD client can keep the daemon from stopping.
    """
    await jobs.shutdown(grace=JOB_GRACE_SECONDS)
    with trio.move_on_after(EXPORT_GRACE_SECONDS) as waited:
        try:
            await exports.shutdown()
        except Exception:
            log.exception("stopping the NBD server failed")
    if waited.cancelled_caught:
        log.error("the NBD server did not stop within %s s", EXPORT_GRACE_SECONDS)


async def quit_daemon(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    # As qemu-storage-daemon does: cancel every job and delete the exports
    # before the reply, then close the connections and exit.
    await wind_down(ctx.jobs, ctx.exports)
    ctx.request_shutdown()
    return {}
