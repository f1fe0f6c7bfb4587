"""``transaction``: several actions, all or none (see :mod:`blockd.commands.actions`).

blockd knows the actions ``abort``, ``blockdev-snapshot`` and
``blockdev-snapshot-sync``; the schema refuses QEMU's other action types
(bitmaps, backups, internal snapshots) as values it does not know, so
``query-qmp-schema`` shows which ones a client may use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockd.commands.actions import Action, run_actions
from blockd.commands.context import CommandContext
from blockd.commands.snapshot import SnapshotAction
from blockd.errors import BlockdError


class AbortAction:
    """QEMU's ``abort`` action: fails the transaction when its turn comes."""

    async def warm_up(self) -> None:
        return None

    async def prepare(self) -> None:
        raise BlockdError("Transaction aborted using Abort action")

    async def record(self) -> None:
        raise AssertionError("an abort action is never prepared")

    async def commit(self) -> None:
        raise AssertionError("an abort action is never prepared")

    async def abort(self) -> None:
        return None

    async def clean(self) -> None:
        return None


def _action(ctx: CommandContext, entry: Mapping[str, Any], grouped: bool) -> Action:
    kind, data = entry["type"], entry["data"]
    if kind == "abort":
        return AbortAction()
    return SnapshotAction(ctx, kind, data, grouped=grouped)


async def transaction(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    properties = args.get("properties", {})
    grouped = properties.get("completion-mode", "individual") == "grouped"
    await run_actions(ctx, [_action(ctx, entry, grouped) for entry in args["actions"]])
    return {}
