"""Random operation sequences against a bytearray model, judged by qemu-img at the end."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from blockd.block.graph import BlockGraph
from blockd.block.node import Status

from .conftest import (
    assert_clean,
    compare_with,
    create,
    open_qcow2,
    property_settings,
    qemu_io,
    run,
    to_raw,
)


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    compat = draw(st.sampled_from(["0.10", "1.1"]))
    refcount_bits = 16 if compat == "0.10" else draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
    cluster_size = 1 << draw(st.integers(9, 16))
    size = 512 * draw(st.integers(1, 1024))  # up to 512 KiB, sector granular like qemu-img
    backing = draw(st.booleans())
    # what QEMU left in the image before we touch it: nothing, data plus
    # (v3) preallocated zero clusters, or (no backing) compressed clusters
    prefill = draw(
        st.sampled_from(["none", "qemu", "compressed"] if not backing else ["none", "qemu"])
    )
    backing_size = 512 * draw(st.integers(1, 1200)) if backing else 0
    ops = []
    for _ in range(draw(st.integers(1, 12))):
        op = draw(st.sampled_from(["write", "write", "zero", "discard", "read"]))
        off = draw(st.integers(0, size - 1))
        n = draw(st.integers(1, min(size - off, 3 * cluster_size + 1000)))
        ops.append((op, off, n, draw(st.integers(1, 255))))
    return {
        "compat": compat,
        "refcount_bits": refcount_bits,
        "cluster_size": cluster_size,
        "size": size,
        "backing_size": backing_size,
        "ops": ops,
        "prefill": prefill,
    }


def discard_model(model: bytearray, below: bytes, sc: dict, off: int, n: int) -> None:
    cs, size = sc["cluster_size"], sc["size"]
    first = -(-off // cs)
    end = off + n
    last_excl = -(-size // cs) if end >= size else end // cs
    for c in range(first, last_excl):
        lo, hi = c * cs, min((c + 1) * cs, size)
        if sc["backing_size"] and sc["compat"] == "0.10":
            model[lo:hi] = below[lo:hi]  # v2 has no zero flag: the backing shows through
        else:
            model[lo:hi] = bytes(hi - lo)


@property_settings
@given(sc=scenarios())
@example(
    sc={  # v2 + backing + QEMU data: discard must let the backing show through
        "compat": "0.10",
        "refcount_bits": 16,
        "cluster_size": 4096,
        "size": 64 * 1024,
        "backing_size": 48 * 1024,
        "prefill": "qemu",
        "ops": [
            ("discard", 1000, 20000, 1),
            ("read", 0, 65536, 1),
            ("write", 4095, 2, 9),
            ("zero", 40000, 20000, 1),
            ("discard", 0, 65536, 1),
        ],
    }
)
@example(
    sc={  # v3 compressed clusters, partially overwritten, zeroed and discarded
        "compat": "1.1",
        "refcount_bits": 4,
        "cluster_size": 1024,
        "size": 32 * 1024,
        "backing_size": 0,
        "prefill": "compressed",
        "ops": [
            ("write", 100, 5000, 7),
            ("zero", 3000, 9000, 1),
            ("discard", 8000, 9000, 1),
            ("read", 0, 32768, 1),
        ],
    }
)
async def test_random_operations(sc: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        backing = None
        below = bytes(sc["size"])
        if sc["backing_size"]:
            backing = create(tmp / "base.qcow2", sc["backing_size"], compat=sc["compat"])
            bs = sc["backing_size"]
            qemu_io(backing, f"write -P 0xb1 0 {bs}", f"write -P 0xb2 {bs // 3} {bs // 3}")
            base_raw = to_raw(backing, tmp / "base.raw")
            below = (base_raw + bytes(sc["size"]))[: sc["size"]]
        img = create(
            tmp / "top.qcow2",
            sc["size"],
            compat=sc["compat"],
            cluster_size=sc["cluster_size"],
            refcount_bits=sc["refcount_bits"],
            backing=backing,
        )
        if sc["prefill"] != "none":
            size = sc["size"]
            cmds = [f"write -P 0xc1 0 {size // 2}", f"write -P 0xc2 {size // 3} {size // 4}"]
            if sc["compat"] == "1.1":
                cmds.append(f"write -z {size // 4} {size // 4}")  # prealloc zero clusters
            qemu_io(img, *cmds)
            if sc["prefill"] == "compressed":
                comp = tmp / "comp.qcow2"
                run(
                    "qemu-img",
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    f"compat={sc['compat']},cluster_size={sc['cluster_size']},"
                    f"refcount_bits={sc['refcount_bits']}",
                    str(img),
                    str(comp),
                )
                comp.replace(img)
            model = bytearray(to_raw(img, tmp / "prefilled.raw"))
        else:
            model = bytearray(below)
        graph = BlockGraph()
        try:
            node = await open_qcow2(graph, img)
            assert node.size == sc["size"]
            for op, off, n, byte in sc["ops"]:
                if op == "write":
                    data = bytes([byte]) * n
                    await node.write(off, data)
                    model[off : off + n] = data
                elif op == "zero":
                    await node.write_zeroes(off, n)
                    model[off : off + n] = bytes(n)
                elif op == "discard":
                    await node.discard(off, n)
                    discard_model(model, below, sc, off, n)
                else:
                    assert await node.read(off, n) == bytes(model[off : off + n])
            assert await node.read(0, sc["size"]) == bytes(model)
            # block_status must agree with what reads return
            pos = 0
            while pos < sc["size"]:
                status, n = await node.block_status(pos, sc["size"] - pos)
                assert 0 < n <= sc["size"] - pos
                hidden = status is Status.UNALLOCATED and not sc["backing_size"]
                if status is Status.ZERO or hidden:
                    assert model[pos : pos + n] == bytes(n)
                elif status is Status.UNALLOCATED:
                    assert model[pos : pos + n] == below[pos : pos + n]
                pos += n
        finally:
            await graph.close_all()
        assert_clean(img)
        compare_with(img, bytes(model), tmp)
