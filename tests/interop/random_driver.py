"""Randomized differential runs: blockd and qemu-storage-daemon 7.2 side by side.

A *scenario* is made from a seed alone (so a seed always means the same
scenario): a random chain ``n0 <- n1 <- ...`` and spare overlays ``oK`` (made
with qemu-img, filled with random patterns by qemu-io), a prologue that adds
the chain and starts an NBD server, and a body of random steps: QMP commands
(block-commit intermediate and active, the job verbs, blockdev-add/del,
exports), qemu-io clients reading and writing through exports, and pauses of
the test itself (so that commands land while a rate-limited job sleeps).

Each daemon gets an identical copy of the images in its own directory and the
same steps in lock step.  After every step both are *settled* (see
:class:`JobTrack`), then compared: the reply (error class and text), the
events of the step per job in order, query-block-jobs and query-jobs, and,
whenever no job is alive, query-named-block-nodes and query-block-exports.
At the end every job is cancelled and dismissed (compared too), both daemons
quit, and every image's backing string, guest view (qemu-img compare between
the two copies) and qemu-img check are compared, and so is what an image's
internal snapshot holds (always, even past a divergence: nothing changes it).

What is normalised, and why (timing, not behaviour):

* event ``timestamp``; the daemon's directory and NBD socket in strings;
  ``#blockNNN`` node names (QEMU's are random); ``actual-size`` (host
  allocation of the image file, not what a client sees).
* ``offset`` / ``current-progress``: shown only as whether they have reached
  ``len`` / ``total-progress``.  How far a job got when it was paused,
  cancelled or hit an error depends on chunk sizes and the clock.
* ``virtual-size`` of a protocol node (file, blkdebug): the host file's
  length, which grows with the clusters a daemon has allocated (timing, for a
  cancelled copy; allocation order otherwise), like ``actual-size``.
* a ``paused`` then ``running`` (``standby`` then ``ready``) status change of
  a job within one step: no single command pauses and resumes a job; QSD 7.2
  emits the pair when it drains the graph around a change elsewhere.
* repeats of the same BLOCK_JOB_ERROR in a row: one per request in flight
  when the fault hit (QSD 7.2 alone gives 3 or 4 in the same scenario).
* ``busy`` of a running or ready job (asleep in the rate limiter or copying).
* ``len`` (and so ``offset``) of an active commit that has not been READY,
  in queries and events: QSD fills in the amount to copy while the job runs
  (a cancel right after the start reports 0 or all of it), and once a
  client has written to its top (QSD counts a write when its job loop next
  looks, which for a paused or sleeping job is much later, or never when the
  job is cancelled first).  The data itself is still compared at the end.
* guest view of a commit's base when the job did not end with everything
  copied (cancel before the end, error): which chunks arrived is timing.

Deliberate differences (README.md lists them) are in the allow-list section
below (A1-A18), each with its reason and checked against what the client
knows; nothing else is tolerated.  When one makes the daemons' states part,
the run stops comparing there and only checks blockd's images.  Known QSD 7.2
bugs the scenario must not step into are in :func:`skip_reason`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import backing_of, create, nbd_io, qemu_img, qemu_io

MiB = 1 << 20
KiB = 1 << 10
SIZE = 32 * MiB
#: Rate limits under which a job copies one chunk and then sleeps for longer
#: than any scenario lasts: such a job is *running* and stays running.
SLOW_SPEEDS = (1, 4096, 65536)
#: 0 is no limit; a limit this high finishes our few MiB within milliseconds.
FAST_SPEEDS = (0, 1 << 30)
#: A limit a job feels (a few MiB take seconds) and still finishes while we wait.
MEDIUM_SPEED = 2 * MiB
FAST_MIN = MEDIUM_SPEED
SETTLE_TIMEOUT = 20.0
#: Statuses a job can stay in without a client's command (see Side.settle); a
#: running job only if it is rate-limited to a crawl.
RESTING = ("null", "concluded", "pending", "paused", "standby", "ready", "running")
QUIET = 3.0
#: commands after which a job ends, its graph changes drained in QSD (A6)
ENDING_VERBS = (
    "block-job-cancel",
    "job-cancel",
    "block-job-complete",
    "job-complete",
    "block-job-finalize",
    "job-finalize",
)
#: how long a stable job may still take to reach QSD's status (settle)
LATE = 1.5
#: a pause after a guest write for READY jobs to copy it (see _step)
READY_CATCH_UP = 0.5
#: a pause after an NBD client step for both daemons to see the client go
#: (see _step)
CLIENT_GONE = 0.2
BLKDEBUG_EVENTS = (
    "read_aio",
    "write_aio",
    "none",
    "pwritev",
    "cow_read",
    "cow_write",
    "l2_load",
    "l2_update",
    "refblock_load",
    "flush_to_disk",
)

Step = dict[str, Any]


# --------------------------------------------------------------------------- scenario


@dataclass
class ImageSpec:
    name: str
    backing: str | None  # image name in the same directory
    commands: list[str]
    snapshot: bool = False


@dataclass
class Scenario:
    seed: int
    images: list[ImageSpec]
    prologue: list[Step]
    body: list[Step]
    #: image name -> blkdebug rules on its file
    blkdebug: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def with_body(self, body: list[Step]) -> Scenario:
        return Scenario(self.seed, self.images, self.prologue, body, self.blkdebug)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        raw = json.loads(text)
        images = [ImageSpec(**i) for i in raw.pop("images")]
        return cls(images=images, **raw)


def is_fast(speed: int | None) -> bool:
    return speed is None or speed == 0 or speed >= FAST_MIN


def _extents(rng: random.Random, count: int, sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """Non-adjacent extents in the first 20 MiB (the rest is for client writes)."""
    slots = sorted(rng.sample(range(0, 20, 3), count))
    return [(s * MiB, rng.choice(sizes)) for s in slots]


def file_options(name: str, rules: list[dict[str, Any]] | None) -> dict[str, Any]:
    plain = {"driver": "file", "filename": f"{{d}}/{name}.qcow2", "node-name": f"f-{name}"}
    if rules is None:
        return plain
    return {"driver": "blkdebug", "node-name": f"dbg-{name}", "inject-error": rules, "image": plain}


def add_image(scn: Scenario, name: str, backing: str | None, read_only: bool) -> Step:
    arguments = {
        "driver": "qcow2",
        "node-name": name,
        "read-only": read_only,
        "backing": backing,
        "file": file_options(name, scn.blkdebug.get(name)),
    }
    return {"qmp": "blockdev-add", "args": arguments}


#: What BLOCKD_FUZZ_AVOID can leave out of scenarios (comma-separated), so that a
#: long run can look past a difference that is known and being fixed: each name
#: is a feature that currently makes most sequences stop at their first steps.
#: Off by default; a run that uses it must say so in its report.
AVOIDABLE = {
    "blkdebug": "blkdebug under a chain member (events and query output differ)",
    "duplicate-add": "blockdev-add of a node name that exists (error names another node)",
}


def generate(seed: int, steps: int, avoid: frozenset[str] = frozenset()) -> Scenario:
    """The scenario of ``seed``: images, prologue and ``steps`` random body steps."""
    unknown = avoid - set(AVOIDABLE)
    if unknown:
        raise ValueError(f"cannot avoid {sorted(unknown)}; choose from {sorted(AVOIDABLE)}")
    rng = random.Random(seed)
    k = rng.randint(2, 4)
    chain = [f"n{i}" for i in range(k)]
    images: list[ImageSpec] = []
    extents: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(chain):
        # Every image above base holds >= 3 MiB in separate extents: more than a
        # rate-limited job copies before its first sleep (see SLOW_SPEEDS).
        ext = _extents(rng, 2 if i == 0 else rng.randint(3, 4), (MiB, 2 * MiB))
        extents[name] = ext
        commands = [f"write -P {rng.randint(1, 255):#x} {off} {n}" for off, n in ext]
        if i and rng.random() < 0.2:
            off = rng.randrange(0, 20) * MiB + 512 * KiB
            commands.append(f"write -z {off} 256k")
        snapshot = rng.random() < 0.06
        images.append(ImageSpec(name, chain[i - 1] if i else None, commands, snapshot))
    for j in range(rng.randint(0, 2)):
        under = rng.choice(chain)
        ext = _extents(rng, 1, (MiB,))
        extents[f"o{j}"] = ext
        commands = [f"write -P {rng.randint(1, 255):#x} {off} {n}" for off, n in ext]
        images.append(ImageSpec(f"o{j}", under, commands))
    scn = Scenario(seed, images, [], [])
    if rng.random() < 0.25 and "blkdebug" not in avoid:
        target = rng.choice(chain)
        rules = []
        for _ in range(rng.randint(1, 2)):
            rule: dict[str, Any] = {
                "event": rng.choice(BLKDEBUG_EVENTS),
                "errno": rng.choice((errno.EIO, errno.ENOSPC)),
                "once": rng.random() < 0.6,
            }
            iotype = rng.choice((None, "read", "write", "flush"))
            if iotype is not None:
                rule["iotype"] = iotype
            if iotype != "flush" and rng.random() < 0.7:
                off, n = rng.choice(extents[target])
                rule["sector"] = (off + rng.randrange(0, n, 64 * KiB)) // 512
            rules.append(rule)
        scn.blkdebug[target] = rules
    for i, name in enumerate(chain):
        ro = i < k - 1 and rng.random() < 0.85
        scn.prologue.append(add_image(scn, name, chain[i - 1] if i else None, ro))
    scn.prologue.append(
        {"qmp": "nbd-server-start", "args": {"addr": {"type": "unix", "data": {"path": "{nbd}"}}}}
    )
    scn.body = _Generator(rng, scn, chain, avoid).body(steps)
    return scn


class _Generator:
    """Picks plausible steps from a rough model of what should exist by then.

    The model only steers the choice: whatever the daemons really answer is
    compared, errors included, so a wrong guess is a test of an error path."""

    def __init__(
        self, rng: random.Random, scn: Scenario, chain: list[str], avoid: frozenset[str]
    ) -> None:
        self.avoid = avoid
        self.rng = rng
        self.scn = scn
        self.chain = chain
        self.backing: dict[str, str | None] = {
            s.name: s.backing for s in scn.images if s.name in chain
        }
        self.header = {s.name: s.backing for s in scn.images}
        self.jobs: list[str] = []
        self.exports: dict[str, str] = {}
        self.fresh = [20 * MiB + i * 256 * KiB for i in range(48)]
        rng.shuffle(self.fresh)
        self.n_exports = 0
        rules = [r for rs in scn.blkdebug.values() for r in rs]
        self.faulty = bool(rules)
        self.all_once = all(r["once"] for r in rules)

    def chain_of(self, node: str) -> list[str]:
        out = []
        while node is not None and node in self.backing and node not in out:
            out.append(node)
            node = self.backing[node]  # type: ignore[assignment]
        return out

    def roots(self) -> list[str]:
        below = {b for b in self.backing.values() if b is not None}
        return [n for n in self.backing if n not in below] or list(self.backing) or ["n0"]

    def job(self) -> str:
        if not self.jobs or self.rng.random() < 0.04:
            return "nosuch"
        return self.rng.choice(self.jobs[-3:])

    def speed(self) -> int | None:
        r = self.rng
        if self.faulty:  # where a throttled job meets the bad sector depends on chunk sizes
            return r.choice((None, None, *FAST_SPEEDS))
        return r.choice((None, None, MEDIUM_SPEED, *FAST_SPEEDS, *SLOW_SPEEDS, *SLOW_SPEEDS))

    def commit(self) -> Step:
        r = self.rng
        device = r.choice(self.roots())
        chain = self.chain_of(device) or [device]
        job = f"j{len(self.jobs)}"
        self.jobs.append(job)
        args: dict[str, Any] = {"job-id": job, "device": device}
        if r.random() < 0.35 or len(chain) < 3:
            if r.random() < 0.5:
                args["top-node"] = device
            below = chain[1:]
        else:
            i = r.randrange(1, len(chain) - 1)
            args["top-node"] = chain[i]
            below = chain[i + 1 :]
            if r.random() < 0.1:
                base = below[-1] if below else "n0"
                args["backing-file"] = f"{base}.qcow2"
        if below and r.random() < 0.5:
            args["base-node"] = r.choice(below)
        speed = self.speed()
        if speed is not None:
            args["speed"] = speed
        if r.random() < 0.25:
            args["auto-finalize"] = False
        if r.random() < 0.3:
            args["auto-dismiss"] = False
        if self.faulty and r.random() < 0.8:
            choices = ["report", "stop", "enospc"] + (["ignore"] if self.all_once else [])
            args["on-error"] = r.choice(choices)
        return {"qmp": "block-commit", "args": args}

    def step(self) -> Step:
        r = self.rng
        kinds: list[tuple[float, Callable[[], Step]]] = [
            (3.0, self.commit),
            (2.0, self.set_speed),
            (1.5, lambda: self.verb("pause")),
            (1.5, lambda: self.verb("resume")),
            (1.5, self.cancel),
            (1.0, lambda: self.verb("complete")),
            (1.0, lambda: self.verb("finalize")),
            (1.0, lambda: self.verb("dismiss")),
            (1.0, self.delete),
            (1.0, self.add),
            (1.0, self.export_add),
            (0.4, self.export_del),
            (1.5 if self.exports else 0.0, self.write),
            (0.5 if self.exports else 0.0, self.read),
            (1.0, self.sleep),
        ]
        total = sum(w for w, _ in kinds)
        x = r.random() * total
        for weight, make in kinds:
            x -= weight
            if x < 0:
                return make()
        return self.sleep()

    def body(self, n: int) -> list[Step]:
        return [self.step() for _ in range(n)]

    def set_speed(self) -> Step:
        speed = self.speed()
        if self.rng.random() < 0.03:
            speed = -1
        return {"qmp": "block-job-set-speed", "args": {"device": self.job(), "speed": speed or 0}}

    def verb(self, verb: str) -> Step:
        job = self.job()
        if verb in ("finalize", "dismiss"):
            prefix = "job" if self.rng.random() < 0.7 else "block-job"
            return {"qmp": f"{prefix}-{verb}", "args": {"id": job}}
        if self.rng.random() < 0.5:
            return {"qmp": f"job-{verb}", "args": {"id": job}}
        return {"qmp": f"block-job-{verb}", "args": {"device": job}}

    def cancel(self) -> Step:
        job = self.job()
        if self.rng.random() < 0.25:
            return {"qmp": "job-cancel", "args": {"id": job}}
        args: dict[str, Any] = {"device": job}
        if self.rng.random() < 0.5:
            args["force"] = self.rng.random() < 0.7
        return {"qmp": "block-job-cancel", "args": args}

    def delete(self) -> Step:
        r = self.rng
        names = list(self.backing) + [f"f-{n}" for n in self.backing] + ["nosuch"]
        name = r.choice(names)
        below = {b for b in self.backing.values() if b is not None}
        if (
            name in self.backing
            and name not in below
            and name not in self.exports.values()
            and not self.jobs
        ):
            del self.backing[name]
        return {"qmp": "blockdev-del", "args": {"node-name": name}}

    def add(self) -> Step:
        r = self.rng
        missing = [s.name for s in self.scn.images if s.name not in self.backing]
        if not missing and "duplicate-add" in self.avoid:
            return self.sleep()
        name = r.choice(missing) if missing else r.choice([s.name for s in self.scn.images])
        backing = self.header[name]
        if backing not in self.backing or r.random() < 0.15:
            backing = r.choice([*self.backing, None]) if self.backing else None
        self.backing[name] = backing
        read_only = name in self.chain and name != self.chain[-1] and r.random() < 0.7
        return add_image(self.scn, name, backing, read_only)

    def export_add(self) -> Step:
        r = self.rng
        node = r.choice([*self.backing, "nosuch"])
        eid = f"e{self.n_exports}"
        self.n_exports += 1
        self.exports[eid] = node
        args = {"type": "nbd", "id": eid, "node-name": node, "writable": r.random() < 0.75}
        return {"qmp": "block-export-add", "args": args}

    def export_del(self) -> Step:
        eid = self.rng.choice([*self.exports, "nosuch"])
        node = self.exports.pop(eid, None)
        args: dict[str, Any] = {"id": eid}
        if node is not None and self.rng.random() < 0.3:
            args["mode"] = "hard"
        return {"qmp": "block-export-del", "args": args}

    def write(self) -> Step:
        node = self.rng.choice(list(self.exports.values()))
        offset = self.fresh.pop() if self.fresh else self.rng.randrange(0, SIZE, 64 * KiB)
        pattern = self.rng.randint(1, 255)
        return {"io": node, "cmds": [f"write -P {pattern:#x} {offset} 64k"]}

    def read(self) -> Step:
        node = self.rng.choice(list(self.exports.values()))
        offset = self.rng.randrange(0, 24 * MiB, 64 * KiB)
        return {"io": node, "cmds": [f"read -v {offset} 512"]}

    def sleep(self) -> Step:
        return {"sleep": self.rng.choice((0.05, 0.3, 1.0))}


def build_images(scn: Scenario, d: Path) -> None:
    d.mkdir(parents=True)
    for spec in scn.images:
        image = create(
            d / f"{spec.name}.qcow2",
            size=f"{SIZE}",
            backing=(f"{spec.backing}.qcow2" if spec.backing else None),
        )
        if spec.commands:
            qemu_io(image, *spec.commands)
        if spec.snapshot:
            qemu_img("snapshot", "-c", "snap1", str(image))


# --------------------------------------------------------------------------- running


@dataclass
class JobTrack:
    """What a client knows about one job: its status (from events) and what it
    asked for (from successful replies).  ``stable`` says whether the job can
    stay in its status until the client does something: that is the point at
    which both daemons are compared."""

    kind: str  # "active" or "commit"
    top: str  # the top of the committed range (the device, for an active commit)
    base: str | None  # None: the daemon refused before this side knew the chain
    fast: bool
    auto_finalize: bool
    auto_dismiss: bool
    #: the images whose data the job copies (top down to above base)
    range: tuple[str, ...] = ()
    status: str = "created"
    want_pause: bool = False
    error_pause: bool = False
    cancelling: bool = False
    completing: bool = False
    finalizing: bool = False
    written: bool = False  # a client wrote to the active layer while it ran
    #: went from pending to aborting: applying its result failed
    failed_to_apply: bool = False
    #: images backed by top when the job started: a commit moves those onto base
    overlays: tuple[str, ...] = ()
    was_ready: bool = False
    #: the speed asked for (0: none), to tell a raise from a cut
    speed: int = 0
    errors: bool = False
    completed_ok: bool = False
    #: an active commit's pivot, once taken into account by restored_read_only
    pivot_seen: bool = False

    def fold(self, event: dict[str, Any]) -> None:
        data = event.get("data", {})
        name = event["event"]
        if name == "JOB_STATUS_CHANGE":
            self.failed_to_apply |= self.status == "pending" and data["status"] == "aborting"
            self.status = data["status"]
            self.was_ready = self.was_ready or self.status == "ready"
        elif name == "BLOCK_JOB_ERROR":
            self.errors = True
            if data.get("action") == "stop":
                self.error_pause = True
        elif name == "BLOCK_JOB_COMPLETED":
            self.completed_ok = "error" not in data

    def stable(self) -> bool:
        s = self.status
        if s == "null":
            return True
        if s == "concluded":
            return not self.auto_dismiss
        if s in ("created", "waiting", "aborting"):
            return False
        if s in ("paused", "standby"):
            return (self.want_pause or self.error_pause) and not self.cancelling
        if s == "pending":
            return not self.auto_finalize and not self.finalizing and not self.cancelling
        if s == "ready":
            return not (self.completing or self.cancelling or self.want_pause)
        # running
        return not (self.fast or self.want_pause or self.cancelling or self.error_pause)


def diff_paths(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Where two JSON values differ (for readable reports)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += diff_paths(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            name = x.get("node-name", i) if isinstance(x, dict) else i
            out += diff_paths(x, y, f"{path}[{name}]")
        return out
    return [] if a == b else [(path or "<root>", a, b)]


class Difference(AssertionError):
    def __init__(self, where: str, kind: str, qsd: Any, ours: Any) -> None:
        self.where, self.kind, self.qsd, self.ours = where, kind, qsd, ours
        detail = "\n".join(
            f"  at {path}: qsd {a!r}, blockd {b!r}" for path, a, b in diff_paths(qsd, ours)[:12]
        )
        super().__init__(f"{where}: {kind} differs\n{detail}")

    def signature(self) -> str:
        """What kind of difference, at what kind of step (for shrinking and tallies)."""
        command = re.search(r'"qmp": "([^"]+)"', self.where)
        if command is not None:
            at = command.group(1)
        elif '"io"' in self.where:
            at = "io"
        else:
            at = self.where.split(" ")[0]
        return f"{self.kind}@{at}"


class Inconclusive(Exception):
    """qemu-storage-daemon itself did not reach a state to compare at."""


class NoReply(Exception):
    """A daemon did not answer a command within the client's timeout."""

    def __init__(self, side: str, command: str) -> None:
        super().__init__(f"{side}: no reply to {command}")
        self.side = side


#: Tries at QSD's monitor (0.2 s, 0.4 s, ... apart: about 20 s in all, for a
#: machine under load); it serves one connection at a time.
ATTEMPTS = 14


class Side:
    def __init__(self, name: str, daemon: DaemonProcess, d: Path, nbd: Path) -> None:
        self.name, self.daemon, self.dir, self.nbd = name, daemon, d, nbd
        for attempt in range(ATTEMPTS):
            # QSD's monitor serves one connection at a time: the start-up probe's
            # may still hold it, and then ours is closed before the greeting.
            self.client = RawQMP(daemon.socket_path, timeout=30.0)
            try:
                greeting = self.client.read()
                reply = self.client.execute("qmp_capabilities")
                if reply != {"return": {}}:
                    raise ConnectionError(f"negotiation failed: {greeting} {reply}")
                break
            except (EOFError, ConnectionError):
                self.client.close()
                if attempt == ATTEMPTS - 1 or daemon.proc.poll() is not None:
                    raise
                time.sleep(0.2 * (attempt + 1))
        self.cursor = 0
        self.jobs: dict[str, JobTrack] = {}
        self.early: dict[str, list[Any]] = {}
        self._folded = 0
        #: image node -> its backing node, for nodes this side added successfully
        self.graph: dict[str, str | None] = {}
        self.exports: dict[str, str] = {}
        self.writable_exports: dict[str, str] = {}
        #: allow-list entries this run needed
        self.allowed: set[str] = set()
        #: nodes whose backing a completed commit changed (their header was written)
        self.repointed: set[str] = set()
        #: nodes a client's write failed on: what that range holds is undefined
        #: (a daemon may have written it before the error; QSD often has)
        self.failed_writes: set[str] = set()
        #: image name -> blkdebug rules on its file (the scenario's)
        self.blkdebug: dict[str, list[dict[str, Any]]] = {}
        #: images made with zero clusters (the scenario's)
        self.zeroed: set[str] = set()
        #: active commits that ran under a limit a job feels while an export was added
        #: (or its add was refused), or that a client paused and resumed
        self.drained: set[str] = set()
        #: bases of block-commits refused once the job existed (see A13)
        self.refused_commit_bases: set[str] = set()

    def chain(self, node: str) -> list[str]:
        """``node`` and the nodes below it, as this side added them."""
        out: list[str] = []
        current: str | None = node
        while current is not None and current in self.graph and current not in out:
            out.append(current)
            current = self.graph[current]
        return out

    def view_is_timing(self, node: str) -> bool:
        """Whether what ``node`` shows depends on how far a job got (see
        :func:`timing_images`) or on a failed write, by the graph as this
        side built it."""
        tainted = timing_images([self])
        tainted.update((name, None) for name in self.failed_writes)
        return reads_timing(self.chain(node), tainted)

    def sub(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{d}", str(self.dir)).replace("{nbd}", str(self.nbd))
        if isinstance(value, dict):
            return {k: self.sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.sub(v) for v in value]
        return value

    def unsub(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(str(self.nbd), "{nbd}").replace(str(self.dir), "{d}")
        if isinstance(value, dict):
            return {k: self.unsub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.unsub(v) for v in value]
        return value

    def execute(self, command: str, args: dict[str, Any] | None) -> dict[str, Any]:
        # the jobs a drain during this command may wake (their status before
        # it: the job can turn READY before the reply)
        throttled = [
            jid
            for jid, job in self.jobs.items()
            if job.kind == "active" and job.status == "running" and not job.fast
        ]
        try:
            reply = self.client.execute(command, self.sub(args) if args is not None else None)
        except TimeoutError as error:
            raise NoReply(self.name, command) from error
        self.absorb()
        if (
            command == "block-export-add"
            or (command == "block-export-del" and "return" in reply)
            or (command in ENDING_VERBS and "return" in reply)
        ):
            # QSD drains the graph for an export add, whether it succeeds or
            # not, when a deleted export lets go of its node (seed 7003317),
            # and when a job that ends changes the graph under others (a
            # cancelled commit of a node below their chain: seed 7014047).
            self.drained.update(throttled)
        if "return" in reply:
            self.track(command, args or {})
        elif command == "block-commit" and args and args.get("job-id") in self.early:
            chain = self.chain(args["device"])
            base = args.get("base-node", chain[-1] if chain else None)
            if base is not None:
                self.refused_commit_bases.add(base)
        return reply

    def track(self, command: str, args: dict[str, Any]) -> None:
        job = self.jobs.get(str(args.get("id", args.get("device", ""))))
        if command == "block-commit":
            active = args.get("top-node", args["device"]) == args["device"]
            chain = self.chain(args["device"])
            top = args.get("top-node", args["device"])
            base = args.get("base-node", chain[-1] if chain else None)
            below_top = chain[chain.index(top) :] if top in chain else [top]
            track = JobTrack(
                kind="active" if active else "commit",
                top=top,
                base=base,
                range=tuple(below_top[: below_top.index(base)] if base in below_top else below_top),
                fast=is_fast(args.get("speed")),
                speed=args.get("speed", 0),
                auto_finalize=args.get("auto-finalize", True),
                auto_dismiss=args.get("auto-dismiss", True),
                overlays=tuple(n for n, b in self.graph.items() if b == top),
            )
            for event in self.early.pop(args["job-id"], []):
                track.fold(event)
            self.jobs[args["job-id"]] = track
        elif command == "blockdev-add":
            self.graph[args["node-name"]] = args.get("backing")
        elif command == "blockdev-del":
            self.graph.pop(args["node-name"], None)
        elif command == "block-export-add":
            self.exports[args["id"]] = args["node-name"]
            if args.get("writable"):
                self.writable_exports[args["id"]] = args["node-name"]
        elif job is None:
            return
        elif command == "block-job-set-speed":
            speed = args["speed"]
            raised = speed == 0 or 0 < job.speed < speed
            if raised and job.kind == "active" and not job.fast and not job.was_ready:
                # QEMU kicks a job out of its limit's sleep when the speed is
                # raised (block_job_set_speed), and the mirror does not sleep
                # the rest: as a pause's resume (A6, seed 7011283)
                self.drained.add(str(args["device"]))
            job.fast = is_fast(speed)
            job.speed = speed
        elif command.endswith("-pause"):
            job.want_pause = True
        elif command.endswith("-resume"):
            job.want_pause = job.error_pause = False
            if job.kind == "active" and not job.fast and not job.was_ready:
                self.drained.add(str(args.get("id", args.get("device"))))
        elif command.endswith("-cancel"):
            job.cancelling = True
        elif command.endswith("-complete"):
            job.completing = True
        elif command.endswith("-finalize"):
            job.finalizing = True

    def absorb(self) -> None:
        """Fold new events into the job tracks (events of a job whose start
        has not been answered yet wait for the answer)."""
        while self._folded < len(self.client.events):
            event = self.client.events[self._folded]
            self._folded += 1
            data = event.get("data", {})
            name = event["event"]
            if name == "BLOCK_EXPORT_DELETED":
                self.exports.pop(data.get("id"), None)
                self.writable_exports.pop(data.get("id"), None)
            if name in ("JOB_STATUS_CHANGE", "BLOCK_JOB_PENDING"):
                jid = data.get("id")
            elif name.startswith("BLOCK_JOB"):
                jid = data.get("device")
            else:
                continue
            job = self.jobs.get(jid)
            if job is None:
                self.early.setdefault(jid, []).append(event)
            else:
                job.fold(event)
                if name == "BLOCK_JOB_COMPLETED" and job.completed_ok and job.kind == "commit":
                    # The top's parents from before the job now read the base
                    # (QEMU replaces its filter above top by base).
                    for node, backing in list(self.graph.items()):
                        if backing == job.top and node in job.overlays:
                            self.graph[node] = job.base
                            self.repointed.add(node)
                moved = job.kind == "commit" or (job.completing and not job.cancelling)
                pivoted = job.kind == "active" and moved and job.base
                if name == "BLOCK_JOB_COMPLETED" and job.completed_ok and pivoted:
                    # every parent of top reads base from now on, an overlay
                    # added while the job ran too (seed 7005595; its header
                    # keeps naming top, as in QEMU)
                    for node, backing in list(self.graph.items()):
                        if backing == job.top:
                            self.graph[node] = job.base
                if name == "BLOCK_JOB_COMPLETED" and job.completed_ok and moved and job.base:
                    # top's exports serve base from now on (a commit's, or an
                    # active commit's pivot): seed 7001598, A3 on the new node
                    for table in (self.exports, self.writable_exports):
                        for eid, node in table.items():
                            if node == job.top:
                                table[eid] = job.base

    def poll(self, timeout: float) -> None:
        self.client.sock.settimeout(timeout)
        try:
            self.client.events.append(self.client.read())
        except TimeoutError:
            pass
        finally:
            self.client.sock.settimeout(30.0)
        self.absorb()

    def statuses(self) -> dict[str, str]:
        return {j: t.status for j, t in self.jobs.items() if t.status != "null"}

    def settle(self, target: dict[str, str] | None = None) -> bool:
        """Wait until every job is stable (and, with ``target``, in those statuses).

        A job that stays QUIET seconds without an event in a status a job can
        rest in counts as stable too: QSD 7.2 sometimes leaves a job paused
        after a resume (a pause count left over from a drain), and a client
        sees exactly that."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        seen, since = len(self.client.events), time.monotonic()
        while True:
            self.absorb()
            if len(self.client.events) != seen:
                seen, since = len(self.client.events), time.monotonic()
            quiet = time.monotonic() - since > QUIET and all(
                t.status in RESTING and not (t.status == "running" and t.fast)
                for t in self.jobs.values()
            )
            stable = quiet or all(t.stable() for t in self.jobs.values())
            if target is None and stable:
                return True
            if target is not None and self.statuses() == target:
                return True
            if target is not None and stable:
                # Stable but not where QSD is: give late events a moment, then
                # compare (a READY job meets a guest write's range only at its
                # next 100 ms poll, as QEMU's mirror does; a loaded machine
                # took more than 0.3 s for it and its error: seed 7008270)
                late = time.monotonic() + LATE
                while self.statuses() != target and time.monotonic() < late:
                    self.poll(0.1)
                return self.statuses() == target
            if time.monotonic() > deadline:
                return False
            self.poll(0.1)

    def take_events(self) -> list[Any]:
        self.absorb()
        out = self.client.events[self.cursor :]
        self.cursor = len(self.client.events)
        return out

    def alive(self) -> bool:
        return any(t.status not in ("null", "concluded") for t in self.jobs.values())

    def close(self) -> None:
        self.client.close()


JOB_EVENT_KEYS = ("offset", "current-progress")


def normalise(side: Side, value: Any) -> Any:
    """The parts of a reply or event that do not depend on timing (module doc)."""
    value = side.unsub(value)

    def walk(v: Any) -> Any:
        if isinstance(v, list):
            return [walk(x) for x in v]
        if not isinstance(v, dict):
            return v
        out: dict[str, Any] = {}
        job_id = v.get("device", v.get("id"))
        track = side.jobs.get(job_id) if isinstance(job_id, str) else None
        status = v.get("status", "running")
        amount_timing = (
            track is not None and track.kind == "active" and (not track.was_ready or track.written)
        )
        for key, item in v.items():
            if key in ("timestamp", "actual-size"):
                continue
            if key == "node-name" and str(item).startswith("#block"):
                item = "<auto>"
            if key == "offset" and "len" in v:
                item = "=len" if item == v["len"] else "<len"
            if key == "current-progress" and "total-progress" in v:
                item = "=total" if item == v["total-progress"] else "<total"
            if key == "virtual-size" and v.get("format") in ("file", "blkdebug"):
                item = "<host file length>"
            if key == "busy" and status in ("running", "ready"):
                item = "<timing>"
            if amount_timing and key in ("len", "total-progress", "offset", "current-progress"):
                item = "<timing>"
            out[key] = walk(item)
        return out

    return walk(value)


DRAIN_PAIRS = {("paused", "running"), ("standby", "ready")}


def group_events(side: Side, events: list[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for event in events:
        data = event.get("data", {})
        key = str(data.get("id", data.get("device", "-")))
        entry = [event["event"], normalise(side, data)]
        group = groups.setdefault(key, [])
        if (
            entry[0] == "JOB_STATUS_CHANGE"
            and group
            and group[-1][0] == "JOB_STATUS_CHANGE"
            and (group[-1][1]["status"], data["status"]) in DRAIN_PAIRS
        ):
            # One command never both pauses and resumes a job: this is QSD
            # draining the graph around a change (export, node, other job).
            group.pop()
            continue
        if entry[0] == "BLOCK_JOB_ERROR" and group and group[-1] == entry:
            # As many identical errors as requests were in flight when the
            # first failed: QSD 7.2 itself reports 3 or 4 in the same run.
            continue
        group.append(entry)
    return {key: group for key, group in groups.items() if group}


def sort_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(nodes, key=lambda n: json.dumps([n.get(k) for k in ("node-name", "drv", "file")]))


# --------------------------------------------------------------------------- allow-list
#
# Each entry is a difference README.md lists as deliberate: what blockd
# refuses where qemu-storage-daemon 7.2 goes ahead and damages data, where
# blockd restores a state QSD leaves changed, what blockd writes differently
# into an image, or a QSD timing side effect blockd does not have.  Nothing
# else is tolerated.

#: A1. Committing into a base that another open chain reads from: QSD 7.2
#: starts the job and changes what that other chain reads; blockd refuses.
#: The two daemons' states part here, so the run stops comparing (and checks
#: that blockd's images are sound).
COMMIT_INTO_SHARED_BASE = re.compile(
    r"^Conflicts with use by node '(?P<parent>[^']+)' as 'backing', which does not allow "
    r"'write' on (?P<base>\S+): committing into '(?P=base)' would change what "
    r"'(?P=parent)' reads$"
)


#: A3. Committing an intermediate top that is exported writable: QSD 7.2
#: turns the job into an active commit; blockd refuses (README: it would lose
#: the writes landing behind the copy).  States part here too.
COMMIT_OF_WRITABLE_EXPORT = re.compile(
    r"^Cannot commit '(?P<node>[^']+)' while it is exported writable: "
    r"writes to it during the commit would be lost$"
)

#: A16. blockdev-del of a node whose flush fails (blkdebug): blockd keeps
#: every node open and replies the error (README "blockdev-del makes the
#: node's data durable"); QSD 7.2 closes it anyway, losing what it could not
#: write.  States part here.
FLUSH_REFUSED = "Error flushing drive: "

#: A3 as well: the same commit refused by blockd's permission check of base
#: (a writable export of base), which QSD's active-commit turn does not make.
PERMISSION_CONFLICT = re.compile(r"^Permission conflict on node '(?P<node>[^']+)': ")

#: A9. An intermediate commit whose top has another overlay that a running
#: job holds (the base of an active commit): QSD 7.2 starts it and, when it
#: completes, rewrites that overlay's header under the other job; blockd
#: refuses up front, as it refuses a commit over any node a job holds (README).
#: States part here.
OVERLAY_HELD_BY_A_JOB = re.compile(
    r"^Node '(?P<node>[^']+)' is busy: block device is in use by block job: commit$"
)

#: A2 consequence: blockd refuses a writable export of a base it put back to
#: read-only after a cancelled active commit, which QSD left read-write.
READ_ONLY_EXPORT = "Cannot export read-only node as writable"


def plain_file_of(pseudo: str) -> str | None:
    """The image file a ``json:{...}`` qcow2 pseudo-filename opens (through blkdebug too)."""
    if not pseudo.startswith("json:"):
        return None
    try:
        options = json.loads(pseudo.removeprefix("json:"))
    except json.JSONDecodeError:
        return None
    file = options.get("file") if isinstance(options, dict) else None
    while isinstance(file, dict) and "image" in file:
        file = file["image"]
    filename = file.get("filename") if isinstance(file, dict) else None
    return filename if isinstance(filename, str) else None


def json_backing_written(side: Side, node: str, theirs: str, mine: str) -> bool:
    """A5. The backing string a completed commit wrote into an overlay whose new
    backing node has no plain filename (for instance, it was added with its
    own backing given by node name): QSD 7.2 writes a ``json:{...}``
    pseudo-filename, pinning the driver options of that moment into the image
    (later changes to the base's own header are ignored, and ``qemu-img info
    --backing-chain`` cannot open it); blockd writes the base's plain path
    (README).  Checked: the node's backing was
    changed by a commit this side saw complete, blockd's string is the plain
    path QSD's pseudo-filename opens."""
    return node in side.repointed and plain_file_of(theirs) == mine


def drain_ran_ahead(qsd: Side, ours: Side) -> str | None:
    """A6. QSD 7.2 lets a throttled active commit run past its speed limit
    after a pause: a drain of the graph around a block-export-add or -del or
    another job's end, a client's pause and resume, or a raised speed wakes
    the job from the sleep
    its limit asked for and it does not sleep the rest (seen: the job turns
    READY right after the add, the resume or the block-job-set-speed, long
    before its limit would let it; later QEMU sleeps the rest).  blockd keeps
    the limit (a raised one from the start of the current slice).  Checked:
    an export was added (or one deleted) while the job was running under a
    limit a job feels, or the job was resumed, or its speed raised, under
    such a limit before it was ready, on both sides; QSD's job
    has been READY and blockd's, still limited, never was (it may have been
    cancelled since).  The states part here."""
    for jid in sorted(qsd.drained & ours.drained):
        theirs, mine = qsd.jobs.get(jid), ours.jobs.get(jid)
        if theirs is None or mine is None or mine.fast or mine.was_ready:
            continue
        if theirs.was_ready:
            return f"A6: QSD's {jid} ran past its speed limit after a drain or pause"
    return None


def base_flush_refused(qsd: Side, ours: Side) -> str | None:
    """A7. A commit whose base, or an overlay whose header it rewrites, cannot
    be flushed when the commit is applied: blockd makes base's data and each
    new header durable before the job completes (README) and fails the job
    when a flush fails; QSD 7.2 does not flush there and completes, so a
    client that then deletes the intermediate images may be left with an
    overlay naming them, or backed by a base whose copied data never reached
    the disk (seed 40070130 of the QSD-against-QSD test leaves that base
    corrupt).  Checked: blockd's job went from pending to aborting with no
    I/O error reported while it ran, QSD's completed, and the file of base
    or of an overlay of top has a blkdebug rule that can fail a flush (no
    sector: a flush has none) or a write (a flush writes back the metadata
    the job changed, seed 800140).  The states part here."""
    for jid in sorted(set(qsd.jobs) & set(ours.jobs)):
        theirs, mine = qsd.jobs[jid], ours.jobs[jid]
        if mine.kind != "commit" or mine.errors or not mine.failed_to_apply:
            continue
        flushed = [mine.base] + [n for n, b in ours.graph.items() if b == mine.top]
        rules = [r for image in flushed for r in ours.blkdebug.get(image or "", [])]
        fails = [r.get("iotype", "flush") for r in rules if r.get("iotype") == "write"]
        fails += [r.get("iotype", "flush") for r in rules if "sector" not in r]
        if theirs.completed_ok and {"write", "flush"} & set(fails):
            return f"A7: blockd's {jid} failed a flush applying it; QSD's went ahead"
    return None


def zero_write_metadata(qsd: Side, ours: Side) -> str | None:
    """A8. A commit that writes zeros into a base whose file has blkdebug rules:
    blockd writes the L2 entries of a zero write at once, after a flush (block
    README, blkdebug events: ``l2_update`` and ``cluster_free`` differ), QEMU at
    its next flush, so the flushes, and with them the events that make rules
    active, come in another order, and a job that fails on both daemons fails
    with another error or operation (seed 1000057: QSD's refblock rule is
    active by the time its flush comes, blockd's flush meets an l2_load rule),
    or a rule fails blockd's flush that QSD never makes (seed 5001746: an
    l2_update rule on flushes, with on-error ignore).  Checked: an I/O error
    was reported or the job failed on one side at least, the job copies from
    an image with zero clusters, and its base has blkdebug rules.  The states
    part here."""
    for jid in sorted(set(qsd.jobs) & set(ours.jobs)):
        theirs, mine = qsd.jobs[jid], ours.jobs[jid]
        if not (_job_failed(theirs) or _job_failed(mine)):
            continue
        if ours.blkdebug.get(mine.base or "") and ours.zeroed & set(mine.range):
            return f"A8: {jid} met an I/O error at zero-write metadata of a blkdebug base"
    return None


def allowed_divergence(
    side: Side, step: Step, qsd_reply: Any, our_reply: Any, ro_at_add: dict[str, bool]
) -> str | None:
    """The allow-list entry that explains differing replies, if any (each one is
    checked against what this side knows, not taken on the error's word)."""
    qsd_ok = "return" in qsd_reply
    if not qsd_ok and step.get("qmp") not in ("block-commit", "block-export-add"):
        return None
    desc = our_reply.get("error", {}).get("desc", "")
    args = step.get("args", {})
    if step.get("qmp") == "blockdev-add":
        return None
    if step.get("qmp") == "blockdev-del":
        node = args.get("node-name", "")
        if qsd_ok and desc.startswith(FLUSH_REFUSED) and side.blkdebug.get(node):
            return f"A16: blockd keeps {node} open: the flush before closing it failed"
        return None
    if step.get("qmp") == "block-export-add":
        node = args.get("node-name")
        if desc == READ_ONLY_EXPORT and node in restored_read_only(side, ro_at_add):
            # (QSD may refuse too, for a reason it checks after the node's
            # mode: an export of that name, seed 5001219)
            return f"A2: blockd keeps {node} read-only after the cancel: no writable export"
        return None
    if step.get("qmp") != "block-commit":
        return None
    match = COMMIT_INTO_SHARED_BASE.match(desc)
    if match is not None:
        # The parent is open, backed by the base, outside the commit.  (QSD may
        # refuse too, for a reason it checks first: a permission conflict on an
        # exported intermediate, say.)
        parent, base = match["parent"], match["base"]
        if side.graph.get(parent) == base:
            return f"A1: blockd refuses to commit into {base}, which {parent} also reads from"
    if not qsd_ok:
        return None
    match = COMMIT_OF_WRITABLE_EXPORT.match(desc)
    if match is not None:
        node = match["node"]
        chain = side.chain(args.get("device", ""))
        if node in chain[1:] and node in side.writable_exports.values():
            return f"A3: blockd refuses to commit {node}, which is exported writable"
    match = PERMISSION_CONFLICT.match(desc)
    if match is not None:
        # QSD's active-commit turn shares base's write permission, so a
        # writable export of base is no conflict there (seed 7013739);
        # blockd checks an intermediate commit's permissions first
        top, chain = args.get("top-node"), side.chain(args.get("device", ""))
        base = args.get("base-node", chain[-1] if chain else None)
        if top in chain[1:] and top in side.writable_exports.values() and match["node"] == base:
            return f"A3: blockd refuses to commit {top}, which is exported writable"
    match = OVERLAY_HELD_BY_A_JOB.match(desc)
    if match is not None:
        # an overlay of top outside the device's chain, the base of a running job
        node, top = match["node"], args.get("top-node")
        held = any(
            job.base == node and job.status not in ("null", "concluded")
            for job in side.jobs.values()
        )
        if (
            held
            and top is not None
            and side.graph.get(node) == top
            and (node not in side.chain(args.get("device", "")))
        ):
            return f"A9: blockd refuses to re-point {node}, held by another job"
    return None


def restored_read_only(side: Side, read_only_at_add: dict[str, bool]) -> set[str]:
    """A2. Nodes whose ``ro`` may differ: the base of an active commit that ended
    without the pivot, read-only when the job started (QSD 7.2 leaves it
    read-write; blockd puts it back, README "Merging the active layer"), the
    base of an intermediate commit whose file has a sector rule on a write,
    or that failed with blkdebug rules on base's file (QEMU's reopen back to
    read-only can fail there, blockd's not), and the file nodes under them.
    Read-only as the client made it: at blockdev-add, or by an earlier active
    commit's pivot, which gives base top's mode."""
    out: set[str] = set()
    for job in side.jobs.values():
        base = job.base
        if job.kind == "active" and base and job.completed_ok and job.completing:
            # The pivot gave base top's open mode (in both daemons): the mode
            # a later job of the same base starts from (seed 7000170).
            if not job.pivot_seen and job.top in read_only_at_add:
                read_only_at_add[base] = read_only_at_add[job.top]
            job.pivot_seen = True
            continue
        if base is None or not read_only_at_add.get(base, False):
            continue
        if job.kind == "commit":
            # The flush of the reopen that puts base back: QEMU's writes whole
            # L2 tables, which a sector rule can fail (A10's mechanism: seed
            # 7013970), and after a failed job what its cache still holds,
            # which a lasting rule fails (seed 7014951); either leaves QSD's
            # base read-write, where blockd's entries went out already
            rules = side.blkdebug.get(base, [])
            whole_table = any("sector" in r and r["event"] in WHOLE_TABLE_EVENTS for r in rules)
            if job.status in ("concluded", "null") and (
                whole_table or (rules and _job_failed(job))
            ):
                out |= {base, f"f-{base}", f"dbg-{base}"}
            continue
        if job.status in ("concluded", "null") and not (job.completed_ok and job.completing):
            out |= {base, f"f-{base}", f"dbg-{base}"}
    return out


#: blkdebug events raised for a write of a whole L2 table from QEMU's cache
WHOLE_TABLE_EVENTS = ("pwritev", "pwritev_done", "l2_update")


def skip_reason(qsd: Side, step: Step) -> str | None:
    """Steps not run at all, because QSD 7.2 has a bug there (not a difference to judge)."""
    if "io" in step and "write" in step["cmds"][0]:
        for job in qsd.jobs.values():
            if job.kind == "active" and job.status == "pending":
                # ACTIVE_COMMIT_NOTES.md §5: QSD 7.2 loses a write made while an
                # active commit is PENDING.
                return "QSD 7.2 loses writes while an active commit is pending"
    if step.get("qmp") == "block-commit":
        args = step["args"]
        top = args.get("top-node", args.get("device"))
        overlays = [node for node, backing in qsd.graph.items() if backing == top]
        for rule in (r for node in overlays for r in qsd.blkdebug.get(node, [])):
            if (
                rule.get("iotype", "write") == "write"
                and rule["event"] in ("none", "pwritev")
                and rule.get("sector", 0) == 0
            ):
                # QSD 7.2 dies (SIGSEGV) after "Could not update backing file
                # link" when the write of an overlay's new backing name fails
                # (long run H: seeds 7021175, 7021372 at the start of the
                # commit, 7021928 at job-finalize)
                return "QSD 7.2 crashes when an overlay's backing link cannot be written"
    return None


# --------------------------------------------------------------------------- the run


IO_NOISE = re.compile(r"^(wrote|read) \d+/\d+ bytes at offset \d+$|ops/sec|^\d+ ops;")


@dataclass
class Outcome:
    steps_run: int = 0
    skipped: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _daemons(
    sock_dir: Path, work: Path, start_b: Callable[[Path], DaemonProcess]
) -> Iterator[tuple[Side, Side]]:
    sides: list[Side] = []
    procs: list[DaemonProcess] = []
    try:
        for name, start in (("qsd", start_qsd), ("blockd", start_b)):
            proc = start(sock_dir / f"{name}.sock")
            procs.append(proc)
            sides.append(Side(name, proc, work / name, sock_dir / f"{name}-nbd.sock"))
        yield sides[0], sides[1]
    finally:
        for side in sides:
            side.close()
        for proc in procs:
            proc.stop()


def run_io(side: Side, step: Step) -> Any:
    result = nbd_io(side.nbd, step["io"], *step["cmds"])
    lines = [ln for ln in result.stdout.splitlines() if not IO_NOISE.search(ln)]
    return {"rc": result.returncode, "out": lines, "err": side.unsub(result.stderr.strip())}


def _died(qsd: Side, ours: Side, where: str, error: BaseException) -> Exception:
    """What to raise when a connection broke: a daemon died (blockd: a difference)."""
    if isinstance(error, NoReply):
        if error.side == ours.name:
            return Difference(where, "no reply (hang)", "a reply", str(error))
        return Inconclusive(f"{where}: {error}")
    time.sleep(0.5)
    for side in (ours, qsd):
        code = side.daemon.proc.poll()
        if code is not None:
            tail = side.daemon.stderr()[-1500:]
            if side is ours:
                return Difference(where, "daemon exited", "running", f"exit {code}: {tail}")
            return Inconclusive(f"{where}: QSD exited {code}: {tail}")
    return Inconclusive(f"{where}: connection broke ({error!r}), both daemons alive")


def _step(
    qsd: Side, ours: Side, step: Step, where: str, ro_at_add: dict[str, bool], outcome: Outcome
) -> bool:
    """Run one step on both daemons and compare; True when an allow-listed
    difference makes their states part (the run stops comparing there)."""
    if "sleep" in step:
        time.sleep(step["sleep"])
        return False
    reason = skip_reason(qsd, step)
    if reason is not None:
        outcome.skipped.append(f"{where}: {reason}")
        return False
    outcome.steps_run += 1
    if "io" in step:
        theirs, mine = run_io(qsd, step), run_io(ours, step)
        # qemu-io has exited, but a daemon counts its connection until it
        # reads the end of it; QSD's client ran first and had ours' run to
        # be seen gone, ours had two QMP round trips before a block-export-del
        # (seed 7031827 on a loaded machine: "export 'e0' still in use")
        time.sleep(CLIENT_GONE)
        if step["cmds"][0].startswith("read") and qsd.view_is_timing(step["io"]):
            theirs["out"] = mine["out"] = "<timing: partly committed into>"
        for job in (*qsd.jobs.values(), *ours.jobs.values()):
            if job.kind == "active" and job.status not in ("null", "concluded"):
                job.written = True
        if step["cmds"][0].startswith("write") and theirs["rc"] != 0:
            qsd.failed_writes.add(step["io"])
        if (
            step["cmds"][0].startswith("write")
            and ours.blkdebug
            and any(
                job.kind == "active" and job.status == "ready"
                for job in (*qsd.jobs.values(), *ours.jobs.values())
            )
        ):
            # A READY job copies a guest write at its next 100 ms poll (QEMU's
            # mirror as ours), and only then can meet a blkdebug rule; READY
            # counts as settled, so without this wait one side's error event
            # could land before the comparison and the other's after it
            # (seed 7008270, on a loaded machine)
            time.sleep(READY_CATCH_UP)
    else:
        args = step.get("args")
        theirs = normalise(qsd, qsd.execute(step["qmp"], args))
        mine = normalise(ours, ours.execute(step["qmp"], args))
        if step["qmp"] == "blockdev-add" and "return" in theirs:
            ro_at_add[args["node-name"]] = bool(args.get("read-only", False))
    if theirs != mine:
        allowed = (
            allowed_divergence(ours, step, theirs, mine, ro_at_add)
            or drain_ran_ahead(qsd, ours)
            or base_flush_refused(qsd, ours)
        )
        if allowed is None:
            raise Difference(where, "reply", theirs, mine)
        ours.allowed.add(f"{where}: {allowed}")
        return True
    return compare_state(qsd, ours, where, ro_at_add)


def run_scenario(
    scn: Scenario,
    work: Path,
    start_b: Callable[[Path], DaemonProcess] = start_blockd,
    tamper: Callable[[Path], None] | None = None,
) -> Outcome:
    """Run ``scn`` on QSD and on the daemon ``start_b`` starts; raise
    :class:`Difference` at the first observable difference.  ``tamper`` changes
    the second daemon's copy of the images first (to prove a test can fail)."""
    outcome = Outcome()
    pristine = work / "images"
    build_images(scn, pristine)
    for name in ("qsd", "blockd"):
        shutil.copytree(pristine, work / name)
    if tamper is not None:
        tamper(work / "blockd")
    sock_dir = Path(tempfile.mkdtemp(prefix="fz-"))
    diverged = False
    try:
        with _daemons(sock_dir, work, start_b) as (qsd, ours):
            qsd.blkdebug = ours.blkdebug = scn.blkdebug
            qsd.zeroed = ours.zeroed = {
                spec.name for spec in scn.images if any("-z" in c for c in spec.commands)
            }
            ro_at_add: dict[str, bool] = {}
            steps = scn.prologue + scn.body
            for index, step in enumerate(steps):
                where = f"step {index} {json.dumps(step)}"
                try:
                    diverged = _step(qsd, ours, step, where, ro_at_add, outcome)
                except (OSError, EOFError, NoReply) as error:
                    raise _died(qsd, ours, where, error) from error
                if diverged:
                    break
            if not diverged:
                try:
                    diverged = cleanup(qsd, ours, ro_at_add, outcome)
                except (OSError, EOFError, NoReply) as error:
                    raise _died(qsd, ours, "cleanup", error) from error
            for side in (qsd, ours):
                reply = side.execute("quit", None)
                if reply != {"return": {}}:
                    raise Difference("quit", "reply", reply, side.name)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    compare_disks(scn, work, qsd, ours, diverged)
    outcome.allowed = sorted(ours.allowed)
    return outcome


def _job_failed(job: JobTrack) -> bool:
    """An I/O error was reported, or the job ended without completing."""
    return job.errors or (job.status in ("concluded", "null") and not job.completed_ok)


def _had_errors(job: JobTrack) -> bool:
    return job.errors


def _one_side_met_a_base_rule(
    qsd: Side,
    ours: Side,
    failed: Callable[[JobTrack], bool],
    qsd_fails: bool,
    rule: Callable[[dict[str, Any], str], bool],
    allowance: str,
    why: str,
) -> str | None:
    """``allowance: job: why`` for the first job that ``failed`` on one side
    only (QSD's if ``qsd_fails``, else blockd's) and whose base's file has a
    blkdebug rule ``rule`` holds of (given the rule and the base); None if
    there is none."""
    for jid in sorted(set(qsd.jobs) & set(ours.jobs)):
        theirs, mine = qsd.jobs[jid], ours.jobs[jid]
        if failed(theirs) == failed(mine) or failed(theirs) != qsd_fails:
            continue
        base = mine.base or ""
        if any(rule(r, base) for r in ours.blkdebug.get(base, [])):
            return f"{allowance}: {jid}: {why}"
    return None


def l2_sector_rule_missed(qsd: Side, ours: Side) -> str | None:
    """A10. A blkdebug rule with a ``sector`` on the file of a commit's base,
    on ``l2_update`` or aimed at one of base's L2 tables (armed by any event:
    seed 7015267, ``write_aio``): QEMU writes an L2 table back whole from its
    cache, blockd writes only the entries that changed (a neighbour may be an
    allocation whose counters are not durable yet), so a rule aimed at a
    table's sector fails QEMU's write and may miss blockd's (block README,
    blkdebug events).  Checked: QSD's job met an I/O error or failed,
    blockd's did neither, and its base's file has such a rule.  The states
    part here."""

    tables = functools.cache(lambda base: _l2_table_sectors(qsd, base))  # read once a base

    def aimed_at_a_table(r: dict[str, Any], base: str) -> bool:
        if "sector" not in r:
            return False
        return r["event"] == "l2_update" or r["sector"] in tables(base)

    return _one_side_met_a_base_rule(
        qsd, ours, _job_failed, True, aimed_at_a_table,
        "A10", "a sector rule failed QSD's whole-table write",
    )  # fmt: skip


def _l2_table_sectors(side: Side, image: str) -> set[int]:
    """The sectors of the L2 tables an image's L1 table names, as the file is now."""
    path = side.dir / f"{image}.qcow2"
    if not path.exists():
        return set()
    raw = path.read_bytes()
    bits = int.from_bytes(raw[20:24], "big")
    l1_size = int.from_bytes(raw[36:40], "big")
    l1_offset = int.from_bytes(raw[40:48], "big")
    out: set[int] = set()
    for i in range(l1_size):
        at = l1_offset + 8 * i
        table = int.from_bytes(raw[at : at + 8], "big") & 0x00FF_FFFF_FFFF_FE00
        if table:
            out.update(range(table // 512, (table + (1 << bits)) // 512))
    return out


def read_after_data_write(qsd: Side, ours: Side) -> str | None:
    """A11. A blkdebug rule on a commit base's file that fails the first read
    after a ``write_aio``: the read that meets it is the base's refcount block,
    loaded for the first allocating write.  QSD's mirror runs several copy
    operations at once, so whether that load comes before or after another
    operation's data write varies from run to run of QSD itself (seed 7003438:
    QSD against QSD parts in 2 runs of 12); blockd copies in order, in place
    first, and meets the rule every time, one of QSD's outcomes.  Checked:
    blockd's job met an I/O error, QSD's met none, and the base's file has a
    ``write_aio`` rule for reads.  The states part here."""
    return _one_side_met_a_base_rule(
        qsd, ours, _had_errors, False,
        lambda r, _b: r["event"] == "write_aio" and r.get("iotype") == "read",
        "A11", "QSD's copy order let its refcount load slip past the rule",
    )  # fmt: skip


def metadata_read_after_first_write(qsd: Side, ours: Side) -> str | None:
    """A14. A blkdebug rule on a commit base's file that fails every read after
    a ``pwritev`` (any write to the file): the base's caches start empty at the
    job's reopen, and QSD's mirror runs several copy operations at once, so
    whether an operation loads base's L2 table or refcount block before or
    after another one's first write varies from run to run of QSD itself (seed
    7011008: QSD against QSD parts in 6 runs of 10, both ways); blockd's first
    batch loads what it needs before it writes anything and never meets the
    rule there, one of QSD's outcomes.  Checked: QSD's job met an I/O error,
    blockd's met none, and the base's file has a ``pwritev`` rule for reads.
    The states part here."""
    return _one_side_met_a_base_rule(
        qsd, ours, _had_errors, True,
        lambda r, _b: r["event"] == "pwritev" and r.get("iotype") == "read",
        "A14", "QSD's concurrent copies loaded base's metadata after a write",
    )  # fmt: skip


#: blkdebug events QEMU's qcow2 emits when it reads a table into its cache
LOAD_EVENTS = ("l2_load", "refblock_load")


def open_rule_replaced_by_a_load(qsd: Side, ours: Side) -> str | None:
    """A17. A blkdebug rule on event ``none`` for writes, on a commit base's
    file, and another rule on a table load of the same file: the ``none``
    rule is armed when the file opens, and the first load that arms the other
    rule replaces it.  The job's reopen of base starts its caches empty, so
    the first allocating copy loads a refcount block; QSD's mirror runs
    several copy operations at once, and whether one of them overwrites a
    cluster of base in place (meeting the ``none`` rule) before that load
    varies from run to run of QSD itself (seed 7015924: QSD against QSD parts
    in 4 runs of 16); blockd's first batch loads what it needs before it
    writes and never meets the rule, one of QSD's outcomes.  Checked: QSD's
    job met an I/O error, blockd's met none, and the base's file has both
    rules.  The states part here."""

    def replaced_open_rule(r: dict[str, Any], base: str) -> bool:
        rules = ours.blkdebug.get(base, [])
        return (
            r["event"] == "none"
            and r.get("iotype", "write") == "write"
            and any(other["event"] in LOAD_EVENTS for other in rules)
        )

    return _one_side_met_a_base_rule(
        qsd, ours, _had_errors, True, replaced_open_rule,
        "A17", "QSD's concurrent copies wrote in place before base's first table load",
    )  # fmt: skip


def base_reopened_after_a_job(qsd: Side, ours: Side, ro_at_add: dict[str, bool]) -> str | None:
    """A15. A job on a base that an earlier active commit left without its
    pivot, the base read-only as the client added it (A2): blockd put that
    base back to read-only (a reopen that flushes it) and the later job
    reopened it read-write (both reopens start new metadata caches, as QEMU's
    do), while QSD's base stayed read-write through both jobs.  So blkdebug
    rules on the base's file meet other requests: blockd's flush consumes a
    flush rule that QSD's later job then meets (seed 7010468), or blockd's
    later job reads a table QSD still has cached.  Checked: the base's file
    has blkdebug rules, such an earlier job exists, and the later job met an
    error or failed on one side only.  The states part here."""
    jobs = list(ours.jobs.items())
    for index, (jid, mine) in enumerate(jobs):
        theirs = qsd.jobs.get(jid)
        base = mine.base
        if theirs is None or base is None or not ro_at_add.get(base, False):
            continue
        if _job_failed(theirs) == _job_failed(mine) or not ours.blkdebug.get(base):
            continue
        if any(
            earlier.kind == "active"
            and earlier.base == base
            and earlier.status in ("concluded", "null")
            and not (earlier.completed_ok and earlier.completing)
            for _, earlier in jobs[:index]
        ):
            return f"A15: {jid}: blockd's {base} went back to read-only after an earlier job"
    return None


def allocation_before_in_place_part(qsd: Side, ours: Side) -> str | None:
    """A12. A blkdebug rule on a commit base's file that a ``refblock_load``
    makes active, aimed at a sector of a data cluster: when one write covers
    clusters base can overwrite in place and clusters it must allocate, QEMU
    writes the in-place part first and then allocates the rest (a piece at a
    time), blockd allocates for the whole request first and then writes it
    (block README, blkdebug events), so the rule can meet blockd's in-place
    part and nothing of QEMU's (seed 7006008).  Checked: blockd's job met an
    I/O error, QSD's met none, and the base's file has a ``refblock_load`` rule
    with a sector.  The states part here."""
    return _one_side_met_a_base_rule(
        qsd, ours, _had_errors, False,
        lambda r, _b: r["event"] == "refblock_load" and "sector" in r,
        "A12", "blockd allocated before writing a request's in-place part",
    )  # fmt: skip


def batch_entries_after_a_flush(qsd: Side, ours: Side) -> str | None:
    """A18. A blkdebug rule that fails a flush (``iotype`` flush, or none, and
    no sector) on the file of an intermediate commit's base: blockd writes a
    bulk-copy batch's L2 entries at once, after the fdatasync that makes the
    copied data durable (block README, metadata writes and bulk copies), so
    its copy flushes base; QEMU's entries wait in its cache for the next flush,
    which in QSD 7.2's intermediate commit is the reopen at the end, whose
    failure goes unreported.  blockd's job meets the rule as a write error
    while it copies; QSD's completes (seed 7030828: an ``l2_load`` rule on
    flushes, armed by the batch's table load).  Checked: an intermediate
    commit met an I/O error in blockd and none in QSD, and its base's file has
    such a rule.  The states part here."""
    for jid in sorted(set(qsd.jobs) & set(ours.jobs)):
        theirs, mine = qsd.jobs[jid], ours.jobs[jid]
        if mine.kind != "commit" or not mine.errors or theirs.errors:
            continue
        rules = ours.blkdebug.get(mine.base or "", [])
        if any(r.get("iotype") in (None, "flush") and "sector" not in r for r in rules):
            return f"A18: {jid}: blockd's copy flushed base before a batch's entries"
    return None


def compare_state(qsd: Side, ours: Side, where: str, ro_at_add: dict[str, bool]) -> bool:
    """Compare jobs (and, with none alive, the graph); True when an allow-listed
    difference makes the states part."""
    if not qsd.settle():
        raise Inconclusive(f"{where}: QSD did not settle: {qsd.statuses()}")
    target = qsd.statuses()
    settled = ours.settle(target)
    # The queries first: their replies come after every event emitted before them.
    replies = [
        (
            command,
            normalise(qsd, qsd.execute(command, None)),
            normalise(ours, ours.execute(command, None)),
        )
        for command in ("query-block-jobs", "query-jobs")
    ]
    theirs_ev = group_events(qsd, qsd.take_events())
    mine_ev = group_events(ours, ours.take_events())
    differs: tuple[str, Any, Any] | None = None
    if theirs_ev != mine_ev:
        differs = ("events", theirs_ev, mine_ev)
    elif not settled:
        differs = ("job statuses", target, ours.statuses())
    else:
        differs = next(((c, a, b) for c, a, b in replies if a != b), None)
    if differs is not None:
        allowed = (
            drain_ran_ahead(qsd, ours)
            or base_flush_refused(qsd, ours)
            or zero_write_metadata(qsd, ours)
            or l2_sector_rule_missed(qsd, ours)
            or read_after_data_write(qsd, ours)
            or allocation_before_in_place_part(qsd, ours)
            or metadata_read_after_first_write(qsd, ours)
            or open_rule_replaced_by_a_load(qsd, ours)
            or base_reopened_after_a_job(qsd, ours, ro_at_add)
            or batch_entries_after_a_flush(qsd, ours)
        )
        if allowed is None:
            raise Difference(where, *differs)
        ours.allowed.add(f"{where}: {allowed}")
        return True
    if not qsd.alive() and not ours.alive():
        compare_graph(qsd, ours, where, ro_at_add)
    return False


def compare_graph(qsd: Side, ours: Side, where: str, ro_at_add: dict[str, bool]) -> None:
    loose = restored_read_only(ours, ro_at_add)
    views = []
    for side in (qsd, ours):
        nodes = normalise(side, side.execute("query-named-block-nodes", {"flat": True}))
        nodes = sort_nodes(nodes.get("return", nodes))
        views.append(nodes)
    theirs, mine = views
    for a, b in zip(theirs, mine, strict=False):
        name = a.get("node-name")
        if name in loose and name == b.get("node-name") and a.get("ro") is False and b.get("ro"):
            # A2 (see restored_read_only)
            ours.allowed.add(f"A2: blockd restored read-only on {name}")
            a["ro"] = b["ro"] = "<A2: read-only restored>"
    mask_restore_order(ours, loose, theirs, mine)
    mask_restore_order(ours, ours.refused_commit_bases - loose, theirs, mine, REFUSED_COMMIT)
    mask_json_backing(ours, theirs, mine)
    if theirs != mine:
        raise Difference(where, "query-named-block-nodes", theirs, mine)
    theirs_x = normalise(qsd, qsd.execute("query-block-exports", None))
    mine_x = normalise(ours, ours.execute("query-block-exports", None))
    if theirs_x != mine_x:
        raise Difference(where, "query-block-exports", theirs_x, mine_x)


#: A13.  A block-commit refused once its job exists (a permission conflict):
#: QEMU reopens a read-only base read-write before it checks the job's
#: permissions, and back to read-only after the refusal; blockd checks first
#: and never reopens (README: its read-write open clears autoclear bits, which
#: a commit that never runs must not do).  The two reopens
#: QEMU made show only in the order of blkdebug options in ``json:`` file
#: names (seed 7006457), tolerated as A2's are.
REFUSED_COMMIT = "A13: json: key order after QSD's reopens around a refused commit"


def mask_restore_order(
    ours: Side,
    loose: set[str],
    theirs: list[dict[str, Any]],
    mine: list[dict[str, Any]],
    why: str = "A2: json: key order after blockd's restore",
) -> None:
    """A2 consequence in ``json:`` file names: QEMU rebuilds a node's options
    at each reopen, which changes the order of keys sharing a hash bucket
    (blkdebug rules), so blockd's reopen that restores read-only shows the
    order QEMU would have shown after its own.  Tolerated: the same options
    in another order, on a restored node or a node whose chain holds one
    (``why`` names the entry: A13 uses it too)."""
    if not loose:
        return
    for a, b in zip(theirs, mine, strict=False):
        name = str(a.get("node-name"))
        if name != b.get("node-name"):
            continue
        base = name.removeprefix("f-").removeprefix("dbg-")
        if name not in loose and not loose & set(ours.chain(base)):
            continue
        ia, ib = a.get("image", {}), b.get("image", {})
        for holder, other, key in ((a, b, "file"), (a, b, "backing_file"), (ia, ib, "filename")):
            x, y = holder.get(key), other.get(key)
            if x == y or not (isinstance(x, str) and isinstance(y, str)):
                continue
            if x[:5] == y[:5] == "json:" and json.loads(x[5:]) == json.loads(y[5:]):
                ours.allowed.add(f"{why}, in {name}")
                holder[key] = other[key] = f"<{why}>"


def mask_json_backing(ours: Side, theirs: list[dict[str, Any]], mine: list[dict[str, Any]]) -> None:
    """A5 (see json_backing_written) in query-named-block-nodes: the backing
    strings of the overlays concerned, and the filenames that follow from them
    (QEMU shows a node whose backing is not what its header names, and every
    node above it, by a ``json:`` pseudo-filename)."""
    written: set[str] = set()
    for a, b in zip(theirs, mine, strict=False):
        name = a.get("node-name")
        ia, ib = a.get("image", {}), b.get("image", {})
        if name == b.get("node-name") and json_backing_written(
            ours, str(name), str(ia.get("backing-filename")), str(ib.get("backing-filename"))
        ):
            written.add(str(name))
    if not written:
        return
    ours.allowed.add(f"A5: plain backing string written into {sorted(written)}")
    above = {n for n in ours.graph if written & set(ours.chain(n))}
    for a, b in zip(theirs, mine, strict=False):
        name = a.get("node-name")
        if name != b.get("node-name"):
            continue
        files = {n for n in above if name in (n, f"f-{n}", f"dbg-{n}")}
        ia, ib = a.get("image", {}), b.get("image", {})
        keys = ("backing-filename", "full-backing-filename") if name in written else ()
        for key in keys:
            ia[key] = ib[key] = "<A5: backing string>"
        if not files and name not in above:
            continue
        for holder, key in ((a, "file"), (a, "backing_file"), (ia, "filename")):
            other = b if holder is a else ib
            x, y = str(holder.get(key)), str(other.get(key))
            if x != y and (x.startswith("json:") or y.startswith("json:")):
                holder[key] = other[key] = "<A5: json: filename>"


def cleanup(qsd: Side, ours: Side, ro_at_add: dict[str, bool], outcome: Outcome) -> bool:
    """Cancel whatever still runs, dismiss what is left: compared like any step
    (True when an allow-listed difference made the states part)."""
    for phase in ("cancel", "dismiss"):
        for jid, job in sorted(qsd.jobs.items()):
            if phase == "cancel" and job.status not in ("null", "concluded"):
                step: Step = {"qmp": "block-job-cancel", "args": {"device": jid, "force": True}}
            elif phase == "dismiss" and job.status == "concluded":
                step = {"qmp": "job-dismiss", "args": {"id": jid}}
            else:
                continue
            where = f"cleanup {json.dumps(step)}"
            theirs = normalise(qsd, qsd.execute(step["qmp"], step["args"]))
            mine = normalise(ours, ours.execute(step["qmp"], step["args"]))
            if theirs != mine:
                raise Difference(where, "reply", theirs, mine)
            if compare_state(qsd, ours, where, ro_at_add):
                return True
    for side in (qsd, ours):
        if side.jobs and side.alive():
            raise Inconclusive(f"{side.name} still has jobs after cleanup: {side.statuses()}")
    compare_graph(qsd, ours, "final", ro_at_add)
    return False


def timing_images(sides: list[Side]) -> dict[str, tuple[str, ...] | None]:
    """Images whose data depends on how far a job got, each with the range (top
    first) through which its readers still see exactly what they saw (None: no
    such range).

    A job that did not copy everything (still running, cancelled, failed, hit
    errors) leaves its base with whatever chunks had arrived; readers of the base
    through the job's top see the whole range above it, so nothing changed for
    them.  A later job that copies from a range holding such an image passes the
    timing on to its own base, for every reader."""
    tainted: dict[str, tuple[str, ...] | None] = {}
    changed = True
    while changed:
        changed = False
        for side in sides:
            for job in side.jobs.values():
                if job.base is None:
                    continue
                done = job.status in ("null", "concluded")
                if not done or not job.completed_ok or job.errors:
                    old = tainted.get(job.base, ("<none>",))
                    rng = job.range or None
                    new = rng if old in (("<none>",), rng) else None
                    if old != new:
                        tainted[job.base] = new
                        changed = True
                elif any(n in tainted for n in job.range) and tainted.get(job.base, ()) is not None:
                    tainted[job.base] = None
                    changed = True
    return tainted


def reads_timing(chain: list[str], tainted: dict[str, tuple[str, ...] | None]) -> bool:
    """Whether an image with this backing chain reads data that is timing: it
    reads a tainted image other than through the whole range above it (an
    overlay whose header names the base directly does not, though the job ran
    through it: seed 6000165, where blockdev-add had given it another backing)."""
    for image, exempt in tainted.items():
        if image not in chain:
            continue
        at = chain.index(image)
        if exempt is None or tuple(chain[max(0, at - len(exempt)) : at]) != exempt:
            return True
    return False


def _check(image: Path) -> dict[str, Any]:
    result = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True
    )
    try:
        report: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        report = {"error": result.stderr.strip()}
    return {
        "rc": result.returncode,
        "corruptions": report.get("corruptions", 0),
        "leaks": report.get("leaks", 0),
        "error": report.get("error"),
    }


def is_qsd(daemon: DaemonProcess) -> bool:
    return "qemu-storage-daemon" in str(daemon.proc.args)


def compare_disks(scn: Scenario, work: Path, qsd: Side, ours: Side, diverged: bool) -> None:
    """Backing strings, guest views and qemu-img check of every image."""
    tainted = timing_images([qsd, ours])
    # A failed client write leaves its range undefined, in its node and in
    # the base of any commit that copied from it.
    undefined = set(qsd.failed_writes)
    for job in qsd.jobs.values():
        if job.base is not None and undefined & {job.top, *job.range}:
            undefined.add(job.base)
    for image in undefined:
        tainted[image] = None

    def header_chain(name: str) -> list[str]:
        out = [name]
        while len(out) < 10:
            backing = backing_of(work / "qsd" / f"{out[-1]}.qcow2")
            if backing is not None and backing.startswith("json:"):
                # QSD names a base under blkdebug by its options: the image is inside.
                files = re.findall(r'"filename": "([^"]+)"', backing)
                backing = files[-1] if files else None
            if backing is None:
                break
            out.append(Path(backing).name.removesuffix(".qcow2"))
        return out

    write_faults = any(
        r.get("iotype") in (None, "write", "flush")  # none: every kind of request
        or r["event"] in ("write_aio", "pwritev", "cow_write", "l2_update", "flush_to_disk")
        for rules in scn.blkdebug.values()
        for r in rules
    )
    for spec in scn.images:
        theirs, mine = work / "qsd" / f"{spec.name}.qcow2", work / "blockd" / f"{spec.name}.qcow2"
        where = f"image {spec.name}"
        mine_check = _check(mine)
        if mine_check["corruptions"] or mine_check["error"]:
            # blockd never leaves an image corrupt.  QSD 7.2 does, when flushes
            # of the image fail (its refcounts stay in a cache it cannot write
            # back): the harness's QSD-against-QSD test then sees a corrupt
            # image on both sides, and that is no difference.  How much is
            # corrupt or leaked depends on how far the job got before the
            # flush failed (seed 40070130 in CI under load: 8 and 64).
            theirs_check = _check(theirs)
            same = all(
                bool(theirs_check[k]) == bool(mine_check[k]) for k in ("corruptions", "error")
            )
            if not (is_qsd(ours.daemon) and same):
                raise Difference(where, "qemu-img check", theirs_check, mine_check)
        if spec.snapshot and snapshot_view(theirs) != snapshot_view(mine):
            # whatever was written into the image, its snapshot holds what it held
            raise Difference(where, "snap1 (qemu-img convert -l)", "", "differs")
        if diverged:
            continue
        theirs_check = _check(theirs)
        if (
            mine_check["leaks"]
            and not theirs_check["leaks"]
            and not (write_faults and spec.name in scn.blkdebug)
        ):
            raise Difference(where, "qemu-img check", theirs_check, mine_check)
        qsd_backing = backing_of(theirs)
        want = None if qsd_backing is None else qsd_backing.replace(str(qsd.dir), str(ours.dir))
        got = backing_of(mine)
        if got != want and want is not None and json_backing_written(ours, spec.name, want, got):
            ours.allowed.add(f"A5: plain backing string in {spec.name}'s header")
        elif got != want:
            raise Difference(where, "backing string", qsd_backing, got)
        if reads_timing(header_chain(spec.name), tainted):
            continue
        chain = header_chain(spec.name)
        result = subprocess.run(
            ["qemu-img", "compare", "--image-opts",
             plain_chain(work / "qsd", chain), plain_chain(work / "blockd", chain)],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise Difference(where, "guest view (qemu-img compare)", "", result.stdout.strip())


def plain_chain(d: Path, chain: list[str]) -> str:
    """``--image-opts`` for the first image of ``chain``, every backing named by its
    plain file: a ``json:`` backing string (QSD's name for a base under blkdebug)
    would run the blkdebug rules again in qemu-img and fail the comparison's reads."""
    parts, prefix = [], ""
    for name in chain:
        parts += [f"{prefix}driver=qcow2", f"{prefix}file.driver=file",
                  f"{prefix}file.filename={d / name}.qcow2"]  # fmt: skip
        prefix += "backing."
    return ",".join(parts)


def snapshot_view(image: Path) -> str:
    """A digest of what internal snapshot snap1 of ``image`` itself holds, as
    qemu-img reads it (without the backing chain, which jobs may change)."""
    out = image.with_name(image.name + ".snap1.raw")
    alone = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(image)}}
    subprocess.run(
        ["qemu-img", "convert", "-U", "-l", "snapshot.name=snap1", "-O", "raw",
         "json:" + json.dumps(alone), str(out)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    with out.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    out.unlink()
    return digest


# --------------------------------------------------------------------------- shrinking


def shrink(
    scn: Scenario,
    failure: Difference,
    attempt: Callable[[Scenario], Difference | None],
    budget: int = 40,
) -> tuple[Scenario, Difference]:
    """ddmin over the body: the shortest body that still fails the same way."""
    body, best = list(scn.body), failure
    signature = failure.signature()
    runs = 0
    chunk = max(1, len(body) // 2)
    # First cut everything after the failing step: it never ran.
    m = re.match(r"step (\d+) ", failure.where)
    if m:
        body = body[: max(0, int(m.group(1)) - len(scn.prologue)) + 1]
    while chunk >= 1 and runs < budget:
        i, changed = 0, False
        while i < len(body) and runs < budget:
            candidate = body[:i] + body[i + chunk :]
            runs += 1
            try:
                got = attempt(scn.with_body(candidate))
            except Exception:  # a candidate that breaks the harness is no smaller repro
                got = None
            if got is not None and got.signature() == signature:
                body, best, changed = candidate, got, True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return scn.with_body(body), best


def try_scenario(
    scn: Scenario,
    start_b: Callable[[Path], DaemonProcess] = start_blockd,
    inconclusive: Callable[[str], object] = lambda why: None,
    allowed: Callable[[list[str]], object] = lambda entries: None,
) -> Difference | None:
    """The first difference of one run of ``scn``, if any."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as name:
        try:
            allowed(run_scenario(scn, Path(name), start_b).allowed)
        except Difference as diff:
            return diff
        except Inconclusive as why:
            inconclusive(str(why))
    return None


def describe(scn: Scenario) -> str:
    lines = [f"seed {scn.seed}"]
    for spec in scn.images:
        lines.append(
            f"  image {spec.name} <- {spec.backing}: {spec.commands}"
            + (" +snapshot" if spec.snapshot else "")
        )
    for name, rules in scn.blkdebug.items():
        lines.append(f"  blkdebug under {name}: {rules}")
    for i, step in enumerate(scn.prologue + scn.body):
        lines.append(f"  {i}: {json.dumps(step)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- campaigns


def avoid_from_env(value: str | None) -> frozenset[str]:
    return frozenset(x.strip() for x in (value or "").split(",") if x.strip())


def campaign(
    seeds: range,
    steps: int,
    out: Path,
    avoid: frozenset[str] = frozenset(),
    shrink_budget: int = 30,
) -> dict[str, Any]:
    """Run many seeds, tally differences by signature, shrink the first of each kind.

    ``python -m tests.interop.random_driver FIRST COUNT STEPS OUTDIR [AVOID]``
    writes ``summary.json`` (kept up to date while it runs), ``diff-SEED.txt``
    for every failing seed and ``scenario-SEED.json`` (the shrunk scenario, for
    BLOCKD_FUZZ_REPLAY) for the first seed of each signature."""
    out.mkdir(parents=True, exist_ok=True)
    tally: dict[str, list[int]] = {}
    inconclusive: list[int] = []
    allowed: dict[str, int] = {}  # allow-list entry -> last seed that needed it
    harness: list[int] = []
    started = time.monotonic()
    summary: dict[str, Any] = {}
    for ran, seed in enumerate(seeds, start=1):
        scn = generate(seed, steps, avoid)
        failure: Exception | None = None
        diff = None
        # A second try: on a loaded machine a daemon can miss its start-up timeout.
        for _attempt in range(2):
            try:
                diff = try_scenario(
                    scn,
                    inconclusive=lambda why, s=seed: inconclusive.append(s),
                    allowed=lambda entries, s=seed: allowed.update(
                        {m: s for e in entries for m in re.findall(r"\bA\d\b", e)}
                    ),
                )
                failure = None
                break
            except Exception as error:  # a harness failure must not end a long run
                failure = error
        if failure is not None:
            harness.append(seed)
            (out / f"harness-{seed}.txt").write_text(f"{failure!r}\n{describe(scn)}\n")
            continue
        if diff is not None:
            sig = diff.signature()
            first = sig not in tally
            tally.setdefault(sig, []).append(seed)
            text = f"{diff}\n\n{describe(scn)}\n"
            if first:
                small, small_diff = shrink(scn, diff, try_scenario, shrink_budget)
                text += f"\n--- shrunk ---\n{small_diff}\n\n{describe(small)}\n"
                (out / f"scenario-{seed}.json").write_text(small.to_json())
            (out / f"diff-{seed}.txt").write_text(text)
        summary = {
            "ran": ran,
            "seconds": round(time.monotonic() - started),
            "seeds": [seeds.start, seed],
            "steps": steps,
            "avoid": sorted(avoid),
            "passed": ran - sum(len(v) for v in tally.values()) - len(inconclusive) - len(harness),
            "differences": {k: v for k, v in sorted(tally.items())},
            "inconclusive": inconclusive,
            "allowed": allowed,
            "harness_errors": harness,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    import sys

    first, count, n_steps = (int(a) for a in sys.argv[1:4])
    avoid = avoid_from_env(sys.argv[5] if len(sys.argv) > 5 else None)
    result = campaign(range(first, first + count), n_steps, Path(sys.argv[4]), avoid)
    print(json.dumps(result, indent=1))
