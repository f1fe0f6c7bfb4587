"""Internal snapshots as query-named-block-nodes reports them, against qemu-storage-daemon 7.2.

Images get their snapshots from ``qemu-img snapshot -c``, or a snapshot table
written here field by field (extra data of every length QEMU knows, VM state
and clock values, ids and names QEMU cuts at a NUL, tables QEMU refuses).
Each image is opened read-only (images qemu-img made also read-write) in
both daemons and everything a client can see is compared: the reply to
``blockdev-add``, then every node's ``image`` (where ``snapshots`` appears,
its members and their order on the wire).
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd

from .conftest import create, qemu_io, run

pytestmark = pytest.mark.qsd


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


def _observe(
    daemon: DaemonProcess, image: Path, read_only: bool
) -> tuple[dict[str, Any], list[str]]:
    """blockdev-add's reply, and each node's ``image`` as raw wire text (member order counts)."""
    with RawQMP(daemon.socket_path) as client:
        client.negotiate()
        reply: dict[str, Any] = client.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "top", "read-only": read_only,
            "file": {"driver": "file", "filename": str(image)}})
        client.send('{"execute": "query-named-block-nodes"}')
        raw = client.read_line().decode()
        if "return" in reply:
            assert client.execute("blockdev-del", {"node-name": "top"}) == {"return": {}}
    # the image objects, cut out of the wire text so their member order is kept
    images = []
    pos = 0
    while (start := raw.find('"image": {', pos)) >= 0:
        depth, end = 0, start + len('"image": ')
        for end in range(end, len(raw)):  # noqa: B020 (the scan continues from there)
            depth += {"{": 1, "}": -1}.get(raw[end], 0)
            if depth == 0:
                break
        images.append(raw[start : end + 1])
        pos = end + 1
    return reply, sorted(images)


def _compare(
    daemons: tuple[DaemonProcess, DaemonProcess], image: Path, read_only: bool = True
) -> list[str]:
    theirs = _observe(daemons[0], image, read_only)
    ours = _observe(daemons[1], image, read_only)
    assert "Internal error" not in str(ours[0])
    assert ours == theirs
    return ours[1]


def test_snapshots_made_by_qemu_img(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path
) -> None:
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 1 0 64k")
    for name in ("first", "", "third with spaces"):
        run("qemu-img", "snapshot", "-c", name, str(base))
    top = create(tmp_path / "top.qcow2", "4M", backing=base)
    qemu_io(top, "write -P 2 64k 64k")
    run("qemu-img", "snapshot", "-c", "on-top", str(top))
    run("qemu-img", "snapshot", "-d", "first", str(base))  # ids need not be dense
    images = _compare(daemons, top)
    assert sum(i.count('"name": "third with spaces"') for i in images) == 2  # own + nested
    assert any('"name": "on-top"' in i for i in images)


@pytest.mark.parametrize(
    ("compat", "cluster_size"), [("0.10", 65536), ("1.1", 512), ("1.1", 2 << 20)]
)
def test_snapshots_other_layouts(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path, compat: str, cluster_size: int
) -> None:
    img = create(tmp_path / "s.qcow2", "8M", compat=compat, cluster_size=cluster_size)
    for n in range(5):
        qemu_io(img, f"write -P {n} {n}M 4k")
        run("qemu-img", "snapshot", "-c", f"s{n}", str(img))
    _compare(daemons, img)
    _compare(daemons, img, read_only=False)  # the list is the same in a read-write node


def _entry(ident: bytes, name: bytes, extra: bytes, *, vm_state: int = 0,
           date: tuple[int, int] = (1700000000, 123456789), vm_clock: int = 0) -> bytes:
    raw = struct.pack(">QIHHIIQII", 0x30000, 1, len(ident), len(name), date[0], date[1],
                      vm_clock, vm_state, len(extra))
    raw += extra + ident + name
    return raw + bytes(-len(raw) % 8)


def _extra(size: int, vm_state: int = 0, disk: int = 1 << 20, icount: int = 0) -> bytes:
    known = struct.pack(">QQQ", vm_state, disk, icount)
    return known[:size] + bytes(max(0, size - 24))


def _with_table(path: Path, count: int, table: bytes) -> Path:
    """An image whose header points at ``table`` (appended, cluster aligned)."""
    img = create(path, "1M")
    buf = bytearray(img.read_bytes())
    offset = -(-len(buf) // 65536) * 65536
    buf += bytes(offset - len(buf)) + table
    struct.pack_into(">IQ", buf, 60, count, offset)
    img.write_bytes(bytes(buf))
    return img


TABLES: dict[str, tuple[int, bytes]] = {
    # every length of extra data: icount only from 24 bytes on, vm-state-size
    # from the 64-bit field once there are 8, unknown extra data skipped
    "extra-lengths": (6, b"".join([
        _entry(b"1", b"none", b"", vm_state=4096),
        _entry(b"2", b"vm-state-large", _extra(8, vm_state=5 << 32), vm_state=7),
        _entry(b"3", b"disk-size", _extra(16, vm_state=8192)),
        _entry(b"4", b"icount", _extra(24, icount=987654321)),
        _entry(b"5", b"no-icount", _extra(24, icount=(1 << 64) - 1)),
        _entry(b"6", b"unknown-extra", _extra(40, icount=5)),
    ])),
    "clock-and-date": (2, b"".join([
        _entry(b"1", b"clock", _extra(24), vm_clock=12_345_678_901_234, date=(0, 999999999)),
        _entry(b"2", b"max", _extra(24), vm_clock=(1 << 64) - 1, date=(0xFFFFFFFF, 0xFFFFFFFF)),
    ])),
    "nul-in-id-and-name": (2, b"".join([
        _entry(b"7\0junk", b"na\0me", _extra(24)),
        _entry(b"", b"", _extra(24)),
    ])),
    "past-end-of-file": (3, _entry(b"1", b"only one written", _extra(24))),
    "too-much-extra-data": (2, _entry(b"1", b"ok", _extra(24)) + _entry(b"2", b"x", _extra(1032))),
    "zeros-past-eof": (600, b""),  # 600 empty 40-byte entries read from past EOF
    # 512 entries of 131112 bytes reach the 64 MiB limit; the 513th passes it
    "table-too-big-names": (513, _entry(b"i" * 65535, b"n" * 65535, b"") * 513),
}


@pytest.mark.parametrize("case", sorted(TABLES))
def test_crafted_snapshot_tables(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path, case: str
) -> None:
    count, table = TABLES[case]
    img = _with_table(tmp_path / "t.qcow2", count, table)
    _compare(daemons, img)
