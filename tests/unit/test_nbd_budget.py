"""The NBD byte budget: per client, for all clients, and the one request always allowed."""

from __future__ import annotations

import trio
import trio.testing

from blockd.export.budget import ALONE_BYTES, ClientBudget, ServerBudget

MiB = 1 << 20


async def test_a_client_waits_for_its_own_replies_to_go_out() -> None:
    server = ServerBudget(64 * MiB)
    client = ClientBudget(server, 8 * MiB)
    for _ in range(8):
        await client.acquire(MiB)
    assert not client.fits(MiB) and client.held == server.held == 8 * MiB
    admitted = trio.Event()

    async def ninth() -> None:
        await client.acquire(MiB)
        admitted.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ninth)
        await trio.testing.wait_all_tasks_blocked()
        assert not admitted.is_set()
        client.give(MiB)  # one reply sent
        await admitted.wait()
    assert client.held == 8 * MiB


async def test_the_server_share_bounds_all_clients_but_never_starves_one() -> None:
    server = ServerBudget(16 * MiB)
    stuck = [ClientBudget(server, 8 * MiB) for _ in range(2)]
    for budget in stuck:
        for _ in range(8):
            await budget.acquire(MiB)
    assert server.held == 16 * MiB
    late = ClientBudget(server, 8 * MiB)
    # holding nothing, it may still start one request of up to 2 MiB...
    assert late.fits(ALONE_BYTES) and not late.fits(ALONE_BYTES + 1)
    await late.acquire(MiB)
    # ...but no second while the server's share is taken
    assert not late.fits(MiB)
    stuck[0].close()  # a stuck client goes away: its bytes are free again
    assert server.held == 9 * MiB and late.fits(MiB)


async def test_a_request_over_the_client_limit_runs_alone_if_the_server_has_room() -> None:
    server = ServerBudget(64 * MiB)
    client = ClientBudget(server, 8 * MiB)
    assert client.fits(32 * MiB)
    await client.acquire(32 * MiB)
    assert not client.fits(1)
    other = ClientBudget(server, 8 * MiB)
    await other.acquire(8 * MiB)
    client.give(32 * MiB)
    # 56 MiB held elsewhere: no room for another 32 MiB, but a small one goes
    filler = ClientBudget(server, 64 * MiB)
    await filler.acquire(ALONE_BYTES)
    await filler.acquire(46 * MiB)
    assert not client.fits(32 * MiB) and client.fits(MiB)


async def test_requests_without_data_always_fit() -> None:
    server = ServerBudget(MiB)
    client = ClientBudget(server, MiB)
    await client.acquire(MiB)
    assert client.fits(0)
