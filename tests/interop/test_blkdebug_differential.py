"""blkdebug rules against qemu-storage-daemon 7.2, event by event.

The same image (one copy each, made by qemu-img / qemu-io), the same blkdebug
rule on the image's file, the same requests through an NBD export (or the
same block-commit): which operation fails, and with which errno or error
text, must agree.  A rule fails the first matching request *after* its event,
so agreement means the event is raised before the same I/O as in QEMU.

Each case is also checked to fire at all in QSD (or, for the events neither
daemon raises in a scenario, to fire in neither), so no case can pass
vacuously.  The few deliberate differences (block/README.md, blkdebug) are in
KNOWN_DIFFERENCES with both daemons' results spelled out.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import RawQMP, start_blockd, start_qsd
from tests.images import qemu_img, qemu_io

pytestmark = pytest.mark.qsd

KiB, MiB = 1 << 10, 1 << 20
Op = tuple[Any, ...]
Rules = list[dict[str, Any]]


# -- the images ------------------------------------------------------------------------


def overlay(d: Path) -> None:
    """d.qcow2 (64 KiB clusters) over base.qcow2: data at 0, compressed at 128k,
    zero at 192k, the backing's data at 1M; 512k unallocated in both."""
    qemu_img("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    qemu_io(d / "base.qcow2", "write -P 1 1M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(d / "d.qcow2"), "4M")  # fmt: skip
    qemu_io(d / "d.qcow2", "write -P 2 0 64k", "write -c 128k 64k", "write -z 192k 64k")


def small_clusters(d: Path) -> None:
    """512-byte clusters: L2 tables cover 32 KiB, refcount blocks 128 KiB and the
    refcount table 8 MiB, so ordinary writes allocate all three."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(d / "d.qcow2"), "16M")


def cow(d: Path) -> None:
    """An empty d.qcow2 over a base with data at 1M (64k), 2M (4k) and 2560k (4k)."""
    qemu_img("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    qemu_io(d / "base.qcow2", "write -P 1 1M 64k", "write -P 3 2M 4k", "write -P 4 2560k 4k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(d / "d.qcow2"), "4M")  # fmt: skip


def snapshot(d: Path) -> None:
    """d.qcow2 (64 KiB clusters) with data at 0 and 1M and a compressed cluster at
    128k, all shared with snapshot s1: the first write copies the L2 table."""
    qemu_img("create", "-q", "-f", "qcow2", str(d / "d.qcow2"), "4M")
    qemu_io(d / "d.qcow2", "write -P 2 0 64k", "write -c 128k 64k", "write -P 3 1M 64k")
    qemu_img("snapshot", "-c", "s1", str(d / "d.qcow2"))


def raw(d: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", str(d / "d.qcow2"), "4M")


def commit_chain(d: Path) -> None:
    """base (1M) <- mid (4M) <- top, 512-byte clusters: committing mid grows base's L1."""
    opts = ["-o", "cluster_size=512"]
    qemu_img("create", "-q", "-f", "qcow2", *opts, str(d / "base.qcow2"), "1M")
    qemu_io(d / "base.qcow2", "write -P 1 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", *opts, "-b", "base.qcow2", "-F", "qcow2",
             str(d / "mid.qcow2"), "4M")  # fmt: skip
    qemu_io(d / "mid.qcow2", "write -P 2 32k 64k", "write -P 3 3M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             str(d / "top.qcow2"), "4M")  # fmt: skip


# (prepare, format of d, the NBD requests)
SCENARIOS: dict[str, tuple[Callable[[Path], None], str, tuple[Op, ...]]] = {
    "overlay": (overlay, "qcow2", (
        ("read", 0, 4 * KiB),  # 0: data (loads the L2 table)
        ("read", 0, 4 * KiB),  # 1: the same again
        ("read", 1 * MiB, 4 * KiB),  # 2: unallocated: the backing's data
        ("read", 128 * KiB, 4 * KiB),  # 3: compressed
        ("write", 0, 4 * KiB),  # 4: in place
        ("write", 512 * KiB, 4 * KiB),  # 5: allocating, part of a cluster
        ("flush",),  # 6: new L2 entry and refcounts made durable
        ("read", 512 * KiB, 4 * KiB),  # 7
        ("zero", 0, 64 * KiB),  # 8: a whole allocated cluster
        ("trim", 64 * KiB, 64 * KiB),  # 9: ignored (discard=ignore)
        ("flush",),  # 10
    )),
    "small-clusters": (small_clusters, "qcow2", (
        ("write", 0, 512),  # 0: the first L2 table (L1 entry)
        ("write", 1 * MiB, 4 * KiB),  # 1: another L2 table
        ("write", 2 * MiB, 256 * KiB),  # 2: beyond the first refcount block
        ("flush",),  # 3
        ("write", 4 * MiB, 9 * MiB),  # 4: beyond what the refcount table covers
        ("flush",),  # 5
        ("read", 0, 512),  # 6
    )),
    "cow": (cow, "qcow2", (
        ("write", 1 * MiB + 4 * KiB, 4 * KiB),  # 0: copy-on-write from the backing
        ("write", 2 * MiB + 4 * KiB, 4 * KiB),  # 1: the rest of that cluster too
        ("write", 3 * MiB, 4 * KiB),  # 2: nothing below: the rest reads as zeros
        ("read", 1 * MiB, 4 * KiB),  # 3
        ("flush",),  # 4
        ("write", 2560 * KiB, 4 * KiB),  # 5: over all the data below: zeros around it
        ("flush",),  # 6
    )),
    "snapshot": (snapshot, "qcow2", (
        ("read", 0, 4 * KiB),  # 0: the shared table, cached
        ("write", 4 * KiB, 4 * KiB),  # 1: copies the L2 table, then the data cluster
        ("flush",),  # 2
        ("write", 130 * KiB, 4 * KiB),  # 3: over the shared compressed cluster
        ("zero", 1 * MiB, 64 * KiB),  # 4: a whole shared cluster: only our reference goes
        ("write", 8 * KiB, 4 * KiB),  # 5: in place now
        ("flush",),  # 6
        ("read", 0, 64 * KiB),  # 7
    )),
    "fua": (overlay, "qcow2", (
        ("write-fua", 512 * KiB, 4 * KiB),  # 0: allocating: nothing finished since the open
        ("write", 0, 4 * KiB),  # 1: in place
        ("write-fua", 8 * KiB, 4 * KiB),  # 2: in place, after a write that finished
        ("flush",),  # 3
    )),
    # FUA on the other commands that take it: a TRIM (ignored: discard=ignore)
    # and a WRITE_ZEROES, each after a write that finished
    "fua-other": (overlay, "qcow2", (
        ("write", 0, 4 * KiB),  # 0
        ("trim-fua", 64 * KiB, 64 * KiB),  # 1
        ("write", 4 * KiB, 4 * KiB),  # 2
        ("zero-fua", 8 * KiB, 4 * KiB),  # 3
        ("flush",),  # 4
    )),
    # a WRITE_ZEROES with FUA as the first request (only itself to flush),
    # then one with NO_HOLE alone, which needs no flush
    "fua-zero": (overlay, "qcow2", (
        ("zero-fua", 8 * KiB, 4 * KiB),  # 0
        ("write", 0, 4 * KiB),  # 1
        ("zero-nohole", 64 * KiB, 4 * KiB),  # 2
        ("flush",),  # 3
    )),
    # the same with the TRIM carried out
    "fua-unmap": (overlay, "qcow2", (
        ("trim-fua", 128 * KiB, 64 * KiB),  # 0: the first request: only itself to flush
        ("write", 0, 4 * KiB),  # 1
    )),
    # a write-through export: writes are flushed as they are made, discards not
    "writethrough": (overlay, "qcow2", (
        ("write", 0, 4 * KiB),  # 0
        ("trim", 128 * KiB, 64 * KiB),  # 1
        ("zero", 256 * KiB, 4 * KiB),  # 2
    )),
    "commit": (commit_chain, "qcow2", ()),  # block-commit, not NBD requests: see below
    "raw": (raw, "raw", (
        ("read", 0, 4 * KiB),
        ("write", 0, 4 * KiB),
        ("zero", 4 * KiB, 4 * KiB),
        ("trim", 0, 64 * KiB),
        ("flush",),
        ("read", 0, 512),
    )),
}

#: (scenario, event) for every event name blockd raises, in a scenario where
#: qemu-storage-daemon fires it
FIRING = [
    ("overlay", "none"),
    ("overlay", "reftable_load"),
    ("overlay", "l2_load"),
    ("overlay", "read_aio"),
    ("overlay", "read_backing_aio"),
    ("overlay", "read_compressed"),
    ("overlay", "write_aio"),
    ("overlay", "pwritev"),
    ("overlay", "pwritev_done"),
    ("overlay", "cluster_alloc"),
    ("overlay", "refblock_load"),
    ("overlay", "refblock_alloc"),
    ("overlay", "refblock_update_part"),  # both at the flush (refcounts written back)
    ("overlay", "cluster_alloc_space"),
    ("overlay", "l2_update"),
    ("overlay", "flush_to_os"),
    ("overlay", "flush_to_disk"),
    ("small-clusters", "l1_update"),
    ("small-clusters", "l2_alloc_write"),
    ("small-clusters", "l2_update"),
    ("small-clusters", "refblock_alloc_write"),
    ("small-clusters", "refblock_alloc_hookup"),
    ("small-clusters", "reftable_grow"),
    ("small-clusters", "refblock_alloc_write_blocks"),
    ("small-clusters", "refblock_alloc_write_table"),
    ("small-clusters", "refblock_alloc_switch_table"),
    ("small-clusters", "flush_to_disk"),
    ("cow", "cow_read"),
    ("cow", "cow_write"),
    ("cow", "read_backing_aio"),
    ("cow", "cluster_alloc_space"),
    ("snapshot", "l2_alloc_cow_read"),
    ("snapshot", "l2_alloc_write"),
    ("snapshot", "l1_update"),
    ("snapshot", "cluster_alloc"),
    ("snapshot", "cow_read"),
    ("snapshot", "write_aio"),
    ("snapshot", "read_compressed"),
    ("snapshot", "l2_update"),
    ("snapshot", "cluster_free"),
    ("snapshot", "l2_load"),
    ("snapshot", "cow_write"),
    ("raw", "none"),
    ("raw", "read_aio"),
    ("raw", "write_aio"),
    ("raw", "pwritev"),
    ("raw", "pwritev_zero"),
    ("raw", "pwritev_done"),
    ("raw", "flush_to_os"),
    ("raw", "flush_to_disk"),
]

#: Events neither daemon raises in the overlay scenario: blockd has no code
#: path for them (block/README.md says why), and QEMU takes none of its paths
#: for them in these requests.
SILENT = [
    "l1_grow_alloc_table", "l2_update_compressed", "l2_alloc_cow_read", "write_compressed",
    "vmstate_load", "vmstate_save", "reftable_update", "refblock_update",
    "cluster_alloc_bytes", "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail",
    "pwritev_rmw_after_tail", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write",
]  # fmt: skip

#: Rules beyond a bare ``once`` (overlay scenario): sticky rules, sectors,
#: iotypes, errnos, several rules, states.
VARIANTS: list[tuple[Rules, dict[str, Any]]] = [
    ([{"event": "l2_load"}], {}),
    ([{"event": "read_aio", "sector": 1000}], {}),
    # d.qcow2's first L2 table is at 0x40000 (sector 512), cluster 0's data at 0x50000
    ([{"event": "write_aio", "sector": 640}], {}),
    ([{"event": "l2_load", "sector": 512}], {}),
    ([{"event": "read_aio", "sector": 640, "iotype": "read"}], {}),
    # from the start, on a sector of the L1 table (0x30000), the refcount table
    # (0x10000) or its block (0x20000): the open fails naming what it read, or
    # the first request reading or writing that sector does
    ([{"event": "none", "sector": 384}], {}),
    ([{"event": "none", "sector": 128}], {}),
    ([{"event": "none", "sector": 256, "once": True}], {}),
    ([{"event": "none", "sector": 512}], {}),
    ([{"event": "read_aio", "iotype": "write", "once": True}], {}),
    ([{"event": "read_aio", "iotype": "flush", "once": True}], {}),
    ([{"event": "read_aio", "iotype": "block-status"}], {}),
    ([{"event": "read_aio", "errno": 28, "once": True}], {}),
    ([{"event": "read_aio", "errno": 1, "once": True}], {}),
    ([{"event": "read_aio", "errno": 0}], {}),
    ([{"event": "read_aio", "once": True, "immediately": True}], {}),
    ([{"event": "pwritev", "sector": 2000}], {}),
    ([{"event": "none", "iotype": "write", "once": True}], {}),
    ([{"event": "read_aio", "once": True}, {"event": "write_aio", "once": True}], {}),
    ([{"event": "none", "iotype": "write"}, {"event": "read_aio", "iotype": "read", "once": True}],
     {}),
    ([{"event": "write_aio", "state": 2, "once": True}], {}),
    ([{"event": "write_aio", "state": 2, "once": True}],
     {"set-state": [{"event": "read_aio", "new_state": 2}]}),
    ([{"event": "write_aio", "state": 3, "once": True}, {"event": "read_aio", "state": 1,
                                                         "once": True}],
     {"set-state": [{"event": "read_aio", "new_state": 2},
                    {"event": "flush_to_os", "state": 2, "new_state": 3}]}),
    ([{"event": "write_aio", "state": 2, "once": True}, {"event": "pwritev", "state": 3}],
     {"set-state": [{"event": "read_aio", "new_state": 2},
                    {"event": "read_aio", "new_state": 3}]}),
]  # fmt: skip

#: Where blockd deliberately differs (block/README.md, blkdebug): (QSD, blockd).
#: blockd writes refcount changes and the L2 entries of zero writes through at
#: once, where QEMU keeps them in its metadata cache until the next flush; and
#: it completes a partial cluster in one write instead of zeroing the cluster
#: first and writing the data after (so no write-zeroes request to raise
#: pwritev_zero on).
OK = {"open": "ok"}
KNOWN_DIFFERENCES: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {
    ("overlay", "cluster_free"): (
        {**OK, "ops": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]},  # at the next flush
        {**OK, "ops": [0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0]},  # at the zero write
    ),
    ("overlay", "pwritev_zero"): (
        {**OK, "ops": [0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0]},  # zeroing the new cluster
        {**OK, "ops": [0] * 11},
    ),
    ("cow", "pwritev_zero"): (
        {**OK, "ops": [0, 0, 5, 0, 0, 0, 0]},
        {**OK, "ops": [0] * 7},
    ),
    # a sticky rule: QEMU's zero write (8) touches only cached metadata
    ("overlay", "sticky read_aio"): (
        {**OK, "ops": [5, 5, 0, 5, 5, 5, 5, 0, 0, 0, 5]},
        {**OK, "ops": [5, 5, 0, 5, 5, 5, 5, 0, 5, 0, 5]},
    ),
}


#: Sector rules on metadata writes: QEMU writes whole L2 tables (and refcount
#: blocks) from its cache, blockd only the entries that changed, so a sector
#: matches where the changed entry lies.  (QSD, blockd) for the overlay scenario.
KNOWN_SECTOR_DIFFERENCES: list[tuple[Rules, dict[str, Any], dict[str, Any]]] = [
    # the L2 table's first sector: QEMU's whole-table write at the flush covers it,
    # blockd's entry write (512k's entry, at 0x40040) does not; the zero write's does
    ([{"event": "l2_update", "sector": 512, "once": True}],
     {**OK, "ops": [0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0]},
     {**OK, "ops": [0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0]}),
    ([{"event": "l2_update", "sector": 513}],
     {**OK, "ops": [0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 5]},
     {**OK, "ops": [0] * 11}),
    # the refcount block (0x20000): blockd also writes it at the zero write
    ([{"event": "cluster_alloc", "sector": 256}],
     {**OK, "ops": [0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0]},
     {**OK, "ops": [0, 0, 0, 0, 0, 5, 0, 0, 5, 0, 0]}),
]  # fmt: skip


# -- running the cases -------------------------------------------------------------
#
# Starting two daemons per case would cost most of the run: each daemon runs
# every case of a scenario instead, each case on a node (and images) of its own.
# Rules live in a node's blkdebug filter, so cases cannot see each other.


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("NBD server closed the connection")
        buf += chunk
    return buf


def nbd_connect(path: Path, name: str) -> socket.socket:
    """Fixed newstyle handshake, NBD_OPT_GO, simple replies."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(str(path))
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
    raw_name = name.encode()
    data = struct.pack(">I", len(raw_name)) + raw_name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    while True:
        _magic, _option, reply, length = struct.unpack(">QIII", recv_exactly(sock, 20))
        recv_exactly(sock, length)
        if reply == 1:  # NBD_REP_ACK
            return sock
        assert not reply & 0x80000000, f"NBD_OPT_GO refused: {reply:#x}"


#: Options of the scenario's node itself (``blockdev-add`` of the format node),
#: and of its export.
NODE_OPTIONS: dict[str, dict[str, Any]] = {
    "fua-unmap": {"discard": "unmap"},
    "writethrough": {"discard": "unmap"},
}
EXPORT_OPTIONS: dict[str, dict[str, Any]] = {"writethrough": {"writethrough": True}}

COMMANDS = {
    "read": 0, "write": 1, "write-fua": 1, "flush": 3, "trim": 4, "trim-fua": 4, "zero": 6,
    "zero-fua": 6, "zero-nohole": 6,
}  # fmt: skip

#: NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE
FLAGS = {"fua": 1, "nohole": 2}


def nbd_request(sock: socket.socket, handle: int, op: Op) -> int:
    """The request's NBD error (an errno value; 0 for success)."""
    command, offset, length = (*op, 0, 0)[:3]
    payload = b"\x5a" * length if command.startswith("write") else b""
    flags = FLAGS.get(command.rpartition("-")[2], 0)
    header = struct.pack(">IHHQQI", 0x25609513, flags, COMMANDS[command], handle, offset, length)
    sock.sendall(header + payload)
    magic, error, got = struct.unpack(">IIQ", recv_exactly(sock, 16))
    assert (magic, got) == (0x67446698, handle)
    if command == "read" and not error:
        recv_exactly(sock, length)
    return int(error)


def key(rules: Rules, extra: dict[str, Any]) -> str:
    return json.dumps([rules, extra], sort_keys=True)


def nbd_case(qmp: RawQMP, d: Path, n: int, scenario: str, rules: Rules,
             extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    _prepare, fmt, ops = SCENARIOS[scenario]
    node = NODE_OPTIONS.get(scenario, {})
    image = {"driver": "file", "filename": str(d / "d.qcow2")}
    file = {"driver": "blkdebug", "image": image, "inject-error": rules, **extra}
    reply = qmp.execute(
        "blockdev-add", {"driver": fmt, "node-name": f"n{n}", "file": file, **node}
    )
    if "error" in reply:
        return {"open": reply["error"]["desc"]}
    export = {"type": "nbd", "id": f"e{n}", "node-name": f"n{n}", "writable": True,
              **EXPORT_OPTIONS.get(scenario, {})}  # fmt: skip
    assert qmp.execute("block-export-add", export) == {"return": {}}
    with nbd_connect(d.parent / "nbd.sock", f"n{n}") as sock:
        errors = [nbd_request(sock, handle, op) for handle, op in enumerate(ops, 1)]
    return {"open": "ok", "ops": errors}


def first_status(qmp: RawQMP, job: str, statuses: tuple[str, ...]) -> str:
    """Wait for the job to reach one of ``statuses``; which one it reached."""
    checked = 0
    while True:
        for event in qmp.events[checked:]:
            data = event.get("data", {})
            if event["event"] != "JOB_STATUS_CHANGE" or data.get("id") != job:
                continue
            if data["status"] in statuses:
                return str(data["status"])
        checked = len(qmp.events)
        qmp.events.append(qmp.read())


def commit_case(
    qmp: RawQMP, d: Path, n: int, where: str, rules: Rules, active: bool
) -> list[Any]:
    """Commit mid (or, ``active``, top) into base with the rule below ``where``:
    the job's errors, READY, and its end."""
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        file: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
        if name == where:
            file = {"driver": "blkdebug", "image": file, "inject-error": rules}
        reply = qmp.execute("blockdev-add", {
            "driver": "qcow2", "node-name": f"{name}{n}", "read-only": name != "top",
            "file": file, "backing": backing and f"{backing}{n}",
        })  # fmt: skip
        if "error" in reply:
            return ["open", name, reply["error"]["desc"]]
    job = f"j{n}"
    reply = qmp.execute("block-commit", {
        "job-id": job, "device": f"top{n}", "top-node": f"{'top' if active else 'mid'}{n}",
        "base-node": f"base{n}", "on-error": "report",
    })  # fmt: skip
    assert reply == {"return": {}}, reply
    out: list[Any] = []
    if active and first_status(qmp, job, ("ready", "concluded")) == "ready":
        out.append("ready")
        assert qmp.execute("block-job-complete", {"device": job}) == {"return": {}}
    done = qmp.wait_event("BLOCK_JOB_COMPLETED", device=job)
    errors = [e["data"]["operation"] for e in qmp.events
              if e["event"] == "BLOCK_JOB_ERROR" and e["data"]["device"] == job]  # fmt: skip
    return errors + out + [done["data"].get("error", "completed")]


def run_scenario(root: Path, kind: str, scenario: str, cases: list[Any]) -> dict[str, Any]:
    """Every case of a scenario in one daemon, each on a fresh copy of the images."""
    prepare = SCENARIOS[scenario][0]
    template = root / scenario
    if not template.exists():
        template.mkdir()
        prepare(template)
    d = root / f"{kind}-{scenario}"
    d.mkdir()
    daemon = (start_qsd if kind == "qsd" else start_blockd)(d / "qmp.sock")
    out: dict[str, Any] = {}
    try:
        with RawQMP(d / "qmp.sock") as qmp:
            qmp.negotiate()
            server = {"addr": {"type": "unix", "data": {"path": str(d / "nbd.sock")}}}
            assert qmp.execute("nbd-server-start", server) == {"return": {}}
            for n, case in enumerate(cases):
                shutil.copytree(template, d / f"c{n}")
                if scenario == "commit":
                    where, rules, active = case
                    out[key(rules, {"where": where, "active": active})] = commit_case(
                        qmp, d / f"c{n}", n, where, rules, active
                    )
                else:
                    rules, extra = case
                    out[key(rules, extra)] = nbd_case(qmp, d / f"c{n}", n, scenario, rules, extra)
    finally:
        daemon.stop()
    return out


def once(event: str) -> Rules:
    return [{"event": event, "once": True}]


def all_cases() -> dict[str, list[Any]]:
    cases: dict[str, list[Any]] = {name: [] for name in SCENARIOS}
    for scenario, event in FIRING:
        cases[scenario].append((once(event), {}))
    cases["overlay"] += [(once(event), {}) for event in SILENT]
    cases["overlay"] += VARIANTS
    cases["cow"] += [([{"event": e, "state": 2, "once": True}], AFTER_FLUSH)
                     for e, _ops in COW_AFTER_FLUSH]  # fmt: skip
    cases["small-clusters"].append(([{"event": "l2_alloc_write"}], {}))
    for scenario, event in KNOWN_DIFFERENCES:
        cases[scenario].append((known_rule(event), {}))
    cases["overlay"] += [(rules, {}) for rules, _q, _b in KNOWN_SECTOR_DIFFERENCES]
    cases["raw"] += BAD_RULES
    for scenario, rules, _ops in FLUSH_CASES:
        cases[scenario].append((rules, {}))
    cases["commit"] = [(where, once(event), False) for where, event, _x in COMMIT_CASES]
    cases["commit"] += [("base", once(event), False) for event in COMMIT_FLUSH]
    cases["commit"] += [(where, rules, True) for where, rules, _x in ACTIVE_COMMIT_CASES]
    return cases


class Outcomes:
    """Both daemons' results, each scenario run (once) when a test first asks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases = all_cases()
        self.done: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    def __call__(self, scenario: str, rules: Rules, extra: dict[str, Any]) -> tuple[Any, Any]:
        if scenario not in self.done:
            self.done[scenario] = (
                run_scenario(self.root, "qsd", scenario, self.cases[scenario]),
                run_scenario(self.root, "blockd", scenario, self.cases[scenario]),
            )
        qsd, blockd = self.done[scenario]
        return qsd[key(rules, extra)], blockd[key(rules, extra)]


@pytest.fixture(scope="module")
def outcomes() -> Iterator[Outcomes]:
    require_tool("qemu-storage-daemon")
    with tempfile.TemporaryDirectory(prefix="bd-") as name:  # short: sockets live in it
        yield Outcomes(Path(name))


def fired(result: dict[str, Any]) -> bool:
    return result["open"] != "ok" or any(result["ops"])


def known_rule(event: str) -> Rules:
    if event.startswith("sticky "):
        return [{"event": event.removeprefix("sticky ")}]
    return once(event)


# -- the cases -------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "event"), FIRING, ids=[f"{s}-{e}" for s, e in FIRING])
def test_event_fails_the_same_request(outcomes: Outcomes, scenario: str, event: str) -> None:
    qsd, blockd = outcomes(scenario, once(event), {})
    assert fired(qsd), f"the case does not exercise {event}: {qsd}"
    assert blockd == qsd


@pytest.mark.parametrize("event", SILENT)
def test_event_without_a_path_fires_in_neither(outcomes: Outcomes, event: str) -> None:
    qsd, blockd = outcomes("overlay", once(event), {})
    assert qsd == blockd == {**OK, "ops": [0] * len(SCENARIOS["overlay"][2])}


@pytest.mark.parametrize(("rules", "extra"), VARIANTS, ids=[str(i) for i in range(len(VARIANTS))])
def test_rule_options_agree(outcomes: Outcomes, rules: Rules, extra: dict[str, Any]) -> None:
    qsd, blockd = outcomes("overlay", rules, extra)
    assert blockd == qsd


#: State 2 from the first flush on: the rules see only the last write (5), which
#: copies the rest of its cluster from the backing's allocated cluster.
AFTER_FLUSH = {"set-state": [{"event": "flush_to_os", "new_state": 2}]}
COW_AFTER_FLUSH = [
    ("cow_read", [0, 0, 0, 0, 0, 5, 0]),
    ("write_aio", [0, 0, 0, 0, 0, 5, 0]),
    ("cluster_alloc_space", [0] * 7),
]


@pytest.mark.parametrize(("event", "ops"), COW_AFTER_FLUSH)
def test_copy_on_write_in_a_later_state(outcomes: Outcomes, event: str, ops: list[int]) -> None:
    qsd, blockd = outcomes("cow", [{"event": event, "state": 2, "once": True}], AFTER_FLUSH)
    assert qsd == {**OK, "ops": ops}
    assert blockd == qsd


def test_rules_that_fail_every_request(outcomes: Outcomes) -> None:
    """Without ``once`` the rule stays active: every later request doing I/O fails
    (the last read finds cluster 0 unallocated, the first write having failed)."""
    qsd, blockd = outcomes("small-clusters", [{"event": "l2_alloc_write"}], {})
    assert qsd == {**OK, "ops": [5, 5, 5, 5, 5, 5, 0]}
    assert blockd == qsd


@pytest.mark.parametrize(("scenario", "event"), list(KNOWN_DIFFERENCES))
def test_known_differences(outcomes: Outcomes, scenario: str, event: str) -> None:
    assert outcomes(scenario, known_rule(event), {}) == KNOWN_DIFFERENCES[scenario, event]


@pytest.mark.parametrize(
    ("rules", "qsd", "blockd"), KNOWN_SECTOR_DIFFERENCES,
    ids=[str(i) for i in range(len(KNOWN_SECTOR_DIFFERENCES))],
)  # fmt: skip
def test_known_sector_differences(
    outcomes: Outcomes, rules: Rules, qsd: dict[str, Any], blockd: dict[str, Any]
) -> None:
    assert outcomes("overlay", rules, {}) == (qsd, blockd)


BAD_RULES: list[tuple[Rules, dict[str, Any]]] = [
    ([{"event": "bogus"}], {}),
    ([{"event": "read_aio", "iotype": "bogus"}], {}),
    ([{"iotype": "read"}], {}),
    ([{"event": "read_aio"}], {"set-state": [{"event": "read_aio"}]}),
    ([{"event": "read_aio", "once": "yes"}], {}),
]


@pytest.mark.parametrize(("rules", "extra"), BAD_RULES, ids=[str(i) for i in range(len(BAD_RULES))])
def test_bad_rules_are_refused_alike(
    outcomes: Outcomes, rules: Rules, extra: dict[str, Any]
) -> None:
    qsd, blockd = outcomes("raw", rules, extra)
    assert qsd["open"] != "ok"
    assert blockd == qsd


# -- the flushes a request asks for --------------------------------------------------

FLUSH_TO_DISK_ONCE: Rules = [{"event": "flush_to_disk", "iotype": "flush", "once": True}]
FLUSH_TO_DISK: Rules = [{"event": "flush_to_disk", "iotype": "flush"}]

#: (scenario, rules, the ops each case fails in both daemons).
FLUSH_CASES: list[tuple[str, Rules, list[int]]] = [
    # A FUA write's flush: QEMU counts a write once it has finished, after the
    # flush a FUA write needs, so that flush raises no ``flush_to_disk``
    # unless another write finished since the last flush (a long run's seed
    # 7006437: blockd failed the first FUA write).
    ("fua", FLUSH_TO_DISK_ONCE, [0, 0, 5, 0]),
    ("fua", FLUSH_TO_DISK, [0, 0, 5, 5]),
    ("fua", [{"event": "flush_to_os", "iotype": "flush", "once": True}], [5, 0, 0, 0]),
    # The same rules on a TRIM and a WRITE_ZEROES with FUA: a discard takes
    # no FUA flag down the stack, so QEMU's server flushes after it has
    # finished, counting what finished before it.
    ("fua-other", FLUSH_TO_DISK_ONCE, [0, 5, 0, 0, 0]),
    ("fua-other", FLUSH_TO_DISK, [0, 5, 0, 5, 5]),
    ("fua-zero", FLUSH_TO_DISK_ONCE, [0, 0, 0, 5]),
    # A TRIM carried out is itself a write that has finished by then.
    ("fua-unmap", FLUSH_TO_DISK_ONCE, [5, 0]),
    # A write-through export flushes each write as part of it (QEMU turns it
    # into a FUA write), but a TRIM not at all: the zero write after it meets
    # the sticky rule, the TRIM does not.
    ("writethrough", FLUSH_TO_DISK, [0, 0, 5]),
]


@pytest.mark.parametrize(
    ("scenario", "rules", "ops"),
    FLUSH_CASES,
    ids=[f"{scenario}-{i}" for i, (scenario, _r, _o) in enumerate(FLUSH_CASES)],
)
def test_requests_flush_alike(
    outcomes: Outcomes, scenario: str, rules: Rules, ops: list[int]
) -> None:
    qsd, blockd = outcomes(scenario, rules, {})
    assert qsd == blockd == {**OK, "ops": ops}


# -- block-commit ----------------------------------------------------------------------

COMMIT_CASES = [
    ("base", "none", ["open", "base", "Could not read qcow2 header: Input/output error"]),
    ("base", "l1_grow_alloc_table", ["Input/output error"]),
    ("base", "l1_grow_write_table", ["Input/output error"]),
    ("base", "l1_grow_activate_table", ["Input/output error"]),
    ("base", "cluster_alloc", ["Input/output error"]),
    ("base", "pwritev", ["Input/output error"]),
    ("base", "write_aio", ["write", "Input/output error"]),
    ("base", "l1_update", ["write", "Input/output error"]),
    ("base", "l2_alloc_write", ["write", "Input/output error"]),
    ("base", "l2_update", ["write", "Input/output error"]),
    ("base", "read_aio", ["completed"]),  # commit does not read base
    ("mid", "read_aio", ["read", "Input/output error"]),
    ("mid", "l2_load", ["read", "Input/output error"]),
    ("mid", "read_backing_aio", ["completed"]),
    ("mid", "none", ["open", "mid", "Could not read qcow2 header: Input/output error"]),
]
COMMIT_FLUSH = ["flush_to_os", "flush_to_disk"]


@pytest.mark.parametrize(
    ("where", "event", "expected"), COMMIT_CASES, ids=[f"{w}-{e}" for w, e, _x in COMMIT_CASES]
)
def test_commit_fails_alike(
    outcomes: Outcomes, where: str, event: str, expected: list[Any]
) -> None:
    qsd, blockd = outcomes("commit", once(event), {"where": where, "active": False})
    assert qsd == expected
    assert blockd == qsd


@pytest.mark.parametrize("event", COMMIT_FLUSH)
def test_commit_flush_of_base(outcomes: Outcomes, event: str) -> None:
    """Known difference: QSD's commit never flushes base itself (its flush when base
    goes back to read-only fails unreported), blockd's fails the job when base
    cannot be made durable."""
    assert outcomes("commit", once(event), {"where": "base", "active": False}) == (
        ["completed"],
        ["Input/output error"],
    )


ACTIVE_COMMIT_CASES: list[tuple[str, Rules, list[Any]]] = [
    ("base", once("write_aio"), ["write", "Input/output error"]),
    ("base", [{"event": "write_aio", "errno": 28, "once": True}],
     ["write", "No space left on device"]),
    ("base", once("l2_update"), ["write", "Input/output error"]),
    ("base", once("read_aio"), ["ready", "completed"]),
    ("mid", once("read_aio"), ["read", "Input/output error"]),
    # the scan for what to copy fails the job at once, on-error aside (no error event)
    ("mid", once("l2_load"), ["Input/output error"]),
    ("mid", [{"event": "l2_load", "errno": 28, "once": True}], ["No space left on device"]),
    # unlike commit, an active commit flushes base (before READY) in QSD as well
    ("base", once("flush_to_disk"), ["write", "Input/output error"]),
    ("base", once("flush_to_os"), ["write", "Input/output error"]),
    # top holds no data and has no L2 table: the job reads nothing from its file
    ("top", once("read_aio"), ["ready", "completed"]),
    ("top", once("l2_load"), ["ready", "completed"]),
    ("top", once("read_backing_aio"), ["ready", "completed"]),
    ("top", once("write_aio"), ["ready", "completed"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("where", "rules", "expected"), ACTIVE_COMMIT_CASES,
    ids=[f"{w}-{r[0]['event']}-{r[0].get('errno', 5)}" for w, r, _x in ACTIVE_COMMIT_CASES],
)  # fmt: skip
def test_active_commit_fails_alike(
    outcomes: Outcomes, where: str, rules: Rules, expected: list[Any]
) -> None:
    qsd, blockd = outcomes("commit", rules, {"where": where, "active": True})
    assert qsd == expected
    assert blockd == qsd


def test_every_event_has_a_case() -> None:
    """Each BlkdebugEvent the schema accepts is compared somewhere above."""
    from tests.helpers import SCHEMA_DIR

    schema = json.loads((SCHEMA_DIR / "types" / "BlockdevOptions-blkdebug.json").read_text())
    accepted = set(schema["properties"]["inject-error"]["items"]["properties"]["event"]["enum"])
    covered = {event for _s, event in FIRING} | set(SILENT)
    covered |= {event.removeprefix("sticky ") for _s, event in KNOWN_DIFFERENCES}
    covered |= {event for _w, event, _x in COMMIT_CASES} | set(COMMIT_FLUSH)
    assert covered == accepted
