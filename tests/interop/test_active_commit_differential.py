"""Active commit (block-commit of the active layer) against qemu-storage-daemon 7.2.

Chain base <- mid <- top added by blockdev-add with explicit node names, ``top``
exported writable over NBD.  Each daemon gets its own fresh copy of the chain and
the same conversation: QMP commands, and qemu-io clients writing and reading
through the export at the same points.  Compared: every reply, every event (in
order, without its timestamp), what the clients read, and the images afterwards.
The probed QSD behaviour behind these conversations is in ACTIVE_COMMIT_NOTES.md.

Masks (each one is what legitimately differs, nothing else):

* ``timestamp`` of events: wall-clock time.
* ``#blockNNN`` node names: QEMU's implicit node names are random; shown as
  ``<auto>`` (none is expected outside a job, but an implicit file node would be).
* before READY only (steps marked ``timing``): ``offset`` / ``current-progress`` and
  ``busy``.  A rate-limited job has copied however much its first chunk was when we
  look (QSD: the first 2 MiB run) and may be mid-chunk or asleep.  ``len`` is
  compared: it is the amount allocated above base plus what clients wrote, which
  does not depend on timing.  In READY and later offset == len is compared exactly.
* ``ro`` of base (and its file node) after a cancel: QSD 7.2 leaves base read-write
  after any cancel of an active commit, blockd restores read-only (deliberate;
  not when a writer of base was added meanwhile: see test_active_commit.py).
  After a completion base is read-write in both (it is the active image now).

Not compared because QSD's answer shows its internals: query-block-exports and
query-named-block-nodes *during* the job (QSD reports the export on its implicit
``mirror_top`` filter node).  Exports and nodes are compared once the job is over.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import TIMEOUT, DaemonProcess, RawQMP, negotiated, start_blockd, start_qsd
from tests.images import backing_of, chain, check, nbd_io, qemu_img, qemu_io

pytestmark = pytest.mark.qsd

MiB = 1 << 20
KiB = 1 << 10

# What the job has to copy at the start: allocated above base is mid's 1-3M and
# 32-36M (top's 2-3M lies inside) plus the 64 KiB the prologue writes at 4M.
START_LEN = 6 * MiB + 64 * KiB


@dataclass(frozen=True)
class Qmp:
    """One command.  ``wait``: the event that ends this step (everything up to it
    belongs to the step); ``timing``: progress is timing-dependent here (see above)."""

    command: str
    arguments: dict[str, Any] | None = None
    wait: tuple[str, dict[str, Any]] | None = None
    timing: bool = False


@dataclass(frozen=True)
class Io:
    """qemu-io commands through the export (a new NBD client each time); all must succeed."""

    commands: tuple[str, ...]


@dataclass(frozen=True)
class Nodes:
    """query-named-block-nodes reduced to (node-name, drv, ro), sorted."""

    cancelled: bool = False  # mask base's ro (QSD 7.2 does not restore it)


@dataclass(frozen=True)
class Settle:
    """Poll query-block-jobs (not recorded) until job0's ``len`` has reached
    ``length`` and everything is copied (offset == len); with ``started``, until it
    has copied anything at all.  There is no event for either: polling the state is
    the synchronisation.  (offset == len alone is not enough: a write through the
    export shows up in len only once the job looks at its dirty bitmap again.)"""

    length: int = 0
    started: bool = False


Step = Qmp | Io | Nodes | Settle


def ev(status: str) -> tuple[str, dict[str, Any]]:
    return ("JOB_STATUS_CHANGE", {"status": status})


READY: tuple[str, dict[str, Any]] = ("BLOCK_JOB_READY", {})


def write(pattern: int, offset: str, length: str) -> Io:
    return Io((f"write -P {pattern:#x} {offset} {length}",))


def commit(**args: Any) -> dict[str, Any]:
    return {"job-id": "job0", "device": "top", **args}


def prologue(d: Path, nbd: Path) -> list[Step]:
    steps: list[Step] = []
    for name, backing, ro in (("base", None, True), ("mid", "base", True), ("top", "mid", False)):
        file = {"driver": "file", "filename": str(d / f"{name}.qcow2"), "node-name": f"f-{name}"}
        arguments = {"driver": "qcow2", "node-name": name, "read-only": ro, "backing": backing}
        steps.append(Qmp("blockdev-add", {**arguments, "file": file}))
    steps += [
        Qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}}),
        Qmp(
            "block-export-add", {"type": "nbd", "id": "exp0", "node-name": "top", "writable": True}
        ),
        write(0x41, "4M", "64k"),  # allocated in top before the job
    ]
    return steps


# Everything the chain holds (see make_chain), as the guest sees it, plus the
# client writes of the conversations.  Read back through the export at the end.
CHAIN_PATTERNS = (
    "read -P 0x11 0 1M",
    "read -P 0x21 1M 1M",
    "read -P 0x31 2M 1M",
    "read -P 0x41 4M 64k",
    "read -P 0x12 8M 1M",
    "read -P 0x22 32M 4M",
)

COMPLETE: list[Step] = [
    Qmp("block-commit", commit(), READY),
    Qmp("query-block-jobs"),
    Qmp("query-jobs"),
    # Writes during READY: each grows len (and offset, once mirrored) by its size.
    write(0x42, "5M", "1M"),
    Io(("write -z 33M 1M",)),  # zeros over mid's data: base must read zeros there after
    write(0x43, "40M", "128k"),
    Settle(START_LEN + 2 * MiB + 128 * KiB),
    Qmp("query-block-jobs"),
    Qmp("query-jobs"),
    Qmp("block-job-complete", {"device": "job0"}, ev("null")),
    Qmp("query-block-jobs"),
    Qmp("query-block-exports"),
    Nodes(),
    # The same client URI now reaches base, which holds everything.
    Io(
        (
            "read -P 0x11 0 1M",
            "read -P 0x21 1M 1M",
            "read -P 0x31 2M 1M",
            "read -P 0x41 4M 64k",
            "read -P 0x42 5M 1M",
            "read -P 0x12 8M 1M",
            "read -P 0x22 32M 1M",
            "read -P 0 33M 1M",
            "read -P 0x22 34M 2M",
            "read -P 0x43 40M 128k",
        )
    ),
    write(0x44, "48M", "64k"),  # lands in base
    Qmp("blockdev-del", {"node-name": "top"}),
    Qmp("blockdev-del", {"node-name": "f-top"}),
    Qmp("blockdev-del", {"node-name": "mid"}),
    Qmp("blockdev-del", {"node-name": "base"}),
    Nodes(),
    Qmp("block-commit", {"job-id": "job1", "device": "base"}),
]


def cancel_in_ready(request: Qmp) -> list[Step]:
    return [
        Qmp("block-commit", commit(**{"auto-dismiss": False}), READY),
        write(0x42, "5M", "1M"),
        Settle(START_LEN + MiB),
        request,
        Qmp("query-block-jobs"),
        Qmp("query-jobs"),
        Qmp("query-block-exports"),
        Nodes(cancelled=True),
        Qmp("block-job-cancel", {"device": "job0"}),
        Qmp("job-dismiss", {"id": "job0"}, ev("null")),
        # The export still serves top, which still has everything.
        Io((*CHAIN_PATTERNS, "read -P 0x42 5M 1M", "write -P 0x45 6M 64k")),
        Qmp("blockdev-del", {"node-name": "top"}),
    ]


SOFT_CANCEL = cancel_in_ready(Qmp("block-job-cancel", {"device": "job0"}, ev("concluded")))
FORCE_CANCEL = cancel_in_ready(
    Qmp("block-job-cancel", {"device": "job0", "force": True}, ev("concluded"))
)
JOB_CANCEL = cancel_in_ready(Qmp("job-cancel", {"id": "job0"}, ev("concluded")))

# speed 1: QSD copies its first chunk and then sleeps for hours, so the job stays RUNNING.
BEFORE_READY: list[Step] = [
    Qmp("block-commit", commit(**{"speed": 1, "auto-dismiss": False}), timing=True),
    Settle(started=True),
    Qmp("query-block-jobs", timing=True),
    Qmp("query-jobs", timing=True),
    Qmp("block-job-complete", {"device": "job0"}),
    Qmp("job-complete", {"id": "job0"}),
    Qmp("block-job-pause", {"device": "job0"}, ev("paused")),
    Qmp("query-block-jobs", timing=True),
    # A write while paused: len grows by 64 KiB once the job runs again (QSD counts
    # it when it wakes; the cancel below shows it).
    write(0x45, "48M", "64k"),
    Qmp("block-job-pause", {"device": "job0"}),
    Qmp("block-job-cancel", {"device": "job0"}),
    Qmp("block-job-complete", {"device": "job0"}),
    Qmp("block-job-resume", {"device": "job0"}, ev("running")),
    Qmp("block-job-cancel", {"device": "job0"}, ev("concluded"), timing=True),
    Qmp("query-jobs", timing=True),
    Qmp("query-block-exports"),
    Qmp("job-dismiss", {"id": "job0"}, ev("null")),
    Nodes(cancelled=True),
    Io((*CHAIN_PATTERNS, "read -P 0x45 48M 64k")),
]

STANDBY: list[Step] = [
    Qmp("block-commit", commit(**{"top-node": "top", "base-node": "base"}), READY),
    Qmp("block-commit", {"job-id": "job1", "device": "top"}),
    Qmp("blockdev-del", {"node-name": "top"}),
    Qmp("blockdev-del", {"node-name": "mid"}),
    Qmp("blockdev-del", {"node-name": "base"}),
    Qmp("blockdev-del", {"node-name": "f-top"}),
    Qmp("block-job-set-speed", {"device": "job0", "speed": MiB}),
    Qmp("query-block-jobs"),
    Qmp("block-job-set-speed", {"device": "job0", "speed": 0}),
    Qmp("block-job-pause", {"device": "job0"}, ev("standby")),
    Qmp("query-block-jobs"),
    Qmp("query-jobs"),
    Qmp("block-job-pause", {"device": "job0"}),
    Qmp("block-job-cancel", {"device": "job0"}),
    Qmp("block-job-resume", {"device": "job0"}, ev("ready")),
    Qmp("query-block-jobs"),
    Qmp("block-job-resume", {"device": "job0"}),
    Qmp("job-pause", {"id": "job0"}, ev("standby")),
    # 7.2: complete in STANDBY is accepted (twice, even) and happens on resume.
    Qmp("block-job-complete", {"device": "job0"}),
    Qmp("query-block-jobs"),
    Qmp("block-job-complete", {"device": "job0"}),
    # Written in STANDBY: must be copied on resume, before the pivot.
    write(0x46, "12M", "64k"),
    Qmp("job-resume", {"id": "job0"}, ev("null")),
    Qmp("query-block-exports"),
    Nodes(),
    Io((*CHAIN_PATTERNS, "read -P 0x46 12M 64k")),
]

MANUAL_FINALIZE: list[Step] = [
    Qmp("block-commit", commit(**{"auto-finalize": False, "auto-dismiss": False}), READY),
    write(0x42, "5M", "1M"),
    Settle(START_LEN + MiB),
    Qmp("job-finalize", {"id": "job0"}),
    Qmp("job-dismiss", {"id": "job0"}),
    Qmp("block-job-complete", {"device": "job0"}, ("BLOCK_JOB_PENDING", {})),
    Qmp("query-block-jobs"),
    Qmp("query-jobs"),
    Qmp("block-job-complete", {"device": "job0"}),
    Qmp("block-job-set-speed", {"device": "job0", "speed": 5}),
    Qmp("block-job-pause", {"device": "job0"}),
    Qmp("job-dismiss", {"id": "job0"}),
    # (no client writes while PENDING: QSD 7.2 loses them, see the notes)
    Qmp("job-finalize", {"id": "job0"}, ev("concluded")),
    Qmp("query-block-jobs"),
    Qmp("query-block-exports"),
    Nodes(),
    Qmp("job-dismiss", {"id": "job0"}, ev("null")),
    Io((*CHAIN_PATTERNS, "read -P 0x42 5M 1M")),
]

ERRORS: list[Step] = [
    Qmp("block-commit", commit(**{"backing-file": "base.qcow2"})),
    Qmp("block-commit", commit(**{"top-node": "top", "backing-file": "base.qcow2"})),
    Qmp("block-commit", commit(**{"base-node": "base", "backing-file": "x"})),
    Qmp("block-commit", commit(speed=-1)),
    Qmp("block-commit", commit(**{"job-id": "1job"})),
    Qmp("block-commit", {"device": "top"}),
    Qmp("block-commit", commit(**{"job-id": "1job", "filter-node-name": "mid"})),
    Qmp("block-commit", commit(**{"base-node": "top"})),
    Qmp("block-commit", commit(**{"top-node": "top", "base-node": "top"})),
    Qmp("block-commit", commit(device="base")),
    Qmp("block-job-complete", {"device": "nosuch"}),
    Qmp("job-complete", {"id": "nosuch"}),
    Qmp("block-job-cancel", {"device": "nosuch"}),
    Qmp("query-block-jobs"),
    Qmp("query-block-exports"),
    Nodes(),  # nothing changed: base still read-only
]

CONVERSATIONS: dict[str, list[Step]] = {
    "complete": COMPLETE,
    "soft cancel": SOFT_CANCEL,
    "force cancel": FORCE_CANCEL,
    "job-cancel": JOB_CANCEL,
    "cancel before ready": BEFORE_READY,
    "standby": STANDBY,
    "manual finalize": MANUAL_FINALIZE,
    "errors": ERRORS,
}

TIMING_KEYS = ("offset", "current-progress", "busy")


def mask(value: Any, timing: bool) -> Any:
    """Hide what legitimately differs between the two daemons (see the module doc)."""
    if isinstance(value, list):
        return [mask(v, timing) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if key == "timestamp" or (timing and key in TIMING_KEYS):
            continue
        if key == "node-name" and str(item).startswith("#block"):
            item = "<auto>"
        out[key] = mask(item, timing)
    return out


IO_LINE = re.compile(r"^(wrote|read|discard) \d+/\d+ bytes at offset \d+$|verification failed")


def settle(client: RawQMP, length: int, started: bool) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        reply = client.execute("query-block-jobs")
        jobs = [job for job in reply["return"] if job["device"] == "job0"]
        assert jobs, reply
        job = jobs[0]
        if started:
            done = job["offset"] > 0
        else:
            done = job["len"] >= length and job["offset"] == job["len"]
        if done:
            return
        assert time.monotonic() < deadline, f"job0 did not get there: {job}"
        time.sleep(0.02)


def converse(
    daemon: DaemonProcess, nbd: Path, steps: list[Step], expected: list[Any] | None = None
) -> list[Any]:
    """Run ``steps`` (and quit) and return the transcript.  With ``expected`` (the
    other daemon's transcript) every entry is compared as soon as it is made, so a
    failure names the first step that differs instead of timing out later."""
    transcript: list[Any] = []

    def record(entry: Any, step: Step) -> None:
        transcript.append(entry)
        if expected is not None:
            index = len(transcript) - 1
            want = expected[index] if index < len(expected) else None
            assert entry == want, f"step {index} {step}\n got:  {entry}\n want: {want}"

    with negotiated(daemon) as client:
        for step in [*steps, Qmp("quit")]:
            if isinstance(step, Settle):
                settle(client, step.length, step.started)
                continue
            if isinstance(step, Io):
                result = nbd_io(nbd, "top", *step.commands)
                lines = [line for line in result.stdout.splitlines() if IO_LINE.search(line)]
                assert result.returncode == 0 and not any("failed" in x for x in lines), (
                    step,
                    result.stdout,
                    result.stderr,
                )
                record(("io", lines), step)
                continue
            if isinstance(step, Nodes):
                reply = client.execute("query-named-block-nodes", {"flat": True})
                nodes = []
                for node in reply["return"]:
                    name = node["node-name"]
                    ro = "<masked>" if step.cancelled and name in ("base", "f-base") else node["ro"]
                    nodes.append(("<auto>" if name.startswith("#block") else name, node["drv"], ro))
                record(("nodes", sorted(nodes)), step)
                continue
            reply = mask(client.execute(step.command, step.arguments), step.timing)
            if expected is not None and len(transcript) < len(expected):
                # The reply first: a refused command would otherwise wait for its events.
                want = expected[len(transcript)][1]
                assert reply == want, (
                    f"step {len(transcript)} {step}\n got:  {reply}\n want: {want}"
                )
            if step.wait is not None:
                name, data = step.wait
                event = client.wait_event(name, **data)
                # Everything emitted up to the awaited event belongs to this step.
                upto = client.events.index(event) + 1
            else:
                upto = len(client.events)
            events = [mask(e, step.timing) for e in client.events[:upto]]
            record((step.command, reply, events), step)
            del client.events[:upto]
    assert daemon.wait() == 0
    if expected is not None:
        assert len(transcript) == len(expected)
    return transcript


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: the NBD and QMP socket paths must fit in sun_path."""
    with tempfile.TemporaryDirectory(prefix="ac-") as name:
        yield Path(name)


def make_chain(d: Path) -> None:
    d.mkdir()
    chain(
        d,
        ("write -P 0x11 0 1M", "write -P 0x12 8M 1M"),
        ("write -P 0x21 1M 2M", "write -P 0x22 32M 4M"),
        ("write -P 0x31 2M 1M",),
    )


def run_one(
    start: Callable[[Path], DaemonProcess],
    d: Path,
    sock: Path,
    name: str,
    expected: list[Any] | None = None,
) -> list[Any]:
    nbd = sock.with_name(sock.stem + "-nbd.sock")
    daemon = start(sock)
    try:
        return converse(daemon, nbd, prologue(d, nbd) + CONVERSATIONS[name], expected)
    finally:
        daemon.stop()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_same_active_commit_conversation(tmp_path: Path, short_dir: Path, name: str) -> None:
    require_tool("qemu-storage-daemon")
    require_tool("qemu-io")
    make_chain(tmp_path / "chain")
    for which in ("qsd", "blockd"):
        shutil.copytree(tmp_path / "chain", tmp_path / which)
    qsd = run_one(start_qsd, tmp_path / "qsd", short_dir / "qsd.sock", name)
    # blockd's transcript is compared with QSD's step by step as it is made.
    run_one(start_blockd, tmp_path / "blockd", short_dir / "blockd.sock", name, qsd)
    # Active commit rewrites no header: every image keeps its relative backing name.
    for image in ("base", "mid", "top"):
        theirs, mine = tmp_path / "qsd" / f"{image}.qcow2", tmp_path / "blockd" / f"{image}.qcow2"
        assert backing_of(mine) == backing_of(theirs)
        check(theirs)
        check(mine)
    # What the guest sees through top is the same; so are base and mid (whose view
    # shows base where mid is unallocated), except after a cancel before READY: which
    # parts of the chain base got by then is timing.
    compared = ("top",) if name == "cancel before ready" else ("top", "mid", "base")
    for image in compared:
        theirs, mine = tmp_path / "qsd" / f"{image}.qcow2", tmp_path / "blockd" / f"{image}.qcow2"
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(theirs), str(mine))
    if name in ("complete", "soft cancel"):
        # base on its own holds what the guest saw at the end of the mirroring.
        qemu_io(tmp_path / "blockd" / "base.qcow2", *CHAIN_PATTERNS[:3], "read -P 0x42 5M 1M")
