"""BLOCK_IMAGE_CORRUPTED as qemu-storage-daemon 7.2 sends it.

Images damaged the way tests/block/test_image_rules.py damages them (a zero
flag in a version 2 L2 entry, unaligned L2 or cluster offsets: qemu-img makes
them, the test patches one entry) are opened read-only or read-write and read
through an NBD export.  QSD fails the read and tells every QMP client once per
node, with the driver's reason, whether it marked the image corrupt (``fatal``)
and no offset or size for these cases; blockd must send the same event.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.block.test_image_rules import READ_CASES, image
from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, check_event, start_blockd, start_qsd
from tests.interop.test_blkdebug_differential import nbd_connect, nbd_request

pytestmark = pytest.mark.qsd

EIO = 5


def corrupt_events(
    start: Callable[[Path], DaemonProcess], d: Path, damaged: bytes, read_only: bool
) -> tuple[list[Any], list[int]]:
    """The BLOCK_IMAGE_CORRUPTED data seen, and the NBD errors of the reads."""
    path = d / "damaged.qcow2"
    path.write_bytes(damaged)
    sock = d / "qmp.sock"
    daemon = start(sock)
    try:
        with RawQMP(sock) as qmp:
            qmp.negotiate()
            nbd_path = d / "nbd.sock"
            addr = {"type": "unix", "data": {"path": str(nbd_path)}}
            assert qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
            args = {"driver": "qcow2", "node-name": "img", "read-only": read_only,
                    "file": {"driver": "file", "filename": str(path)}}  # fmt: skip
            assert qmp.execute("blockdev-add", args) == {"return": {}}
            export = {"type": "nbd", "id": "e", "node-name": "img"}
            assert qmp.execute("block-export-add", export) == {"return": {}}
            sock_nbd = nbd_connect(nbd_path, "img")
            try:
                errors = [nbd_request(sock_nbd, 1, ("read", 0, 65536))]
                errors.append(nbd_request(sock_nbd, 2, ("read", 0, 4096)))
            finally:
                sock_nbd.close()
            # a command after the reads: every event sent before its reply is in
            assert qmp.execute("query-block-exports")["return"]
            events = [e["data"] for e in qmp.events if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
    finally:
        daemon.stop()
    return events, errors


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
@pytest.mark.parametrize("case", sorted(READ_CASES))
def test_corruption_event_as_qsd(
    sock_dir: Path, tmp_path: Path, case: str, read_only: bool
) -> None:
    require_tool("qemu-storage-daemon")
    compat, damage, reason = READ_CASES[case]
    buf = bytearray(image(tmp_path / "src.qcow2", compat).read_bytes())
    damage(buf)
    results = []
    for name, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = sock_dir / name
        d.mkdir()
        results.append(corrupt_events(start, d, bytes(buf), read_only))
    (qsd_events, qsd_errors), (events, errors) = results
    assert qsd_events == [{"device": "", "node-name": "img", "msg": reason,
                           "fatal": not read_only}]  # fmt: skip
    assert events == qsd_events
    check_event("BLOCK_IMAGE_CORRUPTED", events[0])
    assert errors[0] == qsd_errors[0] == EIO
    assert errors[1] != 0 and qsd_errors[1] != 0


def test_overlap_event_as_qsd(sock_dir: Path, tmp_path: Path) -> None:
    """A data cluster that is also the refcount block: a write to it is refused,
    and the event carries the refused host range as offset and size."""
    require_tool("qemu-storage-daemon")
    buf = bytearray(image(tmp_path / "src.qcow2", "1.1").read_bytes())
    reftable = struct.unpack_from(">Q", buf, 48)[0]
    refblock = struct.unpack_from(">Q", buf, reftable)[0]
    l2 = struct.unpack_from(">Q", buf, struct.unpack_from(">Q", buf, 40)[0])[0] & ~(1 << 63)
    struct.pack_into(">Q", buf, l2, refblock | 1 << 63)  # guest cluster 0, marked COPIED
    results = []
    for name, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = sock_dir / name
        d.mkdir()
        results.append(overlap_events(start, d, bytes(buf)))
    qsd, ours = results
    assert qsd[0] == [{"device": "", "node-name": "img", "fatal": True, "offset": refblock + 4096,
                       "size": 4096, "msg": "Preventing invalid write on metadata "
                       "(overlaps with refcount block)"}]  # fmt: skip
    assert ours == qsd


def overlap_events(
    start: Callable[[Path], DaemonProcess], d: Path, damaged: bytes
) -> tuple[list[Any], int]:
    path = d / "damaged.qcow2"
    path.write_bytes(damaged)
    sock = d / "qmp.sock"
    daemon = start(sock)
    try:
        with RawQMP(sock) as qmp:
            qmp.negotiate()
            nbd_path = d / "nbd.sock"
            addr = {"type": "unix", "data": {"path": str(nbd_path)}}
            assert qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
            args = {"driver": "qcow2", "node-name": "img",
                    "file": {"driver": "file", "filename": str(path)}}  # fmt: skip
            assert qmp.execute("blockdev-add", args) == {"return": {}}
            export = {"type": "nbd", "id": "e", "node-name": "img", "writable": True}
            assert qmp.execute("block-export-add", export) == {"return": {}}
            sock_nbd = nbd_connect(nbd_path, "img")
            try:
                error = nbd_request(sock_nbd, 1, ("write", 4096, 4096))
            finally:
                sock_nbd.close()
            assert qmp.execute("query-block-exports")["return"]
            events = [e["data"] for e in qmp.events if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
    finally:
        daemon.stop()
    for event in events:
        check_event("BLOCK_IMAGE_CORRUPTED", event)
    return events, error
