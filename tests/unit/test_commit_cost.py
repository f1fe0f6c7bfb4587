"""The commit plan's verdict on room (``CommitCost.fits``), at its edge.

The daemon tests of the plan (tests/integration/test_commit_plan.py, and
blockctl's on a small file system) see free space far from the edge either
way; here the edge itself: the predicted peak plus the margin must fit.
"""

from __future__ import annotations

import pytest

from blockd.block.node import WriteForecast
from blockd.jobs.plan import CommitCost

KiB, MiB = 1 << 10, 1 << 20
PEAK = 10 * MiB


def cost(free: int | None, growth: int = 8 * MiB, peak: int = PEAK) -> CommitCost:
    forecast = WriteForecast(
        cluster_size=64 * KiB, clusters=128, data=8 * MiB, l2_tables=0, refcount_blocks=0,
        refcount_table=0, l1_table=0, reused=0, growth=growth, peak=peak,
        file_growth=max(growth, 0), upper_bound=False,
    )  # fmt: skip
    # top and base play no part in the verdict
    return CommitCost(top=None, base=None, layers=[], forecast=forecast,  # type: ignore[arg-type]
                      virtual_growth=0, free=free)  # fmt: skip


@pytest.mark.parametrize("growth", [8 * MiB, -8 * MiB])
def test_the_margin_is_one_percent_of_the_growth_and_a_cluster(growth: int) -> None:
    assert cost(None, growth).margin == 8 * MiB // 100 + 64 * KiB


# (the second peak shares set bits with the margin: their sum is not their xor)
@pytest.mark.parametrize("peak", [PEAK, PEAK + 123457])
def test_it_fits_when_the_peak_and_the_margin_fit(peak: int) -> None:
    margin = cost(None).margin
    assert cost(peak + margin, peak=peak).fits
    assert not cost(peak + margin - 1, peak=peak).fits
    assert not cost(peak, peak=peak).fits
    assert cost(None, peak=peak).fits  # no host file: nothing to measure
