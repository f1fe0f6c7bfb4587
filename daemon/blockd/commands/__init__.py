"""The command table: every QMP command the daemon implements beyond the
protocol's own (``qmp_capabilities``, ``query-commands``), by name.

Each name must also have a schema under ``schema/commands/``; the dispatcher
refuses to start if the two sets differ.
"""

from __future__ import annotations

from collections.abc import Mapping

from blockd.commands import misc
from blockd.commands.context import CommandContext, Handler

HANDLERS: Mapping[str, Handler] = {
    "query-version": misc.query_version,
    "quit": misc.quit_daemon,
}

__all__ = ["HANDLERS", "CommandContext", "Handler"]
