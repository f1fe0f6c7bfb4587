"""Mutants the qcow2 metadata fuzzer found, replayed one by one.

Each case is a seed image and the few header/table writes that made the
mutant; it goes through the fuzzer's own trial (QSD and blockd read-only,
then blockd read-write and an active commit into a fresh base), which must
end in the verdict given here, with no failure.
"""

from __future__ import annotations

import struct

import pytest

from tests.fuzz.qcow2_fuzz import Runner

pytestmark = pytest.mark.qsd

#: name -> (seed, [(offset, struct format, value)], expected verdict, words in the detail)
CASES: dict[str, tuple[str, list[tuple[int, str, int]], str, str]] = {
    # QEMU refuses a table whose end would pass INT64_MAX, even an empty
    # snapshot table; blockd served the image (fuzz seed 2, mutant 871)
    "snapshot table offset near 2^64": (
        "v2-4k.qcow2", [(64, ">Q", 0xAB00000000000000)], "both-refused", ""),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fuzz_regression(qcow2_runner: Runner, case: str) -> None:
    runner = qcow2_runner
    seed, writes, verdict, words = CASES[case]
    data = bytearray((runner.work / seed).read_bytes())
    for offset, fmt, value in writes:
        struct.pack_into(fmt, data, offset, value)
    trial = runner.trial(0, seed, [case], bytes(data))
    assert not trial.failures, trial
    assert trial.kind == verdict, trial
    assert words in trial.detail, trial

