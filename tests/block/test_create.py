"""New images: byte for byte what ``qemu-img create`` makes, and usable at once.

qemu-img is the judge: each image is made by qemu-img and by blockd with the
same options and the two files are compared whole (``cmp``), then blockd's
image is checked by ``qemu-img check`` and opened and written by blockd.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blockd.block.create import (
    CreateError,
    Qcow2Request,
    create_file,
    create_qcow2_image,
    format_qcow2,
    validate_qcow2,
)
from blockd.block.drivers import file as file_driver
from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.create import Qcow2CreateOptions, plan_image
from blockd.block.graph import BlockGraph
from blockd.errors import BlockIOError, ImageError
from blockd.events import EventBus
from blockd.jobs.create import CreateJob
from tests.block.conftest import assert_clean, open_qcow2, pattern, qemu_io, run

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def qemu_img_create(path: Path, o: Qcow2CreateOptions) -> None:
    opts = [
        f"cluster_size={o.cluster_size}",
        f"compat={'1.1' if o.version == 3 else '0.10'}",
        f"refcount_bits={o.refcount_bits}",
        f"lazy_refcounts={'on' if o.lazy_refcounts else 'off'}",
        f"preallocation={o.preallocation}",
        f"compression_type={'zstd' if o.zstd else 'zlib'}" if o.version == 3 else "",
    ]
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(p for p in opts if p)]
    if o.backing_file is not None:
        args += ["-u", "-b", o.backing_file, "-F", str(o.backing_fmt)]
    run(*args, str(path), str(o.size))


def write_plan(path: Path, o: Qcow2CreateOptions) -> None:
    """The plan alone, written with plain file calls (the layout under test)."""
    plan = plan_image(o)
    with open(path, "wb") as f:
        for c, data in plan.clusters.items():
            f.seek(c * plan.cluster_size)
            f.write(data)
        f.truncate(plan.length)


def _data_ranges(path: Path) -> list[tuple[int, int]]:
    """Where the file may hold non-zero bytes (its data extents)."""
    out = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def same_file(a: Path, b: Path) -> None:
    """``cmp``, but reading only where either file has data: the holes of big
    sparse images read as zeros in both."""
    assert a.stat().st_size == b.stat().st_size
    if a.stat().st_size < 1 << 30:
        proc = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted(_data_ranges(a) + _data_ranges(b)):
            for pos in range(start, end, 1 << 20):
                n = min(1 << 20, end - pos)
                assert os.pread(fa.fileno(), n, pos) == os.pread(fb.fileno(), n, pos), (
                    f"{a} and {b} differ in bytes {pos}..{pos + n}")


LAYOUTS: list[dict[str, Any]] = [
    {"size": GiB},
    {"size": GiB + 512},  # not cluster-aligned
    {"size": 0},
    {"size": TiB},
    {"size": 4 * TiB},
    {"size": 4 * TiB, "cluster_size": 4096},  # an L1 table of 16 MiB: many refcount blocks
    {"size": GiB, "backing_file": "base.qcow2", "backing_fmt": "qcow2"},
    {"size": GiB, "backing_file": "b" * 880, "backing_fmt": "raw", "cluster_size": 1024},
    {"size": GiB, "version": 2},
    {"size": GiB, "version": 2, "backing_file": "base.raw", "backing_fmt": "raw"},
    {"size": GiB, "lazy_refcounts": True},
    {"size": GiB, "zstd": True},
    {"size": 10 * GiB, "cluster_size": 512, "refcount_bits": 64},  # table grows many times
    {"size": 10 * GiB, "cluster_size": 512, "refcount_bits": 1},
    {"size": 3 * GiB, "cluster_size": 2 * MiB, "refcount_bits": 8},
    {"size": 64 * MiB + 512, "cluster_size": 4096, "preallocation": "metadata"},
    {"size": 3 * MiB + 512, "cluster_size": 512, "refcount_bits": 64, "preallocation": "metadata"},
    {"size": 100 * MiB, "cluster_size": 2 * MiB, "preallocation": "metadata"},
    {"size": 2 * GiB, "preallocation": "metadata", "lazy_refcounts": True},
    {"size": 100 * GiB, "preallocation": "metadata"},  # the refcount table grows
    {"size": 64 * MiB, "preallocation": "falloc"},
    {"size": 8 * MiB, "cluster_size": 512, "refcount_bits": 1, "preallocation": "falloc"},
    {"size": 0, "preallocation": "full"},
    {"size": 64 * MiB + 512, "cluster_size": 4096, "preallocation": "full", "version": 2},
]
LAYOUTS += [{"size": 5 * GiB + 1536, "cluster_size": 1 << b} for b in range(9, 22)]
LAYOUTS += [{"size": 20 * GiB, "refcount_bits": 1 << b, "cluster_size": 1024}
            for b in range(7)]


@pytest.mark.parametrize("opts", LAYOUTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                o.items())[:80])
def test_layout_is_qemu_img_create(tmp_path: Path, opts: dict[str, Any]) -> None:
    o = Qcow2CreateOptions(**opts)
    qemu_img_create(tmp_path / "qemu.qcow2", o)
    write_plan(tmp_path / "blockd.qcow2", o)
    same_file(tmp_path / "qemu.qcow2", tmp_path / "blockd.qcow2")


def test_too_big_for_the_l1_table() -> None:
    with pytest.raises(CreateError, match=r"^Could not resize image: Failed to grow the L1 "
                                          r"table: File too large$"):
        plan_image(Qcow2CreateOptions(size=4 * TiB, cluster_size=512))


def test_backing_name_that_does_not_fit_the_header() -> None:
    with pytest.raises(CreateError, match="No space left on device"):
        plan_image(Qcow2CreateOptions(size=GiB, cluster_size=512, backing_file="x" * 1000,
                                      backing_fmt="qcow2"))


@pytest.mark.parametrize(("request_", "message"), [
    (Qcow2Request(size=1000), "Image size must be a multiple of 512 bytes"),
    (Qcow2Request(size=GiB, cluster_size=3000), "Cluster size must be a power of two"),
    (Qcow2Request(size=GiB, cluster_size=256), "Cluster size must be a power of two"),
    (Qcow2Request(size=GiB, cluster_size=4 * MiB), "Cluster size must be a power of two"),
    (Qcow2Request(size=GiB, backing_fmt="raw"), "Backing format cannot be used without"),
    (Qcow2Request(size=GiB, backing_file="b", preallocation="metadata"),
     "Backing file and preallocation"),
    (Qcow2Request(size=GiB, version="v2", lazy_refcounts=True), "Lazy refcounts only"),
    (Qcow2Request(size=GiB, refcount_bits=3), "Refcount width must be a power of two"),
    (Qcow2Request(size=GiB, refcount_bits=128), "Refcount width must be a power of two"),
    (Qcow2Request(size=GiB, version="v2", refcount_bits=8), "Different refcount widths"),
    (Qcow2Request(size=GiB, version="v2", compression_type="zstd"), "Non-zlib compression"),
    (Qcow2Request(size=GiB, extended_l2=True), "extended L2 entries"),
    (Qcow2Request(size=GiB, data_file="d"), "external data file"),
    (Qcow2Request(size=GiB, data_file_raw=True), "data-file-raw requires data-file"),
])
def test_refused_options(request_: Qcow2Request, message: str) -> None:
    with pytest.raises(CreateError, match=message):
        validate_qcow2(request_)


async def test_overlay_for_a_snapshot(tmp_path: Path, graph: BlockGraph) -> None:
    """The snapshot-sync overlay: qemu-img's bytes, and it reads its backing file."""
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(GiB + 512))
    qemu_io(base, "write -P 7 0 1M")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    await create_qcow2_image(str(ours), GiB + 512, backing_file=str(base), backing_fmt="qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(theirs))
    same_file(theirs, ours)
    assert_clean(ours)
    node = await open_qcow2(graph, ours)
    assert await node.read(0, 4096) == pattern(7, 4096)
    await node.write(MiB, pattern(9, 4096))
    await graph.close_all()
    assert_clean(ours)
    qemu_io(ours, "read -P 7 0 1M", "read -P 9 1M 4k")


async def test_create_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "old.qcow2"
    path.write_bytes(b"\xff" * (3 * MiB + 7))
    await create_qcow2_image(str(path), 8 * MiB, cluster_size=4096)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
        str(tmp_path / "q.qcow2"), str(8 * MiB))
    same_file(tmp_path / "q.qcow2", path)


async def test_create_is_refused_on_a_locked_file(tmp_path: Path) -> None:
    """A file another process writes is neither emptied nor touched."""
    path = tmp_path / "busy.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M")
    before = path.read_bytes()
    holder = await FileNode.open("holder", str(path), read_only=False)
    try:
        with pytest.raises(ImageError, match=r'^Failed to get "write" lock$'):
            await create_qcow2_image(str(path), MiB)
    finally:
        await holder.close()
    assert path.read_bytes() == before


async def test_create_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "x.qcow2"
    with pytest.raises(BlockIOError, match=f"^Could not create '{path}': No such file"):
        await create_qcow2_image(str(path), MiB)


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
async def test_create_file_modes(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "f.raw"
    path.write_bytes(b"junk" * 1000)
    await create_file(str(path), 3 * MiB + 5, preallocation=mode)
    assert path.stat().st_size == 3 * MiB + 5
    assert path.read_bytes() == bytes(3 * MiB + 5)
    allocated = os.stat(path).st_blocks * 512
    if mode == "off":
        assert allocated < MiB
    else:
        assert allocated >= 3 * MiB


async def test_create_file_checks(tmp_path: Path) -> None:
    with pytest.raises(CreateError, match=r"^Extent size hint is too large$"):
        await create_file(str(tmp_path / "x"), 0, extent_size_hint=1 << 32)
    assert not (tmp_path / "x").exists()
    # as in QEMU, the file is made (empty) before the mode is looked at
    with pytest.raises(BlockIOError, match=r"^Unsupported preallocation mode: metadata$"):
        await create_file(str(tmp_path / "x"), 0, preallocation="metadata")
    assert (tmp_path / "x").stat().st_size == 0


async def test_format_on_an_open_file_node(tmp_path: Path) -> None:
    """blockdev-create's path: the file node is written through the block layer."""
    path = tmp_path / "n.qcow2"
    await create_file(str(path), 0)
    node = await FileNode.open("f", str(path), read_only=False)
    try:
        o = Qcow2CreateOptions(size=16 * MiB, cluster_size=512, refcount_bits=64,
                               preallocation="metadata", lazy_refcounts=True)
        await format_qcow2(node, o)
    finally:
        await node.close()
    qemu_img_create(tmp_path / "q.qcow2", o)
    same_file(tmp_path / "q.qcow2", path)
    assert_clean(path)


@pytest.mark.parametrize("asked", [{}, {"nocow": False}, {"nocow": True}])
async def test_the_create_job_sets_nocow_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked: dict[str, Any]
) -> None:
    """blockdev-create of a ``file`` turns copy-on-write off (btrfs) only on
    request, as QEMU: the attribute is made on the file itself, and this
    machine's file systems may ignore it, so the call is what is checked."""
    made: list[int] = []
    monkeypatch.setattr(file_driver, "_set_nocow", made.append)
    path = tmp_path / "disk"
    job = CreateJob("j", EventBus(), BlockGraph(),
                    {"driver": "file", "filename": str(path), "size": 4096, **asked})  # fmt: skip
    await job.run()
    assert path.stat().st_size == 4096
    assert len(made) == (1 if asked.get("nocow") else 0)
