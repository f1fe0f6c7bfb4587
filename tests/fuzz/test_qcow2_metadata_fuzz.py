"""Hostile qcow2 metadata: seeded mutants of qemu-made images through blockd and QSD.

For each mutant (:mod:`tests.fuzz.qcow2_corpus` makes and mutates the
seeds, :mod:`tests.fuzz.qcow2_fuzz` runs it): ``blockdev-add`` read-only,
read the whole disk over NBD, then open it read-write over a fresh base,
commit it into that base and ``blockdev-del``.  blockd must never die, hang,
log an internal error, grow without bound or serve bytes that differ from
what qemu-storage-daemon 7.2 serves for the same mutant; it must not write to
the mutant beyond the header's feature bits (the corrupt bit QEMU also sets);
a base it committed into must pass ``qemu-img check`` and hold the mutant's
data.

Where only one of the two opens a mutant, or only one fails a read, that is a
disagreement: counted and printed for review, not a failure (blockd refuses
more at open than QEMU on purpose, see the block layer's README; the rule for
each kind is in :func:`tests.fuzz.qcow2_fuzz.compare`).

Short profile by default; ``BLOCKD_FUZZ_EXAMPLES=N`` runs N mutants,
``BLOCKD_FUZZ_SEED`` replays a run (the seed is printed), and
``BLOCKD_FUZZ_REPORT=FILE`` writes every disagreement and failure there.
"""

from __future__ import annotations

import collections
import json
import os
import random
import time

import pytest

from tests.fuzz.qcow2_corpus import Mutator, load
from tests.fuzz.qcow2_fuzz import MiB, Runner, Trial

pytestmark = pytest.mark.qsd

SHORT_PROFILE = 100
#: blockd's resident set may not grow more than this over a run
RSS_GROWTH = 64 * MiB


def test_qcow2_metadata_fuzz(qcow2_runner: Runner) -> None:
    runner = qcow2_runner
    count = int(os.environ.get("BLOCKD_FUZZ_EXAMPLES", "0")) or SHORT_PROFILE
    first_seed = int(os.environ.get("BLOCKD_FUZZ_SEED", "0")) or random.randrange(1, 1 << 32)
    print(f"\nqcow2 metadata fuzz: {count} mutants, BLOCKD_FUZZ_SEED={first_seed}")
    seeds = load(sorted(runner.work.glob("*.qcow2")))
    seeds = [s for s in seeds if s.path.name != "backing.qcow2"]
    rng = random.Random(first_seed)
    mutator = Mutator(rng)
    kinds: collections.Counter[str] = collections.Counter()
    commits: collections.Counter[str] = collections.Counter()
    review: list[Trial] = []
    failed: list[Trial] = []
    started = time.monotonic()
    for index in range(count):
        seed = rng.choice(seeds)
        data, notes = mutator.mutate(seed)
        trial = runner.trial(index, seed.path.name, notes, bytes(data))
        kinds[trial.kind or "failed"] += 1
        commits[trial.commit.split(":")[0] or "-"] += 1
        if trial.failures:
            failed.append(trial)
        elif trial.kind not in ("equal", "both-refused"):
            review.append(trial)
    took = time.monotonic() - started
    rss = [(i, round(r / MiB)) for i, r in runner.rss]
    print(f"qcow2 metadata fuzz: seed {first_seed}, {count} mutants in {took:.0f} s; "
          f"{dict(kinds)}; commit phase {dict(commits)}; {len(failed)} failures; "
          f"blockd restarts {runner.blockd.starts - 1}, QSD restarts {runner.qsd.starts - 1}; "
          f"RSS MiB {rss[:3]}...{rss[-3:]}; QSD against qemu-img convert "
          f"{dict(runner.qemu_img)} {runner.qemu_img_mismatches[:10]}")
    for t in review[:40]:
        print(f"  review #{t.index} {t.seed} {t.notes}: {t.kind} {t.detail}")
    report = os.environ.get("BLOCKD_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"seed": first_seed, "count": count, "seconds": took,
                       "kinds": kinds, "commits": commits, "rss_mib": rss,
                       "qemu_img": runner.qemu_img,
                       "qemu_img_mismatches": runner.qemu_img_mismatches,
                       "review": [vars(t) for t in review],
                       "failed": [vars(t) for t in failed]}, f, indent=1)
    shown = "\n".join(f"#{t.index} {t.seed} {t.notes}: {t.failures}" for t in failed[:10])
    assert not failed, f"seed {first_seed}: {len(failed)} failing mutants:\n{shown}"
    if len(runner.rss) >= 2:
        assert runner.rss[-1][1] - runner.rss[0][1] <= RSS_GROWTH, rss
