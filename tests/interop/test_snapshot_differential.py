"""External snapshots and transactions, blockd beside qemu-storage-daemon 7.2.

Each daemon gets its own directory with the same images and the same
conversation; every reply is compared (paths written as ``D``), and so are
the events, the exports' nodes, the nodes' open modes, the images'
``qemu-img info`` and the guest views (``qemu-img compare``).

One deliberate difference (README): an overlay whose header names no
backing file gets the node's file name and format written there by blockd
(QEMU writes nothing, and such an overlay reads as an empty disk once QEMU
exits); its node is then named by its plain file name where QEMU shows a
``json:`` name.  Overlays made as libvirt makes them (``backing-file`` already
in the header) show no difference at all.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, negotiated, start_blockd, start_qsd
from tests.images import check, create, digest, qemu_img, qemu_io

pytestmark = pytest.mark.qsd

MiB = 1 << 20


def _swap(value: Any, old: str, new: str) -> Any:
    return json.loads(json.dumps(value).replace(old, new))


@dataclass
class Side:
    name: str
    dir: Path
    daemon: DaemonProcess
    qmp: RawQMP
    nbd_sock: Path

    def ask(self, command: str, arguments: Any = None) -> Any:
        """The reply, with this side's directory written as D."""
        if arguments is not None:
            arguments = _swap(arguments, "D", str(self.dir))
        return _swap(self.qmp.execute(command, arguments), str(self.dir), "D")

    def events(self) -> list[tuple[str, Any]]:
        return [(e["event"], e.get("data")) for e in self.qmp.events]

    def exports(self) -> list[tuple[str, str]]:
        return sorted((e["id"], e["node-name"]) for e in self.ask("query-block-exports")["return"])

    def nodes(self) -> list[tuple[str, str, bool, str]]:
        """Named nodes: (name, driver, read-only, backing file)."""
        reply = self.ask("query-named-block-nodes", {"flat": True})["return"]
        return sorted(
            (n["node-name"], n["drv"], n["ro"], n.get("backing_file", ""))
            for n in reply
            if not n["node-name"].startswith("#")
        )

    def io(self, export: str, *commands: str) -> str:
        argv = [require_tool("qemu-io"), "-f", "raw"]
        for command in commands:
            argv += ["-c", command]
        uri = f"nbd+unix:///{export}?socket={self.nbd_sock}"
        result = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "failed" not in result.stdout, result
        return result.stdout

    def image_bytes(self, image: str) -> bytes:
        """The file's bytes, this side's directory (in the backing name) as D."""
        return (self.dir / image).read_bytes().replace(str(self.dir).encode(), b"D")

    def info(self, image: str) -> dict[str, Any]:
        out = qemu_img("info", "-U", "--output=json", str(self.dir / image))
        info: dict[str, Any] = _swap(json.loads(out), str(self.dir), "D")
        info.pop("actual-size", None)
        return info


@dataclass
class Pair:
    sides: list[Side] = field(default_factory=list)

    def same(self, command: str, arguments: Any = None) -> Any:
        """Run on both; the replies must be the same; returns it."""
        replies = [side.ask(command, arguments) for side in self.sides]
        assert replies[0] == replies[1], (command, arguments, replies)
        return replies[0]

    def ok(self, command: str, arguments: Any = None) -> None:
        assert self.same(command, arguments) == {"return": {}}

    def error(self, command: str, arguments: Any = None) -> str:
        reply = self.same(command, arguments)
        assert reply["error"]["class"] == "GenericError", reply
        desc: str = reply["error"]["desc"]
        return desc

    def images(self, *names: str, size: str = "64M", backing: str | None = None) -> None:
        for side in self.sides:
            for name in names:
                create(side.dir / name, size, backing=None if backing is None
                       else str(side.dir / backing))  # fmt: skip

    def add(self, name: str, image: str, **extra: Any) -> None:
        file = {"driver": "file", "filename": f"D/{image}"}
        self.ok("blockdev-add", {"driver": "qcow2", "node-name": name, "file": file, **extra})

    def export(self, node: str, name: str, *, writable: bool = True) -> None:
        args = {"type": "nbd", "id": name, "node-name": node, "name": name, "writable": writable}
        self.ok("block-export-add", args)

    def compare(self, image: str, other: str | None = None) -> None:
        """The two sides' images hold the same guest view."""
        a, b = (side.dir / (other if i and other else image) for i, side in enumerate(self.sides))
        result = subprocess.run([require_tool("qemu-img"), "compare", "-U", str(a), str(b)],
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def pair(tmp_path: Path, sock_dir: Path) -> Iterator[Pair]:
    out = Pair()
    started: list[DaemonProcess] = []
    try:
        for name in ("qsd", "blockd"):
            # directories of one length: the images' bytes can be compared
            d = tmp_path / name[0]
            d.mkdir()
            sock = sock_dir / f"{name}.sock"
            daemon = start_qsd(sock) if name == "qsd" else start_blockd(sock)
            started.append(daemon)
            qmp = negotiated(daemon)
            out.sides.append(Side(name, d, daemon, qmp, sock_dir / f"{name}-nbd.sock"))
        for side in out.sides:
            addr = {"type": "unix", "data": {"path": str(side.nbd_sock)}}
            assert side.ask("nbd-server-start", {"addr": addr}) == {"return": {}}
        yield out
    finally:
        for side in out.sides:
            side.qmp.close()
        for daemon in started:
            daemon.stop()
    assert "Traceback" not in started[1].stderr()


def test_blockdev_snapshot_errors(pair: Pair) -> None:
    pair.images("base.qcow2", "ov.qcow2", "other.qcow2", "x.qcow2", "ro.qcow2", "eo.qcow2")
    pair.images("hdr.qcow2", backing="base.qcow2")
    pair.add("base", "base.qcow2")
    pair.add("ov", "ov.qcow2", backing=None)
    pair.add("x", "x.qcow2")
    pair.add("other", "other.qcow2", backing="x")
    pair.add("ro", "ro.qcow2", backing=None, **{"read-only": True})
    pair.add("eo", "eo.qcow2", backing=None)
    pair.export("eo", "eo", writable=False)
    raw = {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "D/r.raw"}}
    for side in pair.sides:
        (side.dir / "r.raw").write_bytes(bytes(MiB))
    pair.ok("blockdev-add", raw)
    dbg = {"driver": "blkdebug", "node-name": "dbg",
           "image": {"driver": "file", "filename": "D/ov.qcow2", "locking": "off"}}  # fmt: skip
    pair.ok("blockdev-add", dbg)
    cases = {
        ("nope", "ov"): "Cannot find device='nope' nor node-name='nope'",
        ("base", "nope"): "Cannot find device='nope' nor node-name='nope'",
        ("ov", "ov"): "Making 'ov' a backing child of 'ov' would create a cycle",
        ("base", "other"): "The overlay already has a backing image",
        ("base", "r"): "The overlay does not support backing images",
        ("base", "dbg"): "Filters cannot be used as overlays",
        ("base", "eo"): "The overlay is already in use",
        ("x", "ov"): "Node 'x' is busy: node is used as backing hd of 'other'",
    }
    for (node, overlay), desc in cases.items():
        assert pair.error("blockdev-snapshot", {"node": node, "overlay": overlay}) == desc
    # a read-only overlay cannot take over a writable export
    pair.export("base", "disk")
    assert pair.error("blockdev-snapshot", {"node": "base", "overlay": "ro"}) == (
        "Block node is read-only"
    )
    # a loop: the node is above the overlay already
    pair.add("above", "hdr.qcow2", backing="ov")
    assert pair.error("blockdev-snapshot", {"node": "above", "overlay": "ov"}) == (
        "Making 'above' a backing child of 'ov' would create a cycle"
    )
    # and the schema's refusals
    assert pair.error("blockdev-snapshot", {"node": "base"}) == "Parameter 'overlay' is missing"
    assert pair.error("blockdev-snapshot", {"node": 1, "overlay": "ov"}) == (
        "Invalid parameter type for 'node', expected: string"
    )
    assert pair.error("blockdev-snapshot", {"node": "b", "overlay": "o", "x": 1}) == (
        "Parameter 'x' is unexpected"
    )
    # nothing changed anywhere
    nodes = [side.nodes() for side in pair.sides]
    assert nodes[0] == nodes[1]
    assert all(not ro for name, _, ro, _ in nodes[1] if name not in ("ro", "x"))
    assert pair.sides[0].exports() == pair.sides[1].exports()
    assert pair.sides[0].events() == pair.sides[1].events() == []


def test_a_running_job_holds_its_nodes(pair: Pair) -> None:
    pair.images("base.qcow2", "ov.qcow2")
    pair.images("top.qcow2", backing="base.qcow2")
    for side in pair.sides:
        qemu_io(side.dir / "top.qcow2", "write -P 0x33 0 32M")
    pair.add("base", "base.qcow2")
    pair.add("top", "top.qcow2", backing="base")
    pair.add("ov", "ov.qcow2", backing=None)
    pair.ok("block-commit", {"job-id": "j", "device": "top", "speed": 1024})
    for node in ("top", "base"):
        assert pair.error("blockdev-snapshot", {"node": node, "overlay": "ov"}) == (
            f"Node '{node}' is busy: block device is in use by block job: commit"
        )
    # the job only writes to base (as a mirror writes to its target): base may
    # become an overlay (QEMU's allow-write-only-overlay)
    pair.images("x.qcow2")
    pair.add("x", "x.qcow2")
    pair.ok("blockdev-snapshot", {"node": "x", "overlay": "base"})
    nodes = [side.nodes() for side in pair.sides]
    # (top's backing is named by a json: name in QSD: base's header names nothing)
    assert [n[:3] for n in nodes[0]] == [n[:3] for n in nodes[1]]
    assert ("base", "qcow2", False, "D/x.qcow2") in nodes[0]
    assert ("base", "qcow2", False, "D/x.qcow2") in nodes[1]
    pair.ok("block-job-cancel", {"device": "j", "force": True})


def test_snapshot_of_an_exported_disk(pair: Pair) -> None:
    """libvirt's way: the overlay is created naming the node's file, added
    without a backing, then put on top while the disk is exported."""
    pair.images("base.qcow2")
    pair.images("ov.qcow2", backing="base.qcow2")
    for side in pair.sides:
        qemu_io(side.dir / "base.qcow2", "write -P 0x11 0 8M")
    pair.add("base", "base.qcow2")
    pair.add("ov", "ov.qcow2", backing=None)
    pair.export("base", "disk")
    for side in pair.sides:
        side.io("disk", "write -P 0x22 4M 2M")
    headers = [digest(side.dir / "ov.qcow2") for side in pair.sides]
    pair.ok("blockdev-snapshot", {"node": "base", "overlay": "ov"})
    for side in pair.sides:
        side.io("disk", "write -P 0x33 5M 2M", "read -P 0x22 4M 1M", "read -P 0x11 0 4M")
    assert [s.exports() for s in pair.sides] == [[("disk", "ov")]] * 2
    nodes = [side.nodes() for side in pair.sides]
    assert nodes[0] == nodes[1]
    assert ("base", "qcow2", True, "") in nodes[1]  # frozen
    assert ("ov", "qcow2", False, "D/base.qcow2") in nodes[1]
    # the same names everywhere (this overlay's header named base already)
    qsd_files, blockd_files = (
        sorted(n["file"] for n in side.ask("query-named-block-nodes", {"flat": True})["return"])
        for side in pair.sides
    )
    assert qsd_files == blockd_files
    # a second snapshot on top of the first, as libvirt does for the next one
    pair.images("ov2.qcow2", backing="ov.qcow2")
    pair.add("ov2", "ov2.qcow2", backing=None)
    pair.ok("blockdev-snapshot", {"node": "ov", "overlay": "ov2"})
    for side in pair.sides:
        side.io("disk", "write -P 0x44 6M 2M")
    assert [s.exports() for s in pair.sides] == [[("disk", "ov2")]] * 2
    assert pair.error("blockdev-del", {"node-name": "ov"}) == (
        "Node 'ov' is busy: node is used as backing hd of 'ov2'"
    )
    assert pair.sides[0].events() == pair.sides[1].events() == []
    for side in pair.sides:
        side.qmp.close()
        side.daemon.stop()
    blockd = pair.sides[1]
    for image in ("base.qcow2", "ov.qcow2", "ov2.qcow2"):
        check(blockd.dir / image)
        assert pair.sides[0].info(image) == blockd.info(image)
        pair.compare(image)
    # the header libvirt wrote is left as it was
    assert digest(pair.sides[1].dir / "ov.qcow2") != headers[1]  # data went in
    qemu_io(blockd.dir / "base.qcow2", "read -P 0x22 4M 2M", "read -P 0x11 6M 2M")


def test_snapshot_of_a_bare_overlay_names_the_node(pair: Pair) -> None:
    """An overlay whose header names nothing: the one difference (README)."""
    pair.images("base.qcow2", "ov.qcow2")
    for side in pair.sides:
        qemu_io(side.dir / "base.qcow2", "write -P 0x11 0 8M")
    pair.add("base", "base.qcow2")
    pair.add("ov", "ov.qcow2", backing=None)
    pair.export("base", "disk")
    pair.ok("blockdev-snapshot", {"node": "base", "overlay": "ov"})
    for side in pair.sides:
        side.io("disk", "write -P 0x33 5M 2M")
    nodes = [side.nodes() for side in pair.sides]
    assert nodes[0] == nodes[1]
    qsd, blockd = pair.sides
    files = {side.name: {n["node-name"]: n["file"] for n in
                         side.ask("query-named-block-nodes", {"flat": True})["return"]}
             for side in pair.sides}  # fmt: skip
    assert files["qsd"]["ov"].startswith("json:{")
    assert files["blockd"]["ov"] == "D/ov.qcow2"
    for side in pair.sides:
        side.qmp.close()
        side.daemon.stop()
    assert "backing-filename" not in qsd.info("ov.qcow2")
    info = blockd.info("ov.qcow2")
    assert info["backing-filename"] == "D/base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    check(blockd.dir / "ov.qcow2")
    # the guest view: QSD's overlay needs its backing named to be read at all
    qemu_img("rebase", "-u", "-b", str(qsd.dir / "base.qcow2"), "-F", "qcow2",
             str(qsd.dir / "ov.qcow2"))  # fmt: skip
    assert qsd.info("ov.qcow2") == info
    pair.compare("ov.qcow2")


def snap(node: str, overlay: str) -> dict[str, Any]:
    return {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}


def two_disks(pair: Pair) -> dict[str, list[str]]:
    """Disks a and b, exported, each with an overlay named in its header;
    the digests of every image before anything happens."""
    pair.images("a.qcow2", "b.qcow2")
    pair.images("a1.qcow2", backing="a.qcow2")
    pair.images("b1.qcow2", backing="b.qcow2")
    for disk in "ab":
        pair.add(disk, f"{disk}.qcow2")
        pair.add(f"{disk}1", f"{disk}1.qcow2", backing=None)
        pair.export(disk, disk)
    return {side.name: [digest(side.dir / f"{n}.qcow2") for n in ("a", "b", "a1", "b1")]
            for side in pair.sides}  # fmt: skip


def unchanged(pair: Pair, before: dict[str, list[str]]) -> None:
    for side in pair.sides:
        assert side.exports() == [("a", "a"), ("b", "b")]
        assert [digest(side.dir / f"{n}.qcow2") for n in ("a", "b", "a1", "b1")] == (
            before[side.name]
        )
    nodes = [side.nodes() for side in pair.sides]
    assert nodes[0] == nodes[1]
    assert all(not ro for _, _, ro, _ in nodes[1])


def test_transaction_snapshots_two_disks_at_once(pair: Pair) -> None:
    two_disks(pair)
    for side in pair.sides:
        side.io("a", "write -P 0xa1 0 1M")
        side.io("b", "write -P 0xb1 0 1M")
    pair.ok("transaction", {"actions": [snap("a", "a1"), snap("b", "b1")]})
    for side in pair.sides:
        assert side.exports() == [("a", "a1"), ("b", "b1")]
        side.io("a", "write -P 0xa2 1M 1M", "read -P 0xa1 0 1M")
        side.io("b", "write -P 0xb2 1M 1M", "read -P 0xb1 0 1M")
    nodes = [side.nodes() for side in pair.sides]
    assert nodes[0] == nodes[1]
    assert pair.sides[0].events() == pair.sides[1].events() == []
    for side in pair.sides:
        side.qmp.close()
        side.daemon.stop()
    for image in ("a.qcow2", "b.qcow2", "a1.qcow2", "b1.qcow2"):
        check(pair.sides[1].dir / image)
        assert pair.sides[0].info(image) == pair.sides[1].info(image)
        pair.compare(image)


@pytest.mark.parametrize(
    ("actions", "properties", "desc"),
    [
        ([snap("a", "a1"), snap("b", "nope")], None,
         "Cannot find device='nope' nor node-name='nope'"),
        ([snap("a", "a1"), {"type": "abort", "data": {}}], None,
         "Transaction aborted using Abort action"),
        ([snap("a", "a1"), snap("a", "b1")], None,
         "Node 'a' is busy: node is used as backing hd of 'a1'"),
        ([snap("a", "a1"), snap("b", "a1")], None, "The overlay is already in use"),
        ([snap("a", "a1"), snap("b", "b1")], {"completion-mode": "grouped"},
         "Action 'blockdev-snapshot' does not support Transaction property "
         "completion-mode = grouped"),
        ([{"type": "abort", "data": {}}], {"completion-mode": "grouped"},
         "Transaction aborted using Abort action"),
        ([snap("a", "a1"), {"type": "abort"}], None, "Parameter 'actions[1].data' is missing"),
        ([snap("a", "a1"), {"type": "foo", "data": {}}], None,
         "Parameter 'type' does not accept value 'foo'"),
        ([{"type": "blockdev-snapshot", "data": {"node": "a"}}], None,
         "Parameter 'actions[0].data.overlay' is missing"),
        ([snap("a", "a1")], {"completion-mode": "x"},
         "Parameter 'completion-mode' does not accept value 'x'"),
        ([snap("a", "a1")], {"x": 1}, "Parameter 'properties.x' is unexpected"),
    ],
)  # fmt: skip
def test_a_failed_transaction_changes_nothing(
    pair: Pair, actions: list[dict[str, Any]], properties: dict[str, Any] | None, desc: str
) -> None:
    """Every prepared action is undone: exports, graph and every byte of
    every image are as before, and the disks work on."""
    before = two_disks(pair)
    args: dict[str, Any] = {"actions": actions}
    if properties is not None:
        args["properties"] = properties
    assert pair.error("transaction", args) == desc
    unchanged(pair, before)
    for side in pair.sides:
        side.io("a", "write -P 0xa3 0 1M")
    assert pair.sides[0].events() == pair.sides[1].events() == []


@pytest.mark.parametrize("properties", [None, {"completion-mode": "grouped"}])
def test_an_empty_transaction_does_nothing(pair: Pair, properties: Any) -> None:
    before = two_disks(pair)
    args: dict[str, Any] = {"actions": []}
    if properties is not None:
        args["properties"] = properties
    pair.ok("transaction", args)
    unchanged(pair, before)


@pytest.mark.parametrize(
    "kind", ["drive-backup", "blockdev-backup", "block-dirty-bitmap-add",
             "blockdev-snapshot-internal-sync"],
)  # fmt: skip
def test_other_action_types_are_unknown_to_blockd(pair: Pair, kind: str) -> None:
    """QEMU's other action types: QSD reads their data (and would run them),
    blockd refuses the type itself, as a value its schema does not list
    (README), before anything is done."""
    before = two_disks(pair)
    args = {"actions": [snap("a", "a1"), {"type": kind, "data": {}}]}
    qsd, blockd = (side.ask("transaction", args) for side in pair.sides)
    assert qsd["error"]["desc"].startswith("Parameter 'actions[1].data.")
    assert blockd["error"] == {
        "class": "GenericError", "desc": f"Parameter 'type' does not accept value '{kind}'"
    }  # fmt: skip
    unchanged(pair, before)


def sync(node: str, image: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"node-name": node, "snapshot-file": f"D/{image}", "snapshot-node-name": name,
            **extra}  # fmt: skip


def test_blockdev_snapshot_sync_errors(pair: Pair) -> None:
    pair.images("base.qcow2", "used.qcow2")
    pair.add("base", "base.qcow2")
    pair.add("used", "used.qcow2")
    for side in pair.sides:
        (side.dir / "r.raw").write_bytes(bytes(MiB))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"device": "base", "snapshot-file": "D/s.qcow2"},
         "Cannot find device='base' nor node-name=''"),
        ({"node-name": "nope", "snapshot-file": "D/s.qcow2", "snapshot-node-name": "s"},
         "Cannot find device='' nor node-name='nope'"),
        ({"node-name": "base", "snapshot-file": "D/s.qcow2"}, "New overlay node-name missing"),
        (sync("base", "s.qcow2", "used"), "New overlay node-name already in use"),
        (sync("base", "nodir/s.qcow2", "s"),
         "Could not create 'D/nodir/s.qcow2': No such file or directory"),
        (sync("base", "s.raw", "s", format="raw"),
         "Backing file not supported for file format 'raw'"),
        (sync("base", "s.raw", "s", format="file"),
         "Backing file not supported for file format 'file'"),
        (sync("base", "s.raw", "s", format="blkdebug"),
         "Format driver 'blkdebug' does not support image creation"),
        (sync("base", "s.qcow2", "s", format="nope"), "Unknown file format 'nope'"),
        (sync("base", "base.qcow2", "s"),
         "Error: Trying to create an image with the same filename as the backing file"),
        (sync("base", "used.qcow2", "s"), 'Failed to get "write" lock'),
        (sync("base", "none.qcow2", "s", mode="existing"),
         "Could not open 'D/none.qcow2': No such file or directory"),
        (sync("base", "r.raw", "s", mode="existing", format="raw"),
         "The overlay does not support backing images"),
        (sync("base", "s.qcow2", "s", mode="relative"),
         "Parameter 'mode' does not accept value 'relative'"),
        ({"node-name": "base"}, "Parameter 'snapshot-file' is missing"),
    ]  # fmt: skip
    for args, desc in cases:
        assert pair.error("blockdev-snapshot-sync", args) == desc
    for side in pair.sides:
        assert not (side.dir / "s.qcow2").exists()
        assert not (side.dir / "s.raw").exists()
    nodes = [side.nodes() for side in pair.sides]
    assert nodes[0] == nodes[1]
    assert all(not ro for _, _, ro, _ in nodes[1])
    # a bad node name is found once the file is made: QSD leaves the file,
    # blockd takes it back (README)
    for name, desc in (("#x", "Invalid node-name: '#x'"), ("x" * 40, "Node name too long")):
        assert pair.error("blockdev-snapshot-sync", sync("base", "s.qcow2", name)) == desc
        assert (pair.sides[0].dir / "s.qcow2").exists()
        assert not (pair.sides[1].dir / "s.qcow2").exists()


def test_snapshot_sync_of_an_exported_disk(pair: Pair) -> None:
    """The overlay is created (the same bytes as QSD's), put on top, serves the
    export, and goes away with the export (nobody owns it), as in QSD."""
    pair.images("base.qcow2")
    for side in pair.sides:
        qemu_io(side.dir / "base.qcow2", "write -P 0x11 0 8M")
    pair.add("base", "base.qcow2")
    pair.export("base", "disk")
    pair.ok("blockdev-snapshot-sync", sync("base", "s1.qcow2", "s1"))
    qsd, blockd = pair.sides
    assert qsd.image_bytes("s1.qcow2") == blockd.image_bytes("s1.qcow2")
    for side in pair.sides:
        side.io("disk", "write -P 0x22 1M 1M", "read -P 0x11 0 1M", "read -P 0x11 2M 6M")
    assert [s.exports() for s in pair.sides] == [[("disk", "s1")]] * 2
    # on top of that one, in a transaction
    pair.ok("transaction", {"actions": [
        {"type": "blockdev-snapshot-sync", "data": sync("s1", "s2.qcow2", "s2")}]})
    for side in pair.sides:
        side.io("disk", "write -P 0x33 3M 1M", "read -P 0x22 1M 1M")
    nodes = [side.nodes() for side in pair.sides]
    assert nodes[0] == nodes[1]
    assert ("s1", "qcow2", True, "D/base.qcow2") in nodes[1]
    assert pair.error("blockdev-del", {"node-name": "s2"}) == "Node s2 is in use"
    assert pair.error("blockdev-del", {"node-name": "s1"}) == (
        "Node 's1' is busy: node is used as backing hd of 's2'"
    )
    pair.ok("block-export-del", {"id": "disk", "mode": "hard"})
    for side in pair.sides:
        side.qmp.wait_event("BLOCK_EXPORT_DELETED", id="disk")
    # the overlays went with their last user
    assert [side.nodes() for side in pair.sides] == [[("base", "qcow2", True, "")]] * 2
    assert pair.sides[0].events() == pair.sides[1].events()
    for side in pair.sides:
        side.qmp.close()
        side.daemon.stop()
    for image in ("base.qcow2", "s1.qcow2", "s2.qcow2"):
        check(blockd.dir / image)
        assert qsd.info(image) == blockd.info(image)
        pair.compare(image)


def test_snapshot_sync_of_a_node_nobody_uses(pair: Pair) -> None:
    """Nothing uses the node: the new overlay has no user and is closed at
    once (QSD drops its last reference); the image stays, the node frozen."""
    pair.images("base.qcow2", "ro.qcow2")
    pair.add("base", "base.qcow2")
    pair.add("ro", "ro.qcow2", **{"read-only": True})
    pair.ok("blockdev-snapshot-sync", sync("base", "s.qcow2", "s"))
    pair.ok("blockdev-snapshot-sync", sync("ro", "t.qcow2", "t"))
    assert [side.nodes() for side in pair.sides] == [
        [("base", "qcow2", True, ""), ("ro", "qcow2", True, "")]] * 2
    # mode existing: the image made just before serves again
    pair.ok("blockdev-snapshot-sync", sync("base", "s.qcow2", "s", mode="existing"))
    qsd, blockd = pair.sides
    for image in ("s.qcow2", "t.qcow2"):
        assert qsd.info(image) == blockd.info(image)
        check(blockd.dir / image)
    assert pair.sides[0].events() == pair.sides[1].events() == []


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_transaction_with_snapshot_sync(pair: Pair, existed: bool) -> None:
    """Everything is undone; QSD leaves the image it created (and an empty
    file it found is a qcow2 image from then on), blockd takes it back."""
    before = two_disks(pair)
    if existed:
        for side in pair.sides:
            (side.dir / "new.qcow2").write_bytes(b"")
    actions = [
        {"type": "blockdev-snapshot-sync", "data": sync("b", "new.qcow2", "new")},
        snap("a", "a1"),
        {"type": "abort", "data": {}},
    ]
    assert pair.error("transaction", {"actions": actions}) == (
        "Transaction aborted using Abort action"
    )
    unchanged(pair, before)
    qsd, blockd = pair.sides
    assert "backing-filename" in qsd.info("new.qcow2")
    if existed:
        assert (blockd.dir / "new.qcow2").read_bytes() == b""
    else:
        assert not (blockd.dir / "new.qcow2").exists()
    pair.ok("transaction", {"actions": actions[:2]})
    assert [side.exports() for side in pair.sides] == [[("a", "a1"), ("b", "new")]] * 2
    assert qsd.image_bytes("new.qcow2") == blockd.image_bytes("new.qcow2")


@pytest.mark.parametrize("present", ["none", "empty", "image"])
def test_an_action_whose_turn_never_comes_makes_nothing(pair: Pair, present: str) -> None:
    """blockd makes a new image before the exports are held (README); when an
    earlier action fails, that image is taken back: as in QSD, which never got
    to it, the file is as it was (absent, empty, or an image left alone)."""
    before = two_disks(pair)
    for side in pair.sides:
        if present == "empty":
            (side.dir / "new.qcow2").write_bytes(b"")
        elif present == "image":
            create(side.dir / "new.qcow2", "1M")
    was = {side.name: (side.dir / "new.qcow2").read_bytes() if present != "none" else None
           for side in pair.sides}  # fmt: skip
    actions = [
        snap("a", "a1"),
        {"type": "abort", "data": {}},
        {"type": "blockdev-snapshot-sync", "data": sync("b", "new.qcow2", "new")},
    ]
    assert pair.error("transaction", {"actions": actions}) == (
        "Transaction aborted using Abort action"
    )
    unchanged(pair, before)
    for side in pair.sides:
        path = side.dir / "new.qcow2"
        assert (path.read_bytes() if path.exists() else None) == was[side.name]


def test_a_read_only_overlay_takes_a_read_only_export(pair: Pair) -> None:
    """Allowed in both; blockd opens the overlay read-write just for its header
    (README) and leaves it read-only again."""
    pair.images("base.qcow2", "ov.qcow2")
    pair.add("base", "base.qcow2", **{"read-only": True})
    pair.add("ov", "ov.qcow2", backing=None, **{"read-only": True})
    pair.export("base", "disk", writable=False)
    pair.ok("blockdev-snapshot", {"node": "base", "overlay": "ov"})
    assert [s.exports() for s in pair.sides] == [[("disk", "ov")]] * 2
    nodes = [side.nodes() for side in pair.sides]
    assert [n[:3] for n in nodes[0]] == [n[:3] for n in nodes[1]]
    assert ("ov", "qcow2", True, "D/base.qcow2") in nodes[1]
    for side in pair.sides:
        side.qmp.close()
        side.daemon.stop()
    assert pair.sides[1].info("ov.qcow2")["backing-filename"] == "D/base.qcow2"
    check(pair.sides[1].dir / "ov.qcow2")


@pytest.mark.parametrize("size", ["32M", "128M"])
def test_an_overlay_of_another_size(pair: Pair, size: str) -> None:
    """QEMU does not compare sizes: the export serves the overlay's, the rest
    reads as the overlay's chain does; blockd the same."""
    pair.images("base.qcow2")
    pair.images("ov.qcow2", size=size, backing="base.qcow2")
    for side in pair.sides:
        qemu_io(side.dir / "base.qcow2", "write -P 0x11 0 64M")
    pair.add("base", "base.qcow2")
    pair.add("ov", "ov.qcow2", backing=None)
    pair.export("base", "disk")
    pair.ok("blockdev-snapshot", {"node": "base", "overlay": "ov"})
    sizes = [[n["image"]["virtual-size"] for n in side.ask(
        "query-named-block-nodes", {"flat": True})["return"] if n["node-name"] == "ov"]
        for side in pair.sides]  # fmt: skip
    assert sizes[0] == sizes[1]
    for side in pair.sides:
        side.io("disk", "write -P 0x22 1M 1M", "read -P 0x11 0 1M")
    assert [s.exports() for s in pair.sides] == [[("disk", "ov")]] * 2
    for side in pair.sides:
        side.qmp.close()
        side.daemon.stop()
    check(pair.sides[1].dir / "ov.qcow2")
    pair.compare("ov.qcow2")
