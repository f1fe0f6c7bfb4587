"""Range locks (``blockd.block.ranges``): overlapping holders wait, in arrival order."""

from __future__ import annotations

import trio
import trio.testing

from blockd.block.ranges import RangeLocks


async def test_overlapping_locks_wait_and_a_queued_lock_is_not_jumped() -> None:
    locks = RangeLocks()
    first = locks.try_lock(0, 4096)
    assert first is not None
    assert locks.try_lock(4096, 4096) is not None  # no overlap: at once
    order: list[str] = []

    async def whole() -> None:
        entry = await locks.lock(0, 1 << 40)
        order.append("whole")
        locks.unlock(entry)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(whole)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        # a later small request overlapping the queued big one waits behind it
        assert locks.try_lock(1 << 20, 4096) is None
        locks.unlock(first)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # the second entry still holds [4096, 8192)
        for entry in list(locks._entries):
            if entry.end == 8192:
                locks.unlock(entry)
    assert order == ["whole"]
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_no_entry() -> None:
    locks = RangeLocks()
    held = locks.try_lock(0, 10)
    assert held is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(locks.lock, 5, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert len(locks) == 2
        nursery.cancel_scope.cancel()
    assert len(locks) == 1
    locks.unlock(held)
    async with locks.holding(0, 20):
        assert len(locks) == 1
    assert len(locks) == 0
