"""blockdev-del whose flush fails, against qemu-storage-daemon 7.2.

A qcow2 node over a blkdebug node whose rule fails the I/O after the
``flush_to_os`` or ``flush_to_disk`` event; two writes through an NBD export
leave the qcow2 metadata dirty; the export goes; then blockdev-del.

QSD ignores the failed flush: it replies success, removes the node and its
children, and with a rule that keeps failing the written data is lost (shown
below).  blockd refuses instead (README, deliberate differences): the reply
is QEMU's "Error flushing drive: ..." and every node is left exactly as it
was, named and usable, so a retry once the fault is gone writes the data and
removes the same nodes QSD removed.  Never a node removed half-way: no child
left behind without the parent that named it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import RawQMP, start_blockd, start_qsd
from tests.images import qemu_img
from tests.interop.test_blkdebug_differential import nbd_connect, nbd_request

pytestmark = pytest.mark.qsd

MiB = 1 << 20
WRITES = ((0, 4096), (1 * MiB, 4096))  # the pattern is 0x5a (nbd_request's payload)
FLUSH_ERROR = {"class": "GenericError", "desc": "Error flushing drive: Input/output error"}
# (event, once, blkdebug added on its own as "dbg<n>" rather than inline)
CASES = [
    (event, once, separate)
    for event in ("flush_to_os", "flush_to_disk")
    for once in (True, False)
    for separate in (False, True)
]


def nodes_of(qmp: RawQMP, d: Path) -> list[dict[str, Any]]:
    """query-named-block-nodes' entries for the nodes on this case's image."""
    reply = qmp.execute("query-named-block-nodes", {"flat": True})["return"]
    return sorted(
        (n for n in reply if str(d) in n["file"]), key=lambda n: (n["node-name"], n["drv"])
    )


def shape(nodes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Names and drivers, generated names (which differ by daemon) as '#'."""
    return sorted(("#" if n["node-name"].startswith("#") else n["node-name"], n["drv"])
                  for n in nodes)  # fmt: skip


def export_del(qmp: RawQMP, name: str) -> None:
    """Delete the export once the daemon has seen the NBD client go."""
    deadline = time.monotonic() + 10
    while (reply := qmp.execute("block-export-del", {"id": name})) != {"return": {}}:
        assert "still in use" in reply["error"]["desc"], reply
        assert time.monotonic() < deadline, reply
        time.sleep(0.05)
    qmp.wait_event("BLOCK_EXPORT_DELETED", id=name)


def run_case(
    qmp: RawQMP, d: Path, n: int, event: str, once: bool, separate: bool
) -> dict[str, Any]:
    rule: dict[str, Any] = {"event": event, **({"once": True} if once else {})}
    image = {"driver": "file", "filename": str(d / "d.qcow2")}
    dbg: dict[str, Any] = {"driver": "blkdebug", "image": image, "inject-error": [rule]}
    file: Any = dbg
    if separate:
        assert qmp.execute("blockdev-add", {**dbg, "node-name": f"dbg{n}"}) == {"return": {}}
        file = f"dbg{n}"
    top = f"top{n}"
    assert qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": top, "file": file}) == {
        "return": {}
    }
    export = {"type": "nbd", "id": f"e{n}", "node-name": top, "writable": True}
    assert qmp.execute("block-export-add", export) == {"return": {}}
    with nbd_connect(d.parent / "nbd.sock", top) as sock:
        for handle, (offset, length) in enumerate(WRITES, 1):
            assert nbd_request(sock, handle, ("write", offset, length)) == 0
    export_del(qmp, f"e{n}")
    out: dict[str, Any] = {"before": nodes_of(qmp, d), "replies": [], "after": []}
    for _attempt in range(2):  # a second try only where the first failed
        reply = qmp.execute("blockdev-del", {"node-name": top})
        out["replies"].append(reply)
        out["after"].append(nodes_of(qmp, d))
        if reply == {"return": {}}:
            break
    if separate:
        out["dbg"] = qmp.execute("blockdev-del", {"node-name": f"dbg{n}"})
        out["dbg_after"] = nodes_of(qmp, d)
    return out


def kept_data(image: Path) -> bool:
    """Whether both writes are in the image, judged by qemu-io after the daemon stopped."""
    reads = [a for o, n in WRITES for a in ("-c", f"read -P 0x5a {o} {n}")]
    proc = subprocess.run(["qemu-io", "-f", "qcow2", *reads, str(image)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.stdout.count("read 4096/4096 bytes") == len(WRITES), proc.stdout + proc.stderr
    return "Pattern verification failed" not in proc.stdout


def run_all(root: Path, kind: str) -> list[dict[str, Any]]:
    d = root / kind
    d.mkdir()
    daemon = (start_qsd if kind == "qsd" else start_blockd)(d / "qmp.sock")
    results = []
    try:
        with RawQMP(d / "qmp.sock") as qmp:
            qmp.negotiate()
            server = {"addr": {"type": "unix", "data": {"path": str(d / "nbd.sock")}}}
            assert qmp.execute("nbd-server-start", server) == {"return": {}}
            for n, case in enumerate(CASES):
                (d / f"c{n}").mkdir()
                qemu_img("create", "-q", "-f", "qcow2", str(d / f"c{n}" / "d.qcow2"), "4M")
                results.append(run_case(qmp, d / f"c{n}", n, *case))
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.stderr()
    for n, result in enumerate(results):
        result["kept"] = kept_data(d / f"c{n}" / "d.qcow2")
    return results


@pytest.fixture(scope="module")
def outcomes() -> Iterator[dict[str, list[dict[str, Any]]]]:
    require_tool("qemu-storage-daemon")
    require_tool("qemu-io")
    root = Path(tempfile.mkdtemp(prefix="bdel-"))  # short: AF_UNIX paths
    try:
        yield {kind: run_all(root, kind) for kind in ("qsd", "blockd")}
    finally:
        shutil.rmtree(root)


IDS = [f"{e}-{'once' if o else 'always'}-{'separate' if s else 'inline'}" for e, o, s in CASES]


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_qsd_removes_regardless(outcomes: dict[str, list[dict[str, Any]]], case: int) -> None:
    """The reference: success at once, only the blkdebug node added on its own left."""
    qsd = outcomes["qsd"][case]
    separate = CASES[case][2]
    assert qsd["replies"] == [{"return": {}}]
    assert shape(qsd["after"][0]) == ([("#", "file"), (f"dbg{case}", "blkdebug")]
                                      if separate else [])  # fmt: skip
    if separate:
        assert qsd["dbg"] == {"return": {}} and qsd["dbg_after"] == []


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_blockd_refuses_and_changes_nothing(
    outcomes: dict[str, list[dict[str, Any]]], case: int
) -> None:
    ours = outcomes["blockd"][case]
    assert shape(ours["before"]) == ([("#", "file"), (f"dbg{case}", "blkdebug"),
                                      (f"top{case}", "qcow2")] if CASES[case][2]
                                     else [("#", "blkdebug"), ("#", "file"),
                                           (f"top{case}", "qcow2")])  # fmt: skip
    assert ours["replies"][0] == {"error": FLUSH_ERROR}
    # every node still there, with its name, exactly as query-named-block-nodes showed it
    assert ours["after"][0] == ours["before"]


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_retry_ends_where_qsd_ends(outcomes: dict[str, list[dict[str, Any]]], case: int) -> None:
    """A fault that went away: the retry succeeds and leaves what QSD left; the
    data is written.  One that stays: refused again, nothing changed."""
    ours, qsd = outcomes["blockd"][case], outcomes["qsd"][case]
    once, separate = CASES[case][1], CASES[case][2]
    if once:
        assert ours["replies"][1] == {"return": {}}
        assert shape(ours["after"][1]) == shape(qsd["after"][0])
        assert ours["kept"]
    else:
        assert ours["replies"][1] == {"error": FLUSH_ERROR}
        assert ours["after"][1] == ours["before"]
    if separate:
        # the blkdebug node is still the monitor's: it goes once nothing uses it
        expected = (
            {"return": {}}
            if once
            else {"error": {"class": "GenericError", "desc": f"Block device dbg{case} is in use"}}
        )
        assert ours["dbg"] == expected


def test_qsd_loses_the_data_blockd_keeps(outcomes: dict[str, list[dict[str, Any]]]) -> None:
    """Why blockd refuses: with a lasting fault QSD's success dropped the writes
    (the L2 table never reached the image); with a passing one both keep them."""
    for case, (event, once, _separate) in enumerate(CASES):
        qsd = outcomes["qsd"][case]
        if event == "flush_to_os" and not once:
            assert not qsd["kept"], IDS[case]
        elif once:
            assert qsd["kept"], IDS[case]
