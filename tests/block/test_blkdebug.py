"""blkdebug: QEMU's rules (an event activates them, the next matching request fails)
surface as BlockIOError with the errno asked for.  tests/interop/test_blkdebug_differential.py
holds the same rules against qemu-storage-daemon."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blockd.block.blkdebug import BlkdebugNode, Rule, Transition, rules_from_options
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.block.open import open_node
from blockd.errors import BlockError, BlockIOError

from .conftest import assert_clean, check, create, qemu_io

MiB = 1 << 20


async def open_over_blkdebug(
    graph: BlockGraph, img: Path, rules: list[dict[str, object]], **extra: object
) -> tuple[BlockNode, BlkdebugNode]:
    node = await open_node(graph, {
        "driver": "qcow2", "node-name": "q",
        "file": {"driver": "blkdebug", "node-name": "dbg", "inject-error": rules,
                 "image": {"driver": "file", "filename": str(img)}, **extra},
    })  # fmt: skip
    dbg = graph.get("dbg")
    assert isinstance(dbg, BlkdebugNode)
    return node, dbg


async def test_qcow2_over_blkdebug(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "d.qcow2", MiB)
    # a fresh 1 MiB image: header, L1, refcount table and block, then cluster 4
    # for the first L2 table; the first data cluster is cluster 5 (0x50000)
    rule = {"event": "write_aio", "errno": errno.ENOSPC, "sector": 0x50000 // 512, "once": True}
    node, dbg = await open_over_blkdebug(graph, img, [rule])
    with pytest.raises(BlockIOError) as info:
        await node.write(0, b"a" * 4096)
    assert info.value.errno == errno.ENOSPC
    assert info.value.is_nospace
    await node.write(0, b"b" * 4096)  # once: the retry succeeds
    assert await node.read(0, 4) == b"bbbb"
    dbg.inject(Rule(event="read_aio"))
    with pytest.raises(BlockIOError) as info:
        await node.read(0, 4)
    assert info.value.errno == errno.EIO
    with pytest.raises(BlockIOError):
        await node.read(0, 4)  # not once: every read raising the event fails
    dbg.clear()
    assert await node.read(0, 4) == b"bbbb"
    await graph.close_all()
    # a failed data write leaves only a leak at worst, never corruption
    result = check(img)
    assert result.get("corruptions", 0) == 0


async def test_open_raises_no_data_events(tmp_path: Path, graph: BlockGraph) -> None:
    """The issue's case: reading the header at open is not ``read_aio``."""
    img = create(tmp_path / "d.qcow2", MiB)
    qemu_io(img, "write -P 7 0 4k")
    node, _dbg = await open_over_blkdebug(graph, img, [{"event": "read_aio", "once": True}])
    with pytest.raises(BlockIOError):
        await node.read(0, 4096)  # the first guest data read
    assert await node.read(0, 4096) == b"\x07" * 4096
    await graph.close_all()


async def test_open_events(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "d.qcow2", MiB)
    with pytest.raises(BlockIOError, match=r"^Could not read qcow2 header: Input/output error$"):
        await open_over_blkdebug(graph, img, [{"event": "none"}])
    with pytest.raises(
        BlockIOError, match=r"^Could not initialize refcount handling: No space left on device$"
    ):
        await open_over_blkdebug(graph, img, [{"event": "reftable_load", "errno": errno.ENOSPC}])
    assert graph.get("q") is None and graph.get("dbg") is None


async def test_flush_rules(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "e.qcow2", MiB)
    qemu_io(img, "write 0 64k")  # overwritten in place below: no allocation, no flush
    node, dbg = await open_over_blkdebug(graph, img, [{"event": "none", "iotype": "flush"}])
    await node.flush()  # nothing written since opening: the filter is not flushed
    await node.write(512, b"z" * 512)
    with pytest.raises(BlockIOError):
        await node.flush()
    dbg.clear()
    await node.flush()
    dbg.inject(Rule(event="flush_to_disk", once=True))
    await node.flush()  # nothing new: no flush_to_disk event
    await node.write(0, b"y" * 512)
    with pytest.raises(BlockIOError):
        await node.flush()
    await node.flush()
    await graph.close_all()
    assert_clean(img)


async def test_reopen_reads_tables_again(tmp_path: Path, graph: BlockGraph) -> None:
    """QEMU's qcow2 starts new metadata caches at every reopen: after one,
    the L2 table comes from the file again, where an l2_load rule fails it
    (the random differential's seed 7008471: a read after a commit's base
    went back to read-only)."""
    img = create(tmp_path / "r.qcow2", MiB)
    qemu_io(img, "write -P 7 0 4k")
    rule = {"event": "l2_load", "errno": errno.ENOSPC, "once": True}
    node, dbg = await open_over_blkdebug(graph, img, [rule])
    with pytest.raises(BlockIOError):
        await node.read(0, 4)
    assert await node.read(0, 4) == b"\x07" * 4  # the L2 table is cached now
    dbg.inject(Rule(event="l2_load", errno=errno.ENOSPC, once=True))
    assert await node.read(0, 4) == b"\x07" * 4  # no load, no failure
    for read_only in (True, False):
        await node.reopen(read_only=read_only)
        with pytest.raises(BlockIOError) as info:
            await node.read(0, 4)
        assert info.value.errno == errno.ENOSPC
        assert await node.read(0, 4) == b"\x07" * 4
        dbg.inject(Rule(event="l2_load", errno=errno.ENOSPC, once=True))
    await graph.close_all()
    assert_clean(img)


async def test_state_machine(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "s.qcow2", MiB)
    qemu_io(img, "write -P 1 0 64k")
    node, dbg = await open_over_blkdebug(
        graph, img, [{"event": "write_aio", "state": 2, "once": True}],
        **{"set-state": [{"event": "read_aio", "new_state": 2},
                         {"event": "read_aio", "new_state": 3}]},
    )  # fmt: skip
    assert dbg.state == 1
    await node.write(0, b"w" * 512)  # state 1: the rule is not raised
    await node.read(0, 512)
    assert dbg.state == 2  # the first set-state rule given wins
    with pytest.raises(BlockIOError):
        await node.write(0, b"w" * 512)
    await node.write(0, b"w" * 512)
    await graph.close_all()


def test_rule_options() -> None:
    rule = Rule.from_options({"event": "read_aio", "sector": 2})
    assert rule.offset == 1024 and rule.errno == errno.EIO and not rule.once
    assert rule.matches("read", 1024, 1) and rule.matches("write", 512, 1024)
    assert not rule.matches("read", 0, 1024) and not rule.matches("read", 1025, 512)
    assert not rule.matches("block-status", 1024, 1)  # not among the defaults
    assert not rule.matches("flush", 0, 0)  # a flush covers no sector
    assert Rule.from_options({"event": "none", "iotype": "flush"}).matches("flush", 0, 0)
    assert Rule.from_options({"event": "pwritev", "errno": 28}).errno == errno.ENOSPC
    with pytest.raises(BlockError, match=r"^Parameter 'iotype' does not accept value 'bogus'$"):
        Rule.from_options({"event": "read_aio", "iotype": "bogus"})
    with pytest.raises(BlockError, match=r"^Parameter 'event' does not accept value 'x'$"):
        Rule.from_options({"event": "x"})
    with pytest.raises(BlockError, match=r"^Parameter 'event' is missing$"):
        Rule.from_options({"iotype": "read"})
    with pytest.raises(BlockError, match=r"^Parameter 'new_state' is missing$"):
        Transition.from_options({"event": "read_aio"})
    rules, transitions = rules_from_options({
        "inject-error": [{"event": "l2_load"}],
        "set-state": [{"event": "l2_load", "state": 1, "new_state": 2}],
    })  # fmt: skip
    assert [r.event for r in rules] == ["l2_load"]
    assert transitions == [Transition("l2_load", 2, 1)]
