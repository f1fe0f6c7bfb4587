"""What an image looks like from outside: the ``ImageInfo`` of qemu-img info.

Management tools read these fields (sizes, backing names, format details) to
decide what to do with a chain, so they carry QEMU's names and meanings.
"""

from __future__ import annotations

from typing import Any

from blockd.block.blkdebug import BlkdebugNode
from blockd.block.drivers.file import FileNode
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.qjson import encode


def _backing_overridden(graph: BlockGraph, node: BlockNode) -> bool:
    """Whether the node's backing differs from what its image header names.

    Such a node cannot be described by its file name alone, so QEMU names it
    by a ``json:`` pseudo-filename holding its whole configuration.
    """
    if node.backing is None:
        return bool(node.backing_file)
    if node.backing in graph.implicit_children(node) and not graph.backing_given(node):
        # opened from the header's name: QEMU takes that node's name as the
        # header's, so this one is never overridden
        return False
    return node.backing_file != display_filename(graph, node.backing)


def _describe(graph: BlockGraph, node: BlockNode) -> tuple[str | None, dict[str, Any]]:
    """QEMU's two descriptions of a node: a plain file name that opens the same
    thing (None when there is none) and the options that do (its ``json:``
    form).  Children come first, as in QEMU, because both follow from theirs.

    Options go in in the order QEMU inserts them (``driver``, strong options,
    then the children, newest attached first), which is what decides their
    order in the JSON text where two keys share a hash bucket.
    """
    if isinstance(node, FileNode) or node.file is None:
        return node.filename, {"driver": node.driver, "filename": node.filename}
    file_name, file_options = _describe(graph, node.file)
    if isinstance(node, BlkdebugNode):
        strong = node.filename_options()
        options = {"driver": node.driver, **strong, node.file_edge: file_options}
        # only a node without strong options has a plain name (no config file here)
        plain = None if strong or file_name is None else f"blkdebug::{file_name}"
        return plain, options
    options = {"driver": node.driver}
    overridden = _backing_overridden(graph, node)
    if overridden:
        backing = node.backing
        options["backing"] = None if backing is None else _describe(graph, backing)[1]
    options["file"] = file_options
    # a format node takes its protocol child's name unless something was overridden
    protocol = isinstance(node.file, FileNode | BlkdebugNode)
    return (file_name if protocol and not overridden else None), options


def display_filename(graph: BlockGraph, node: BlockNode) -> str:
    """The node's file name as QEMU reports it (``json:{...}`` when no plain name will do)."""
    plain, options = _describe(graph, node)
    return plain if plain is not None else "json:" + encode(options)


async def image_info(graph: BlockGraph, node: BlockNode, *, nested: bool) -> dict[str, Any]:
    """ImageInfo of one node; ``nested`` adds the backing chain as backing-image."""
    info = await node.image_info()
    info["filename"] = display_filename(graph, node)
    # QEMU reports lengths in whole 512-byte sectors (bdrv_getlength).
    info["virtual-size"] = -(-node.size // 512) * 512
    if nested and node.backing is not None:
        info["backing-image"] = await image_info(graph, node.backing, nested=True)
    return info
