"""scripts/bootstrap --system installs every Debian package the tests and
benchmarks look for.

A fresh Debian machine gets its tools only from the bootstrap's package list,
while a developer's machine may have them from elsewhere: a tool missing from
the list passes here and fails (or, outside CI, silently skips) there.  So the
tools are read from the code itself: every ``require_tool(...)`` and
``shutil.which(...)``, every command a subprocess or the benchmarks' helpers
run, and every ``import X`` probed on Debian's python3.  Each must map to a
package in the bootstrap's APT_PACKAGES (an unmapped one fails: add it here and
to the bootstrap), and on Debian ``dpkg -S`` must agree with the mapping.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SYSTEM_PYTHON, in_ci, require_tool

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("tests", "bench")

#: Command -> the Debian package that ships it (as ``dpkg -S`` says).
TOOL_PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common",
    "socat": "socat",
    "systemd-analyze": "systemd",
    "systemd-socket-activate": "systemd",
    "nbdinfo": "libnbd-bin",
    "nbdsh": "python3-libnbd",
}
#: Python module probed on Debian's python3 -> its Debian package.
MODULE_PACKAGES = {"nbd": "python3-libnbd"}
#: Commands that need no package of the bootstrap's, and why.
NOT_PACKAGES = {
    "python3": "the interpreter itself: the bootstrap builds .venv from it (python3-venv)",
    "dpkg": "essential on every Debian system",
    "cp": "coreutils, essential on every Debian system",
    "cmp": "diffutils, essential on every Debian system",
    "mount": "package mount, of required priority: on every Debian system",
    "umount": "package mount, of required priority: on every Debian system",
}
#: Calls whose first argument (or the first item of a list given first) is a command.
RUNNERS = {"run", "Popen", "check_output", "check_call", "call", "tool", "spawn", "which",
           "require_tool"}  # fmt: skip


def apt_packages() -> set[str]:
    text = (ROOT / "scripts" / "bootstrap").read_text()
    match = re.search(r'^APT_PACKAGES="([^"]*)"', text, re.MULTILINE)
    assert match, "scripts/bootstrap has no APT_PACKAGES line"
    return set(match.group(1).split())


def _loop_values(tree: ast.AST) -> dict[int, dict[str, list[str]]]:
    """For ``for x in ("a", "b"):`` bodies: the strings ``x`` takes, by node id."""
    values: dict[int, dict[str, list[str]]] = {}
    for loop in ast.walk(tree):
        if (
            isinstance(loop, ast.For)
            and isinstance(loop.target, ast.Name)
            and isinstance(loop.iter, ast.Tuple | ast.List)
        ):
            strings = [e.value for e in loop.iter.elts
                       if isinstance(e, ast.Constant) and isinstance(e.value, str)]  # fmt: skip
            for stmt in loop.body:
                for node in ast.walk(stmt):
                    values.setdefault(id(node), {})[loop.target.id] = strings
    return values


def _strings(node: ast.expr, loops: dict[str, list[str]]) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name) and node.id in loops:
        return loops[node.id]
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        return _strings(node.elts[0], loops)
    return []


def _not_runners(tree: ast.Module) -> set[str]:
    """Functions of this file named like a runner whose first argument is no
    command (``def run(daemon, ...)`` in a differential test)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in RUNNERS:
            first = node.args.posonlyargs + node.args.args
            if first and first[0].arg not in {"argv", "args", "cmd", "command", "tool", "name"}:
                names.add(node.name)
    return names


def probes(path: Path) -> Iterator[tuple[str, str]]:
    """("tool", command) and ("module", name) that one source file relies on."""
    tree = ast.parse(path.read_text(), str(path))
    loops = _loop_values(tree)
    runners = RUNNERS - _not_runners(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in runners:
                for command in _strings(node.args[0], loops.get(id(node), {})):
                    if command and not command.startswith("-") and " " not in command:
                        yield "tool", command.rsplit("/", 1)[-1]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(r"import (\w+)", node.value.strip())
            if match:
                yield "module", match.group(1)


def all_probes() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            for probe in probes(path):
                found.setdefault(probe, []).append(str(path.relative_to(ROOT)))
    return found


def _is_repo_file(command: str) -> bool:
    return any((ROOT / top / command).exists() for top in ("", "scripts", "bench"))


def test_the_scan_sees_what_we_know_is_there() -> None:
    """The scanner itself: probes known to exist in the tree are found."""
    found = all_probes()
    for probe in (("tool", "qemu-img"), ("tool", "qemu-storage-daemon"),
                  ("tool", "systemd-socket-activate"), ("module", "nbd")):  # fmt: skip
        assert probe in found, probe


def test_bootstrap_installs_every_package_the_tests_probe_for() -> None:
    packages = apt_packages()
    unmapped, uninstalled = [], []
    for (kind, name), where in sorted(all_probes().items()):
        table = TOOL_PACKAGES if kind == "tool" else MODULE_PACKAGES
        if kind == "tool" and (name in NOT_PACKAGES or _is_repo_file(name)):
            continue
        if name not in table:
            unmapped.append(f"{kind} {name} (used in {', '.join(sorted(set(where)))})")
        elif table[name] not in packages:
            uninstalled.append(f"{table[name]} (for {kind} {name})")
    assert not unmapped, (
        "tools with no Debian package in tests/unit/test_bootstrap.py: " + "; ".join(unmapped)
    )
    assert not uninstalled, "scripts/bootstrap's APT_PACKAGES lacks: " + "; ".join(uninstalled)


def _owner(path: str) -> str:
    result = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split(":", 1)[0]


def test_the_mapping_is_what_dpkg_says() -> None:
    """On Debian, each mapped command belongs to the package named for it."""
    require_tool("dpkg")
    for tool, package in TOOL_PACKAGES.items():
        path = shutil.which(tool)
        if path is None:
            if in_ci():
                pytest.fail(f"{tool} is not installed after scripts/bootstrap --system")
            continue
        assert _owner(str(Path(path).resolve())) == package, tool
    for module, package in MODULE_PACKAGES.items():
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", f"import {module}; print({module}.__file__)"],
            capture_output=True, text=True,
        )  # fmt: skip
        if probe.returncode != 0:
            if in_ci():
                pytest.fail(f"{SYSTEM_PYTHON} cannot import {module} after the bootstrap")
            continue
        assert _owner(probe.stdout.strip()) == package, module


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("True", True), ("1", True), ("yes", True),
     ("false", False), ("0", False), ("", False), (None, False)],
)  # fmt: skip
def test_one_rule_for_ci(monkeypatch: pytest.MonkeyPatch, value: str | None,
                         expected: bool) -> None:  # fmt: skip
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_no_other_ci_rule_in_the_tests() -> None:
    """Every "are we in CI" question goes through tests.conftest.in_ci."""
    others = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name == "conftest.py" and path.parent.name == "tests":
            continue
        text = path.read_text()
        if re.search(r"""environ(\.get\(|\[)\s*["']CI["']""", text):
            others.append(str(path.relative_to(ROOT)))
    assert not others, others
