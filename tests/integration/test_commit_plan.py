"""``__org.blockd_commit-plan`` against reality, through a real daemon's socket.

For each chain of ``tests/plan_chains.py`` (cluster sizes 512 B-2 MiB, sparse
and full, base smaller than top, zero clusters, base partly allocated, a
version 2 base, a refcount table that must grow) the plan's predicted growth
of base must be within 1% and one cluster of what the commit really took
(allocated bytes on the host, after blockd closed base; qemu-img checks
base and compares the guest view).  The selection is refused as
block-commit refuses it, and asking changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, RawQMP
from tests.images import create, digest, qemu_io
from tests.plan_chains import CASES, K, M, run_case

COMPONENTS = ("data", "l2-tables", "refcount-blocks", "refcount-table", "l1-table")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_predicted_growth_is_what_the_commit_takes(
    case: Any, sock_dir: Path, tmp_path: Path
) -> None:
    row = run_case(case, tmp_path, sock_dir / "qmp.sock")
    assert row.within, (row.predicted, row.actual, row.tolerance, row.plan)
    plan = row.plan
    growth = plan["growth"]
    # new clusters less the free ones filled: how much longer the file gets;
    # the space it takes also gives back what the commit frees (punched out)
    assert sum(growth[k] for k in COMPONENTS) - growth["reused"] == growth["file-length"]
    assert growth["total"] <= growth["file-length"] and growth["peak"] >= max(0, growth["total"])
    assert plan["clusters"] * plan["cluster-size"] == growth["data"]
    assert plan["cluster-size"] == row.cluster_size and plan["upper-bound"] is False
    assert (plan["top-node"], plan["base-node"]) == ("mid", "base")
    [layer] = plan["layers"]
    assert layer["node-name"] == "mid" and layer["filename"].endswith("mid.qcow2")
    assert layer["runs"] >= 1 and layer["data"] + layer["zero"] > 0
    assert plan["free"] > 0 and plan["fits"] is True
    assert plan["margin"] == abs(growth["total"]) // 100 + row.cluster_size
    if case.name == "base smaller than top":
        assert plan["virtual-growth"] == 2048 * M - 16 * M and growth["l1-table"] > 0
    else:
        assert plan["virtual-growth"] == 0
    if case.name.startswith("512-byte"):
        assert growth["refcount-table"] > 0 and growth["refcount-blocks"] > 0
    if case.name == "zero clusters over base data":
        # mid's zero clusters free base's data there (punched out: base ends
        # smaller); the new data reuses them
        assert layer["zero"] == 31 * M + 64 * K and growth["reused"] > 0  # 1M written over
        assert growth["total"] < 0
    if case.name == "64K full":
        assert (layer["data"], layer["zero"], layer["runs"]) == (128 * M, 0, 1)


def _open(qmp: RawQMP, d: Path) -> None:
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        args = {"driver": "qcow2", "node-name": name, "read-only": name != "top",
                "backing": backing,
                "file": {"driver": "file", "filename": str(d / f"{name}.qcow2")}}  # fmt: skip
        assert qmp.execute("blockdev-add", args) == {"return": {}}


@pytest.fixture
def small_chain(tmp_path: Path) -> Path:
    create(tmp_path / "base.qcow2", size="64M")
    qemu_io(tmp_path / "base.qcow2", "write -P 1 0 8M")
    create(tmp_path / "mid.qcow2", size="64M", backing="base.qcow2")
    qemu_io(tmp_path / "mid.qcow2", "write -P 2 4M 8M", "write -z 32M 1M")
    create(tmp_path / "top.qcow2", size="64M", backing="mid.qcow2")
    qemu_io(tmp_path / "top.qcow2", "write -P 3 0 64k")
    return tmp_path


SELECTIONS: list[dict[str, Any]] = [
    {"device": "nosuch"},
    {"device": "mid"},  # not a root
    {"device": "top", "top-node": "nosuch"},
    {"device": "top", "top-node": "base", "base-node": "mid"},
    {"device": "top", "top-node": "mid", "base-node": "mid"},
    {"device": "top", "top-node": "mid", "top": "mid.qcow2"},
    {"device": "top", "base": "nosuch.qcow2"},
    {"device": "top", "top-node": "mid", "base-node": "nosuch"},
]


def test_selection_refused_as_block_commit_refuses_it(
    blockd: DaemonProcess, small_chain: Path
) -> None:
    with RawQMP(blockd.socket_path) as qmp:
        qmp.negotiate()
        _open(qmp, small_chain)
        files = {p: digest(p) for p in small_chain.glob("*.qcow2")}
        for selection in SELECTIONS:
            plan = qmp.execute("__org.blockd_commit-plan", selection)
            commit = qmp.execute("block-commit", {"job-id": "j", **selection})
            assert "error" in plan and plan == commit, (selection, plan, commit)
        # the plans wrote nothing (a job is about to write into base)
        assert {p: digest(p) for p in small_chain.glob("*.qcow2")} == files
        # nodes a running job holds are refused too, in block-commit's words
        started = {"job-id": "j", "device": "top", "top-node": "mid", "speed": 1}
        assert qmp.execute("block-commit", started) == {"return": {}}
        plan = qmp.execute("__org.blockd_commit-plan", {"device": "top", "top-node": "mid"})
        again = qmp.execute("block-commit", {**started, "job-id": "k"})
        assert "error" in plan and plan == again, (plan, again)
        assert qmp.execute("block-job-cancel", {"device": "j", "force": True}) == {"return": {}}
        qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="null")
        # and what the job's claim meets: an export reads mid, which an
        # active commit of top empties (refused by block-commit once its job
        # exists; named after the device, block-commit's default job id)
        addr = {"type": "unix", "data": {"path": str(small_chain / "nbd.sock")}}
        assert qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
        export = {"type": "nbd", "id": "e", "node-name": "mid"}
        assert qmp.execute("block-export-add", export) == {"return": {}}
        plan = qmp.execute("__org.blockd_commit-plan", {"device": "top"})
        commit = qmp.execute("block-commit", {"job-id": "top", "device": "top"})
        assert "Permission conflict on node 'mid'" in str(plan), (plan, commit)
        assert plan == commit, (plan, commit)
        qmp.wait_event("JOB_STATUS_CHANGE", id="top", status="null")
        assert qmp.execute("block-export-del", {"id": "e"}) == {"return": {}}
        qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
        # the trials took nothing: without the export the plan goes ahead,
        # and mid can be exported again after it
        assert "return" in qmp.execute("__org.blockd_commit-plan", {"device": "top"})
        assert qmp.execute("block-export-add", export) == {"return": {}}
        assert qmp.execute("block-export-del", {"id": "e"}) == {"return": {}}
        qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
        # unknown and badly typed arguments, as the schema words them
        bad = qmp.execute("__org.blockd_commit-plan", {"device": "top", "speed": 1})
        assert bad["error"]["desc"] == "Parameter 'speed' is unexpected"
        bad = qmp.execute("__org.blockd_commit-plan", {})
        assert bad["error"]["desc"] == "Parameter 'device' is missing"
        assert qmp.execute("query-block-jobs") == {"return": []}
    blockd.stop()
    # the cancelled job may have copied into base before it stopped, nothing else
    for name in ("mid.qcow2", "top.qcow2"):
        assert digest(small_chain / name) == files[small_chain / name]


def test_plan_of_an_active_commit_and_of_a_deeper_chain(
    blockd: DaemonProcess, small_chain: Path
) -> None:
    """Without top-node the active layer is top: both layers above base count,
    each for what the one above it does not hide."""
    with RawQMP(blockd.socket_path) as qmp:
        qmp.negotiate()
        _open(qmp, small_chain)
        plan = qmp.execute("__org.blockd_commit-plan", {"device": "top"})["return"]
        assert (plan["top-node"], plan["base-node"]) == ("top", "base")
        layers = {layer["node-name"]: layer for layer in plan["layers"]}
        assert list(layers) == ["top", "mid"]
        assert (layers["top"]["data"], layers["top"]["zero"]) == (64 * K, 0)
        # mid's 4M..12M less top's first 64 KiB (top hides none of it), and 1M of zeros
        assert (layers["mid"]["data"], layers["mid"]["zero"]) == (8 * M, 1 * M)
        # base holds 0..8M already: new clusters for 8M..12M only (64 KiB each)
        assert plan["clusters"] == 4 * M // (64 * K)
        listed = {c["name"] for c in qmp.execute("query-commands")["return"]}
        assert "__org.blockd_commit-plan" in listed
        schema = {e["name"]: e for e in qmp.execute("query-qmp-schema")["return"]}
        entry = schema["__org.blockd_commit-plan"]
        assert entry["meta-type"] == "command"
        members = {m["name"] for m in schema[entry["arg-type"]]["members"]}
        assert members == {"device", "top", "top-node", "base", "base-node"}
        returned = {m["name"] for m in schema[entry["ret-type"]]["members"]}
        assert {"layers", "clusters", "growth", "free", "fits", "virtual-growth"} <= returned


def test_raw_base_gets_an_upper_bound(blockd: DaemonProcess, tmp_path: Path) -> None:
    """A raw base keeps no allocation map: every data byte is counted, and the
    commit takes no more than that."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"")
    os.truncate(base, 64 * M)
    qemu_io(base, "write -P 1 0 4M", fmt="raw")
    backing = "backing_file=base.raw,backing_fmt=raw"
    mid = create(tmp_path / "mid.qcow2", size="64M", options=backing)
    qemu_io(mid, "write -P 2 2M 6M", "write -z 20M 1M")
    with RawQMP(blockd.socket_path) as qmp:
        qmp.negotiate()
        nodes = [
            {"driver": "raw", "node-name": "base", "read-only": True,
             "file": {"driver": "file", "filename": str(base)}},
            {"driver": "qcow2", "node-name": "mid", "backing": "base",
             "file": {"driver": "file", "filename": str(mid)}},
        ]  # fmt: skip
        for args in nodes:
            assert qmp.execute("blockdev-add", args) == {"return": {}}
        plan = qmp.execute("__org.blockd_commit-plan", {"device": "mid"})["return"]
        assert plan["upper-bound"] is True and plan["cluster-size"] == 0
        assert plan["growth"]["total"] == plan["growth"]["data"] == 6 * M
        assert plan["layers"] == [{"node-name": "mid", "filename": str(mid), "data": 6 * M,
                                   "zero": 1 * M, "runs": 2}]  # fmt: skip
        before = os.stat(base).st_blocks * 512
        commit = {"job-id": "c", "device": "mid", "base-node": "base"}
        assert qmp.execute("block-commit", commit) == {"return": {}}
        qmp.wait_event("BLOCK_JOB_READY", device="c")
        assert qmp.execute("block-job-complete", {"device": "c"}) == {"return": {}}
        qmp.wait_event("BLOCK_JOB_COMPLETED", device="c")
    blockd.stop()
    assert 0 < os.stat(base).st_blocks * 512 - before <= plan["growth"]["total"]


def test_a_layer_that_cannot_be_read_fails_the_plan_with_its_error(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    """The walk meets an L2 table of mid it cannot read: the plan fails with
    the I/O error in its own words, and writes nothing."""
    base = create(tmp_path / "base.qcow2", size="16M")
    backing = "backing_file=base.qcow2,backing_fmt=qcow2"
    mid = create(tmp_path / "mid.qcow2", size="16M", options=backing)
    qemu_io(mid, "write -P 2 1M 2M")
    files = {p: digest(p) for p in (base, mid)}
    with RawQMP(blockd.socket_path) as qmp:
        qmp.negotiate()
        rule = {"event": "l2_load", "errno": 5}
        nodes = [
            {"driver": "qcow2", "node-name": "base", "read-only": True,
             "file": {"driver": "file", "filename": str(base)}},
            {"driver": "qcow2", "node-name": "mid", "backing": "base",
             "file": {"driver": "blkdebug", "inject-error": [rule],
                      "image": {"driver": "file", "filename": str(mid)}}},
        ]  # fmt: skip
        for args in nodes:
            assert qmp.execute("blockdev-add", args) == {"return": {}}
        plan = qmp.execute("__org.blockd_commit-plan", {"device": "mid"})
        assert plan["error"] == {"class": "GenericError", "desc": "Input/output error"}, plan
    blockd.stop()
    assert {p: digest(p) for p in (base, mid)} == files
