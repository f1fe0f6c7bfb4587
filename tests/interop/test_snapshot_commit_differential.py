"""Commits and NBD writes into a base with internal snapshots, blockd beside QSD 7.2.

The base gets its snapshots from ``qemu-img snapshot -c`` after ``qemu-io``
writes (data, preallocated zero clusters, compressed clusters), so the
commit writes over clusters and L2 tables the snapshots share.  Each daemon
gets its own copy of the chain and the same conversation (the harnesses of
``test_commit_differential.py`` and ``test_active_commit_differential.py``).
Compared: every reply and event, the final guest view of every image, and
each snapshot's content (``qemu-img convert -l snapshot.name=...``), which
must also be what it was before the commit; blockd's images pass
``qemu-img check`` with no leak.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import start_blockd, start_qsd
from tests.images import backing_of, check, create, qemu_img, qemu_io
from tests.interop import test_active_commit_differential as active
from tests.interop import test_commit_differential as intermediate

pytestmark = pytest.mark.qsd

MiB = 1 << 20

#: base image options: (qemu-img create -o, virtual size)
BASES = {
    "v3-64k": ("compat=1.1,cluster_size=65536", "64M"),
    "v2-4k": ("compat=0.10,cluster_size=4096", "64M"),
    "v3-2M": ("compat=1.1,cluster_size=2097152", "64M"),
}


def make_chain(d: Path, options: str, size: str) -> dict[str, Path]:
    """base (two snapshots) <- mid <- top; the snapshots' contents, raw, by name.

    mid and top hold what the other commit tests' chains hold (their
    conversations read it back); base adds data the commits and the
    conversations' writes go over: at 5M, 33M (under mid) and 40M.
    """
    d.mkdir()
    base = create(d / "base.qcow2", size, options=options)
    qemu_io(
        base,
        "write -P 0x11 0 1M",
        "write -P 0x12 8M 1M",
        "write -P 0x17 5M 1M",
        "write -P 0x18 33M 512k",
        "write -P 0x16 12M 256k",
        "write -z 12M 128k",  # preallocated zero clusters (v3)
        "write -c -P 0x13 16M 2M",  # compressed
    )
    qemu_img("snapshot", "-c", "s1", str(base))
    qemu_io(base, "write -P 0x14 9M 512k", "write -P 0x19 40M 64k", "write -P 0x15 44M 1M")
    qemu_img("snapshot", "-c", "s2", str(base))
    snapshots = {}
    for name in ("s1", "s2"):
        snapshots[name] = d / f"{name}.raw"
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(base),
                 str(snapshots[name]))  # fmt: skip
    mid = create(d / "mid.qcow2", backing="base.qcow2")
    top = create(d / "top.qcow2", backing="mid.qcow2")
    qemu_io(mid, "write -P 0x21 1M 2M", "write -P 0x22 32M 4M")
    qemu_io(top, "write -P 0x31 2M 1M")
    return snapshots


def normalise(transcript: list[Any], d: Path) -> list[Any]:
    """Paths relative to the daemon's directory; no file lengths (where each
    daemon put its new clusters is its own business)."""
    out: list[Any] = json.loads(json.dumps(transcript).replace(str(d), "{d}"))
    for entry in out:
        reply = entry[1] if len(entry) == 3 else {}  # (command, reply, events) or ("io", lines)
        for node in reply.get("return", []) if isinstance(reply.get("return"), list) else []:
            if isinstance(node, dict):
                node["image"].pop("actual-size", None)
                if node.get("drv") == "file":
                    node["image"].pop("virtual-size", None)
    return out


def compare_results(tmp_path: Path, snapshots: dict[str, Path], images: tuple[str, ...]) -> None:
    for image in images:
        theirs, mine = tmp_path / "qsd" / f"{image}.qcow2", tmp_path / "blockd" / f"{image}.qcow2"
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(theirs), str(mine))
        check(mine)
    for which in ("qsd", "blockd"):
        base = tmp_path / which / "base.qcow2"
        for name, before in snapshots.items():
            after = tmp_path / which / f"{name}.raw"
            qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(base), str(after))
            assert after.read_bytes() == before.read_bytes(), (which, name)


@pytest.mark.parametrize("kind", sorted(BASES))
def test_intermediate_commit_into_base_with_snapshots(
    tmp_path: Path, sock_dir: Path, kind: str
) -> None:
    """mid into a read-only base with snapshots: the commit reopens it read-write."""
    snapshots = make_chain(tmp_path / "chain", *BASES[kind])
    transcripts = []
    for which, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = tmp_path / which
        shutil.copytree(tmp_path / "chain", d)
        steps: list[tuple[str, dict[str, Any], Any]] = [
            *intermediate.chain_nodes(d),
            ("query-named-block-nodes", {"flat": True}, None),
            *intermediate.SUCCESS,
            ("query-named-block-nodes", {"flat": True}, None),
        ]
        daemon = start(sock_dir / f"{which}.sock")
        try:
            transcripts.append(normalise(intermediate.converse(daemon, steps), d))
        finally:
            daemon.stop()
    qsd, ours = transcripts
    for want, got in zip(qsd, ours, strict=True):
        assert got == want
    assert backing_of(tmp_path / "blockd" / "top.qcow2") == str(tmp_path / "blockd" / "base.qcow2")
    compare_results(tmp_path, snapshots, ("base", "top"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: the NBD and QMP socket paths must fit in sun_path."""
    with tempfile.TemporaryDirectory(prefix="sc-") as name:
        yield Path(name)


@pytest.mark.parametrize("kind", ["v2-4k", "v3-64k"])  # (2 MiB clusters: the other test)
def test_active_commit_into_base_with_snapshots(
    tmp_path: Path, short_dir: Path, kind: str
) -> None:
    """top (exported, written while READY) into base through mid, then completed."""
    require_tool("qemu-storage-daemon")
    snapshots = make_chain(tmp_path / "chain", *BASES[kind])
    for which in ("qsd", "blockd"):
        shutil.copytree(tmp_path / "chain", tmp_path / which)
    qsd = active.run_one(start_qsd, tmp_path / "qsd", short_dir / "qsd.sock", "complete")
    active.run_one(start_blockd, tmp_path / "blockd", short_dir / "blockd.sock", "complete", qsd)
    compare_results(tmp_path, snapshots, ("base", "mid", "top"))


def test_commit_that_must_grow_a_v2_base_with_snapshots(tmp_path: Path, sock_dir: Path) -> None:
    """QEMU 7.2 resizes no v2 image with snapshots (their entries need not record
    their size): the commit into a smaller such base fails, base unchanged."""
    d0 = tmp_path / "chain"
    d0.mkdir()
    base = create(d0 / "base.qcow2", "32M", options="compat=0.10")
    qemu_io(base, "write -P 0x11 0 1M")
    qemu_img("snapshot", "-c", "s1", str(base))
    mid = create(d0 / "mid.qcow2", "64M", backing="base.qcow2")
    top = create(d0 / "top.qcow2", "64M", backing="mid.qcow2")
    qemu_io(mid, "write -P 0x21 1M 2M", "write -P 0x22 40M 1M")
    qemu_io(top, "write -P 0x31 2M 1M")
    transcripts = []
    for which, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = tmp_path / which
        shutil.copytree(d0, d)
        steps: list[tuple[str, dict[str, Any], Any]] = [
            *intermediate.chain_nodes(d),
            ("block-commit", intermediate.commit(**{"top-node": "mid"}),
             ("JOB_STATUS_CHANGE", {"status": "null"})),
            ("query-block-jobs", {}, None),
        ]  # fmt: skip
        daemon = start(sock_dir / f"{which}.sock")
        try:
            transcripts.append(normalise(intermediate.converse(daemon, steps), d))
        finally:
            daemon.stop()
    qsd, ours = transcripts
    for want, got in zip(qsd, ours, strict=True):
        assert got == want
    for which in ("qsd", "blockd"):
        assert qemu_img("info", "--output=json", str(tmp_path / which / "base.qcow2")).count(
            '"virtual-size": 33554432'
        )
        qemu_img("compare", str(d0 / "base.qcow2"), str(tmp_path / which / "base.qcow2"))
    check(tmp_path / "blockd" / "base.qcow2")


def test_nbd_writes_into_an_image_with_snapshots(tmp_path: Path, short_dir: Path) -> None:
    """A client writing through a writable export (small requests take blockd's
    fast path where they can): the same replies, guest view and snapshots."""
    require_tool("qemu-storage-daemon")
    snapshots = make_chain(tmp_path / "chain", *BASES["v3-64k"])
    file = {"driver": "file", "filename": "{d}/base.qcow2", "node-name": "f-top"}
    steps: list[Any] = [
        active.Qmp("blockdev-add", {"driver": "qcow2", "node-name": "top", "read-only": False,
                                    "discard": "unmap", "file": file}),
        active.Qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "{nbd}"}}}),
        active.Qmp("block-export-add",
                   {"type": "nbd", "id": "e0", "node-name": "top", "writable": True}),
        active.Io(("write -P 0x51 4k 4k", "write -P 0x52 8M 64k", "write -P 0x53 12M 4k",
                   "write -P 0x54 16M 512", "write -z 5M 128k", "discard 33M 512k",
                   "write -z -u 9M 64k", "flush")),
        active.Io(("write -P 0x55 4k 4k", "read -P 0x55 4k 4k", "read -P 0x52 8M 64k",
                   "read -P 0 5M 128k", "read -P 0 33M 512k", "read -P 0x54 16M 512")),
        active.Qmp("query-named-block-nodes", {"flat": True}),
        active.Qmp("block-export-del", {"id": "e0"}, ("BLOCK_EXPORT_DELETED", {"id": "e0"})),
        active.Qmp("blockdev-del", {"node-name": "top"}),
    ]  # fmt: skip
    transcripts = []
    for which, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = tmp_path / which
        shutil.copytree(tmp_path / "chain", d)
        sock = short_dir / f"{which}.sock"
        nbd = short_dir / f"{which}-nbd.sock"
        mine = json.loads(json.dumps([asdict(s) for s in steps]).replace("{d}", str(d))
                          .replace("{nbd}", str(nbd)))  # fmt: skip
        typed = [type(s)(**m) for s, m in zip(steps, mine, strict=True)]
        daemon = start(sock)
        try:
            transcripts.append(normalise(active.converse(daemon, nbd, typed), d))
        finally:
            daemon.stop()
    qsd, ours = transcripts
    for want, got in zip(qsd, ours, strict=True):
        assert got == want
    compare_results(tmp_path, snapshots, ("base",))
