"""What an image looks like from outside: the ``ImageInfo`` of qemu-img info.

Management tools read these fields (sizes, backing names, format details) to
decide what to do with a chain, so they carry QEMU's names and meanings.
"""

from __future__ import annotations

from typing import Any

from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.qjson import encode


def _backing_overridden(graph: BlockGraph, node: BlockNode) -> bool:
    """Whether the node's backing differs from what its image header names.

    Such a node cannot be described by its file name alone, so QEMU names it
    by a ``json:`` pseudo-filename holding its whole configuration.
    """
    if not isinstance(node, Qcow2Node):
        return False
    if node.backing is None:
        return bool(node.backing_file)
    if node.backing in graph.implicit_children(node) and not graph.backing_given(node):
        # opened from the header's name: QEMU takes that node's name as the
        # header's, so this one is never overridden
        return False
    return node.backing_file != display_filename(graph, node.backing)


def _open_options(graph: BlockGraph, node: BlockNode) -> dict[str, Any]:
    if node.file is None:
        return {"driver": node.driver, "filename": node.filename}
    options: dict[str, Any] = {"driver": node.driver, "file": _open_options(graph, node.file)}
    if _backing_overridden(graph, node):
        backing = node.backing
        options["backing"] = None if backing is None else _open_options(graph, backing)
    return options


def display_filename(graph: BlockGraph, node: BlockNode) -> str:
    """The node's file name as QEMU reports it (``json:{...}`` when overridden)."""
    if _backing_overridden(graph, node):
        return "json:" + encode(_open_options(graph, node))
    return node.filename


async def image_info(graph: BlockGraph, node: BlockNode, *, nested: bool) -> dict[str, Any]:
    """ImageInfo of one node; ``nested`` adds the backing chain as backing-image."""
    info = await node.image_info()
    info["filename"] = display_filename(graph, node)
    # QEMU reports lengths in whole 512-byte sectors (bdrv_getlength).
    info["virtual-size"] = -(-node.size // 512) * 512
    if nested and node.backing is not None:
        info["backing-image"] = await image_info(graph, node.backing, nested=True)
    return info
