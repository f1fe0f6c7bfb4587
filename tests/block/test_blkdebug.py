"""blkdebug: injected errors surface as BlockIOError with the errno asked for."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blockd.block.blkdebug import BlkdebugNode, Rule
from blockd.block.graph import BlockGraph
from blockd.block.open import open_node
from blockd.errors import BlockError, BlockIOError

from .conftest import assert_clean, check, create

MiB = 1 << 20


async def test_qcow2_over_blkdebug(tmp_path: Path, graph: BlockGraph) -> None:
    img = create(tmp_path / "d.qcow2", MiB)
    node = await open_node(graph, {
        "driver": "qcow2", "node-name": "q",
        "file": {"driver": "blkdebug", "node-name": "dbg",
                 "inject-error": [{"event": "none", "iotype": "write", "errno": "ENOSPC",
                                   "offset": 0x50000, "length": 1, "once": True}],
                 "image": {"driver": "file", "filename": str(img)}},
    })
    dbg = graph.get("dbg")
    assert isinstance(dbg, BlkdebugNode)
    with pytest.raises(BlockIOError) as info:
        await node.write(0, b"a" * 4096)  # data lands in cluster 5 (0x50000)
    assert info.value.errno == errno.ENOSPC
    assert info.value.is_nospace
    await node.write(0, b"b" * 4096)  # once: the retry succeeds
    assert await node.read(0, 4) == b"bbbb"
    dbg.inject(Rule(iotype="read", errno=errno.EIO))
    with pytest.raises(BlockIOError) as info:
        await node.read(0, 4)
    assert info.value.errno == errno.EIO
    dbg.clear()
    await graph.close_all()
    # a failed data write leaves only a leak at worst, never corruption
    result = check(img)
    assert result.get("corruptions", 0) == 0


async def test_rule_options(tmp_path: Path, graph: BlockGraph) -> None:
    assert Rule.from_options({"iotype": "flush", "errno": 28}).errno == errno.ENOSPC
    rule = Rule.from_options({"iotype": "read", "sector": 2})
    assert rule.matches("read", 1024, 1)
    assert not rule.matches("read", 0, 1024)
    with pytest.raises(BlockError, match="iotype"):
        Rule.from_options({"iotype": "bogus"})
    img = create(tmp_path / "e.qcow2", MiB)
    node = await open_node(graph, {
        "driver": "qcow2",
        "file": {"driver": "blkdebug",
                 "inject-error": [{"event": "none", "iotype": "flush"}],
                 "image": {"driver": "file", "filename": str(img)}},
    })
    with pytest.raises(BlockIOError):
        await node.flush()
    assert node.file is not None
    assert isinstance(node.file, BlkdebugNode)
    node.file.clear()
    await node.write(MiB - 512, b"z" * 512)
    await graph.close_all()
    assert_clean(img)
