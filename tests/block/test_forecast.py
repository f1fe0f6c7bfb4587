"""``forecast_writes`` against the writes themselves: for random images (version
2 and 3, clusters of 512 B to 64 KiB, refcounts of 1 to 64 bits, state left
by qemu-io, a backing file or none) and random data and zero writes, after an
optional grow, the forecast growth of the host file's length must be exactly
what making those writes through the same node then adds, its growth of the
space the file takes within a cluster of it (4 KiB clusters and up: smaller
ones are not punched), and the forecast changes nothing (the file's bytes are
the same before and after it).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from blockd.block.graph import BlockGraph
from blockd.block.node import PlannedWrite
from tests.block.conftest import assert_clean, create, open_qcow2, property_settings, qemu_io


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    compat = draw(st.sampled_from(["0.10", "1.1"]))
    refcount_bits = 16 if compat == "0.10" else draw(st.sampled_from([1, 4, 16, 64]))
    cluster_size = 1 << draw(st.sampled_from([9, 10, 12, 16]))
    size = cluster_size * draw(st.integers(1, 600))
    grow = cluster_size * draw(st.integers(0, 300)) + 512 * draw(st.integers(0, 3))
    clusters = size // cluster_size
    prefill = [
        (draw(st.sampled_from(["write -P 7", "write -z"])), cluster_size * a,
         cluster_size * min(n, clusters - a))
        for a, n in draw(st.lists(st.tuples(st.integers(0, clusters - 1), st.integers(1, 8)),
                                  max_size=5))
    ]  # fmt: skip
    total = size + grow
    ops = []
    for _ in range(draw(st.integers(1, 14))):
        off = draw(st.integers(0, total - 1))
        n = draw(st.integers(1, min(total - off, 40 * cluster_size)))
        ops.append((off, n, draw(st.booleans())))
    return {"compat": compat, "refcount_bits": refcount_bits, "cluster_size": cluster_size,
            "size": size, "grow": grow, "prefill": prefill, "ops": ops,
            "backing": draw(st.booleans())}  # fmt: skip


async def _planned(ops: list[PlannedWrite]) -> AsyncIterator[PlannedWrite]:
    for op in ops:
        yield op


@property_settings
@given(sc=scenarios())
@example(sc={"compat": "1.1", "refcount_bits": 64, "cluster_size": 512, "size": 512 * 64,
             "grow": 512 * 300, "prefill": [], "ops": [(0, 512 * 360, False)],
             "backing": False})  # the refcount table grows, twice  # fmt: skip
@example(sc={"compat": "1.1", "refcount_bits": 16, "cluster_size": 65536, "size": 65536 * 64,
             "grow": 0, "prefill": [("write -P 7", 0, 65536 * 8)],
             "ops": [(0, 65536 * 8, True), (65536 * 20, 65536 * 4, False)],
             "backing": False})  # zeros free data, the next write reuses it  # fmt: skip
async def test_forecast_is_what_the_writes_take(
    tmp_path_factory: pytest.TempPathFactory, sc: dict
) -> None:
    tmp = tmp_path_factory.mktemp("forecast")
    cs = sc["cluster_size"]
    backing = None
    if sc["backing"]:
        backing = create(tmp / "b.qcow2", sc["size"] + sc["grow"])
    img = create(tmp / "f.qcow2", sc["size"], compat=sc["compat"], cluster_size=cs,
                 refcount_bits=sc["refcount_bits"], backing=backing)  # fmt: skip
    commands = [f"{verb} {off} {n}" for verb, off, n in sc["prefill"]
                if sc["compat"] == "1.1" or verb != "write -z"]  # fmt: skip
    if commands:
        qemu_io(img, *commands)
    graph = BlockGraph()
    try:
        node = await open_qcow2(graph, img, backing=None if backing is None else {
            "driver": "qcow2", "file": {"driver": "file", "filename": str(backing)}})  # fmt: skip
        await node.flush()
        before = img.stat().st_size
        space_before = img.stat().st_blocks * 512
        content = hashlib.sha256(img.read_bytes()).digest()
        new_size = sc["size"] + sc["grow"]
        forecast = await node.forecast_writes(new_size, _planned(sc["ops"]))
        assert hashlib.sha256(img.read_bytes()).digest() == content  # nothing written
        if new_size > node.size:
            await node.truncate(new_size)
        for off, n, zero in sc["ops"]:
            if zero:
                await node.write_zeroes(off, n)
            else:
                await node.write(off, bytes([0x5A]) * n)
        await node.flush()
        after = img.stat().st_size
        space_after = img.stat().st_blocks * 512
    finally:
        await graph.close_all()
    grown = -(-after // cs) * cs - -(-before // cs) * cs
    assert forecast.file_growth == grown, (forecast, before, after)
    assert forecast.upper_bound is False and forecast.cluster_size == cs
    parts = (forecast.data + forecast.l2_tables + forecast.refcount_blocks
             + forecast.refcount_table + forecast.l1_table - forecast.reused)  # fmt: skip
    assert parts == forecast.file_growth
    assert forecast.peak >= max(0, forecast.growth)
    if cs >= 4096:
        # the space the file takes: freed clusters are punched out, filled holes count
        assert abs(forecast.growth - (space_after - space_before)) <= cs, (
            forecast, space_before, space_after)  # fmt: skip
    assert_clean(img)
