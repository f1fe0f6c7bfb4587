"""open_node: blockdev-add options, header backing chains, error texts, rollback."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
import trio

from blockd.block.drivers.file import FileNode
from blockd.block.graph import BlockGraph
from blockd.block.info import allocated_sizes
from blockd.block.node import Status
from blockd.block.open import open_node
from blockd.errors import BlockError, ImageError
from tests.conftest import require_tool

from .conftest import assert_clean, create, open_qcow2, qemu_io, run

MiB = 1 << 20


async def test_missing_file(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "nosuch.qcow2"
    with pytest.raises(ImageError) as info:
        await open_qcow2(graph, path)
    assert str(info.value) == f"Could not open '{path}': No such file or directory"
    assert len(graph) == 0


async def test_node_names(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "a.qcow2", MiB)
    node = await open_qcow2(graph, img, name="base", read_only=True)
    assert node.node_name == "base"
    assert node.file is not None
    assert node.file.node_name.startswith("#block")
    with pytest.raises(BlockError) as info:
        await open_qcow2(graph, img, name="base", read_only=True)
    assert str(info.value) == "Duplicate nodes with node-name='base'"
    with pytest.raises(BlockError, match=r"Invalid node-name: '1bad'"):
        await open_qcow2(graph, img, name="1bad", read_only=True)
    with pytest.raises(BlockError, match="Node name too long"):
        await open_qcow2(graph, img, name="a" * 32, read_only=True)
    with pytest.raises(BlockError, match="Parameter 'driver' does not accept value 'nosuchdrv'"):
        await open_node(graph, {"driver": "nosuchdrv", "node-name": "x"})
    assert len(graph) == 2
    assert graph.lookup(str(img)) is node
    assert graph.lookup("base") is node


async def test_explicit_chain_by_node_name(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    qemu_io(base, "write -P 1 0 1M")
    mid = create(tmp_path / "mid.qcow2", MiB, backing=base)
    qemu_io(mid, "write -P 2 0 64k")
    top = create(tmp_path / "top.qcow2", MiB, backing=mid)
    b = await open_node(
        graph,
        {
            "driver": "qcow2",
            "node-name": "base",
            "backing": None,
            "file": {"driver": "file", "filename": str(base), "node-name": "f-base"},
        },
    )
    f_mid = await open_node(graph, {"driver": "file", "filename": str(mid), "node-name": "f-mid"})
    m = await open_node(
        graph, {"driver": "qcow2", "node-name": "mid", "backing": "base", "file": "f-mid"}
    )
    t = await open_node(
        graph,
        {
            "driver": "qcow2",
            "node-name": "top",
            "backing": "mid",
            "file": {"driver": "file", "filename": str(top)},
        },
    )
    assert m.file is f_mid
    assert [n.node_name for n in graph.chain(t)] == ["top", "mid", "base"]
    assert await t.read(0, 4) == b"\x02" * 4
    assert await t.read(65536, 4) == b"\x01" * 4
    assert await graph.is_allocated_above(t, b, 0, MiB) == (True, 65536)
    assert await graph.is_allocated_above(t, m, 0, MiB) == (False, MiB)
    assert graph.parents(b) == [(m, "backing")]
    other = create(tmp_path / "other.qcow2", MiB)
    with pytest.raises(BlockError) as info:
        await open_node(
            graph,
            {
                "driver": "qcow2",
                "node-name": "x",
                "backing": "nosuchnode",
                "file": {"driver": "file", "filename": str(other)},
            },
        )
    assert str(info.value) == (
        "Could not open backing file: Cannot find device='nosuchnode' nor node-name='nosuchnode'"
    )
    assert "x" not in graph


async def test_backing_null_reads_zeros(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    qemu_io(base, "write -P 1 0 1M")
    top = create(tmp_path / "top.qcow2", MiB, backing=base)
    node = await open_qcow2(graph, top, backing=None, read_only=True)
    assert node.backing is None
    assert await node.read(0, 10) == bytes(10)
    nested = await open_qcow2(
        graph,
        top,
        read_only=True,
        backing={"driver": "raw", "file": {"driver": "file", "filename": str(base)}},
    )
    assert nested.backing is not None
    assert nested.backing.driver == "raw"
    assert (await nested.read(0, 4))[:4] == b"QFI\xfb"  # base seen as raw, as asked


async def test_relative_backing_resolves_against_overlay_dir(
    tmp_path: Path, graph: BlockGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "images"
    d.mkdir()
    base = create(d / "base.qcow2", MiB)
    qemu_io(base, "write -P 7 0 1M")
    top = create(d / "top.qcow2", MiB, backing=Path("base.qcow2"))
    monkeypatch.chdir(tmp_path)  # base.qcow2 does not exist relative to the CWD
    node = await open_qcow2(graph, top, read_only=True)
    assert node.backing is not None
    assert node.backing.filename == str(d / "base.qcow2")
    assert await node.read(100, 1) == b"\x07"


async def test_backing_errors(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    top = create(tmp_path / "top.qcow2", MiB, backing=base)
    os.rename(base, tmp_path / "gone.qcow2")
    with pytest.raises(ImageError) as info:
        await open_qcow2(graph, top)
    assert str(info.value) == (
        f"Could not open backing file: Could not open '{base}': No such file or directory"
    )
    assert len(graph) == 0
    os.rename(tmp_path / "gone.qcow2", base)

    run("qemu-img", "rebase", "-u", "-b", str(base), "-F", "vmdk", str(top))
    with pytest.raises(ImageError, match="Could not open backing file: Unknown driver 'vmdk'"):
        await open_qcow2(graph, top)
    # no format recorded at all (written by hand, qemu-img 7.2 refuses to)
    buf = bytearray(top.read_bytes())
    pos = buf.index(b"\xe2\x79\x2a\xca")
    buf[pos : pos + 4] = b"\x12\x34\x56\x78"  # turn the format extension into an unknown one
    top.write_bytes(bytes(buf))
    with pytest.raises(ImageError, match=r"format .* not recorded"):
        await open_qcow2(graph, top)
    assert top.read_bytes() == bytes(buf)
    assert len(graph) == 0


async def test_backing_loop(tmp_path: Path, graph: BlockGraph) -> None:
    a = create(tmp_path / "a.qcow2", MiB)
    b = create(tmp_path / "b.qcow2", MiB, backing=a)
    run("qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a))
    with pytest.raises(ImageError, match="loop"):
        await open_qcow2(graph, b, read_only=True)
    assert len(graph) == 0


async def test_raw_and_file_nodes(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    raw = await open_node(
        graph,
        {
            "driver": "raw",
            "node-name": "r",
            "offset": 4096,
            "size": 65536,
            "file": {"driver": "file", "filename": str(path)},
        },
    )
    assert raw.size == 65536
    assert await raw.read(0, 4) == bytes([0, 1, 2, 3])
    await raw.write(10, b"abc")
    with pytest.raises(BlockError):
        await raw.write(65535, b"xy")
    await raw.write_zeroes(8192, 8192)
    assert await raw.read(8190, 4) == bytes([254, 255, 0, 0])
    f = raw.file
    assert isinstance(f, FileNode)
    await f.discard(512 * 1024, 256 * 1024)
    status, _n = await f.block_status(512 * 1024, 256 * 1024)
    assert status in (Status.ZERO, Status.DATA)  # DATA if the fs cannot punch holes
    assert await f.read(512 * 1024, 4) == bytes(4)
    await raw.flush()
    data = path.read_bytes()
    assert data[4106:4109] == b"abc"
    assert data[4096 + 8192 : 4096 + 16384] == bytes(8192)
    whole = await open_node(
        graph,
        {
            "driver": "raw",
            "read-only": True,
            "file": {"driver": "file", "filename": str(path), "read-only": True, "locking": "off"},
        },
    )
    assert whole.size == MiB
    with pytest.raises(BlockError, match="read-only"):
        await whole.write(0, b"x")


async def test_qcow2_over_raw_is_refused_by_magic(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(MiB))
    with pytest.raises(ImageError, match="not in qcow2 format"):
        await open_qcow2(graph, path)


async def test_close_drops_implicit_children(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    top = create(tmp_path / "top.qcow2", MiB, backing=base)
    node = await open_qcow2(graph, top, name="top")
    assert len(graph) == 4  # top, its file, base, base's file
    await node.write(0, b"z" * 100)
    await graph.close_node(node)
    assert len(graph) == 0
    assert_clean(top)


async def test_image_locking_interop(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "l.qcow2", MiB)
    node = await open_qcow2(graph, img, name="rw")
    info = run("qemu-img", "info", str(img), check=False)
    assert info.returncode != 0
    assert 'Failed to get shared "write" lock' in info.stderr
    run("qemu-img", "info", "-U", str(img))  # force-share still works
    with pytest.raises(ImageError, match='Failed to get "write" lock'):
        await open_qcow2(graph, img, name="again")
    with pytest.raises(ImageError, match='Failed to get shared "write" lock'):
        await open_qcow2(graph, img, name="again", read_only=True)
    await node.reopen(read_only=True)
    run("qemu-io", "-r", "-c", "read 0 512", str(img))  # readers may share now
    await node.reopen(read_only=False)  # reopen swaps its own locks without conflict
    await node.write(0, b"x")
    await graph.close_all()
    run("qemu-img", "info", str(img))
    assert_clean(img)


async def test_lock_held_by_qemu_storage_daemon(tmp_path: Path, graph: BlockGraph) -> None:
    require_tool("qemu-storage-daemon")
    img = create(tmp_path / "q.qcow2", MiB)
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev",
         f"driver=file,node-name=f,filename={img}", "--blockdev",
         "driver=qcow2,node-name=q,file=f", "--nbd-server",
         f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}", "--export",
         "type=nbd,id=e,node-name=q,writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        # wait until QSD holds the "write" permission lock (byte 101); probe with
        # F_OFD_GETLK, which takes no lock (a qemu-img probe would race with QSD)
        fd = os.open(img, os.O_RDONLY)
        try:
            for _ in range(250):
                flock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 101, 1, 0)
                got = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, flock))
                if got[0] != fcntl.F_UNLCK:
                    break
                if proc.poll() is not None:
                    pytest.fail(f"qemu-storage-daemon exited: {proc.communicate()[1]}")
                await trio.sleep(0.02)
            else:
                pytest.fail("qemu-storage-daemon never locked the image")
        finally:
            os.close(fd)
        with pytest.raises(ImageError, match='Failed to get shared "write" lock'):
            await open_qcow2(graph, img, read_only=True)
        assert len(graph) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_image_info_matches_qemu_img(
    tmp_path: Path, graph: BlockGraph, compat: str
) -> None:
    base = create(tmp_path / "base.qcow2", MiB, compat=compat, refcount_bits=16)
    top = create(tmp_path / "top.qcow2", 2 * MiB, compat=compat, cluster_size=4096,
                 backing=Path("base.qcow2"))
    qemu_io(top, "write -P 1 0 100k")
    expected = json.loads(run("qemu-img", "info", "--output=json", str(top)).stdout)
    node = await open_qcow2(graph, top, read_only=True)
    sizes = await allocated_sizes([node.filename])
    info = node.image_info(sizes[node.filename])
    for key in ("filename", "format", "virtual-size", "cluster-size", "dirty-flag",
                "backing-filename", "full-backing-filename", "backing-filename-format",
                "format-specific", "actual-size"):
        assert info.get(key) == expected.get(key), key
    assert node.backing is not None
    binfo = node.backing.image_info(0)
    assert binfo["filename"] == str(base)
    assert "backing-filename" not in binfo


async def test_old_v2_header_without_extension_area(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB, compat="0.10")
    qemu_io(base, "write -P 5 0 1M")
    img = create(tmp_path / "old.qcow2", MiB, compat="0.10", backing=Path("base.qcow2"))
    raw = bytearray(img.read_bytes())
    name = b"base.qcow2"
    raw[72:512] = bytes(440)
    raw[72 : 72 + len(name)] = name
    struct.pack_into(">QI", raw, 8, 72, len(name))
    img.write_bytes(bytes(raw))
    assert "backing file: base.qcow2" in run("qemu-img", "info", "-U", str(img)).stdout
    with pytest.raises(ImageError, match="not recorded"):
        await open_qcow2(graph, img, read_only=True)
    b = await open_qcow2(graph, base, read_only=True, name="b")
    node = await open_qcow2(graph, img, backing="b")
    assert await node.read(0, 2) == b"\x05\x05"
    await node.write(0, b"new")
    await node.change_backing(b, "base.qcow2", "qcow2")  # now with the format recorded
    await graph.close_all()
    assert_clean(img)
    qemu_io(img, "read -P 5 3 1000")
    info = run("qemu-img", "info", str(img)).stdout
    assert "backing file format: qcow2" in info


async def test_parameter_texts_name_nested_members(graph: BlockGraph) -> None:
    with pytest.raises(BlockError) as info:
        await open_node(graph, {"driver": "qcow2", "file": {"driver": "file"}})
    assert str(info.value) == "Parameter 'file.filename' is missing"
    with pytest.raises(BlockError) as info:
        await open_node(graph, {"driver": "raw", "file": {"driver": "nosuchdrv"}})
    assert str(info.value) == "Parameter 'file.driver' does not accept value 'nosuchdrv'"
    with pytest.raises(BlockError) as info:
        await open_node(graph, {"driver": "qcow2"})
    assert str(info.value) == "Parameter 'file' is missing"
    assert len(graph) == 0


async def test_is_allocated_above_rejects_bad_ranges(tmp_path: Path, graph: BlockGraph) -> None:
    node = await open_qcow2(graph, create(tmp_path / "x.qcow2", MiB), read_only=True)
    for off, n in [(MiB, 1), (0, 0), (-1, 5)]:
        with pytest.raises(BlockError):
            await graph.is_allocated_above(node, None, off, n)
    assert await graph.is_allocated_above(node, None, MiB - 512, 4096) == (False, 512)


async def test_force_share(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    img = create(tmp_path / "fs.qcow2", MiB, backing=base)
    writer = await open_qcow2(graph, img, name="w", backing=None)
    await writer.write(0, b"shared")
    await writer.flush()
    other = BlockGraph()
    try:
        with pytest.raises(BlockError, match="force-share=on can only be used"):
            await open_qcow2(other, img, **{"force-share": True})
        peek = await open_qcow2(other, img, read_only=True, **{"force-share": True})
        assert await peek.read(0, 6) == b"shared"
        assert peek.backing is not None  # the header chain inherits force-share
        # nothing is unshared: QEMU can still open the base read-write
        run("qemu-io", "-c", "write -P 1 0 512", str(base))
    finally:
        await other.close_all()


async def test_drop_intermediate_and_adopt(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    qemu_io(base, "write -P 0xba 0 1M")
    mid = create(tmp_path / "mid.qcow2", MiB, backing=base)
    top = create(tmp_path / "top.qcow2", MiB, backing=mid)
    node = await open_qcow2(graph, top, name="top")
    assert len(graph) == 6
    m = node.backing
    assert m is not None
    b = m.backing
    assert b is not None
    # what commit does at the end: repoint top, drop mid, base now belongs to top
    await node.change_backing(b, "base.qcow2", "qcow2")
    graph.adopt(b, node)
    await graph.close_node(m)
    assert len(graph) == 4
    assert b.node_name in graph
    assert await node.read(0, 1) == b"\xba"
    await graph.close_node(node)
    assert len(graph) == 0
    assert_clean(top)
