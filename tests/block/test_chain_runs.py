"""runs_above, the chain walk that asks each layer once for a whole range,
against the run-by-run walk (layer_above, itself checked against qemu-img map
in test_interop_read.py): the same view of every byte, and, on an image with
an entry a read calls corrupt, the very same outcome.
"""

from __future__ import annotations

import itertools
import random
import shutil
import struct
from pathlib import Path

import pytest

from blockd.block.chain import Run, _run_by_run, runs_above
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import BlockIOError

from .conftest import create, open_qcow2, qemu_io

KiB = 1024
MiB = 1 << 20


def view(runs: list[Run]) -> list[tuple[int, str, str, int, int]]:
    """The runs with neighbours from the same layer and of the same status joined
    (where a walk splits a run is no part of the view)."""
    out: list[tuple[int, str, str, int, int]] = []
    for depth, layer, status, pos, n in runs:
        name = layer.node_name if layer is not None else "-"
        if out and out[-1][:3] == (depth, name, status.value) and out[-1][3] + out[-1][4] == pos:
            out[-1] = (*out[-1][:4], out[-1][4] + n)
        else:
            out.append((depth, name, status.value, pos, n))
    return out


def random_chain(tmp: Path, rng: random.Random) -> list[Path]:
    """3 to 5 layers of mixed cluster and virtual sizes, each with some data,
    zeros (plain and allocated), compressed clusters and discarded ranges."""
    paths: list[Path] = []
    top_size = 4 * MiB
    for i in range(rng.randint(3, 5)):
        size = rng.choice([top_size, top_size, 3 * MiB + 512 * KiB, 2 * MiB])
        cluster = rng.choice([512, 4 * KiB, 64 * KiB])
        paths.append(create(tmp / f"l{i}.qcow2", size, cluster_size=cluster,
                            backing=paths[-1] if paths else None))  # fmt: skip
        # compressed first: qemu-io compresses only into unallocated clusters
        clusters = rng.sample(range(size // cluster), rng.randint(0, 3))
        commands = [f"write -c -P 9 {c * cluster} {cluster}" for c in clusters]
        for _ in range(rng.randint(0, 12)):
            n = rng.choice([512, 4 * KiB, 64 * KiB, 300 * KiB])
            off = rng.randrange(0, size - n) // 512 * 512
            kind = rng.choice(["write -P 7", "write -z", "write -z -u", "discard"])
            commands.append(f"{kind} {off} {n}")
        if commands:
            qemu_io(paths[-1], *commands)
    return paths


async def open_all(graph: BlockGraph, paths: list[Path]) -> list[BlockNode]:
    nodes: list[BlockNode] = []
    for i, path in enumerate(paths):
        nodes.append(await open_qcow2(graph, path, name=f"n{i}",
                                      backing=nodes[-1].node_name if nodes else None))  # fmt: skip
    return nodes


@pytest.mark.parametrize("seed", range(12))
async def test_the_same_view_as_the_run_by_run_walk(
    tmp_path: Path, graph: BlockGraph, seed: int
) -> None:
    rng = random.Random(seed)
    nodes = await open_all(graph, random_chain(tmp_path, rng))
    top = nodes[-1]
    for base in (None, nodes[0], nodes[len(nodes) // 2]):
        ranges = [(0, top.size)]
        for _ in range(6):
            off = rng.randrange(top.size)
            ranges.append((off, rng.randint(1, top.size - off)))
        for off, n in ranges:
            got = await runs_above(top, base, off, n)
            assert view(got) == view(await _run_by_run(top, base, off, n))
            assert got[0][3] == off
            assert all(a[3] + a[4] == b[3] for a, b in itertools.pairwise(got))
            assert got[-1][3] + got[-1][4] == off + n


def l2_entry_offset(path: Path, cluster: int) -> int:
    """Where the L2 entry of guest cluster ``cluster`` lies (a 64 KiB-cluster image
    whose first L2 table covers it)."""
    buf = path.read_bytes()
    l1_offset = struct.unpack_from(">Q", buf, 40)[0]
    l2_offset = struct.unpack_from(">Q", buf, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    return l2_offset + 8 * cluster


def misalign(path: Path, cluster: int) -> None:
    """Give an allocated cluster's L2 entry an unaligned host offset."""
    pos = l2_entry_offset(path, cluster)
    with path.open("r+b") as f:
        f.seek(pos)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry & 0x00FFFFFFFFFFFE00, "the cluster must be allocated"
        f.seek(pos)
        f.write(struct.pack(">Q", entry | 0x200))


@pytest.mark.parametrize(
    ("top_data", "faults"),
    [
        # mid's bad entry comes first along the walk: mid is marked corrupt, not top
        ([40], {"mid": 10, "top": 40}),
        # mid's bad entry is hidden under top's data: no walk ever reads it
        ([40], {"mid": 40}),
        # top's bad entry is past where the walk first stops in top
        ([40, 50], {"top": 50, "mid": 10}),
    ],
)
async def test_a_corrupt_entry_meets_the_exact_walk(
    tmp_path: Path, top_data: list[int], faults: dict[str, int]
) -> None:
    cs = 64 * KiB
    base = create(tmp_path / "base.qcow2", 4 * MiB)
    mid = create(tmp_path / "mid.qcow2", 4 * MiB, backing=base)
    qemu_io(mid, f"write -P 1 {10 * cs} {cs}", f"write -P 2 {40 * cs} {cs}")
    top = create(tmp_path / "top.qcow2", 4 * MiB, backing=mid)
    qemu_io(top, *(f"write -P 3 {c * cs} {cs}" for c in top_data))
    for name, cluster in faults.items():
        misalign(tmp_path / f"{name}.qcow2", cluster)
    outcomes = []
    for walk in (_run_by_run, runs_above):
        work = tmp_path / walk.__name__
        work.mkdir()
        for name in ("base", "mid", "top"):
            shutil.copy(tmp_path / f"{name}.qcow2", work / f"{name}.qcow2")
        graph = BlockGraph()
        try:
            nodes = await open_all(graph, [work / "base.qcow2", work / "mid.qcow2",
                                           work / "top.qcow2"])  # fmt: skip
            try:
                result: object = view(await walk(nodes[2], nodes[0], 0, 4 * MiB))
            except BlockIOError as err:
                result = err.errno
            corrupt = [n.node_name for n in nodes if getattr(n, "corrupt", False)]
        finally:
            await graph.close_all()
        files = [(work / f"{name}.qcow2").read_bytes() for name in ("base", "mid", "top")]
        outcomes.append((result, corrupt, files))
    assert outcomes[1] == outcomes[0]
