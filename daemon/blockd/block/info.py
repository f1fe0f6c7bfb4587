"""What an image looks like from outside: the ``ImageInfo`` of qemu-img info.

Management tools read these fields (sizes, backing names, format details) to
decide what to do with a chain, so they carry QEMU's names and meanings.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

from blockd.block import workers
from blockd.block.blkdebug import BlkdebugNode
from blockd.block.drivers.file import FileNode
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.qjson import encode


class Names:
    """QEMU's names for nodes (plain file names and ``json:`` options), each
    worked out once for the life of this object.

    A node's name follows from its children's, so naming every node of a
    chain one by one would redo the chain below each of them (and encode its
    ``json:`` options) again and again.  Keep one only while the graph cannot
    change: within one command, with no await in between.
    """

    def __init__(self, graph: BlockGraph) -> None:
        self._graph = graph
        self._known: dict[BlockNode, tuple[str | None, dict[str, Any]]] = {}
        self._filenames: dict[BlockNode, str] = {}

    def filename(self, node: BlockNode) -> str:
        """The node's file name as QEMU reports it (``json:{...}`` when no plain name will do)."""
        name = self._filenames.get(node)
        if name is None:
            plain, options = self._describe(node)
            name = plain if plain is not None else "json:" + encode(options)
            self._filenames[node] = name
        return name

    def _backing_overridden(self, node: BlockNode) -> bool:
        """Whether the node's backing differs from what its image header names.

        Such a node cannot be described by its file name alone, so QEMU names it
        by a ``json:`` pseudo-filename holding its whole configuration.
        """
        graph = self._graph
        if node.backing is None:
            return bool(node.backing_file)
        if node.backing in graph.implicit_children(node) and not graph.backing_given(node):
            # opened from the header's name: QEMU takes that node's name as the
            # header's, so this one is never overridden
            return False
        return node.backing_file != self.filename(node.backing)

    def _describe(self, node: BlockNode) -> tuple[str | None, dict[str, Any]]:
        """QEMU's two descriptions of a node: a plain file name that opens the same
        thing (None when there is none) and the options that do (its ``json:``
        form).  Children come first, as in QEMU, because both follow from theirs.

        Options go in in the order QEMU inserts them (``driver``, strong options,
        then the children, newest attached first), which is what decides their
        order in the JSON text where two keys share a hash bucket.
        """
        known = self._known.get(node)
        if known is None:
            known = self._known[node] = self._work_out(node)
        return known

    def _work_out(self, node: BlockNode) -> tuple[str | None, dict[str, Any]]:
        if isinstance(node, FileNode) or node.file is None:
            return node.filename, {"driver": node.driver, "filename": node.filename}
        file_name, file_options = self._describe(node.file)
        if isinstance(node, BlkdebugNode):
            strong = node.filename_options()
            options = {"driver": node.driver, **strong, node.file_edge: file_options}
            # only a node without strong options has a plain name (no config file here)
            plain = None if strong or file_name is None else f"blkdebug::{file_name}"
            return plain, options
        options = {"driver": node.driver}
        overridden = self._backing_overridden(node)
        if overridden:
            backing = node.backing
            options["backing"] = None if backing is None else self._describe(backing)[1]
        options["file"] = file_options
        # a format node takes its protocol child's name unless something was overridden
        protocol = isinstance(node.file, FileNode | BlkdebugNode)
        return (file_name if protocol and not overridden else None), options


def display_filename(graph: BlockGraph, node: BlockNode) -> str:
    """The node's file name as QEMU reports it (``json:{...}`` when no plain name will do)."""
    return Names(graph).filename(node)


async def allocated_sizes(filenames: Collection[str]) -> dict[str, int]:
    """Bytes the host allocates to each file (0 for one that cannot be stat'ed),
    all measured in one worker call: describing a chain needs each file's."""

    def measure() -> dict[str, int]:
        sizes = {}
        for filename in filenames:
            try:
                sizes[filename] = os.stat(filename).st_blocks * 512
            except OSError:
                sizes[filename] = 0
        return sizes

    return await workers.run(measure)


async def image_infos(
    graph: BlockGraph, *, nested: bool
) -> list[tuple[BlockNode, dict[str, Any], Names]]:
    """ImageInfo of every node in the graph, in its order; ``nested`` adds the
    backing chain as backing-image.  With the :class:`Names` that named them,
    for the caller to name more from the same graph without waiting in between.

    Each node is described once per call, however many chains it is in: a
    node's image is nested in the image of every node above it.
    """
    sizes: dict[str, int] = {}
    while missing := {n.filename for n in graph if n.filename} - sizes.keys():
        # the graph may change while the files are measured: measure again
        # what appeared meanwhile, then build from the graph as it is
        sizes |= await allocated_sizes(missing)
    names = Names(graph)
    infos: dict[BlockNode, dict[str, Any]] = {}

    def image(node: BlockNode) -> dict[str, Any]:
        info = infos.get(node)
        if info is None:
            info = node.image_info(sizes.get(node.filename, 0))
            info["filename"] = names.filename(node)
            # QEMU reports lengths in whole 512-byte sectors (bdrv_getlength).
            info["virtual-size"] = -(-node.size // 512) * 512
            if nested and node.backing is not None:
                info["backing-image"] = image(node.backing)
            infos[node] = info
        return info

    return [(node, image(node), names) for node in graph]
