"""QMP stream fuzz: random and mutated messages at a real daemon on a real socket.

Each input (mutated bytes, mutated JSON trees, odd numbers and strings, deep
nesting, truncation, split writes, before or after negotiation) goes on a
fresh connection and is followed by a sentinel command that the daemon must
answer on that same connection.  The daemon must stay up, answer every
sentinel, and never report an internal error.  The same input goes to
qemu-storage-daemon 7.2 and the error classes of the replies must match.

Short profile by default; ``BLOCKD_FUZZ_EXAMPLES=10000`` for the long one,
``BLOCKD_FUZZ_SEED`` to replay a run (the seed is printed).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import in_ci
from tests.fuzz.qmp_corpus import Mutator, examples, seed
from tests.fuzz.qmp_harness import (
    collapse,
    is_event,
    make_images,
    open_session,
    reply_class,
    send_input,
    start,
)
from tests.helpers import DaemonProcess

SHORT_PROFILE = 300


def _kinds() -> list[str]:
    if shutil.which("qemu-storage-daemon") is None and not in_ci():
        return ["blockd"]  # no reference to compare with; still fuzz blockd
    return ["blockd", "qsd"]


#: Replies of blockd's that mark a deliberate difference (README lists both):
#: a ``file`` node takes its image lock when it is opened, where QEMU waits
#: for a parent to use it; and after a message over the nesting limit blockd
#: skips the rest of it, where QEMU lexes the leftovers as new input and may
#: run commands found in them.
_KNOWN = (
    b'Failed to get \\"write\\" lock',
    b'Failed to get \\"consistent read\\" lock',
    b"JSON nesting depth limit exceeded",
)


def _known_difference(replies: dict[str, list[bytes]]) -> bool:
    return any(known in line for line in replies.get("blockd", []) for known in _KNOWN)


def _start_all(sock_dir: Path, images: Path) -> dict[str, DaemonProcess]:
    """Fresh daemons on fresh copies of the images, each with an NBD server."""
    daemons: dict[str, DaemonProcess] = {}
    for kind in _kinds():
        daemons[kind] = start(kind, sock_dir, make_images(images / kind))
        conn = open_session(daemons[kind].socket_path, negotiate=True)
        conn.send(
            b'{"execute": "nbd-server-start", "id": "nbd", "arguments":'
            b' {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}'
        )
        assert reply_class(conn.until_id(b"nbd")[-1]) == "return"
        conn.close()
    return daemons


def test_qmp_stream_fuzz(sock_dir: Path, tmp_path: Path) -> None:
    count, first_seed = examples(SHORT_PROFILE), seed()
    print(f"\nQMP stream fuzz: {count} inputs, BLOCKD_FUZZ_SEED={first_seed}")
    rng = random.Random(first_seed)
    mutator = Mutator(rng)
    daemons: dict[str, DaemonProcess] = {}
    try:
        daemons = _start_all(sock_dir, tmp_path / "0")
        differences = []
        started = time.monotonic()
        sent = known = 0
        for index in range(count):
            data = mutator.message()
            chunks = mutator.chunks(data)
            negotiate = rng.random() < 0.9
            if b"quit" in data:
                continue  # would stop the daemon on purpose
            sent += 1
            marker = f"sentinel-{index}".encode()
            seen: dict[str, list[str]] = {}
            replies: dict[str, list[bytes]] = {}
            for kind, daemon in daemons.items():
                conn = open_session(daemon.socket_path, negotiate)
                try:
                    lines = send_input(conn, chunks, marker)
                except (OSError, EOFError) as err:
                    pytest.fail(
                        f"{kind} did not answer the sentinel after input {index} "
                        f"(seed {first_seed}, exit status {daemon.proc.poll()}): {err}\n"
                        f"input: {data!r}"
                    )
                finally:
                    conn.close()
                internal = [line for line in lines if b"Internal error" in line]
                assert not internal, f"input {index} (seed {first_seed}): {data!r} -> {internal}"
                replies[kind] = lines
                seen[kind] = collapse([reply_class(line) for line in lines if not is_event(line)])
            if len(set(map(tuple, seen.values()))) == 1:
                continue
            if _known_difference(replies):
                # The two daemons' states may now differ (a node or an export
                # one has and the other not): start again from the same state.
                known += 1
                for daemon in daemons.values():
                    daemon.stop()
                daemons = _start_all(sock_dir, tmp_path / str(index))
                continue
            differences.append((index, data, {k: [x[:200] for x in v] for k, v in replies.items()}))
        elapsed = time.monotonic() - started
        print(
            f"QMP stream fuzz: {sent} inputs sent to {', '.join(daemons)} in {elapsed:.1f} s; "
            f"{len(differences)} differences in error classes, {known} known ones"
        )
        for daemon in daemons.values():
            assert daemon.proc.poll() is None
        shown = "\n".join(f"#{i} {d[:300]!r}\n    {s}" for i, d, s in differences[:10])
        assert not differences, f"seed {first_seed}: replies differ from QSD:\n{shown}"
    finally:
        for daemon in daemons.values():
            daemon.stop()
