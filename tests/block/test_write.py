"""Writes through our qcow2 node, judged by qemu-img check / compare and qemu-io."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.graph import BlockGraph
from blockd.block.node import Status
from blockd.errors import BlockError
from tests.power import Power, VolatileFile

from .conftest import (
    assert_clean,
    check,
    compare_with,
    create,
    open_qcow2,
    pattern,
    qemu_io,
    run,
    to_raw,
)

KiB = 1024
MiB = 1 << 20


@pytest.mark.parametrize(
    ("compat", "cluster_size", "refcount_bits"),
    [
        ("1.1", 65536, 16),
        ("0.10", 4096, 16),
        ("1.1", 512, 1),
        ("1.1", 1024, 64),
        ("1.1", 2 * MiB, 2),
    ],
)
async def test_write_patterns(
    tmp_path: Path, graph: BlockGraph, compat: str, cluster_size: int, refcount_bits: int
) -> None:
    img = create(
        tmp_path / "w.qcow2",
        8 * MiB,
        compat=compat,
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
    )
    model = bytearray(8 * MiB)
    node = await open_qcow2(graph, img)
    for off, byte, n in [
        (0, 0x11, 64 * KiB),
        (100 * KiB + 3, 0x22, 3000),
        (MiB, 0x33, MiB),
        (MiB + 17, 0x44, 5),
        (8 * MiB - 700, 0x55, 700),
    ]:
        await node.write(off, pattern(byte, n))
        model[off : off + n] = pattern(byte, n)
    await node.write_zeroes(MiB + 4 * KiB, 300 * KiB)
    model[MiB + 4 * KiB : MiB + 304 * KiB] = bytes(300 * KiB)
    assert await node.read(0, 8 * MiB) == bytes(model)
    await graph.close_all()
    assert_clean(img)
    compare_with(img, bytes(model), tmp_path)
    qemu_io(img, "read -P 0x33 1536k 512k", f"read -P 0x55 {8 * MiB - 700} 700")


async def test_cow_from_backing_and_compressed(tmp_path: Path, graph: BlockGraph) -> None:
    src = create(tmp_path / "src.qcow2", 2 * MiB)
    qemu_io(src, "write -P 0x77 0 2M")
    base = tmp_path / "base.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(base))
    top = create(tmp_path / "top.qcow2", 2 * MiB, backing=base, cluster_size=4096)
    node = await open_qcow2(graph, top)
    await node.write(5000, b"hello")  # partial cluster: COW from the backing file
    await graph.close_all()
    assert_clean(top)
    expected = bytearray(pattern(0x77, 2 * MiB))
    expected[5000:5005] = b"hello"
    assert to_raw(top, tmp_path / "top.raw") == bytes(expected)

    # now write into the compressed base itself: new clusters, old refs dropped
    g2 = BlockGraph()
    bnode = await open_qcow2(g2, base)
    await bnode.write(70 * KiB, pattern(0x01, 10))
    await bnode.write(0, pattern(0x02, 64 * KiB))
    await bnode.write_zeroes(128 * KiB, 64 * KiB)
    await bnode.discard(192 * KiB, 64 * KiB)
    await g2.close_all()
    assert_clean(base)
    model = bytearray(pattern(0x77, 2 * MiB))
    model[70 * KiB : 70 * KiB + 10] = pattern(0x01, 10)
    model[0 : 64 * KiB] = pattern(0x02, 64 * KiB)
    model[128 * KiB : 256 * KiB] = bytes(128 * KiB)
    compare_with(base, bytes(model), tmp_path)


async def test_discard_and_zero_semantics(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    qemu_io(base, "write -P 0xee 0 1M")
    top = create(tmp_path / "top.qcow2", MiB, backing=base)
    node = await open_qcow2(graph, top)
    await node.write(0, pattern(1, 256 * KiB))
    await node.discard(64 * KiB, 64 * KiB)  # with backing: zero cluster, not backing data
    await node.write_zeroes(512 * KiB, 64 * KiB)  # unallocated -> zero cluster
    await node.discard(130 * KiB, 10)  # partial: ignored
    assert await node.block_status(64 * KiB, 64 * KiB) == (Status.ZERO, 64 * KiB)
    assert await node.read(64 * KiB, 4) == bytes(4)
    assert await node.read(512 * KiB, 4) == bytes(4)
    assert await node.read(600 * KiB, 1) == b"\xee"
    await graph.close_all()
    assert_clean(top)
    qemu_io(
        top,
        "read -P 1 0 64k",
        "read -P 0 64k 64k",
        "read -P 1 128k 128k",
        "read -P 0xee 256k 256k",
        "read -P 0 512k 64k",
        "read -P 0xee 576k 448k",
    )


async def test_grow_l1_and_refcount_table(tmp_path: Path, graph: BlockGraph) -> None:
    # 512-byte clusters and 64-bit refcounts: one refcount block covers 32 KiB,
    # one table cluster 2 MiB, so 3 MiB of data forces the table to grow
    img = create(tmp_path / "g.qcow2", 1 * MiB, cluster_size=512, refcount_bits=64)
    node = await open_qcow2(graph, img)
    await node.truncate(4 * MiB)  # L1 grows from 16 to 64 entries
    assert node.size == 4 * MiB
    data = bytes(range(256)) * (3 * MiB // 256)
    for off in range(0, 3 * MiB, 256 * KiB):
        await node.write(off + 100, data[off : off + 256 * KiB])
    await graph.close_all()
    assert_clean(img)
    # 3 MiB of data + ~3% metadata: allocation must not leave big holes behind
    assert check(img)["image-end-offset"] < 3 * MiB + 512 * KiB
    model = bytearray(4 * MiB)
    for off in range(0, 3 * MiB, 256 * KiB):
        model[off + 100 : off + 100 + 256 * KiB] = data[off : off + 256 * KiB]
    compare_with(img, bytes(model), tmp_path)
    info = run("qemu-img", "info", str(img)).stdout
    assert "virtual size: 4 MiB" in info


async def test_truncate_hides_backing_and_tail(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", 2 * MiB)
    qemu_io(base, "write -P 0x99 0 2M")
    top = create(tmp_path / "top.qcow2", MiB + 1024, backing=base)
    node = await open_qcow2(graph, top)
    await node.truncate(2 * MiB)
    assert await node.read(MiB + 1024, 10) == bytes(10)
    assert await node.read(MiB - 10, 10) == pattern(0x99, 10)
    await graph.close_all()
    assert_clean(top)
    qemu_io(top, f"read -P 0x99 0 {MiB + 1024}", f"read -P 0 {MiB + 1024} {MiB - 1024}")


async def test_readonly_and_reopen(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "ro.qcow2", MiB)
    node = await open_qcow2(graph, img, read_only=True)
    with pytest.raises(BlockError, match="read-only"):
        await node.write(0, b"x")
    await node.reopen(read_only=False)
    await node.write(0, b"abc")
    await node.reopen(read_only=True)
    assert await node.read(0, 3) == b"abc"
    with pytest.raises(BlockError, match="read-only"):
        await node.write_zeroes(0, 512)
    await graph.close_all()
    assert_clean(img)


async def test_change_backing(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    qemu_io(base, "write -P 0x10 0 1M")
    other = tmp_path / "sub"
    other.mkdir()
    run("cp", str(base), str(other / "copy-of-base-with-a-long-name.qcow2"))
    top = create(tmp_path / "top.qcow2", MiB, backing=Path("base.qcow2"))
    node = await open_qcow2(graph, top)
    newb = await open_qcow2(
        graph, other / "copy-of-base-with-a-long-name.qcow2", read_only=True, name="nb"
    )
    await node.change_backing(newb, "sub/copy-of-base-with-a-long-name.qcow2", "qcow2")
    assert node.backing is newb
    await graph.close_all()
    assert_clean(top)
    info = run("qemu-img", "info", "--output=json", str(top)).stdout
    assert '"backing-filename": "sub/copy-of-base-with-a-long-name.qcow2"' in info
    assert '"backing-filename-format": "qcow2"' in info
    qemu_io(top, "read -P 0x10 0 1M")
    # and back to a shorter name, then none at all
    g = BlockGraph()
    node = await open_qcow2(g, top, backing=None)
    await node.change_backing(None, "base.qcow2", "qcow2")
    await node.change_backing(None, None, None)
    await g.close_all()
    assert_clean(top)
    info = run("qemu-img", "info", "--output=json", str(top)).stdout
    assert "backing-filename" not in info
    qemu_io(top, "read -P 0 0 1M")


async def test_cancellation_never_tears_metadata(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "c.qcow2", 16 * MiB, cluster_size=4096)
    node = await open_qcow2(graph, img)
    for delay in (0, 0.0005, 0.001, 0.003, 0.01):
        with trio.move_on_after(delay):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(node.write, i * MiB + 1000, pattern(i + 1, 300 * KiB))
    await graph.close_all()
    result = check(img)
    assert result.get("corruptions", 0) == 0
    assert result.get("leaks", 0) == 0


async def test_concurrent_writes_and_reads(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "p.qcow2", 8 * MiB, cluster_size=8192)
    node = await open_qcow2(graph, img)
    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(node.write, i * 512 * KiB + 7, pattern(i + 1, 200 * KiB))
            nursery.start_soon(node.read, i * 512 * KiB, 100 * KiB)
    for i in range(16):
        assert await node.read(i * 512 * KiB + 7, 200 * KiB) == pattern(i + 1, 200 * KiB)
    await graph.close_all()
    assert_clean(img)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_truncate_zeroes_only_what_backing_covers(
    tmp_path: Path, graph: BlockGraph, compat: str
) -> None:
    base = create(tmp_path / "base.qcow2", 1536 * KiB, compat=compat)
    qemu_io(base, "write -P 0x99 0 1536k")
    top = create(tmp_path / "top.qcow2", MiB, backing=base, compat=compat)
    node = await open_qcow2(graph, top)
    await node.truncate(4 * MiB)
    assert await node.read(MiB, 512 * KiB) == bytes(512 * KiB)
    status, _n = await node.block_status(2 * MiB, 2 * MiB)
    assert status is Status.UNALLOCATED  # beyond the backing file: left alone
    await graph.close_all()
    assert_clean(top)
    qemu_io(top, "read -P 0x99 0 1M", "read -P 0 1M 3M")


async def test_concurrent_mixed_operations(tmp_path: Path, graph: BlockGraph) -> None:
    """Tasks on disjoint cluster-aligned regions race in-place writes, allocation,
    discards and reads; each region must end as its own sequential model says."""
    cs = 4096
    region = 16 * cs
    tasks = 12
    base = create(tmp_path / "base.qcow2", tasks * region)
    qemu_io(base, f"write -P 0x3c 0 {tasks * region}")
    img = create(tmp_path / "m.qcow2", tasks * region, cluster_size=cs, backing=base)
    node = await open_qcow2(graph, img)
    models = [bytearray(b"\x3c" * region) for _ in range(tasks)]

    async def worker(t: int) -> None:
        rng = random.Random(t)
        model = models[t]
        start = t * region
        for _ in range(30):
            off = rng.randrange(region)
            n = rng.randrange(1, region - off + 1)
            op = rng.random()
            if op < 0.5:
                data = bytes([rng.randrange(256)]) * n
                await node.write(start + off, data)
                model[off : off + n] = data
            elif op < 0.65:
                await node.discard(start + off, n)
                first, last = -(-off // cs), (off + n) // cs
                for c in range(first, last):
                    model[c * cs : (c + 1) * cs] = bytes(cs)
            elif op < 0.75:
                await node.write_zeroes(start + off, n)
                model[off : off + n] = bytes(n)
            else:
                assert await node.read(start + off, n) == bytes(model[off : off + n])
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for t in range(tasks):
            nursery.start_soon(worker, t)
    expected = b"".join(bytes(m) for m in models)
    assert await node.read(0, tasks * region) == expected
    await graph.close_all()
    assert_clean(img)
    compare_with(img, expected, tmp_path)


async def test_in_flight_read_pins_its_cluster(tmp_path: Path) -> None:
    """A discard cannot free (and a write cannot reuse) a cluster a read is still using."""
    img = create(tmp_path / "pin.qcow2", MiB)
    qemu_io(img, "write -P 0x42 0 64k")  # guest cluster 0 -> host 0x50000

    gate = trio.Event()
    entered = trio.Event()

    class GatedFile(VolatileFile):
        async def _do_read(self, offset: int, length: int) -> bytes:
            if offset == 0x50000:
                entered.set()
                await gate.wait()
            return await self.inner.read(offset, length)

    inner = await FileNode.open("f", str(img), read_only=False)
    node = await Qcow2Node.open("q", GatedFile(inner, Power()), read_only=False)
    result: list[bytes] = []
    discarded = trio.Event()

    async def reader() -> None:
        result.append(await node.read(0, 4096))

    async def discarder() -> None:
        await node.discard(0, 65536)
        await node.write(0, b"\x99" * 65536)  # would reuse the freed cluster
        discarded.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await entered.wait()
        nursery.start_soon(discarder)
        await trio.sleep(0.2)
        assert not discarded.is_set()  # waiting for the read to let go
        gate.set()
    assert result == [b"\x42" * 4096]
    assert await node.read(0, 4) == b"\x99" * 4
    await node.flush()
    await inner.close()
    assert_clean(img)


async def test_lazy_refcounts_image_kept_exact(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "lazy.qcow2", MiB, extra="lazy_refcounts=on")
    node = await open_qcow2(graph, img)
    await node.write(4096, b"q" * 70000)
    # we never defer refcounts, so the dirty bit must stay clear even mid-session
    assert img.read_bytes()[79] & 1 == 0
    await graph.close_all()
    assert_clean(img)
    info = run("qemu-img", "info", "--output=json", str(img)).stdout
    assert '"lazy-refcounts": true' in info  # the compatible bit itself is kept


async def test_bitmaps_invalidated_not_corrupted(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "bm.qcow2", MiB)
    run("qemu-img", "bitmap", "--add", str(img), "b0")
    node = await open_qcow2(graph, img)
    await node.write(0, b"w" * 4096)
    await graph.close_all()
    result = check(img)
    # like any program without bitmap support: autoclear cleared, the bitmap
    # directory becomes a leak for QEMU to reclaim, nothing is corrupted
    assert result.get("corruptions", 0) == 0
    assert "b0" not in run("qemu-img", "info", str(img)).stdout
    qemu_io(img, "read -P 0x77 0 4k")


async def test_header_rewrite_preserves_unknowns(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    img = create(tmp_path / "u.qcow2", MiB, backing=Path("base.qcow2"))
    raw = bytearray(img.read_bytes())
    h = hdr.parse(bytes(raw[:65536]), len(raw))
    # an unknown header field (header_length 120) and an unknown extension
    h.header_length = 120
    h.tail = h.tail + b"\xab" * 8
    h.extensions.append(hdr.Extension(0x12345678, b"keep me"))
    h.compatible_features |= 1 << 9
    crafted = hdr.serialize(h)
    raw[: len(crafted)] = crafted
    img.write_bytes(bytes(raw))
    assert_clean(img)  # QEMU accepts the crafted header

    node = await open_qcow2(graph, img)
    await node.change_backing(None, str(base), "qcow2")
    await graph.close_all()
    after = img.read_bytes()
    h2 = hdr.parse(after[:65536], len(after))
    assert h2.backing_file == str(base)
    assert h2.backing_format == "qcow2"
    assert h2.header_length == 120
    assert h2.tail.endswith(b"\xab" * 8)
    assert hdr.Extension(0x12345678, b"keep me") in h2.extensions
    assert h2.extension(hdr.EXT_FEATURE_TABLE) == h.extension(hdr.EXT_FEATURE_TABLE)
    assert h2.compatible_features & (1 << 9)
    assert_clean(img)
    info = run("qemu-img", "info", "--output=json", str(img)).stdout
    assert f'"backing-filename": "{base}"' in info


async def test_change_backing_refusals(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "r.qcow2", MiB, cluster_size=512)
    node = await open_qcow2(graph, img)
    with pytest.raises(BlockError, match="backing format must be specified"):
        await node.change_backing(None, "x.qcow2", None)
    with pytest.raises(BlockError, match="No space left in the file header"):
        await node.change_backing(None, "x" * 600, "qcow2")
    with pytest.raises(BlockError, match="too long"):
        await node.change_backing(None, "x" * 1024, "qcow2")
    ro = await open_qcow2(graph, create(tmp_path / "ro.qcow2", MiB), read_only=True)
    with pytest.raises(BlockError, match="read-only"):
        await ro.change_backing(None, None, None)
    await graph.close_all()
    assert_clean(img)
    assert "backing file:" not in run("qemu-img", "info", str(img)).stdout


async def test_grow_limits(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "lim.qcow2", MiB, cluster_size=512, refcount_bits=64)
    node = await open_qcow2(graph, img)
    with pytest.raises(BlockError, match="L1 table"):
        await node.truncate(2**50)
    with pytest.raises(BlockError, match="shrink"):
        await node.truncate(512)
    with pytest.raises(BlockError, match="multiple of 512"):
        await node.truncate(2 * MiB + 1)
    # new L1: 64 KiB = 128 contiguous clusters, more than one refcount block (64) covers
    await node.truncate(256 * MiB)
    await node.write(255 * MiB, b"end")
    await graph.close_all()
    assert_clean(img)
    qemu_io(img, f"read -P 0x65 {255 * MiB} 1")


async def test_change_backing_refuses_loops(tmp_path: Path, graph: BlockGraph) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    top = create(tmp_path / "top.qcow2", MiB, backing=base)
    node = await open_qcow2(graph, top)
    assert node.backing is not None
    await node.backing.reopen(read_only=False)
    with pytest.raises(BlockError, match="loop"):
        await node.backing.change_backing(node, str(top), "qcow2")
    with pytest.raises(BlockError, match="loop"):
        await node.change_backing(node, str(top), "qcow2")
    await graph.close_all()
    assert_clean(base)
    assert "backing file:" not in run("qemu-img", "info", str(base)).stdout


async def test_write_over_qemu_grown_refcount_table(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "qg.qcow2", 4 * MiB, cluster_size=512, refcount_bits=64)
    qemu_io(img, "write -P 0x21 0 3M")  # QEMU grows the refcount table itself
    node = await open_qcow2(graph, img)
    await node.discard(MiB, MiB)
    await node.write(3 * MiB - 100, b"\x22" * 700 * KiB)
    await node.write(MiB + 5, b"\x23" * 5000)
    await graph.close_all()
    assert_clean(img)
    model = bytearray(4 * MiB)
    model[: 3 * MiB] = b"\x21" * (3 * MiB)
    model[MiB : 2 * MiB] = bytes(MiB)
    model[3 * MiB - 100 : 3 * MiB - 100 + 700 * KiB] = b"\x22" * (700 * KiB)
    model[MiB + 5 : MiB + 5005] = b"\x23" * 5000
    compare_with(img, bytes(model), tmp_path)


async def test_reopen_while_io_in_flight(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "ri.qcow2", 4 * MiB)
    qemu_io(img, "write -P 0x1f 0 4M")
    node = await open_qcow2(graph, img)
    errors: list[BaseException] = []

    async def reader(i: int) -> None:
        for _ in range(20):
            try:
                assert await node.read(i * 65536, 65536) == b"\x1f" * 65536
            except BaseException as exc:  # collected, not raised, to count them all
                errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(reader, i)
        for _ in range(5):
            await node.reopen(read_only=True)
            await node.reopen(read_only=False)
    assert errors == []
    await node.write(0, b"ok")
    await graph.close_all()
    assert_clean(img)


@pytest.mark.parametrize("mode", ["on", "unmap"])
async def test_detect_zeroes_writes_zeros_as_zero_clusters(
    tmp_path: Path, graph: BlockGraph, mode: str
) -> None:
    img = create(tmp_path / "dz.qcow2", 4 * MiB)
    node = await open_qcow2(graph, img, **{"detect-zeroes": mode})
    await node.write(0, bytes(MiB))
    await node.write(MiB, b"\x01" * 4096)
    await graph.close_all()
    extents = json.loads(run("qemu-img", "map", "--output=json", str(img)).stdout)
    data = [e for e in extents if e["data"]]
    assert [(e["start"], e["length"]) for e in data] == [(MiB, 65536)]
    assert_clean(img)
