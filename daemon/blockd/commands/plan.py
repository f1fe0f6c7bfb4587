"""``__org.blockd_commit-plan``: what a block-commit would copy and cost, asked
before starting it (blockctl checks it before every commit).

A downstream extension (QAPI's ``__RFQDN_`` rule), so no QSD command changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockd.commands.context import CommandContext
from blockd.commands.jobs import resolve_commit
from blockd.jobs.commit import CommitPlan, refuse_writable_top
from blockd.jobs.plan import commit_cost


async def commit_plan(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    plan = resolve_commit(ctx, args)
    # what the job's claim would meet, named as block-commit's default job id
    # (the device) names it; then what the intermediate commit's setup refuses
    ctx.graph.claim_for_commit(
        args["device"], plan.top, plan.base, active=not isinstance(plan, CommitPlan), trial=True
    )
    if isinstance(plan, CommitPlan):
        refuse_writable_top(plan, ctx.writers)
    cost = await commit_cost(ctx.graph, plan)
    forecast = cost.forecast
    result: dict[str, Any] = {
        "device": args["device"],
        "top-node": cost.top.node_name,
        "base-node": cost.base.node_name,
        "layers": [
            {
                "node-name": share.node.node_name,
                "filename": share.node.filename,
                "data": share.data,
                "zero": share.zero,
                "runs": share.runs,
            }
            for share in cost.layers
        ],
        "cluster-size": forecast.cluster_size,
        "clusters": forecast.clusters,
        "growth": {
            "total": forecast.growth,
            "data": forecast.data,
            "l2-tables": forecast.l2_tables,
            "refcount-blocks": forecast.refcount_blocks,
            "refcount-table": forecast.refcount_table,
            "l1-table": forecast.l1_table,
            "reused": forecast.reused,
            "file-length": forecast.file_growth,
            "peak": forecast.peak,
        },
        "upper-bound": forecast.upper_bound,
        "virtual-growth": cost.virtual_growth,
        "margin": cost.margin,
        "fits": cost.fits,
    }
    if cost.free is not None:
        result["free"] = cost.free
    return result
