"""The rules of docs/interop/qcow2.txt, broken one at a time, against qemu-storage-daemon 7.2.

Each case damages one field of a fresh image (version 2 or 3) the way the
spec forbids or reserves, then opens a copy in each daemon, read-only and
read-write.  Both must answer ``blockdev-add`` alike, word for word (never an
"Internal error"), and leave byte-identical files behind.  Rules that only
bite when a cluster is read are judged by qemu-io on the same bytes.
"""

from __future__ import annotations

import errno
import json
import logging
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockd.block.graph import BlockGraph
from blockd.errors import BlockIOError
from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd

from .conftest import check, create, open_qcow2, qemu_io, run

pytestmark = pytest.mark.qsd

Patch = Callable[[bytearray], None]
OFFSET = 0x00FFFFFFFFFFFE00


def put(fmt: str, offset: int, *values: int) -> Patch:
    def patch(buf: bytearray) -> None:
        struct.pack_into(fmt, buf, offset, *values)

    return patch


def both(*patches: Patch) -> Patch:
    def patch(buf: bytearray) -> None:
        for p in patches:
            p(buf)

    return patch


def _l1_entry(buf: bytearray) -> int:
    return int(struct.unpack_from(">Q", buf, 40)[0])


def _l2_entry(buf: bytearray) -> int:
    return int(struct.unpack_from(">Q", buf, _l1_entry(buf))[0]) & OFFSET


def _reftable_entry(buf: bytearray) -> int:
    return int(struct.unpack_from(">Q", buf, 48)[0])


def set_bits(where: Callable[[bytearray], int], bits: int) -> Patch:
    """OR ``bits`` into the u64 at the offset ``where`` finds (an L1, L2 or reftable entry)."""

    def patch(buf: bytearray) -> None:
        pos = where(buf)
        struct.pack_into(">Q", buf, pos, struct.unpack_from(">Q", buf, pos)[0] | bits)

    return patch


def image(path: Path, compat: str) -> Path:
    img = create(path, "1M", compat=compat)
    qemu_io(img, "write -P 0x42 0 128k")
    return img


V3, V2 = "1.1", "0.10"
EXT = 112  # where QEMU 7.2 puts the first header extension of a v3 image

#: case -> (compat, damage).  Open-time rules: fields, features, extensions.
OPEN_CASES: dict[str, tuple[str, Patch]] = {
    "bad-magic": (V3, put(">I", 0, 0x51464900)),
    "version-1": (V3, put(">I", 4, 1)),
    "version-4": (V3, put(">I", 4, 4)),
    "cluster-bits-8": (V3, put(">I", 20, 8)),
    "cluster-bits-22": (V3, put(">I", 20, 22)),
    "crypt-aes": (V3, put(">I", 32, 1)),
    "crypt-luks": (V3, put(">I", 32, 2)),
    "crypt-unknown": (V3, put(">I", 32, 3)),
    "l1-unaligned": (V3, put(">Q", 40, 0x30200)),
    "l1-past-eof": (V3, put(">Q", 40, 0x7770000)),
    "l1-over-header": (V3, put(">Q", 40, 0)),
    "l1-too-small": (V3, put(">I", 36, 0)),
    "l1-over-reftable": (V3, put(">Q", 40, 0x10000)),
    "reftable-unaligned": (V3, put(">Q", 48, 0x10008)),
    "reftable-past-eof": (V3, put(">Q", 48, 0x9990000)),
    "reftable-over-header": (V3, put(">Q", 48, 0)),
    "no-reftable": (V3, put(">I", 56, 0)),
    "v3-header-length-100": (V3, put(">I", 100, 100)),
    "v3-header-length-108": (V3, put(">I", 100, 108)),
    "v3-header-length-120": (V3, put(">I", 100, 120)),
    "v3-header-length-past-cluster": (V3, put(">I", 100, 0x10008)),
    "v2-refcount-order-field-ignored": (V2, put(">I", 96, 5)),
    "v3-refcount-order-3": (V3, put(">I", 96, 3)),
    "v3-refcount-order-7": (V3, put(">I", 96, 7)),
    "v3-dirty": (V3, put(">Q", 72, 1)),
    "v3-corrupt": (V3, put(">Q", 72, 2)),
    "v3-unknown-incompat": (V3, put(">Q", 72, 1 << 33)),
    "v3-known-and-unknown-incompat": (V3, put(">Q", 72, (1 << 33) | (1 << 4) | (1 << 2))),
    "v3-unknown-compat": (V3, put(">Q", 80, 1 << 9)),
    "v3-lazy-refcounts-clean": (V3, put(">Q", 80, 1)),
    "v3-unknown-autoclear": (V3, put(">Q", 88, (1 << 9) | 1)),
    "v3-raw-data-without-data-file": (V3, put(">Q", 88, 2)),
    "v3-zstd": (V3, both(put(">Q", 72, 8), put(">B", 104, 1))),
    "v3-unknown-compression": (V3, both(put(">Q", 72, 8), put(">B", 104, 2))),
    "v3-compression-bit-with-deflate": (V3, put(">Q", 72, 8)),
    "v3-zstd-without-bit": (V3, put(">B", 104, 1)),
    "v3-padding-not-zero": (V3, put(">B", 105, 7)),
    "v3-extension-too-large": (V3, put(">I", EXT + 4, 0x10000)),
    "v3-unknown-extension": (V3, put(">I", EXT, 0x12345678)),
    "v3-backing-format-too-long": (V3, put(">II", EXT, 0xE2792ACA, 40)),
    "v3-bitmaps-bad-length": (V3, put(">II", EXT, 0x23852875, 8)),
    "v3-bitmaps-no-bitmaps": (
        V3,
        both(put(">II", EXT, 0x23852875, 24), put(">IIQQ", EXT + 8, 0, 0, 0, 0x10000),
             put(">Q", 88, 1)),
    ),
    "v3-bitmaps-unaligned-directory": (
        V3,
        both(put(">II", EXT, 0x23852875, 24), put(">IIQQ", EXT + 8, 1, 0, 64, 0x10008),
             put(">Q", 88, 1)),
    ),
    "v3-bitmaps-too-many": (
        V3,
        both(put(">II", EXT, 0x23852875, 24), put(">IIQQ", EXT + 8, 70000, 0, 64, 0x10000),
             put(">Q", 88, 1)),
    ),
    "v3-bitmaps-stale-without-autoclear": (
        V3,
        both(put(">II", EXT, 0x23852875, 24), put(">IIQQ", EXT + 8, 1, 0, 64, 0x10000)),
    ),
    "v3-crypto-extension-without-luks": (V3, put(">II", EXT, 0x0537BE77, 16)),
    "v3-data-file-extension-without-bit": (V3, put(">II", EXT, 0x44415441, 4)),
    "v2-extension-at-72": (V2, put(">IIQ", 72, 0x12345678, 8, 0)),
    "v2-garbage-at-72": (V2, put(">II", 72, 0x11111111, 0x7FFFFFFF)),
    "v3-snapshot-table-unaligned": (V3, both(put(">I", 60, 1), put(">Q", 64, 0x10008))),
    "v3-too-many-snapshots": (V3, both(put(">I", 60, 70000), put(">Q", 64, 0x10000))),
    "v3-backing-offset-with-empty-name": (V3, put(">QI", 8, 0x200, 0)),
    "v3-backing-name-too-long": (V3, put(">QI", 8, 0x200, 1024)),
    "v3-backing-name-past-cluster": (V3, put(">QI", 8, 0xFFF0, 0x20)),
    "v3-size-too-big": (V3, put(">Q", 24, 1 << 62)),
    "v3-l1-too-large": (V3, put(">I", 36, 0x7FFFFFFF)),
    "v3-reftable-too-large": (V3, put(">I", 56, 0x7FFFFFFF)),
    "v3-reftable-entry-reserved-bits": (V3, set_bits(_reftable_entry, 0x1FF)),
    "v3-l1-entry-reserved-bits": (V3, set_bits(_l1_entry, 0x1FF | (0x7F << 56))),
    "v3-l2-entry-reserved-bits": (V3, set_bits(_l2_entry, 0x1FE | (0x3F << 56))),
}


#: Where blockd answers differently on purpose (block/README.md, "Policies"):
#: case -> (modes, words blockd's refusal holds, or None when both open it).
#: Everything else must match qemu-storage-daemon exactly.
DELIBERATE: dict[str, tuple[tuple[bool, ...], str | None]] = {
    # encryption is not implemented: refused by name, before any key is asked for
    "crypt-aes": ((True, False), "encrypted images are not supported"),
    "crypt-luks": ((True, False), "encrypted images are not supported"),
    # tables outside the file or over other metadata: QEMU opens these and then
    # fails or corrupts on the first I/O that touches them; blockd refuses at open
    "l1-over-header": ((True, False), "overlaps the image header"),
    "l1-over-reftable": ((True, False), "overlaps the reference count table"),
    "l1-past-eof": ((True, False), "beyond the end of the file"),
    "reftable-over-header": ((True, False), "overlaps the image header"),
    "reftable-past-eof": ((True, False), "beyond the end of the file"),
    # both repair a dirty image on a read-write open, QEMU by fixing counters in
    # place, blockd by writing a new refcount structure past the end of the file
    # (block/README.md, "lazy refcounts"); tests/block/test_repair.py judges it
    "v3-dirty": ((False,), None),
    # blockd keeps no bitmaps, so a read-write open clears every autoclear bit
    # (QEMU keeps the bitmaps bit it maintains) and leaves a stale bitmaps
    # extension in place (QEMU rewrites the header without it); both are
    # harmless: without the bit every reader ignores the bitmaps
    "v3-unknown-autoclear": ((False,), None),
    "v3-bitmaps-stale-without-autoclear": ((False,), None),
}


@pytest.fixture(scope="module")
def daemons() -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    require_tool("qemu-storage-daemon")
    with tempfile.TemporaryDirectory(prefix="blockd-") as d:
        qsd = start_qsd(Path(d) / "qsd.sock")
        blockd = start_blockd(Path(d) / "blockd.sock")
        try:
            yield qsd, blockd
        finally:
            qsd.stop()
            blockd.stop()
        assert "Internal error" not in blockd.stderr()
        assert "Traceback" not in blockd.stderr()


def _add(daemon: DaemonProcess, path: Path, read_only: bool) -> dict[str, Any]:
    with RawQMP(daemon.socket_path) as client:
        client.negotiate()
        reply: dict[str, Any] = client.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "n",
                "read-only": read_only,
                "file": {"driver": "file", "filename": str(path)},
            },
        )
        if "return" in reply:
            assert client.execute("blockdev-del", {"node-name": "n"}) == {"return": {}}
        return reply


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
@pytest.mark.parametrize("case", sorted(OPEN_CASES))
def test_open_rule_like_qsd(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path, case: str, read_only: bool
) -> None:
    compat, damage = OPEN_CASES[case]
    buf = bytearray(image(tmp_path / "src.qcow2", compat).read_bytes())
    damage(buf)
    replies = []
    files = []
    for daemon, name in zip(daemons, ("qsd", "blockd"), strict=True):
        path = tmp_path / f"{name}.qcow2"
        path.write_bytes(bytes(buf))
        replies.append(_add(daemon, path, read_only))
        files.append(path.read_bytes())
    assert "Internal error" not in str(replies[1])
    modes, words = DELIBERATE.get(case, ((), None))
    if read_only not in modes:
        assert replies[1] == replies[0]
        assert files[1] == files[0], "the daemons left different bytes behind"
    elif words is None:
        assert replies[1] == replies[0] == {"return": {}}
    else:
        assert replies[1]["error"]["class"] == "GenericError"
        assert words in replies[1]["error"]["desc"]
        assert files[1] == bytes(buf), "a refused image must stay untouched"


# -- rules that bite when a cluster is read ----------------------------------------

#: case -> (compat, damage, QEMU's reason)
READ_CASES: dict[str, tuple[str, Patch, str]] = {
    "v2-zero-flag": (
        V2, set_bits(_l2_entry, 1),
        "Zero cluster entry found in pre-v3 image (L2 offset: 0x40000, L2 index: 0)",
    ),
    "v2-cluster-unaligned": (
        V2, set_bits(_l2_entry, 0x200),
        "Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0)",
    ),
    "v3-cluster-unaligned": (
        V3, set_bits(_l2_entry, 0x200),
        "Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0)",
    ),
    "v3-l2-table-unaligned": (
        V3, set_bits(_l1_entry, 0x200), "L2 table offset 0x40200 unaligned (L1 index: 0)",
    ),
}


def _damaged(tmp_path: Path, compat: str, damage: Patch) -> bytes:
    buf = bytearray(image(tmp_path / "src.qcow2", compat).read_bytes())
    damage(buf)
    return bytes(buf)


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
@pytest.mark.parametrize("case", sorted(READ_CASES))
async def test_read_rule_like_qemu_io(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, read_only: bool
) -> None:
    compat, damage, reason = READ_CASES[case]
    buf = _damaged(tmp_path, compat, damage)
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    theirs.write_bytes(buf)
    ours.write_bytes(buf)
    if read_only:
        line = f"qcow2: Image is corrupt: {reason}; further non-fatal corruption events " \
               "will be suppressed"
    else:
        line = f"qcow2: Marking image as corrupt: {reason}; further corruption events " \
               "will be suppressed"
    proc = run("qemu-io", *(["-r"] if read_only else []), "-f", "qcow2",
               "-c", "read 0 64k", "-c", "read 128k 4k", str(theirs), check=False)
    assert "read failed: Input/output error" in proc.stdout + proc.stderr
    assert line in proc.stderr

    graph = BlockGraph()
    try:
        node = await open_qcow2(graph, ours, read_only=read_only)
        with caplog.at_level(logging.ERROR):
            for _ in range(2):  # reported once, failed every time
                with pytest.raises(BlockIOError) as info:
                    await node.read(0, 65536)
                assert info.value.errno == errno.EIO
                assert str(info.value) == "Input/output error"
            with pytest.raises(BlockIOError):
                await node.block_status(0, 65536)
        assert [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()] == [line]
        if not read_only:
            with pytest.raises(BlockIOError):  # a node marked corrupt takes no writes
                await node.write(128 << 10, b"x" * 512)
    finally:
        await graph.close_all()
    # the same bytes on disk: untouched read-only; v3 read-write gets the corrupt bit
    assert ours.read_bytes() == theirs.read_bytes()
    assert (ours.read_bytes() != buf) == (not read_only and compat == V3)


async def test_v2_zero_flag_overwritten_whole_like_qemu_io(tmp_path: Path) -> None:
    """Writing a whole cluster needs no read of it: QEMU allows that; a partial
    write copies the rest of the cluster, so it fails."""

    def _second_l2_entry(buf: bytearray) -> int:
        return _l2_entry(buf) + 8

    buf = _damaged(
        tmp_path, V2, both(set_bits(_l2_entry, 1), set_bits(_second_l2_entry, 1))
    )
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    theirs.write_bytes(buf)
    ours.write_bytes(buf)
    proc = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 64k",
               "-c", "write -P 0x66 66048 512", str(theirs), check=False)
    assert "wrote 65536/65536" in proc.stdout
    assert "write failed: Input/output error" in proc.stdout + proc.stderr
    graph = BlockGraph()
    try:
        node = await open_qcow2(graph, ours)
        await node.write(0, b"\x55" * 65536)
        assert await node.read(0, 65536) == b"\x55" * 65536
        with pytest.raises(BlockIOError):
            await node.write(66048, b"\x66" * 512)
    finally:
        await graph.close_all()
    for img in (theirs, ours):
        qemu_io(img, "read -P 0x55 0 64k")
        assert check(img).get("corruptions", 0) == 0


async def test_v3_zero_flag_reads_zeros_like_qemu_io(tmp_path: Path) -> None:
    buf = _damaged(tmp_path, V3, set_bits(_l2_entry, 1))
    img = tmp_path / "z.qcow2"
    img.write_bytes(buf)
    qemu_io(img, "read -P 0 0 64k", "read -P 0x42 64k 64k")
    graph = BlockGraph()
    try:
        node = await open_qcow2(graph, img, read_only=True)
        assert await node.read(0, 131072) == bytes(65536) + b"\x42" * 65536
    finally:
        await graph.close_all()


def test_commit_from_v2_zero_flag_fails_like_qsd(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path
) -> None:
    """QSD fails the commit with EIO at the corrupt cluster instead of copying zeros."""
    results = []
    for daemon, name in zip(daemons, ("qsd", "blockd"), strict=True):
        d = tmp_path / name
        d.mkdir()
        base = create(d / "base.qcow2", "4M", compat=V2)
        mid = create(d / "mid.qcow2", "4M", compat=V2, backing=base)
        create(d / "top.qcow2", "4M", compat=V2, backing=mid)
        qemu_io(base, "write -P 0x11 0 1M")
        qemu_io(mid, "write -P 0x22 0 128k")
        buf = bytearray(mid.read_bytes())
        pos = _l2_entry(buf) + 8  # guest cluster 1
        struct.pack_into(">Q", buf, pos, struct.unpack_from(">Q", buf, pos)[0] | 1)
        mid.write_bytes(bytes(buf))
        with RawQMP(daemon.socket_path) as client:
            client.negotiate()
            for node, backing, ro in (("base", None, True), ("mid", "base", True),
                                      ("top", "mid", False)):
                file = {"driver": "file", "filename": str(d / f"{node}.qcow2")}
                assert client.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": node, "read-only": ro,
                    "backing": backing, "file": file}) == {"return": {}}
            assert client.execute("block-commit", {
                "job-id": "j", "device": "top", "top-node": "mid"}) == {"return": {}}
            client.wait_event("JOB_STATUS_CHANGE", status="null")
            events = []
            for event in client.events:
                data = dict(event["data"])
                if event["event"] == "BLOCK_IMAGE_CORRUPTED":
                    continue  # not emitted by blockd (the log has the same text)
                data.pop("offset", None)  # how far each got depends on its chunk size
                events.append((event["event"], data))
            for node in ("top", "mid", "base"):
                assert client.execute("blockdev-del", {"node-name": node}) == {"return": {}}
        results.append(events)
        info = run("qemu-img", "info", str(d / "top.qcow2")).stdout
        assert f"backing file: {mid}\n" in info  # the chain is as it was
    assert results[1] == results[0]
    assert ("BLOCK_JOB_COMPLETED", {"device": "j", "len": 4 << 20, "speed": 0,
                                    "type": "commit", "error": "Input/output error"}) \
        in results[1]


# -- the backing file name -------------------------------------------------------

def _with_backing_name(name: bytes) -> Patch:
    """Replace the header's backing name by ``name`` (same place, new length)."""

    def patch(buf: bytearray) -> None:
        offset = struct.unpack_from(">Q", buf, 8)[0]
        struct.pack_into(">I", buf, 16, len(name))
        buf[offset : offset + len(name)] = name

    return patch


#: name -> the header's backing name bytes; each daemon resolves it next to the image
BACKING_NAMES: dict[str, bytes] = {
    "nul-inside": b"b\0qcow2",  # QEMU reads a C string: the name is "b"
    "nul-at-end": b"base.qcow2\0",
    "nul-first": b"\0base.qcow2",  # an empty name: no backing file at all
    "max-length": b"x" * 1023,
    "too-long": b"x" * 1024,
}


@pytest.mark.parametrize("name", sorted(BACKING_NAMES))
def test_backing_name_like_qsd(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path, name: str
) -> None:
    replies = []
    for daemon, who in zip(daemons, ("qsd", "blockd"), strict=True):
        d = tmp_path / who
        d.mkdir()
        base = create(d / "base.qcow2", "1M")
        img = create(d / "top.qcow2", "1M", backing=base)
        buf = bytearray(img.read_bytes())
        _with_backing_name(BACKING_NAMES[name])(buf)
        img.write_bytes(bytes(buf))
        with RawQMP(daemon.socket_path) as client:
            client.negotiate()
            reply = client.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "top", "read-only": True,
                "file": {"driver": "file", "filename": str(img)}})
            nodes = client.execute("query-named-block-nodes")["return"]
            chain = sorted((n["node-name"].startswith("#"), n["drv"], n["file"]) for n in nodes)
            if "return" in reply:
                assert client.execute("blockdev-del", {"node-name": "top"}) == {"return": {}}
        replies.append(json.loads(json.dumps([reply, chain]).replace(str(d), "D")))
    assert "Internal error" not in str(replies[1])
    assert replies[1] == replies[0]


# -- reserved bits and a broken refcount table entry, met on I/O -------------------

RESERVED_BITS: dict[str, Patch] = {
    "l1-entry": set_bits(_l1_entry, 0x1FF | (0x7F << 56)),
    "l2-entry": set_bits(_l2_entry, 0x1FE | (0x3F << 56)),
    "reftable-entry": set_bits(_reftable_entry, 0x1FF),
}


@pytest.mark.parametrize("where", sorted(RESERVED_BITS))
async def test_reserved_bits_ignored_like_qemu_io(tmp_path: Path, where: str) -> None:
    """Reserved bits are masked off, as QEMU masks them: reads and writes work."""
    buf = _damaged(tmp_path, V3, RESERVED_BITS[where])
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    theirs.write_bytes(buf)
    ours.write_bytes(buf)
    qemu_io(theirs, "read -P 0x42 0 128k", "write -P 0x77 4k 4k", "write -P 0x78 512k 64k")
    graph = BlockGraph()
    try:
        node = await open_qcow2(graph, ours)
        assert await node.read(0, 131072) == b"\x42" * 131072
        await node.write(4096, b"\x77" * 4096)
        await node.write(512 << 10, b"\x78" * 65536)
    finally:
        await graph.close_all()
    for img in (theirs, ours):
        qemu_io(img, "read -P 0x77 4k 4k", "read -P 0x78 512k 64k")


async def test_unaligned_refcount_block_marks_corrupt_like_qemu_io(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading needs no refcounts; the first allocation finds the entry broken."""
    buf = _damaged(tmp_path, V3, set_bits(_reftable_entry, 0x200))
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    theirs.write_bytes(buf)
    ours.write_bytes(buf)
    line = ("qcow2: Marking image as corrupt: Refblock offset 0x20200 unaligned (reftable "
            "index: 0); further corruption events will be suppressed")
    proc = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x42 0 128k",
               "-c", "write -P 1 128k 64k", str(theirs), check=False)
    assert "write failed: Input/output error" in proc.stdout + proc.stderr
    assert line in proc.stderr
    graph = BlockGraph()
    try:
        node = await open_qcow2(graph, ours)
        assert await node.read(0, 131072) == b"\x42" * 131072
        with caplog.at_level(logging.ERROR), pytest.raises(BlockIOError) as info:
            await node.write(128 << 10, b"\x01" * 65536)
        assert str(info.value) == "Input/output error"
        assert line in caplog.text
    finally:
        await graph.close_all()
    assert ours.read_bytes() == theirs.read_bytes()  # the corrupt bit, nothing else
