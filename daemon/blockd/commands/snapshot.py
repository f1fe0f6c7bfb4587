"""External snapshots: ``blockdev-snapshot`` and ``blockdev-snapshot-sync``.

Both are one :class:`SnapshotAction`, alone or inside a ``transaction``.  The
action follows qemu-storage-daemon 7.2's steps, checks and words: find the
node, refuse one an operation holds, flush it, (``-sync``: create and open
the overlay image), check the overlay, then put it on top of the node and
move every export of the node onto it (:mod:`blockd.block.snapshot`); once
the whole transaction is prepared, the node is made read-only (a failure
there is ignored, as in QEMU).

An overlay that ``blockdev-snapshot-sync`` opened belongs to nobody: as in
QEMU, it stays open as long as something uses it (an export) and is closed
when the last user goes, or at once if there is none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from blockd.block.node import BlockNode
from blockd.block.open import open_node
from blockd.block.snapshot import (
    Appended,
    NewImage,
    check_overlay,
    create_overlay_image,
    detach_overlay,
    link_overlay,
    name_backing,
)
from blockd.commands.actions import run_actions
from blockd.commands.context import CommandContext
from blockd.errors import BlockdError, BlockError, BlockIOError

log = logging.getLogger(__name__)

#: The formats an existing overlay is opened in (raw and file only to be
#: refused later, as QEMU refuses them, for having no backing).
_OPENABLE = ("qcow2", "raw", "file")


def _not_found(device: str | None, node_name: str | None) -> BlockdError:
    return BlockdError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


class SnapshotAction:
    """One ``blockdev-snapshot`` (``overlay`` given) or ``blockdev-snapshot-sync``."""

    def __init__(
        self, ctx: CommandContext, kind: str, data: Mapping[str, Any], *, grouped: bool
    ) -> None:
        self.ctx = ctx
        self.kind = kind
        self.data = data
        self.grouped = grouped
        self._appended: Appended | None = None
        self._moved = False
        self._flush_error: BlockIOError | None = None
        self._create_error: BlockError | None = None
        #: blockdev-snapshot-sync: the image file made, and the node opened
        self._created: NewImage | None = None
        self._opened: BlockNode | None = None

    def __repr__(self) -> str:
        return f"<{self.kind} {dict(self.data)!r}>"

    def _find_node(self) -> BlockNode:
        graph = self.ctx.graph
        if self.kind == "blockdev-snapshot":
            name = self.data["node"]
            node = graph.get(name)
            if node is None:
                raise _not_found(name, name)
            return node
        # a storage daemon has no devices: only node-name can find anything
        node_name = self.data.get("node-name")
        node = graph.get(node_name) if node_name is not None else None
        if node is None:
            raise _not_found(self.data.get("device"), node_name)
        return node

    async def _find_overlay(self, node: BlockNode) -> BlockNode:
        if self.kind == "blockdev-snapshot":
            name = self.data["overlay"]
            overlay = self.ctx.graph.get(name)
            if overlay is None:
                raise _not_found(name, name)
            return overlay
        return await self._open_new(node)

    async def _open_new(self, node: BlockNode) -> BlockNode:
        """``blockdev-snapshot-sync``: create the image (unless mode existing), open it."""
        data, graph = self.data, self.ctx.graph
        name = data.get("snapshot-node-name")
        if data.get("node-name") is not None and name is None:
            raise BlockError("New overlay node-name missing")
        if name is not None and name in graph:
            raise BlockError("New overlay node-name already in use")
        fmt = data.get("format", "qcow2")
        path = data["snapshot-file"]
        if data.get("mode", "absolute-paths") != "existing":
            if self._create_error is not None:
                raise self._create_error
            if self._created is None:
                self._created = await create_overlay_image(path, fmt, node)
        elif fmt not in _OPENABLE:
            raise BlockError(f"Unknown file format '{fmt}'")
        # QEMU opens it with the node's flags: its open mode and discard policy
        options: dict[str, Any] = {
            "driver": fmt,
            "node-name": name,
            "read-only": node.read_only,
            "discard": "unmap" if node.unmap else "ignore",
        }
        if fmt == "file":
            options["filename"] = path
        else:
            options["file"] = {"driver": "file", "filename": path}
            if fmt == "qcow2":
                options["backing"] = None
        self._opened = await open_node(graph, options)
        return self._opened

    async def warm_up(self) -> None:
        """Flush the node, and make the new image, while the guest still writes.

        What fails is kept for :meth:`prepare` to report where QEMU meets
        it (a second try could succeed where QEMU's one try failed).  The
        image is made early only where QEMU would get that far, and only in
        place of nothing or of an empty file, which an abort can put back.
        """
        try:
            node = self._find_node()
        except BlockdError:
            return  # prepare reports it
        if not node.read_only:
            try:
                await node.flush()
            except BlockIOError as err:
                self._flush_error = err
                return
        data = self.data
        name = data.get("snapshot-node-name")
        if (
            self.kind != "blockdev-snapshot-sync"
            or self.grouped
            or self.ctx.graph.deletion_blocker(node) is not None
            or name is None
            or name in self.ctx.graph
            or data.get("mode", "absolute-paths") == "existing"
        ):
            return
        try:
            self._created = await create_overlay_image(
                data["snapshot-file"], data.get("format", "qcow2"), node, replace=False
            )
        except BlockError as err:
            self._create_error = err

    async def prepare(self) -> None:
        graph = self.ctx.graph
        if self.grouped:
            raise BlockdError(
                f"Action '{self.kind}' does not support Transaction property "
                "completion-mode = grouped"
            )
        node = self._find_node()
        reason = graph.deletion_blocker(node)
        if reason is not None:
            raise BlockError(f"Node '{node.node_name}' is busy: {reason}")
        if not node.read_only:
            try:
                if self._flush_error is not None:
                    raise self._flush_error
                await node.flush()
            except BlockIOError as err:
                raise BlockIOError(err.errno, "An IO error has occurred") from err
        overlay = await self._find_overlay(node)
        check_overlay(graph, node, overlay)
        self._appended = link_overlay(graph, node, overlay)
        await self.ctx.exports.retarget(node, overlay)
        self._moved = True

    async def record(self) -> None:
        appended = self._appended
        assert appended is not None
        await name_backing(appended)
        log.info(
            "%s: %s is now an overlay of %s",
            self.kind, appended.overlay.node_name, appended.node.node_name,
        )  # fmt: skip

    async def commit(self) -> None:
        appended = self._appended
        assert appended is not None
        node = appended.node
        # a node nobody owns (an earlier snapshot-sync overlay) now goes away
        # with the overlay above it, as QEMU's reference counting has it
        self.ctx.graph.adopt(node, appended.overlay)
        # the node is frozen from now on, as in QEMU (which ignores a failure)
        try:
            await node.reopen(read_only=True)
        except BlockdError as err:
            log.warning("%s: %s stays read-write: %s", self.kind, node.node_name, err)

    async def abort(self) -> None:
        appended, self._appended = self._appended, None
        if appended is not None:
            if self._moved:
                self._moved = False
                await self.ctx.exports.retarget(appended.overlay, appended.node)
            await detach_overlay(self.ctx.graph, appended)
        opened, self._opened = self._opened, None
        if opened is not None:
            await self.ctx.graph.close_node(opened)
        created, self._created = self._created, None
        if created is not None:
            await created.remove()

    async def clean(self) -> None:
        if self._opened is not None:
            # nobody owns it: it lives as long as something uses it, as in QEMU
            await self.ctx.graph.release(self._opened)


async def blockdev_snapshot_sync(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    await run_actions(ctx, [SnapshotAction(ctx, "blockdev-snapshot-sync", args, grouped=False)])
    return {}


async def blockdev_snapshot(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    await run_actions(ctx, [SnapshotAction(ctx, "blockdev-snapshot", args, grouped=False)])
    return {}
