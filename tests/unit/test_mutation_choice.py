"""scripts/mutation runs, for each mutant, only the fast-tier tests that run
the statement it changes.  A wrong choice would let a mutant survive that the
whole tier kills, and the campaign's counts would lie: these cases pin it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

MODULE = """\
LIMIT = 4


def quick(x):
    return x + 1


def slow(x):
    def inner(y):
        return y * 2

    return inner(x) - LIMIT


def never(x):
    return x


VALUE = quick(1)
"""


def load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("mutation_script", str(ROOT / "scripts/mutation"))
    spec = importlib.util.spec_from_loader("mutation_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look themselves up there)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def choose():
    return load_script().choose_tests


#: what coverage recorded: line -> the tests that ran it ("" = at import)
CHOSEN = {
    "seconds": {"t.py::a": 3.0, "t.py::b": 0.5, "t.py::c": 1.0},
    "lines": {
        "1": [""],
        "4": [""],
        "5": ["t.py::a", "t.py::b", ""],  # quick() is also called at import
        "8": [""],
        "9": ["t.py::a", "t.py::c"],
        "10": ["t.py::c"],
        "12": ["t.py::a", "t.py::c"],
        "15": [""],
        "18": [""],
    },
}


def mutate(tmp_path: Path, old: str, new: str) -> tuple[Path, Path]:
    assert MODULE.count(old) == 1
    pristine, mutated = tmp_path / "pristine.py", tmp_path / "mutated.py"
    pristine.write_text(MODULE)
    mutated.write_text(MODULE.replace(old, new))
    return pristine, mutated


def test_a_change_in_a_body_runs_the_tests_that_ran_it_quickest_first(choose, tmp_path):
    assert choose(CHOSEN, *mutate(tmp_path, "inner(x) - LIMIT", "inner(x) + LIMIT")) == [
        "t.py::c",
        "t.py::a",
    ]


def test_a_change_in_a_nested_function_runs_the_tests_of_the_innermost_body(choose, tmp_path):
    assert choose(CHOSEN, *mutate(tmp_path, "y * 2", "y / 2")) == ["t.py::c"]


def test_a_change_at_module_level_runs_the_whole_tier(choose, tmp_path):
    assert choose(CHOSEN, *mutate(tmp_path, "LIMIT = 4", "LIMIT = 5")) is None


def test_a_body_that_runs_at_import_runs_the_whole_tier(choose, tmp_path):
    assert choose(CHOSEN, *mutate(tmp_path, "x + 1", "x - 1")) is None


def test_a_function_no_test_runs_chooses_nothing(choose, tmp_path):
    assert choose(CHOSEN, *mutate(tmp_path, "    return x\n", "    return None\n")) == []


# -- the ledger: a campaign's outcomes outlive its machine -----------------------


def session_with(path: Path, mutants: list[tuple[str, int]]) -> list[str]:
    """A cosmic-ray session of ``(operator, occurrence)`` mutants; their job ids."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import MutationSpec, WorkItem

    ids = []
    with use_db(str(path), WorkDB.Mode.create) as db:
        for i, (operator, occurrence) in enumerate(mutants):
            spec = MutationSpec("m.py", operator, occurrence, (10 + i, 0), (10 + i, 5))
            db.add_work_item(WorkItem(job_id=f"job{path.stem}{i}", mutations=[spec]))
            ids.append(f"job{path.stem}{i}")
    return ids


def test_a_new_session_takes_the_ledger_s_outcomes_and_runs_the_rest(tmp_path, monkeypatch):
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    script = load_script()
    monkeypatch.setattr(script, "LEDGERS", tmp_path / "ledgers")
    (tmp_path / "first.py").write_text(MODULE)
    target = script.Target("m.py", "tests")
    mutants = [("core/A", 0), ("core/A", 1), ("core/B", 0)]
    first = session_with(tmp_path / "first.sqlite", mutants)
    diff = "--- a\n+++ b\n-    return x + 1\n+    return x - 1\n"
    with use_db(str(tmp_path / "first.sqlite")) as db:
        for job, outcome in zip(first, (TestOutcome.KILLED, TestOutcome.SURVIVED), strict=False):
            db.set_result(job, WorkResult(WorkerOutcome.NORMAL, "", outcome, diff))
    script.save_ledger("m", target, tmp_path / "first.sqlite", fast_only=True)

    (tmp_path / "second.py").write_text(MODULE)  # the same module, on another machine
    second = session_with(tmp_path / "second.sqlite", mutants)
    script.apply_ledger("m", tmp_path / "second.sqlite", fast_only=True)
    with use_db(str(tmp_path / "second.sqlite")) as db:
        assert [item.job_id for item in db.pending_work_items] == [second[2]]
        taken = {job: result.test_outcome for job, result in db.results}
    assert taken == {second[0]: TestOutcome.KILLED, second[1]: TestOutcome.SURVIVED}

    # a run with both tiers runs a fast-tier survivor again
    third = session_with(tmp_path / "third.sqlite", mutants)
    (tmp_path / "third.py").write_text(MODULE)
    script.apply_ledger("m", tmp_path / "third.sqlite", fast_only=False)
    with use_db(str(tmp_path / "third.sqlite")) as db:
        assert sorted(item.job_id for item in db.pending_work_items) == third[1:]

    # another version of the module: every mutant runs
    (tmp_path / "fourth.py").write_text(MODULE + "\n# changed\n")
    fourth = session_with(tmp_path / "fourth.sqlite", mutants)
    script.apply_ledger("m", tmp_path / "fourth.sqlite", fast_only=True)
    with use_db(str(tmp_path / "fourth.sqlite")) as db:
        assert sorted(item.job_id for item in db.pending_work_items) == fourth


def test_the_summary_counts_judged_survivors_by_their_change(tmp_path, monkeypatch, capsys):
    script = load_script()
    monkeypatch.setattr(script, "LEDGERS", tmp_path)
    entry = {"line": 5, "tiers": "fast", "timed_out": False}
    (tmp_path / "m.json").write_text(
        json.dumps(
            {
                "mutants": {
                    "a": {**entry, "outcome": "killed", "change": "f: x -> y", "timed_out": True},
                    "b": {
                        **entry,
                        "outcome": "survived",
                        "change": "(module): LIMIT = 4 -> LIMIT = 5",
                    },
                    "c": {**entry, "outcome": "survived", "change": "quick: x + 1 -> x - 1"},
                    "d": {**entry, "outcome": "survived", "change": "inner: y * 2 -> y / 2"},
                },
                "equivalent": {"(module): LIMIT = 4 -> LIMIT = 5": "tuning"},
                "killed_by": {"quick: x + 1 -> x - 1": "t.py::a"},
            }
        )
    )
    script.summary("m")
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "m: 4 mutants run: 1 killed (1 by a timeout), 3 survived: 1 killed by a test"
        " outside the tiers run, 1 judged equivalent, 1 not judged",
        "  line 5 (fast tier): inner: y * 2 -> y / 2",
    ]


def test_a_change_is_named_by_the_lines_it_changes() -> None:
    diff = "--- mutation diff ---\n--- aa.py\n+++ bb.py\n@@ -1 +1 @@\n-    a = 1\n+    a = 2\n"
    assert load_script().change_of(diff) == "a = 1 -> a = 2"


BRANCHY = """\
def f(x):
    if x > 0:
        return 1
    return 2
"""


@pytest.mark.parametrize(
    ("old", "new", "tests"),
    [
        ("return 1", "return 0", ["t.py::a"]),
        ("x > 0", "x >= 0", ["t.py::b", "t.py::a"]),  # the header: both ran it
        ("return 2", "return 3", ["t.py::b"]),
    ],
)
def test_a_change_runs_the_tests_that_ran_its_statement(choose, tmp_path, old, new, tests):
    chosen = {
        "seconds": {"t.py::a": 2.0, "t.py::b": 1.0},
        "lines": {"1": [""], "2": ["t.py::a", "t.py::b"], "3": ["t.py::a"], "4": ["t.py::b"]},
    }
    pristine, mutated = tmp_path / "pristine.py", tmp_path / "mutated.py"
    pristine.write_text(BRANCHY)
    mutated.write_text(BRANCHY.replace(old, new))
    assert choose(chosen, pristine, mutated) == tests
