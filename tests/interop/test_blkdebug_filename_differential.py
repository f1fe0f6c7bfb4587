"""``json:`` file names of blkdebug nodes and everything above them, byte for byte as QSD.

A blkdebug node with rules has no plain file name, so QEMU names it (and a
format node on it, and an overlay whose backing it is) by its options as
JSON.  The key order is QEMU's hash-table order, which for keys sharing a
bucket (the same member of two rules always does) follows how the options
were built: where the blkdebug node sat in the ``blockdev-add`` and how many
times it was reopened since (a commit reopens its base read-write and back).
Clients compare these strings as text, so every shape is compared as text:
rules with each optional member, set-state rules, a top-level blkdebug node
and one under a qcow2 node, before and after commits.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import create, qemu_io

pytestmark = pytest.mark.qsd

#: Events that never fire while these read-only images are opened and queried.
QUIET_EVENTS = ("write_aio", "cow_write", "l2_update", "refblock_update", "pwritev")

Step = tuple[str, dict[str, Any]] | str


def rule(rng: random.Random, harmless: bool = False) -> dict[str, Any]:
    """A rule with a random choice of members; ``harmless``: one that never
    fails a request (its sector lies past the end of the images)."""
    out: dict[str, Any] = {"event": rng.choice(QUIET_EVENTS)}
    for key, chance, value in (
        ("state", 0.2, lambda: rng.randrange(0, 3)),
        ("iotype", 0.4, lambda: rng.choice(("read", "write", "flush"))),
        ("errno", 0.6, lambda: rng.choice((5, 28))),
        ("sector", 1.0 if harmless else 0.5, lambda: rng.randrange(70000, 80000)),
        ("once", 0.6, lambda: rng.random() < 0.5),
        ("immediately", 0.2, lambda: rng.random() < 0.5),
    ):
        if rng.random() < chance:
            out[key] = value()
    return out


def blkdebug(
    rng: random.Random, d: Path, image: str, suffix: str, harmless: bool = False
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "driver": "blkdebug",
        "node-name": f"dbg-{suffix}",
        "inject-error": [rule(rng, harmless) for _ in range(rng.randint(3, 5))],
        "image": {"driver": "file", "filename": str(d / image), "node-name": f"f-{suffix}"},
    }
    if rng.random() < 0.3:
        options["set-state"] = [
            {"event": rng.choice(QUIET_EVENTS), "new_state": 2, "state": 1}
            for _ in range(rng.randint(1, 2))
        ]
    if rng.random() < 0.2:
        options["align"] = 512
    return options


def shapes(d: Path) -> list[Step]:
    """Fixed pseudo-random rule sets, each as a top-level node and under a qcow2 node."""
    rng = random.Random(11)
    steps: list[Step] = []
    for i in range(12):
        if i % 2:
            node = {**blkdebug(rng, d, "c0.qcow2", f"t{i}"), "read-only": True}
            steps.append(("blockdev-add", node))
        else:
            qcow2 = {"driver": "qcow2", "node-name": f"q{i}", "read-only": True, "backing": None}
            steps.append(("blockdev-add", {**qcow2, "file": blkdebug(rng, d, "c0.qcow2", f"q{i}")}))
    return steps


def chain(d: Path, n: int, faulty: int) -> list[Step]:
    """``n0 <- ... <- n{n-1}``, the top read-write, blkdebug under ``n{faulty}``."""
    rng = random.Random(n * 10 + faulty)
    steps: list[Step] = []
    for i in range(n):
        file: dict[str, Any] = {
            "driver": "file", "filename": str(d / f"n{i}.qcow2"), "node-name": f"f-n{i}"
        }
        if i == faulty:
            file = blkdebug(rng, d, f"n{i}.qcow2", f"n{i}", harmless=True)
        steps.append(("blockdev-add", {
            "driver": "qcow2", "node-name": f"n{i}", "read-only": i < n - 1,
            "backing": f"n{i - 1}" if i else None, "file": file,
        }))  # fmt: skip
    return steps


def scenarios(d: Path) -> dict[str, list[Step]]:
    def commit(job: str, device: str, top: str, base: str) -> Step:
        args = {"job-id": job, "device": device, "top-node": top, "base-node": base}
        return ("block-commit", args)

    def plain(name: str, dbg: dict[str, Any], backing: str | None = None) -> Step:
        image = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
        file = {"driver": "blkdebug", "node-name": f"dbg-{name}", "image": image, **dbg}
        return ("blockdev-add", {"driver": "qcow2", "node-name": name, "read-only": True,
                                 "backing": backing, "file": file})  # fmt: skip

    return {
        "shapes": shapes(d),
        # no rules: a plain "blkdebug::" name; an empty list: refused as QEMU does
        "without rules": [
            plain("n0", {}),
            plain("n1", {"inject-error": []}, "n0"),
            plain("n1", {"set-state": []}, "n0"),
            plain("n2", {"set-state": [{"event": "write_aio", "new_state": 2}]}, "n0"),
        ],
        # base reopened read-write and back: twice, then four times
        "two commits into a blkdebug base": [
            *chain(d, 4, 0),
            commit("j0", "n3", "n1", "n0"),
            "completed",
            ("blockdev-del", {"node-name": "n1"}),
            commit("j1", "n3", "n2", "n0"),
            "completed",
        ],
        # base reopened read-write once, for good
        "active commit into a blkdebug base": [
            *chain(d, 2, 0),
            ("block-commit", {"job-id": "j0", "device": "n1"}),
            "ready",
            ("job-complete", {"id": "j0"}),
            "completed",
        ],
        # refused after QEMU reopened base read-write, and back
        "active commit refused over an exported intermediate": [
            *chain(d, 3, 0),
            ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "nbd")}}}),
            ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n1"}),
            ("block-commit", {"job-id": "j0", "device": "n2"}),
        ],
        "commit of a blkdebug top": [*chain(d, 3, 1), commit("j0", "n2", "n1", "n0"), "completed"],
        "commit below a blkdebug overlay": [
            *chain(d, 4, 2),
            commit("j0", "n3", "n1", "n0"),
            "completed",
        ],
    }


def observe(start: Callable[[Path], DaemonProcess], d: Path, steps: list[Step]) -> list[Any]:
    faulty = {f"n{i}" for i in range(4) if f'"dbg-n{i}"' in json.dumps(steps)}
    out: list[Any] = []
    sock = d / "qmp.sock"
    daemon = start(sock)
    try:
        with RawQMP(sock) as qmp:
            qmp.negotiate()
            for step in steps:
                if step == "ready":
                    qmp.wait_event("BLOCK_JOB_READY")
                    continue
                if step == "completed":
                    qmp.wait_event("BLOCK_JOB_COMPLETED")
                    qmp.wait_event("JOB_STATUS_CHANGE", status="null")
                else:
                    command, args = step
                    reply = qmp.execute(command, args)
                    out.append(reply)
                    starts_job = command in ("block-commit", "job-complete")
                    if "return" in reply and starts_job:
                        continue  # a running job shows QEMU's filter nodes
                nodes = qmp.execute("query-named-block-nodes", {"flat": True})["return"]
                devices = qmp.execute("query-block")["return"]
                shown = [(n["node-name"], n["file"], n.get("backing_file")) for n in nodes]
                shown += [(b["device"], b.get("inserted", {}).get("file")) for b in devices]
                # Above a committed base, overlays show what their headers
                # say, and QSD writes json: names there (README, A5); QSD's
                # unnamed nodes are its own (a commit's filter, for a while).
                shown = [x for x in shown if x[0][:1] not in "n#" or x[0] in faulty]
                out.append((step, sorted(shown, key=repr)))
    finally:
        daemon.stop()
    return [str(x).replace(str(d), "D") for x in out]


#: How many times QSD runs a scenario at most.  Under load QSD 7.2 itself
#: sometimes names a node differently: about 1 run in 25 of "two commits into
#: a blkdebug base", on a loaded machine, shows after the second commit the
#: key order of after the first.  blockd must give one of QSD's answers.
QSD_RUNS = 4


def run_scenario(start: Callable[[Path], DaemonProcess], d: Path, name: str) -> list[Any]:
    d.mkdir()
    create(d / "c0.qcow2", size="32M")
    for i in range(4):
        create(d / f"n{i}.qcow2", size="32M", backing=f"n{i - 1}.qcow2" if i else None)
        qemu_io(d / f"n{i}.qcow2", f"write -P {i + 1} {i}M 1M")
    return observe(start, d, scenarios(d)[name])


@pytest.mark.parametrize("name", list(scenarios(Path("/"))))
def test_blkdebug_json_filenames_match_qsd(sock_dir: Path, name: str) -> None:
    require_tool("qemu-storage-daemon")
    ours = run_scenario(start_blockd, sock_dir / "blockd", name)
    answers = []
    for run in range(QSD_RUNS):
        theirs = run_scenario(start_qsd, sock_dir / f"qsd{run}", name)
        assert any("json:{" in line for line in theirs)  # the subject is there to compare
        if theirs == ours:
            return
        answers.append(theirs)
    # none of QSD's answers is ours: show where the first one differs
    for a, b in zip(answers[0], ours, strict=True):
        assert a == b
