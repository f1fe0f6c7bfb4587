"""Block status as NBD reports it: ``base:allocation`` flags and
``qemu:allocation-depth`` depths, from the block layer's walk down the chain."""

from __future__ import annotations

from blockd.block.chain import layer_above
from blockd.block.node import BlockNode, Status
from blockd.export import protocol as p
from blockd.export import replies as r


async def allocation_flags(node: BlockNode, offset: int, length: int) -> tuple[int, int]:
    """``base:allocation``'s flags at ``offset`` (0 data, HOLE|ZERO reads as zeros), and the run."""
    _depth, _layer, status, run = await layer_above(node, None, offset, length)
    return (0 if status is Status.DATA else r.STATE_HOLE | r.STATE_ZERO), run


async def allocation_depth(node: BlockNode, offset: int, length: int) -> tuple[int, int]:
    """``qemu:allocation-depth``'s depth at ``offset`` (0 absent, 1 in ``node``,
    N found N-1 layers down), and the run."""
    depth, _layer, _status, run = await layer_above(node, None, offset, length)
    return depth, run


async def allocation_extents(
    node: BlockNode, offset: int, length: int, max_extents: int, context: str = p.BASE_ALLOCATION
) -> list[tuple[int, int]]:
    probe = allocation_depth if context == p.ALLOCATION_DEPTH else allocation_flags
    extents: list[tuple[int, int]] = []
    end = offset + length
    while offset < end:
        flags, n = await probe(node, offset, min(end - offset, 0xFFFFFFFF))
        extents = r.merge_extents([*extents, (n, flags)])
        offset += n
        if len(extents) >= max_extents:
            break
    return extents
