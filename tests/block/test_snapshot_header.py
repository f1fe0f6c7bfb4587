"""An overlay's header made to name its node (and put back), killed at every I/O.

A kill keeps everything written before it (the page cache survives the
process): the image's file stops at its k-th write or flush.  Whatever k,
``qemu-img check`` finds nothing wrong, and the header names either nothing
(the overlay reads as the empty disk it was) or the node, with its format
(the overlay reads as the node): never a half-written name.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.graph import BlockGraph
from blockd.block.snapshot import Appended, detach_overlay, link_overlay, name_backing
from tests.block.test_kill_leaks import KilledFile
from tests.power import PowerLoss

from .conftest import assert_clean, create, open_qcow2, qemu_io, run

MiB = 1 << 20


def header(path: Path) -> tuple[str | None, str | None]:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(path)).stdout)
    return info.get("backing-filename"), info.get("backing-filename-format")


async def test_a_kill_anywhere_in_naming_or_unnaming_the_node(
    tmp_path: Path, graph: BlockGraph
) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    qemu_io(base, "write -P 0x11 0 512k")
    node = await open_qcow2(graph, base, name="base", read_only=True)
    seen: dict[str, set[tuple[str | None, str | None]]] = {"name": set(), "unname": set()}
    for step in ("name", "unname"):
        k = 0
        while True:
            k += 1
            img = create(tmp_path / f"{step}{k}.qcow2", MiB)
            if step == "unname":  # start from an overlay that names the node
                run("qemu-img", "rebase", "-u", "-b", str(base), "-F", "qcow2", str(img))
            inner = await FileNode.open("f", str(img), read_only=False)
            file = KilledFile(inner, k)
            overlay = await Qcow2Node.open("ov", file, read_only=False)
            scratch = BlockGraph()  # the overlay's own bookkeeping, not the base's graph
            if step == "name":
                appended = link_overlay(scratch, node, overlay)
                act = name_backing(appended)
            else:
                overlay.backing = node
                act = detach_overlay(scratch, Appended(node, overlay, named=True))
            killed = False
            try:
                await act
            except PowerLoss:
                killed = True
            with contextlib.suppress(PowerLoss):  # a killed one writes nothing more
                await overlay.close()
            await inner.close()
            assert_clean(img)
            state = header(img)
            assert state in ((None, None), (str(base), "qcow2")), (step, k, state)
            if state[0] is not None:
                run("qemu-img", "compare", "-U", str(img), str(base))
            seen[step].add(state)
            img.unlink()
            if not killed:
                break
        assert k > 2, "the header change made fewer than two I/O steps"
    # both outcomes happen, in both directions
    assert seen["name"] == seen["unname"] == {(None, None), (str(base), "qcow2")}
