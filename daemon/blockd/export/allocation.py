"""What a node's backing chain holds where, as NBD's block status and sparse reads report it."""

from __future__ import annotations

from blockd.block.node import BlockNode, Status
from blockd.export import protocol as p


async def chain_status(node: BlockNode, offset: int, length: int) -> tuple[int, int, int]:
    """What the whole backing chain holds at ``offset``: (flags, depth, run length).

    ``flags`` are ``base:allocation``'s (0 data, HOLE|ZERO reads as zeros);
    ``depth`` is ``qemu:allocation-depth``'s (0 absent, 1 in ``node``, N
    found N-1 layers down).  A layer shorter than ``offset`` reads as zeros
    from that layer on.
    """
    run = length
    layer: BlockNode | None = node
    depth = 1
    seen: set[int] = set()
    while layer is not None and id(layer) not in seen:
        seen.add(id(layer))
        if offset >= layer.size:
            return p.STATE_HOLE | p.STATE_ZERO, depth, run
        status, n = await layer.block_status(offset, min(run, layer.size - offset))
        run = min(run, n)
        if status is Status.DATA:
            return 0, depth, run
        if status is Status.ZERO:
            return p.STATE_HOLE | p.STATE_ZERO, depth, run
        layer = layer.backing
        depth += 1
    return p.STATE_HOLE | p.STATE_ZERO, 0, run


async def allocation_flags(node: BlockNode, offset: int, length: int) -> tuple[int, int]:
    flags, _depth, run = await chain_status(node, offset, length)
    return flags, run


async def allocation_depth(node: BlockNode, offset: int, length: int) -> tuple[int, int]:
    _flags, depth, run = await chain_status(node, offset, length)
    return depth, run


async def allocation_extents(
    node: BlockNode, offset: int, length: int, max_extents: int, context: str = p.BASE_ALLOCATION
) -> list[tuple[int, int]]:
    probe = allocation_depth if context == p.ALLOCATION_DEPTH else allocation_flags
    extents: list[tuple[int, int]] = []
    end = offset + length
    while offset < end:
        flags, n = await probe(node, offset, min(end - offset, 0xFFFFFFFF))
        extents = p.merge_extents([*extents, (n, flags)])
        offset += n
        if len(extents) >= max_extents:
            break
    return extents


async def sparse_extents(node: BlockNode, offset: int, length: int) -> list[tuple[int, bool]]:
    """How QEMU's sparse read cuts a range: ``(length, reads as zeros)`` runs.

    Adjacent holes are joined only when they come from the same place (one
    layer's zero clusters, or nothing anywhere in the chain), as QEMU's block
    status walk splits them; data runs are never joined.
    """
    out: list[tuple[int, bool]] = []
    last_hole: int | None = None
    end = offset + length
    while offset < end:
        flags, depth, n = await chain_status(node, offset, end - offset)
        if flags & p.STATE_ZERO:
            if last_hole == depth and out:
                out[-1] = (out[-1][0] + n, True)
            else:
                out.append((n, True))
            last_hole = depth
        else:
            out.append((n, False))
            last_hole = None
        offset += n
    return out


async def sparse_read(node: BlockNode, offset: int, length: int) -> list[tuple[int, bytes | None]]:
    """Read a range as QEMU's sparse read does: runs that read as zeros become holes."""
    out: list[tuple[int, bytes | None]] = []
    for n, hole in await sparse_extents(node, offset, length):
        out.append((n, None if hole else await node.read(offset, n)))
        offset += n
    return out
