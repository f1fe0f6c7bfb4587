"""The export registry and the pivot hook, with in-memory nodes and no sockets."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import BlockdError
from blockd.events import EventBus
from blockd.export.exports import Export, ExportRegistry


class MemoryNode(BlockNode):
    driver = "mem"

    def __init__(self, name: str, size: int = 1 << 20, *, read_only: bool = False) -> None:
        super().__init__(name, read_only=read_only)
        self.data = bytearray(size)
        self.gate: trio.Event | None = None
        self.log: list[tuple[str, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    async def _do_read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def _do_write(self, offset: int, data: bytes) -> None:
        self.log.append(("write-start", offset))
        if self.gate is not None:
            await self.gate.wait()
        self.data[offset : offset + len(data)] = data
        self.log.append(("write-done", offset))


def make_export(node: BlockNode) -> tuple[ExportRegistry, Export]:
    registry = ExportRegistry(EventBus(), BlockGraph())
    registry.server = object()  # pretend it runs
    export = registry.add("e", node, name="disk", description=None, writable=True,
                          writethrough=False)  # fmt: skip
    return registry, export


async def write_through(export: Export, offset: int, data: bytes) -> str:
    async with export.use() as node:
        await node.write(offset, data)
        return node.node_name


async def test_pivot_lets_inflight_finish_on_the_old_node_and_moves_new_ones() -> None:
    old, new = MemoryNode("top"), MemoryNode("base")
    old.gate = trio.Event()
    registry, export = make_export(old)
    results: dict[str, str] = {}

    async def run(tag: str, offset: int) -> None:
        results[tag] = await write_through(export, offset, tag.encode())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "early", 0)
        await trio.testing.wait_all_tasks_blocked()
        assert old.log == [("write-start", 0)]

        switched = trio.Event()

        async def pivot() -> None:
            await registry.switch_node(
                old, new, prepare=lambda: new.data.__setitem__(slice(0, 5), old.data[:5])
            )
            switched.set()

        nursery.start_soon(pivot)
        await trio.testing.wait_all_tasks_blocked()
        # a request arriving during the pivot waits for it
        nursery.start_soon(run, "late", 100)
        await trio.testing.wait_all_tasks_blocked()
        assert not switched.is_set()
        assert export.node is old
        assert "late" not in results
        old.gate.set()
    assert results == {"early": "top", "late": "base"}
    assert export.node is new
    assert bytes(old.data[:5]) == b"early"
    assert bytes(new.data[:5]) == b"early"  # copied by prepare, while nothing ran
    assert bytes(new.data[100:104]) == b"late"
    assert old.log == [("write-start", 0), ("write-done", 0)]


async def test_pivot_cancelled_while_draining_leaves_the_export_usable() -> None:
    old, new = MemoryNode("top"), MemoryNode("base")
    old.gate = trio.Event()
    registry, export = make_export(old)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_through, export, 0, b"x")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.05):
            await registry.switch_node(old, new)
        assert export.node is old
        old.gate.set()
    assert await write_through(export, 1, b"y") == "top"


async def test_registry_checks_in_qemu_order() -> None:
    events: list[Any] = []
    bus = EventBus()
    bus.subscribe(events.append)
    registry = ExportRegistry(bus, BlockGraph())
    node = MemoryNode("d")
    with pytest.raises(BlockdError, match="NBD server not running"):
        registry.add("e", node, name=None, description=None, writable=False, writethrough=False)
    with pytest.raises(BlockdError, match="Invalid block export id"):
        registry.check_new_id("1x")
    registry.server = object()  # pretend it runs
    export = registry.add("e", node, name=None, description="d", writable=True, writethrough=False)
    assert export.name == "d"
    assert registry.exports_of(node) == [export]
    with pytest.raises(BlockdError, match="Block export id 'e' is already in use"):
        registry.check_new_id("e")
    with pytest.raises(BlockdError, match="NBD server already has export named 'd'"):
        registry.add("f", node, name=None, description=None, writable=False, writethrough=False)
    ro = MemoryNode("ro", read_only=True)
    with pytest.raises(BlockdError, match="Cannot export read-only node as writable"):
        registry.add("g", ro, name=None, description=None, writable=True, writethrough=False)
    with pytest.raises(BlockdError, match="Export 'x' is not found"):
        await registry.delete("x")
    await registry.delete("e")
    assert [e.name for e in events] == ["BLOCK_EXPORT_DELETED"]
    assert events[0].data == {"id": "e"}
    assert registry.exports_of(node) == []


async def test_registry_pivots_every_export_of_a_node_at_once() -> None:
    registry = ExportRegistry(EventBus(), BlockGraph())
    registry.server = object()
    old, new, other = MemoryNode("top"), MemoryNode("base"), MemoryNode("other")
    a = registry.add("a", old, name="a", description=None, writable=True, writethrough=False)
    b = registry.add("b", old, name="b", description=None, writable=True, writethrough=False)
    c = registry.add("c", other, name="c", description=None, writable=True, writethrough=False)
    old.gate = trio.Event()
    seen_inflight: list[int] = []

    async def prepare() -> None:
        seen_inflight.append(a._inflight + b._inflight)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_through, a, 0, b"a")
        nursery.start_soon(write_through, b, 8, b"b")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(registry.switch_node, old, new, prepare)
        await trio.testing.wait_all_tasks_blocked()
        assert a.node is old and b.node is old
        old.gate.set()
    assert seen_inflight == [0]
    assert a.node is new and b.node is new and c.node is other
    assert registry.exports_of(old) == []
    assert await write_through(b, 16, b"c") == "base"
