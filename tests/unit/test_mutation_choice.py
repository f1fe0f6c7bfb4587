"""scripts/mutation runs, for each mutant, only the fast-tier tests that run
the statement it changes.  A wrong choice would let a mutant survive that the
whole tier kills, and the campaign's counts would lie: these cases pin it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

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


def test_a_tier_that_runs_the_module_in_daemons_runs_whole_for_every_mutant(tmp_path):
    """Coverage sees only the test process: for the commit plan, whose tests
    ask a daemon for it, no line would look run, and every mutant would pass
    the tier unseen."""
    script = load_script()
    assert script.TARGETS["plan"].fast_through_daemon
    where = tmp_path / "plan.tests.json"
    script.map_tests(tmp_path, script.TARGETS["plan"], {}, where)
    chosen = json.loads(where.read_text())
    never_run = mutate(tmp_path, "    return x\n", "    return None\n")
    assert script.choose_tests(chosen, *never_run) is None


# -- the ledger: a campaign's outcomes outlive its machine -----------------------


#: (operator, occurrence, line, the function around it) of three mutants of MODULE
MUTANTS = [("core/A", 0, 5, "quick"), ("core/A", 1, 12, "slow"), ("core/B", 0, 16, "never")]


def session_with(
    path: Path, source: str, mutants: list[tuple[str, int, int, str | None]], tiers: str = "fast"
) -> list[str]:
    """A cosmic-ray session of ``source`` (its pristine copy beside ``path``)
    and these mutants, run with the fast tier or both; their job ids."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import MutationSpec, WorkItem

    script = load_script()
    script.pristine_of(path).write_text(source)
    command = ["fast"] + ([script.pytest_command("slow", 900)] if tiers == "both" else [])
    path.with_suffix(".toml").write_text(
        f"[cosmic-ray]\ntest-command = {script.sh_quote_toml(' && '.join(command))}\n"
    )
    ids = []
    with use_db(str(path), WorkDB.Mode.create) as db:
        for i, (operator, occurrence, line, where) in enumerate(mutants):
            spec = MutationSpec(
                "m.py", operator, occurrence, (line, 4), (line, 9), definition_name=where
            )
            db.add_work_item(WorkItem(job_id=f"job{path.stem}{i}", mutations=[spec]))
            ids.append(f"job{path.stem}{i}")
    return ids


def finish(session: Path, outcomes: dict[str, Any]) -> None:
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    diff = "--- a\n+++ b\n-    return x + 1\n+    return x - 1\n"
    with use_db(str(session)) as db:
        for job, outcome in outcomes.items():
            db.set_result(job, WorkResult(WorkerOutcome.NORMAL, "", outcome, diff))


def pending_and_taken(session: Path) -> tuple[list[str], dict[str, Any]]:
    from cosmic_ray.work_db import use_db

    with use_db(str(session)) as db:
        pending = sorted(item.job_id for item in db.pending_work_items)
        return pending, {job: result.test_outcome for job, result in db.results}


def test_a_new_session_takes_the_ledger_s_outcomes_and_runs_the_rest(tmp_path, monkeypatch):
    from cosmic_ray.work_item import TestOutcome

    script = load_script()
    monkeypatch.setattr(script, "LEDGERS", tmp_path / "ledgers")
    target = script.Target("m.py", "tests", "slow")
    first = session_with(tmp_path / "first.sqlite", MODULE, MUTANTS)
    outcomes = {first[0]: TestOutcome.KILLED, first[1]: TestOutcome.SURVIVED}
    finish(tmp_path / "first.sqlite", outcomes)
    script.save_ledger("m", target, tmp_path / "first.sqlite")
    ledger = json.loads((tmp_path / "ledgers" / "m.json").read_text())
    assert [e["tiers"] for e in ledger["mutants"].values()] == ["fast", "fast"]

    # the same module, on another machine
    second = session_with(tmp_path / "second.sqlite", MODULE, MUTANTS)
    script.apply_ledger("m", tmp_path / "second.sqlite", fast_only=True)
    assert pending_and_taken(tmp_path / "second.sqlite") == (
        [second[2]],
        {second[0]: TestOutcome.KILLED, second[1]: TestOutcome.SURVIVED},
    )

    # a run with both tiers runs a fast-tier survivor again, and records
    # that both tiers ran
    third = session_with(tmp_path / "third.sqlite", MODULE, MUTANTS, tiers="both")
    script.apply_ledger("m", tmp_path / "third.sqlite", fast_only=False)
    assert pending_and_taken(tmp_path / "third.sqlite")[0] == third[1:]
    finish(tmp_path / "third.sqlite", {third[1]: TestOutcome.SURVIVED})
    script.save_ledger("m", target, tmp_path / "third.sqlite")
    ledger = json.loads((tmp_path / "ledgers" / "m.json").read_text())
    assert [e["tiers"] for e in ledger["mutants"].values()] == ["fast", "both"]

    # an edit: quick() changed, a function added above slow(), which moved
    # four lines down; slow's survivor is taken at its new line, and quick's
    # mutant runs again
    added = "def added(x):\n    return x\n\n\n"
    edited = MODULE.replace("x + 1", "x + 2").replace("def slow", added + "def slow")
    moved = [("core/A", 0, 5, "quick"), ("core/A", 1, 16, "slow")]
    fourth = session_with(tmp_path / "fourth.sqlite", edited, moved, tiers="both")
    script.apply_ledger("m", tmp_path / "fourth.sqlite", fast_only=False)
    assert pending_and_taken(tmp_path / "fourth.sqlite") == (
        [fourth[0]],
        {fourth[1]: TestOutcome.SURVIVED},
    )
    # a mutant whose key the ledger knows, at another place (an edit may
    # renumber an operator's occurrences): it runs
    session_with(tmp_path / "renumbered.sqlite", edited, [("core/A", 1, 12, "slow")])
    script.apply_ledger("m", tmp_path / "renumbered.sqlite", fast_only=True)
    assert pending_and_taken(tmp_path / "renumbered.sqlite")[1] == {}
    finish(tmp_path / "fourth.sqlite", {fourth[0]: TestOutcome.KILLED})
    script.save_ledger("m", target, tmp_path / "fourth.sqlite")
    ledger = json.loads((tmp_path / "ledgers" / "m.json").read_text())
    assert ledger["sha256"] == script.digest(edited)
    assert {key: (e["line"], e["outcome"]) for key, e in ledger["mutants"].items()} == {
        "core/A{}#0": (5, "killed"),
        "core/A{}#1": (16, "survived"),
    }

    # an edit outside every function keeps every function's outcomes
    session_with(tmp_path / "fifth.sqlite", edited + "\n# changed\n", moved[:2], "both")
    script.apply_ledger("m", tmp_path / "fifth.sqlite", fast_only=False)
    assert pending_and_taken(tmp_path / "fifth.sqlite")[0] == []


def test_an_edit_keeps_the_outcomes_outside_every_function_while_those_lines_are_unchanged(
    tmp_path, monkeypatch
):
    from cosmic_ray.work_item import TestOutcome

    script = load_script()
    monkeypatch.setattr(script, "LEDGERS", tmp_path / "ledgers")
    target = script.Target("m.py", "tests")
    constants = [("core/N", 0, 1, None), ("core/N", 1, 19, None)]  # LIMIT = 4, VALUE = ...
    first = session_with(tmp_path / "first.sqlite", MODULE, constants)
    finish(tmp_path / "first.sqlite", {job: TestOutcome.KILLED for job in first})
    script.save_ledger("m", target, tmp_path / "first.sqlite")

    # a function added (with its blank lines) moves VALUE four lines down
    added = MODULE.replace("def never", "def added(x):\n    return x\n\n\ndef never")
    moved = [("core/N", 0, 1, None), ("core/N", 1, 23, None)]
    second = session_with(tmp_path / "second.sqlite", added, moved)
    script.apply_ledger("m", tmp_path / "second.sqlite", fast_only=True)
    assert pending_and_taken(tmp_path / "second.sqlite") == (
        [],
        {job: TestOutcome.KILLED for job in second},
    )
    # a constant changed: everything outside the functions runs again
    third = session_with(tmp_path / "third.sqlite", MODULE.replace("= 4", "= 5"), constants)
    script.apply_ledger("m", tmp_path / "third.sqlite", fast_only=True)
    assert pending_and_taken(tmp_path / "third.sqlite")[0] == sorted(third)


def test_shards_made_in_sessions_of_their_own_split_the_mutants_between_them(tmp_path):
    """Each shard makes its own session, where cosmic-ray gives the mutants
    new, random job ids: the split must not depend on them."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import MutationSpec, WorkItem

    script = load_script()
    mutants = [("core/A", n) for n in range(5)] + [("core/B", n) for n in range(4)]
    pending = []
    for number, ids in ((1, range(9)), (2, [3, 7, 0, 8, 2, 5, 1, 6, 4])):
        path = tmp_path / f"shard{number}.sqlite"
        with use_db(str(path), WorkDB.Mode.create) as db:
            for job, (operator, occurrence) in zip(ids, mutants, strict=True):
                spec = MutationSpec("m.py", operator, occurrence, (1, 0), (1, 1))
                db.add_work_item(WorkItem(job_id=f"job{job}", mutations=[spec]))
        script.skip_other_shards(path, (number, 2))
        with use_db(str(path)) as db:
            pending.append({script.mutant_key(item) for item in db.pending_work_items})
    first, second = pending
    assert not first & second
    assert len(first | second) == len(mutants)


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


def test_a_judgment_pinned_to_a_line_judges_that_survivor_only(tmp_path, monkeypatch, capsys):
    script = load_script()
    monkeypatch.setattr(script, "LEDGERS", tmp_path)
    alike = {
        "tiers": "both",
        "timed_out": False,
        "outcome": "survived",
        "change": "f: break -> continue",
    }
    (tmp_path / "m.json").write_text(
        json.dumps(
            {
                "mutants": {
                    "a": {**alike, "line": 7},
                    "b": {**alike, "line": 9},
                    "c": {**alike, "line": 12},
                },
                "equivalent": {"f: break -> continue @ 9": "the loop finds nothing later"},
                "killed_by": {"f: break -> continue @ 7": "t.py::b"},
            }
        )
    )
    script.summary("m")
    assert capsys.readouterr().out.splitlines() == [
        "m: 3 mutants run: 0 killed (0 by a timeout), 3 survived: 1 killed by a test"
        " outside the tiers run, 1 judged equivalent, 1 not judged",
        "  line 12 (both tiers): f: break -> continue",
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


def test_a_session_s_pristine_module_does_not_stand_in_for_a_standard_one(tmp_path: Path) -> None:
    """The tests run in the scratch copy, first on sys.path: the copy of
    jobs/copy.py kept for a session named ``copy`` must not be what
    ``import copy`` (which dataclasses does) finds there."""
    pristine = load_script().pristine_of(tmp_path / "copy.sqlite")
    pristine.write_text("raise SystemExit('the session copy was imported')\n")
    done = subprocess.run(
        [sys.executable, "-c", "import copy, dataclasses"], cwd=tmp_path, capture_output=True
    )
    assert done.returncode == 0, done.stderr
