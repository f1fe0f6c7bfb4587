"""Chains for checking the commit plan against what a commit really does.

Each case is base <- mid <- top made by qemu-img and qemu-io; :func:`run_case`
opens it in a real blockd, asks ``__org.blockd_commit-plan`` over the
socket, commits mid into base (block-commit, to completion), and measures
base's growth.  ``tests/integration/test_commit_plan.py`` asserts on the
rows and ``bench/commit_plan_table.py`` prints them beside ``qemu-img measure``.

"Growth" is what the commit takes from base's file system: the change of
the host file's allocated bytes (``st_blocks * 512``), measured with blockd
stopped (everything flushed and closed).  The file's length is recorded too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import RawQMP, start_blockd
from tests.images import check, create, guest_view, qemu_img, qemu_io, same_data

K, M = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Case:
    name: str
    #: (virtual size, qemu-img -o options, qemu-io commands) for base, mid, top
    base: tuple[str, str, tuple[str, ...]]
    mid: tuple[str, str, tuple[str, ...]]
    top: tuple[str, str, tuple[str, ...]] = ("", "", ("write -P 0x33 0 64k",))


def _spread(pattern: int, start: int, step: int, count: int, length: str) -> tuple[str, ...]:
    return tuple(f"write -P {pattern} {start + i * step} {length}" for i in range(count))


CASES = [
    Case("64K sparse", ("256M", "", ("write -P 1 0 32M",)),
         ("256M", "", _spread(2, 1 * M, 3 * M + 4 * K, 60, "4k"))),
    Case("64K full", ("128M", "", ()), ("128M", "", ("write -P 2 0 128M",))),
    Case("4K sparse", ("128M", "cluster_size=4096", ("write -P 1 0 8M",)),
         ("128M", "cluster_size=4096", _spread(2, 0, 517 * K, 200, "8k"))),
    Case("4K full", ("64M", "cluster_size=4096", ()),
         ("64M", "cluster_size=4096", ("write -P 2 0 64M",))),
    Case("2M over 64K, sparse", ("256M", "cluster_size=2097152", ("write -P 1 0 4M",)),
         ("256M", "", _spread(2, 5 * M, 9 * M + 64 * K, 25, "64k"))),
    Case("2M full", ("128M", "cluster_size=2097152", ()),
         ("128M", "cluster_size=2097152", ("write -P 2 0 128M",))),
    Case("base smaller than top", ("16M", "cluster_size=4096", ("write -P 1 0 16M",)),
         ("2G", "cluster_size=4096",
          ("write -P 2 8M 16M", "write -P 3 1G 4M", "write -P 4 2040M 8M"))),
    # the commit zeroes base's data past mid's end up to top's (the overlay
    # would see it): top is twice mid, and mid ends half-way through a copy
    # chunk, so that walk's last step is a partial one
    Case("base larger than a shorter top", ("32M", "", ("write -P 1 0 32M",)),
         ("8448K", "", ("write -P 2 0 1M",)), ("16896K", "", ("write -P 0x33 0 64k",))),
    Case("zero clusters over base data", ("128M", "", ("write -P 1 0 64M",)),
         ("128M", "", ("write -z 0 16M", "write -z 96M 16M", "write -P 2 16M 8M",
                       "write -z 40M 64k", "write -P 3 100M 1M"))),
    Case("base partially allocated", ("256M", "", _spread(1, 0, 2 * M, 64, "512k")),
         ("256M", "", _spread(2, 256 * K, 2 * M, 64, "1M"))),
    Case("v2 base", ("128M", "compat=0.10", ("write -P 1 0 32M",)),
         ("128M", "", ("write -z 8M 8M", "write -P 2 24M 32M", "write -z 100M 4M"))),
    Case("512-byte clusters, 64-bit refcounts (refcount table grows)",
         ("16M", "cluster_size=512,refcount_bits=64", ()),
         ("16M", "cluster_size=512", ("write -P 2 0 12M",))),
]


@dataclass(frozen=True)
class Row:
    case: str
    cluster_size: int
    predicted: int
    actual: int
    file_growth: int
    plan: dict[str, Any]
    #: qemu-img measure of the whole chain (what a new image holding it needs)
    measure_required: int
    base_allocated_before: int

    @property
    def tolerance(self) -> int:
        return abs(self.actual) // 100 + self.cluster_size

    @property
    def within(self) -> bool:
        return abs(self.predicted - self.actual) <= self.tolerance


def make(case: Case, d: Path) -> Path:
    backing = None
    for name, (size, options, commands) in (("base", case.base), ("mid", case.mid),
                                            ("top", case.top)):  # fmt: skip
        image = create(d / f"{name}.qcow2", size=size or case.mid[0], backing=backing,
                       options=options)  # fmt: skip
        if commands:
            qemu_io(image, *commands)
        backing = image.name
    return guest_view(d / "top.qcow2", d / "before.raw")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def run_case(case: Case, d: Path, sock: Path) -> Row:
    """Make the chain, ask the plan, commit, measure; the images are checked by qemu-img."""
    before = make(case, d)
    base = d / "base.qcow2"
    cluster = int(json.loads(qemu_img("info", "--output=json", str(base)))["cluster-size"])
    measure = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", "-o",
                                  f"cluster_size={cluster}", str(d / "top.qcow2")))  # fmt: skip
    alloc_before, size_before = allocated(base), base.stat().st_size
    daemon = start_blockd(sock)
    try:
        with RawQMP(daemon.socket_path) as qmp:
            qmp.negotiate()
            for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
                file = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
                args = {"driver": "qcow2", "node-name": name, "read-only": name != "top",
                        "backing": backing, "file": file}  # fmt: skip
                assert qmp.execute("blockdev-add", args) == {"return": {}}
            selection = {"device": "top", "top-node": "mid", "base-node": "base"}
            reply = qmp.execute("__org.blockd_commit-plan", selection)
            assert "return" in reply, reply
            plan = reply["return"]
            commit = {"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base"}
            assert qmp.execute("block-commit", commit) == {"return": {}}
            done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=600, device="c")
            assert "error" not in done["data"], done
    finally:
        daemon.stop()
    check(base)
    assert same_data(before, d / "top.qcow2")
    return Row(
        case=case.name,
        cluster_size=cluster,
        predicted=plan["growth"]["total"],
        actual=allocated(base) - alloc_before,
        file_growth=base.stat().st_size - size_before,
        plan=plan,
        measure_required=int(measure["required"]),
        base_allocated_before=alloc_before,
    )
