"""Random sequences of chain surgery and job control, blockd beside qemu-storage-daemon 7.2.

The scenarios, what is compared and what is normalised are described in
``random_driver.py``.  Profiles:

* default: BLOCKD_FUZZ_EXAMPLES seeds (8 unless set) of BLOCKD_FUZZ_STEPS body
  steps (14 unless set), starting at BLOCKD_FUZZ_SEED (a fresh random seed per
  run unless set; the failing seed is in the message, so any failure can be
  replayed).  The long profile is the same test with BLOCKD_FUZZ_EXAMPLES=2000.
* BLOCKD_FUZZ_REPLAY=file.json runs one saved (shrunk) scenario instead.
* BLOCKD_FUZZ_AVOID=name,... leaves features out of the scenarios (see
  ``random_driver.AVOIDABLE``), to look past a known difference; off by default.

A failing seed is shrunk (steps removed while the same kind of difference
remains) and the message shows the shortest sequence found.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, start_blockd, start_qsd
from tests.images import qemu_io
from tests.interop import random_driver as rd

pytestmark = pytest.mark.qsd

EXAMPLES = int(os.environ.get("BLOCKD_FUZZ_EXAMPLES", "8"))
STEPS = int(os.environ.get("BLOCKD_FUZZ_STEPS", "14"))
FIRST_SEED = int(os.environ.get("BLOCKD_FUZZ_SEED", str(random.randrange(1 << 30))))
AVOID = rd.avoid_from_env(os.environ.get("BLOCKD_FUZZ_AVOID"))


def tools() -> None:
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io"):
        require_tool(tool)


def run_seeds(start_b: Callable[[Path], DaemonProcess] = start_blockd) -> list[str]:
    """Run the profile; the first difference fails with its seed and shrunk sequence."""
    inconclusive: list[str] = []
    for seed in range(FIRST_SEED, FIRST_SEED + EXAMPLES):
        scn = rd.generate(seed, STEPS, AVOID)
        diff = rd.try_scenario(scn, start_b, inconclusive.append)
        if diff is None:
            continue
        small, small_diff = rd.shrink(scn, diff, lambda s: rd.try_scenario(s, start_b), budget=25)
        pytest.fail(
            f"seed {seed} (BLOCKD_FUZZ_SEED={seed} BLOCKD_FUZZ_EXAMPLES=1"
            f"{' BLOCKD_FUZZ_AVOID=' + ','.join(sorted(AVOID)) if AVOID else ''}):\n"
            f"{diff}\n\nshrunk to:\n{small_diff}\n{rd.describe(small)}\n\n"
            f"replay file:\n{small.to_json()}",
            pytrace=False,
        )
    return inconclusive


def test_random_sequences_match_qsd() -> None:
    tools()
    replay = os.environ.get("BLOCKD_FUZZ_REPLAY")
    if replay:
        scn = rd.Scenario.from_json(Path(replay).read_text())
        diff = rd.try_scenario(scn)
        assert diff is None, f"{diff}\n{rd.describe(scn)}"
        return
    inconclusive = run_seeds()
    # QSD not settling is a harness problem; a few in a row would hide everything.
    assert len(inconclusive) <= EXAMPLES // 4, inconclusive


def test_harness_sees_no_difference_between_two_qsds() -> None:
    """The normalisation hides timing and nothing else: QSD against itself is
    always the same (a difference here is a harness bug, not a blockd bug)."""
    tools()
    inconclusive = run_seeds(start_b=start_qsd)
    assert len(inconclusive) <= EXAMPLES // 4, inconclusive


def test_the_harness_can_fail(tmp_path: Path) -> None:
    """A planted difference is caught, and shrinking takes away every step it
    does not need: one cluster of the second daemon's copy of the bottom image
    is changed before the run (QSD on both sides otherwise)."""
    tools()
    scn = rd.generate(FIRST_SEED, 0, frozenset(rd.AVOIDABLE)).with_body(
        [
            {"qmp": "query-jobs", "args": {}},
            {"qmp": "job-pause", "args": {"id": "nosuch"}},
            {"sleep": 0.05},
            {"qmp": "blockdev-del", "args": {"node-name": "nosuch"}},
        ]
    )

    def tamper(d: Path) -> None:
        qemu_io(d / "n0.qcow2", "write -P 0xee 30M 64k")

    def attempt(s: rd.Scenario) -> rd.Difference | None:
        with tempfile.TemporaryDirectory(prefix="fuzz-") as name:
            try:
                rd.run_scenario(s, Path(name), start_qsd, tamper)
            except rd.Difference as diff:
                return diff
        return None

    diff = attempt(scn)
    assert diff is not None and diff.where == "image n0", diff
    assert diff.kind.startswith("guest view"), diff
    small, _ = rd.shrink(scn, diff, attempt, budget=12)
    assert small.body == []
