"""The commit plan against reality: predicted growth of base, actual growth
after the commit, and what ``qemu-img measure`` says, for the chains of
``tests/plan_chains.py``.

    .venv/bin/python bench/commit_plan_table.py [--json]

Growth is base's allocated bytes on the host (st_blocks * 512) after minus
before; "file" is the change of its length.  qemu-img measure's "required"
is what a new image holding the whole chain needs; "naive" is that less
what base already takes, the estimate a client without a plan could make.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.plan_chains import CASES, Row, run_case


def mib(n: int) -> str:
    return f"{n / (1 << 20):9.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per chain")
    args = parser.parse_args()
    rows: list[Row] = []
    for i, case in enumerate(CASES):
        with tempfile.TemporaryDirectory(prefix="plan-") as tmp:
            d = Path(tmp)
            (d / "img").mkdir()
            rows.append(run_case(case, d / "img", d / "qmp.sock"))
        row = rows[-1]
        if args.json:
            print(json.dumps({"case": row.case, "cluster": row.cluster_size,
                              "predicted": row.predicted, "actual": row.actual,
                              "file": row.file_growth, "measure": row.measure_required,
                              "plan": row.plan}), flush=True)  # fmt: skip
        else:
            if i == 0:
                print(f"{'chain':<58} {'cluster':>7} {'predicted':>9} {'actual':>9} "
                      f"{'diff':>8} {'file':>9} {'measure':>9} {'naive':>9}  (MiB)")  # fmt: skip
            naive = row.measure_required - row.base_allocated_before
            print(f"{row.case:<58} {row.cluster_size:>7} {mib(row.predicted)} {mib(row.actual)} "
                  f"{(row.predicted - row.actual) / (1 << 20):8.3f} {mib(row.file_growth)} "
                  f"{mib(row.measure_required)} {mib(naive)}"
                  f"{'' if row.within else '  OUTSIDE 1% + 1 cluster'}", flush=True)  # fmt: skip
    return 0 if all(row.within for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
