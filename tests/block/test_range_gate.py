"""The range gate's exact boundaries and wake-ups (block/serialise.py).

A stream's correctness rests on it: a write over a held range must wait,
and one beside it must not (else guests stall for nothing), and every
waiter must be woken when what it waits for is over (else a job or a
guest hangs).
"""

from __future__ import annotations

import trio
import trio.testing

from blockd.block.serialise import RangeGate


async def test_a_held_range_blocks_exactly_the_writes_over_it() -> None:
    gate = RangeGate()
    outcomes: dict[tuple[int, int], bool] = {}
    async with gate.exclusive(100, 100):

        async def probe() -> None:
            for offset, length in [(0, 100), (50, 10), (200, 100), (99, 1), (99, 2),
                                   (199, 1), (0, 1000)]:  # fmt: skip
                outcomes[(offset, length)] = gate.blocked(offset, length)

        # the holder's own writes are never blocked
        assert not gate.blocked(150, 10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
    assert outcomes == {
        (0, 100): False, (50, 10): False, (200, 100): False, (99, 1): False,
        (99, 2): True, (199, 1): True, (0, 1000): True,
    }  # fmt: skip
    assert not gate.blocked(150, 10)


async def test_taking_a_range_waits_only_for_writes_over_it() -> None:
    gate = RangeGate()
    beside = [await gate.begin_write(90, 10), await gate.begin_write(200, 10)]
    with trio.fail_after(1):
        async with gate.exclusive(100, 100):
            pass  # nothing in flight over it: taken at once
    for offset, length, start, size in ((199, 1, 100, 100), (1000, 1000, 1500, 1000)):
        over = await gate.begin_write(offset, length)
        entered = trio.Event()

        async def take(start: int, size: int, entered: trio.Event) -> None:
            async with gate.exclusive(start, size):
                entered.set()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take, start, size, entered)
                await trio.testing.wait_all_tasks_blocked()
                assert not entered.is_set()
                gate.end_write(over)
        assert entered.is_set()
    for token in beside:
        gate.end_write(token)


async def test_every_waiter_is_woken_however_often_it_waits() -> None:
    """The range waits for two writes ending one after the other, then a
    write waits for the range: each wake-up must come."""
    gate = RangeGate()
    first, second = await gate.begin_write(0, 10), await gate.begin_write(5, 10)
    log: list[str] = []

    async def take() -> None:
        async with gate.exclusive(0, 20):
            log.append("held")
            await trio.sleep(0.01)
        log.append("left")

    async def write() -> None:
        token = await gate.begin_write(3, 1)
        log.append("written")
        gate.end_write(token)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            await trio.testing.wait_all_tasks_blocked()
            gate.end_write(first)
            await trio.testing.wait_all_tasks_blocked()
            assert log == []
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            gate.end_write(second)
    assert log == ["held", "left", "written"]


async def test_overlapping_ranges_are_held_one_after_the_other() -> None:
    """Offsets past 256 (Python shares smaller ints, which hides identity
    slips in comparisons)."""
    gate = RangeGate()
    log: list[str] = []

    async def take(name: str, offset: int) -> None:
        async with gate.exclusive(offset, 1000):
            log.append(f"{name} in")
            await trio.sleep(0.01)
            log.append(f"{name} out")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, "a", 1000)
            await trio.testing.wait_all_tasks_blocked()
            for name, offset in (("b", 1999), ("c", 2000), ("d", 5000), ("e", 0)):
                nursery.start_soon(take, name, offset)
    assert log.index("a out") < log.index("b in")
    for beside in "cde":
        assert log.index(f"{beside} in") < log.index("a out")


async def test_writes_beside_a_range_never_delay_it() -> None:
    gate = RangeGate()
    tokens = [await gate.begin_write(offset, n) for offset, n in ((0, 500), (0, 1000), (2000, 1000),
                                                                  (9000, 1000))]  # fmt: skip
    with trio.fail_after(1):
        async with gate.exclusive(1000, 1000):
            assert not gate.blocked(2000, 1000) and not gate.blocked(0, 1000)
            async with trio.open_nursery() as nursery:

                async def other() -> None:
                    assert gate.blocked(1999, 1000) and gate.blocked(0, 1001)
                    assert not gate.blocked(2000, 1000) and not gate.blocked(0, 1000)
                    assert not gate.blocked(5000, 10)

                nursery.start_soon(other)
    for token in tokens:
        gate.end_write(token)


async def test_settled_waits_for_the_writes_in_flight_and_no_later_ones() -> None:
    """What an active commit's write hook waits for before it starts: a write
    already past the hook must be over; one that starts later is the hook's."""
    gate = RangeGate()
    with trio.fail_after(5):
        await gate.settled()  # nothing in flight: at once
    first = await gate.begin_write(0, 10)
    done = trio.Event()

    async def settle() -> None:
        await gate.settled()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(settle)
        await trio.testing.wait_all_tasks_blocked()
        later = await gate.begin_write(5, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        gate.end_write(first)
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set()
    gate.end_write(later)
