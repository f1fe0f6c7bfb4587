"""What a backing chain holds where: the one walk down the layers, for jobs
(through :meth:`BlockGraph.allocation_above`) and for the NBD export's block
status and sparse reads alike.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from blockd.block.node import BlockNode, Status


def layers(top: BlockNode) -> Iterator[BlockNode]:
    """``top``, its backing, its backing's backing, ... (loops are cut)."""
    seen: set[int] = set()
    node: BlockNode | None = top
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        yield node
        node = node.backing


async def layer_above(
    top: BlockNode, base: BlockNode | None, offset: int, length: int
) -> tuple[int, BlockNode | None, Status, int]:
    """The topmost layer from ``top`` down to (excluding) ``base`` that holds
    the run at ``offset``: (depth, layer, status, run length).

    ``depth`` is 1 for ``top``, N for the layer N-1 below it; a run no layer
    holds is (0, None, UNALLOCATED, run).  A layer shorter than ``offset``
    holds zeros there: what is seen through it are zeros it synthesises,
    which hide everything below exactly like a zero cluster would (QEMU
    treats them so).
    """
    run = length
    for depth, node in enumerate(layers(top), 1):
        if node is base:
            break
        if offset >= node.size:
            return depth, node, Status.ZERO, run
        status, n = await node.block_status(offset, min(run, node.size - offset))
        run = min(run, n)
        if status is not Status.UNALLOCATED:
            return depth, node, status, run
    return 0, None, Status.UNALLOCATED, run


#: one run of a chain's view: (depth, layer, status, offset, length), as :func:`layer_above`
Run = tuple[int, BlockNode | None, Status, int, int]


async def runs_above(
    top: BlockNode, base: BlockNode | None, offset: int, length: int
) -> list[Run]:
    """Every run of ``[offset, offset + length)`` with the topmost layer above
    ``base`` holding it, in order: what :func:`layer_above` answers run after
    run, split the same way (where a layer above changes).

    Each layer is asked once for all of its runs across what the layers
    above leave open, so the cost is one question per layer reached plus
    the runs, not (runs x layers).  A layer that cannot answer so (an entry
    it calls corrupt) sends the whole range down the run-by-run walk, which
    meets it exactly where QEMU's does.
    """
    found: list[Run] = []
    open_: list[tuple[int, int]] = [(offset, offset + length)]  # what no layer above holds
    for depth, node in enumerate(layers(top), 1):
        if node is base or not open_:
            break
        lo, hi = open_[0][0], open_[-1][1]
        held: list[tuple[Status, int, int]] = []  # what this layer holds in [lo, hi)
        if lo < node.size:
            answer = await node.block_status_runs(lo, min(hi, node.size) - lo)
            if answer is None:
                return await _run_by_run(top, base, offset, length)
            pos = lo
            for status, n in answer:
                if status is not Status.UNALLOCATED:
                    held.append((status, pos, pos + n))
                pos += n
        if hi > node.size:
            # past a shorter layer's end: zeros it synthesises (see layer_above)
            held.append((Status.ZERO, max(lo, node.size), hi))
        if not held:
            continue
        # cut what this layer holds out of what is still open: per run it
        # holds (a bisection), not per open piece, which grow with the layers
        ends = [b for _a, b in open_]
        still: list[tuple[int, int]] = []
        i = 0
        for status, c, d in held:
            j = bisect.bisect_right(ends, c, i)  # the first open piece ending past c
            still += open_[i:j]
            i = j
            while i < len(open_) and open_[i][0] < d:
                a, b = open_[i]
                if a < c:
                    still.append((a, c))
                found.append((depth, node, status, max(a, c), min(b, d) - max(a, c)))
                if b > d:
                    open_[i] = (d, b)  # the rest stays open for the next run
                    break
                i += 1
        still += open_[i:]
        open_ = still
    found += [(0, None, Status.UNALLOCATED, a, b - a) for a, b in open_]
    found.sort(key=lambda run: run[3])
    return found


async def _run_by_run(
    top: BlockNode, base: BlockNode | None, offset: int, length: int
) -> list[Run]:
    out: list[Run] = []
    end = offset + length
    while offset < end:
        depth, layer, status, n = await layer_above(top, base, offset, end - offset)
        out.append((depth, layer, status, offset, n))
        offset += n
    return out


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
        depth, _layer, status, n = await layer_above(node, None, offset, end - offset)
        if status is not Status.DATA:
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
