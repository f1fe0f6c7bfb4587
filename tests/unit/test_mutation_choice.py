"""scripts/mutation runs, for each mutant, only the fast-tier tests that run
the function it changes.  A wrong choice would let a mutant survive that the
whole tier kills, and the campaign's counts would lie: these cases pin it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
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
