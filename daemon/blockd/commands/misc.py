"""Daemon-wide commands: identity and shutdown."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockd.commands.context import CommandContext
from blockd.version import version_info


async def query_version(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    return version_info()


async def quit_daemon(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    # The reply goes out before the daemon closes connections and exits, as
    # with qemu-storage-daemon.
    ctx.request_shutdown()
    return {}
