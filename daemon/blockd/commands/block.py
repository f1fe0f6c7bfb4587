"""Node commands: blockdev-add, blockdev-del, query-named-block-nodes, query-block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockd import logs
from blockd.block.graph import BlockGraph
from blockd.block.info import Names, image_infos
from blockd.block.node import BlockNode
from blockd.block.open import open_node
from blockd.commands.context import CommandContext
from blockd.errors import BlockdError


async def blockdev_add(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    if "node-name" not in args:
        raise BlockdError("'node-name' must be specified for the root node")
    node = await open_node(ctx.graph, dict(args))
    ctx.graph.set_monitor_owned(node)
    logs.node_opened(node.node_name, node.driver, node.filename, node.read_only)
    return {}


async def blockdev_del(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    name = args["node-name"]
    graph = ctx.graph
    node = _deletable(graph, name)
    # Made durable first, so a failure changes nothing and can be retried;
    # QSD closes regardless and drops what it could not write (README).
    await graph.flush_for_close(node)
    # the flush awaited: check again, so what is closed is what was checked
    node = _deletable(graph, name)
    await graph.close_node(node)
    logs.node_closed(name)
    return {}


def _deletable(graph: BlockGraph, name: str) -> BlockNode:
    """The node ``blockdev-del`` may close, or the error QEMU gives for it."""
    node = graph.get(name)
    if node is None:
        raise BlockdError(f"Failed to find node with node-name='{name}'")
    # QEMU's order: users (exports, a job's target) first, then what holds
    # the node, then ownership, then other parents.
    if graph.attached(node):
        raise BlockdError(f"Node {name} is in use")
    reason = graph.deletion_blocker(node)
    if reason is not None:
        raise BlockdError(f"Node '{name}' is busy: {reason}")
    if not graph.is_monitor_owned(node):
        raise BlockdError(f"Node {name} is not owned by the monitor")
    if graph.parents(node):
        raise BlockdError(f"Block device {name} is in use")
    return node


def _device_info(
    node: BlockNode, image: dict[str, Any], depth: int, names: Names
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "file": names.filename(node),
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.driver,
    }
    if node.backing is not None:
        info["backing_file"] = names.filename(node.backing)
    info.update(
        {
            "backing_file_depth": depth,
            "encrypted": False,
            "detect_zeroes": node.detect_zeroes,
            "bps": 0,
            "bps_rd": 0,
            "bps_wr": 0,
            "iops": 0,
            "iops_rd": 0,
            "iops_wr": 0,
            "image": image,
            "cache": {"writeback": True, "direct": False, "no-flush": False},
            "write_threshold": 0,
        }
    )
    return info


async def query_named_block_nodes(
    ctx: CommandContext, args: Mapping[str, Any]
) -> list[dict[str, Any]]:
    flat = args.get("flat", False)
    out = []
    for node, image, names in await image_infos(ctx.graph, nested=not flat):
        depth = 0 if flat else len(list(ctx.graph.chain(node))) - 1
        out.append(_device_info(node, image, depth, names))
    return out


async def query_block(ctx: CommandContext, args: Mapping[str, Any]) -> list[Any]:
    # Block backends are guest devices; a storage daemon has none.
    return []
