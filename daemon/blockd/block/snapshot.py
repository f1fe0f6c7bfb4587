"""External snapshots: putting an overlay on top of a node (QEMU's ``bdrv_append``).

The overlay, an image without a backing, gets the node as its backing; the
node's users then move onto the overlay (the layer above does that for
exports, at one moment with their requests held), so writes from then on
land in the overlay and the node is frozen.

The overlay's header is made to name the node (file name and format) when it
names no backing file yet, before any write can reach the overlay (the
exports are still held): one header update (``change_backing``), flushed,
so that a daemon killed at any point leaves the overlay naming either
nothing (then nothing was written to it: the guest's disk is the node) or
the node (the overlay shows the node's content, and what was written
since).  QEMU 7.2 writes nothing here, and an overlay added without a
backing name reads as an empty disk once QEMU exits; a header that already
names a file (libvirt creates overlays that way) is left as it is, as in
QEMU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from blockd.block import workers
from blockd.block.create import create_qcow2_image
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.block.permissions import CONSISTENT_READ
from blockd.errors import BlockError

log = logging.getLogger(__name__)


def check_overlay(graph: BlockGraph, node: BlockNode, overlay: BlockNode) -> None:
    """Refuse, in QEMU's words and order, an overlay that cannot go on ``node``."""
    if graph.needs(overlay) & CONSISTENT_READ:
        # something reads it as an image already: giving it a backing would
        # change what that user sees
        raise BlockError("The overlay is already in use")
    if overlay.is_filter:
        raise BlockError("Filters cannot be used as overlays")
    if overlay.backing is not None:
        raise BlockError("The overlay already has a backing image")
    if not overlay.supports_backing:
        raise BlockError("The overlay does not support backing images")
    if _reaches(node, overlay):
        raise BlockError(
            f"Making '{node.node_name}' a backing child of '{overlay.node_name}' "
            "would create a cycle"
        )
    for parent, edge in graph.parents(node):
        if edge != "backing":
            # QEMU moves such a parent too (its format then reads a qcow2
            # overlay as its file); blockd moves only exports
            raise BlockError(
                f"Cannot snapshot '{node.node_name}': node '{parent.node_name}' uses it "
                f"as '{edge}', and blockd moves only exports onto an overlay"
            )
    if overlay.backing_file is None:
        overlay.check_backing_name(node.filename, node.driver)


def _reaches(top: BlockNode, target: BlockNode) -> bool:
    """Whether ``target`` is ``top`` or any node below it (file or backing)."""
    todo, seen = [top], set()
    while todo:
        each = todo.pop()
        if each is target:
            return True
        if id(each) in seen:
            continue
        seen.add(id(each))
        todo.extend(child for child in (each.file, each.backing) if child is not None)
    return False


@dataclass
class Appended:
    """An overlay put on a node, with what :func:`detach_overlay` must undo."""

    node: BlockNode
    overlay: BlockNode
    #: whether the overlay's header was (or may have been) made to name ``node``
    named: bool = False


def link_overlay(graph: BlockGraph, node: BlockNode, overlay: BlockNode) -> Appended:
    """Make ``node`` the overlay's backing in the graph (checked with
    :func:`check_overlay` beforehand); :func:`name_backing` records it."""
    overlay.backing = node
    graph.relink(overlay, None, node)
    return Appended(node, overlay)


async def name_backing(appended: Appended) -> None:
    """Record the node in the overlay's header if it names no backing file yet.

    The only write of a snapshot: the header, in one write (within its first
    cluster), flushed, so a kill leaves the old header or the new one.  A
    read-only overlay is opened read-write for it, as a commit does to
    re-point one.  Until it is done nothing may write to the overlay (the
    caller holds the exports).
    """
    overlay, node = appended.overlay, appended.node
    if overlay.backing_file is not None:
        return
    # a failed write may still have reached the disk: the undo rewrites it
    appended.named = True
    await _record_backing(overlay, node, node.filename, node.driver)
    log.info("%s names %s (%s) as its backing", overlay.node_name, node.filename, node.driver)


async def detach_overlay(graph: BlockGraph, appended: Appended) -> None:
    """Undo :func:`link_overlay` and :func:`name_backing` (the transaction failed)."""
    overlay = appended.overlay
    graph.relink(overlay, appended.node, None)
    overlay.backing = None
    if appended.named:
        await _record_backing(overlay, None, None, None)


async def _record_backing(
    overlay: BlockNode, backing: BlockNode | None, name: str | None, fmt: str | None
) -> None:
    was_read_only = overlay.read_only
    if was_read_only:
        await overlay.reopen(read_only=False)
    try:
        await overlay.change_backing(backing, name, fmt)
    finally:
        if was_read_only and not overlay.read_only:
            try:
                await overlay.reopen(read_only=True)
            except BlockError as err:
                # its header is written and flushed: staying writable loses nothing
                log.warning("%s stays read-write: %s", overlay.node_name, err)


@dataclass
class NewImage:
    """An overlay image made by ``blockdev-snapshot-sync``, and how to take it back.

    QEMU leaves the file behind when the transaction fails; blockd takes back
    what it can: a file it created is removed, one that was empty is emptied
    again.  One that held data was overwritten, as in QEMU (``mode`` is
    ``absolute-paths``: the client asked for a new image there).
    """

    path: str
    existed: bool
    was_empty: bool

    async def remove(self) -> None:
        def undo() -> None:
            if not self.existed:
                os.unlink(self.path)
            elif self.was_empty:
                os.truncate(self.path, 0)

        try:
            await workers.run(undo)
        except OSError as err:
            log.warning("could not take back the new image %s: %s", self.path, err)


async def create_overlay_image(
    path: str, fmt: str, node: BlockNode, *, replace: bool = True
) -> NewImage | None:
    """Create ``path`` as a new overlay of ``node``: ``fmt`` (qcow2: what
    ``qemu-img create -b <node's file> -F <node's format>`` makes), the node's
    size; QEMU's checks and words.  With ``replace`` false, a file that holds
    data is left alone (None): only what :meth:`NewImage.remove` can put back
    is done."""
    if fmt in ("raw", "file"):
        raise BlockError(f"Backing file not supported for file format '{fmt}'")
    if fmt == "blkdebug":
        raise BlockError("Format driver 'blkdebug' does not support image creation")
    if fmt != "qcow2":
        # QEMU knows more formats; blockd makes and reads only these
        raise BlockError(f"Unknown file format '{fmt}'")
    backing = node.filename
    if path == backing:
        raise BlockError(
            "Error: Trying to create an image with the same filename as the backing file"
        )

    def look() -> tuple[bool, bool]:
        try:
            return True, os.stat(path).st_size == 0
        except OSError:
            return False, False

    existed, was_empty = await workers.run(look)
    if existed and not was_empty and not replace:
        return None
    size = -(-node.size // 512) * 512  # QEMU counts lengths in whole sectors
    made = NewImage(path, existed, was_empty)
    try:
        await create_qcow2_image(path, size, backing_file=backing, backing_fmt=node.driver)
    except BlockError:
        if not existed and await workers.run(lambda: os.path.exists(path)):
            await made.remove()
        raise
    log.info("created %s (%s) over %s (%s)", path, fmt, backing, node.driver)
    return made
