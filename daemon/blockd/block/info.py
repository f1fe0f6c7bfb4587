"""What an image looks like from outside: the ``ImageInfo`` of qemu-img info.

Management tools read these fields (sizes, backing names, format details) to
decide what to do with a chain, so they carry QEMU's names and meanings.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.qjson import encode


async def _actual_size(filename: str) -> int | None:
    """Bytes the file really occupies on disk (sparse files use less)."""
    try:
        st = await trio.to_thread.run_sync(os.stat, filename)
    except OSError:
        return None
    return st.st_blocks * 512


def _backing_overridden(graph: BlockGraph, node: BlockNode) -> bool:
    """Whether the node's backing differs from what its image header names.

    Such a node cannot be described by its file name alone, so QEMU names it
    by a ``json:`` pseudo-filename holding its whole configuration.
    """
    if not isinstance(node, Qcow2Node):
        return False
    if node.backing is None:
        return bool(node.backing_file)
    if node.backing in graph.implicit_children(node):
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


def full_backing_filename(node: Qcow2Node) -> str | None:
    """The header's backing name resolved against the image's own directory."""
    name = node.backing_file
    if not name:
        return None
    if os.path.isabs(name) or ":" in name.split("/", 1)[0]:
        return name
    return os.path.join(os.path.dirname(node.filename), name)


def _qcow2_specific(header: hdr.Header) -> dict[str, Any]:
    data: dict[str, Any] = {"compat": "0.10" if header.version == 2 else "1.1"}
    if header.version >= 3:
        data["lazy-refcounts"] = bool(header.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)
        data["corrupt"] = bool(header.incompatible_features & hdr.INCOMPAT_CORRUPT)
        data["extended-l2"] = bool(header.incompatible_features & hdr.INCOMPAT_EXTL2)
    data["refcount-bits"] = header.refcount_bits
    data["compression-type"] = "zstd" if header.compression_type == hdr.COMPRESSION_ZSTD else "zlib"
    return {"type": "qcow2", "data": data}


async def image_info(graph: BlockGraph, node: BlockNode, *, nested: bool) -> dict[str, Any]:
    """ImageInfo of one node; ``nested`` adds the backing chain as backing-image."""
    info: dict[str, Any] = {
        "filename": display_filename(graph, node),
        "format": node.driver,
        "dirty-flag": False,
        # QEMU reports lengths in whole 512-byte sectors (bdrv_getlength).
        "virtual-size": -(-node.size // 512) * 512,
    }
    actual = await _actual_size(node.filename) if node.filename else None
    if actual is not None:
        info["actual-size"] = actual
    if isinstance(node, Qcow2Node):
        header = node.header
        info["dirty-flag"] = bool(header.incompatible_features & hdr.INCOMPAT_DIRTY)
        info["cluster-size"] = header.cluster_size
        info["format-specific"] = _qcow2_specific(header)
        if node.backing_file:
            info["backing-filename"] = node.backing_file
            full = full_backing_filename(node)
            if full is not None:
                info["full-backing-filename"] = full
            if node.backing_format:
                info["backing-filename-format"] = node.backing_format
    if nested and node.backing is not None:
        info["backing-image"] = await image_info(graph, node.backing, nested=True)
    return info
