"""Broken or unsupported images are refused with ImageError and left byte-for-byte alone."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from blockd.block.graph import BlockGraph
from blockd.errors import BlockIOError, ImageError

from .conftest import (
    assert_clean,
    check,
    create,
    data_on_refcount_block,
    open_qcow2,
    qemu_io,
)

Patch = Callable[[bytearray], None]


def put(fmt: str, offset: int, *values: int) -> Patch:
    def patch(buf: bytearray) -> None:
        struct.pack_into(fmt, buf, offset, *values)

    return patch


def truncate_to(n: int) -> Patch:
    def patch(buf: bytearray) -> None:
        del buf[n:]

    return patch


CASES: list[tuple[str, Patch, str]] = [
    ("bad-magic", put(">I", 0, 0x51464900), "not in qcow2 format"),
    ("truncated-50", truncate_to(50), "too short"),
    ("truncated-90", truncate_to(90), "too short"),
    ("version-4", put(">I", 4, 4), "Unsupported qcow2 version 4"),
    ("cluster-bits-8", put(">I", 20, 8), "Unsupported cluster size: 2^8"),
    ("cluster-bits-22", put(">I", 20, 22), "Unsupported cluster size: 2^22"),
    ("crypt-aes", put(">I", 32, 1), "encrypted"),
    ("crypt-luks", put(">I", 32, 2), "encrypted"),
    ("l1-unaligned", put(">Q", 40, 0x30200), "Active L1 table offset invalid"),
    ("l1-past-eof", put(">Q", 40, 0x7770000), "Invalid L1 table offset"),
    ("l1-over-header", put(">Q", 40, 0), "Invalid L1 table offset"),
    ("l1-too-small", put(">I", 36, 0), "L1 table is too small"),
    ("l1-over-reftable", put(">Q", 40, 0x10000), "overlaps the reference count table"),
    ("reftable-unaligned", put(">Q", 48, 0x10008), "Reference count table offset invalid"),
    ("reftable-past-eof", put(">Q", 48, 0x9990000), "Invalid reference count table offset"),
    ("reftable-over-header", put(">Q", 48, 0), "Invalid reference count table offset"),
    ("no-reftable", put(">I", 56, 0), "reference count table"),
    (
        "unknown-incompat",
        put(">Q", 72, 1 << 20),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000",
    ),
    ("extended-l2-bit", put(">Q", 72, 1 << 4), "extended L2 entries"),
    ("data-file-bit", put(">Q", 72, 1 << 2), "external data file"),
    ("header-length-short", put(">I", 100, 96), "header too short"),
    ("refcount-order-7", put(">I", 96, 7), "Reference count entry width too large"),
    ("backing-offset-huge", put(">QI", 8, 0x20000, 5), "Invalid backing file offset"),
    ("zstd-without-bit", put(">B", 104, 1), "Compression type incompatible feature bit"),
]


@pytest.mark.parametrize(
    ("patch", "message"), [(p, m) for _n, p, m in CASES], ids=[n for n, _p, _m in CASES]
)
@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
async def test_refused(
    tmp_path: Path, graph: BlockGraph, patch: Patch, message: str, read_only: bool
) -> None:
    img = create(tmp_path / "bad.qcow2", "1M")
    buf = bytearray(img.read_bytes())
    patch(buf)
    img.write_bytes(bytes(buf))
    with pytest.raises(ImageError) as info:
        await open_qcow2(graph, img, read_only=read_only)
    assert message in str(info.value)
    assert img.read_bytes() == bytes(buf)
    assert len(graph) == 0  # the file node opened on the way was closed again


async def test_refused_read_write_only(tmp_path: Path, graph: BlockGraph) -> None:
    # (a dirty image is repaired instead: test_repair.py)
    message = "Image is corrupt; cannot be opened read/write"
    img = create(tmp_path / "c.qcow2", "1M")
    qemu_io(img, "write -P 0x42 0 4k")
    buf = bytearray(img.read_bytes())
    struct.pack_into(">Q", buf, 72, 1 << 1)
    img.write_bytes(bytes(buf))
    with pytest.raises(ImageError, match=message):
        await open_qcow2(graph, img)
    assert img.read_bytes() == bytes(buf)
    node = await open_qcow2(graph, img, read_only=True)
    assert await node.read(0, 4096) == b"\x42" * 4096
    with pytest.raises(ImageError, match=message):
        await node.reopen(read_only=False)
    assert node.read_only
    await graph.close_all()
    assert img.read_bytes() == bytes(buf)


async def test_real_extended_l2_and_data_file(tmp_path: Path, graph: BlockGraph) -> None:
    ext = create(tmp_path / "e.qcow2", "1M", extra="extended_l2=on")
    before = ext.read_bytes()
    with pytest.raises(ImageError, match="extended L2 entries"):
        await open_qcow2(graph, ext, read_only=True)
    assert ext.read_bytes() == before
    df = create(tmp_path / "d.qcow2", "1M", extra=f"data_file={tmp_path / 'd.raw'}")
    before = df.read_bytes()
    with pytest.raises(ImageError, match="external data file"):
        await open_qcow2(graph, df)
    assert df.read_bytes() == before


async def test_unknown_autoclear_bits_cleared(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "a.qcow2", "1M")
    buf = bytearray(img.read_bytes())
    struct.pack_into(">Q", buf, 88, (1 << 5) | 1)
    struct.pack_into(">Q", buf, 80, 1 << 7)  # an unknown compatible bit must survive
    img.write_bytes(bytes(buf))
    node = await open_qcow2(graph, img, read_only=True)
    await graph.close_all()
    assert img.read_bytes() == bytes(buf)  # read-only: untouched
    node = await open_qcow2(graph, img)
    await node.write(0, b"x" * 512)
    await graph.close_all()
    data = img.read_bytes()
    assert struct.unpack_from(">Q", data, 88)[0] == 0
    assert struct.unpack_from(">Q", data, 80)[0] == 1 << 7
    assert_clean(img)


async def test_write_onto_metadata_marks_corrupt(
    tmp_path: Path, graph: BlockGraph, caplog: pytest.LogCaptureFixture
) -> None:
    img = tmp_path / "m.qcow2"
    refblock = data_on_refcount_block(img)
    node = await open_qcow2(graph, img)
    with pytest.raises(BlockIOError) as info:
        await node.write(0, b"\xff" * 512)
    assert info.value.errno == errno.EIO
    assert str(info.value) == "Input/output error"  # what QEMU tells a client or job
    assert "qcow2: Marking image as corrupt: Preventing invalid write on metadata" in caplog.text
    with pytest.raises(BlockIOError):
        await node.write(4096, b"\xff")
    await graph.close_all()
    data = img.read_bytes()
    assert data[0x20000:0x30000] == refblock  # the refcount block survived
    assert struct.unpack_from(">Q", data, 72)[0] & 2  # corrupt bit set on disk
    assert check(img)["corruptions"] > 0
    with pytest.raises(ImageError, match="corrupt"):
        await open_qcow2(BlockGraph(), img)
