"""The cost of a commit, known before it starts: what each layer above base
gives, and what base's file system must find room for.

The copy is walked as :class:`~blockd.jobs.copy.ChainCopy` will make it,
step by step (:class:`~blockd.jobs.copy.Steps`: zero runs, then data runs),
then what an intermediate commit zeroes in base past a shorter top; base is asked what growing to
top's size and taking those writes would add to its file
(:meth:`BlockNode.forecast_writes`), which only its driver can tell.  The
walk assumes no speed limit: a limited job copies in smaller steps, which
changes nothing unless a base cluster gets both a zero run and data in
different steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode, PlannedWrite, Status, WriteForecast
from blockd.jobs.active_commit import ActiveCommitPlan
from blockd.jobs.commit import CommitPlan
from blockd.jobs.copy import CHUNK, WINDOW, ChainCopy, CopyFailed, Steps


@dataclass
class LayerShare:
    """What one layer above base holds that the commit copies (its own, not hidden above)."""

    node: BlockNode
    data: int = 0
    zero: int = 0
    #: separate runs (adjacent pieces of the same kind count once)
    runs: int = 0


@dataclass(frozen=True)
class CommitCost:
    top: BlockNode
    base: BlockNode
    layers: list[LayerShare]
    forecast: WriteForecast
    #: how much the commit grows base's virtual size (to top's)
    virtual_growth: int
    #: bytes free on base's file system; None: base has no host file
    free: int | None
    margin: int = field(init=False)

    def __post_init__(self) -> None:
        # the forecast's accuracy (tests/integration/test_commit_plan.py): 1% and a cluster
        object.__setattr__(
            self, "margin", abs(self.forecast.growth) // 100 + self.forecast.cluster_size
        )

    @property
    def fits(self) -> bool:
        """Whether base's file system has room for the growth and the margin."""
        return self.free is None or self.forecast.peak + self.margin <= self.free


async def commit_cost(graph: BlockGraph, plan: CommitPlan | ActiveCommitPlan) -> CommitCost:
    """Work out the cost of a validated commit; nothing is written."""
    top, base = plan.top, plan.base
    shares = {id(node): LayerShare(node) for node in plan.intermediates}
    copy = ChainCopy(graph, top, base)
    last: tuple[int, Status, int] | None = None  # (layer, status, end) of the last run

    async def writes() -> AsyncGenerator[PlannedWrite]:
        nonlocal last
        steps = Steps(copy, 0, top.size)
        offset = 0
        while offset < top.size:
            try:
                offset, runs = await steps.next(WINDOW)
            except CopyFailed as failed:
                raise failed.error from failed
            for layer, status, pos, n in runs:
                share = shares[id(layer)]
                if status is Status.ZERO:
                    share.zero += n
                else:
                    share.data += n
                if last != (id(layer), status, pos):
                    share.runs += 1
                last = (id(layer), status, pos + n)
            for _layer, status, pos, n in runs:
                if status is Status.ZERO:
                    yield pos, n, True
            for _layer, status, pos, n in runs:
                if status is not Status.ZERO:
                    yield pos, n, False
        if isinstance(plan, CommitPlan):
            async for hidden in _past_top(graph, plan):
                yield hidden

    async with contextlib.aclosing(writes()) as planned:
        forecast = await base.forecast_writes(max(base.size, top.size), planned)
    return CommitCost(
        top=top,
        base=base,
        layers=[shares[id(node)] for node in plan.intermediates],
        forecast=forecast,
        virtual_growth=max(0, top.size - base.size),
        free=await base.free_space(),
    )


async def _past_top(graph: BlockGraph, plan: CommitPlan) -> AsyncIterator[PlannedWrite]:
    """The zero writes :meth:`CommitJob._hide_base_past_top` makes: base's own
    data past a shorter top's end, where the overlay will see it."""
    visible = max(n.size for n in plan.overlay_chain)
    start, end = plan.top.size, min(plan.base.size, visible)
    while start < end:
        holds, n = await graph.is_allocated_above(plan.base, None, start, min(CHUNK, end - start))
        if holds:
            yield start, n, True
        start += n
