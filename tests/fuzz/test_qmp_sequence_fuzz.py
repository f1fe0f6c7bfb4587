"""Random command sequences from several clients at once, on real qcow2 chains.

Three clients drive one blockd over their own connections: nodes opened and
closed, queries, commits (intermediate and active) started, paused, resumed,
completed and cancelled, and a share of commands with broken arguments.  Every
command must get exactly one reply (matched by id, nothing else in between
but events), the daemon must never report an internal error, and after
``quit`` every image must pass ``qemu-img check``.

Short profile by default; ``BLOCKD_FUZZ_EXAMPLES`` sets the number of commands
in all, ``BLOCKD_FUZZ_SEED`` replays a run (the seed is printed).
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import require_tool
from tests.fuzz.qmp_corpus import Mutator, examples, seed
from tests.fuzz.qmp_harness import Line, is_event, open_session, reply_class, send_input
from tests.helpers import start_blockd
from tests.images import create, qemu_io

SHORT_PROFILE = 240
CLIENTS = 3
CHAIN = ("base", "mid", "top")
SPARES = ("s0", "s1")


def make_chain(directory: Path) -> list[Path]:
    images = []
    backing = None
    for i, name in enumerate(CHAIN):
        image = create(
            directory / f"{name}.qcow2", size="8M" if backing is None else "", backing=backing
        )
        qemu_io(image, f"write -P {i + 1} {i}M 1M", f"write -z {i + 4}M 64k")
        images.append(image)
        backing = image.name
    for name in SPARES:
        images.append(create(directory / f"{name}.qcow2", size="2M"))
    return images


class Commands:
    """Random, mostly meaningful commands on the chain's nodes and jobs."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.mutator = Mutator(rng)

    def _node(self) -> str:
        return self.rng.choice([*CHAIN, *SPARES, "nosuch"])

    def _job(self) -> str:
        return self.rng.choice(["j0", "j1", "j2", "nosuch"])

    def _add(self) -> dict[str, Any]:
        r = self.rng
        name = r.choice([*CHAIN, *SPARES])
        args: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": name,
            "file": {"driver": "file", "filename": f"{name}.qcow2"},
        }
        if name in CHAIN:
            below = CHAIN.index(name) - 1
            if below >= 0 and r.random() < 0.7:
                args["backing"] = CHAIN[below]
            elif below < 0 or r.random() < 0.5:
                args["backing"] = None
        if r.random() < 0.3:
            args["read-only"] = True
        return {"execute": "blockdev-add", "arguments": args}

    def _commit(self) -> dict[str, Any]:
        r = self.rng
        args: dict[str, Any] = {"job-id": self._job(), "device": r.choice(["top", "mid", "base"])}
        if r.random() < 0.5:
            args["top-node"] = r.choice(["mid", "top", "base"])
        if r.random() < 0.5:
            args["base-node"] = r.choice(["base", "mid"])
        if r.random() < 0.6:
            args["speed"] = r.choice([1, 1 << 16, 1 << 20, 1 << 30])
        if r.random() < 0.2:
            args["auto-finalize"] = r.random() < 0.5
        if r.random() < 0.2:
            args["auto-dismiss"] = r.random() < 0.5
        return {"execute": "block-commit", "arguments": args}

    def command(self) -> dict[str, Any]:
        r = self.rng
        kind = r.randrange(20)
        if kind < 4:
            message = self._add()
        elif kind < 6:
            message = {"execute": "blockdev-del", "arguments": {"node-name": self._node()}}
        elif kind < 9:
            message = self._commit()
        elif kind < 15:
            verb = r.choice(
                [
                    "block-job-cancel",
                    "block-job-pause",
                    "block-job-resume",
                    "block-job-complete",
                    "block-job-set-speed",
                    "block-job-dismiss",
                    "block-job-finalize",
                    "job-cancel",
                    "job-pause",
                    "job-resume",
                    "job-complete",
                    "job-dismiss",
                    "job-finalize",
                ]
            )
            key = (
                "device"
                if verb.startswith("block-job-")
                and verb not in ("block-job-dismiss", "block-job-finalize")
                else "id"
            )
            args: dict[str, Any] = {key: self._job()}
            if verb == "block-job-set-speed":
                args["speed"] = r.choice([0, 1, 1 << 20])
            if verb == "block-job-cancel" and r.random() < 0.5:
                args["force"] = r.random() < 0.5
            message = {"execute": verb, "arguments": args}
        else:
            message = {
                "execute": r.choice(
                    [
                        "query-named-block-nodes",
                        "query-jobs",
                        "query-block-jobs",
                        "query-block",
                        "query-block-exports",
                        "query-version",
                    ]
                )
            }
        return message

    def broken(self, message: dict[str, Any]) -> bytes:
        """The command with its arguments or envelope mutated (no quit)."""
        data = self.mutator.dump(self.mutator.mutate_tree(message))
        return data.replace(b"quit", b"quip").replace(b"nbd-server-start", b"nbd-server-st")


def _client(
    path: Path, index: int, count: int, client_seed: int, errors: list[str], counts: dict[str, int]
) -> None:
    rng = random.Random(client_seed)
    commands = Commands(rng)
    conn = open_session(path, negotiate=True)
    data = b""
    try:
        for n in range(count):
            message = commands.command()
            marker = f"c{index}-{n}"
            if rng.random() < 0.15:
                # Broken input may not parse at all (no id to answer with):
                # a resync and a sentinel follow, and anything may come before.
                data = commands.broken(message)
                lines = send_input(conn, [data], marker.encode())
                counts["broken"] = counts.get("broken", 0) + 1
            else:
                message["id"] = marker
                data = commands.mutator.dump(message)
                conn.send(data)
                lines = conn.until_id(marker.encode())
                stray = [line for line in lines[:-1] if not is_event(line)]
                if stray:
                    errors.append(f"client {index}: more than one reply before {marker}: {stray}")
                name = reply_class(lines[-1])
                if name == "return" and message["execute"] == "block-commit":
                    name = "commits started"
                counts[name] = counts.get(name, 0) + 1
            if any(b"Internal error" in line for line in lines):
                errors.append(f"client {index}: {data!r} -> {lines!r}")
            if rng.random() < 0.05:
                time.sleep(rng.random() / 20)  # let jobs make progress
    except Exception as err:  # reported by the test, with the seed
        errors.append(f"client {index}: {type(err).__name__}: {err} after {data!r}")
    finally:
        conn.close()


def _wind_down(conn: Line) -> None:
    """Cancel every job and wait until none is left, so quit finds a quiet daemon."""
    for n in range(200):
        conn.send(b'{"execute": "query-jobs", "id": "q%d"}' % n)
        reply = conn.until_id(b"q%d" % n)[-1]
        if reply == b'{"return": [], "id": "q%d"}' % n:
            return
        # every job listed: the fuzz's job ids include the ones meant to be unknown
        for job in json.loads(reply)["return"]:
            for verb in ("job-cancel", "job-dismiss", "job-finalize"):
                command = {"execute": verb, "arguments": {"id": job["id"]}, "id": "w"}
                conn.send(json.dumps(command).encode())
                conn.until_id(b"w")
        time.sleep(0.05)
    raise AssertionError(f"jobs did not end after cancel: {reply!r}")


def test_qmp_sequence_fuzz(sock_dir: Path, tmp_path: Path) -> None:
    require_tool("qemu-img")
    total, first_seed = examples(SHORT_PROFILE), seed()
    print(
        f"\nQMP sequence fuzz: {total} commands from {CLIENTS} clients,"
        f" BLOCKD_FUZZ_SEED={first_seed}"
    )
    images = make_chain(tmp_path)
    daemon = start_blockd(sock_dir / "qmp.sock", cwd=tmp_path)
    errors: list[str] = []
    counts: dict[str, int] = {}
    started = time.monotonic()
    try:
        threads = [
            threading.Thread(
                target=_client,
                args=(daemon.socket_path, i, total // CLIENTS, first_seed + i, errors, counts),
            )
            for i in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"seed {first_seed}:\n" + "\n".join(errors[:10])
        conn = open_session(daemon.socket_path, negotiate=True)
        _wind_down(conn)
        conn.send(b'{"execute": "quit", "id": "bye"}')
        assert reply_class(conn.until_id(b"bye")[-1]) == "return"
        conn.close()
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    print(f"QMP sequence fuzz: replies by class {counts} in {time.monotonic() - started:.1f} s")
    for image in images:
        check = subprocess.run(
            [require_tool("qemu-img"), "check", str(image)], capture_output=True, text=True
        )
        assert check.returncode == 0, (
            f"seed {first_seed}: {image.name}: {check.stdout}{check.stderr}"
        )
