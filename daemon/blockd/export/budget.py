"""How many bytes of NBD data the server may hold: per client, and for all clients together.

A request's bytes (a WRITE's payload, a READ's reply) are held from the
moment the request is admitted (a WRITE's payload: from its header on, before
the payload is received) until its reply has been handed to the socket, and
so are handshake replies.  A client whose bytes would go over
its own limit, or over what is left of the server's, is simply not read from
until some of its replies have gone out (or another client's have, for the
server's limit): TCP then slows it down, and a client that never reads its
replies costs at most its own limit, never more daemon memory.

A client holding nothing may always take one request of up to
:data:`ALONE_BYTES`: that keeps every client served (slowly) while stuck
clients hold the server's whole share, and bounds what N stuck clients can
hold at the server's share plus N x 2 MiB, whatever the size of their
requests.  A READ never needs more: one of over :data:`ALONE_BYTES` is read
and sent a piece at a time and holds two pieces (see
:mod:`blockd.export.stream`).  A bigger WRITE (up to NBD's 32 MiB) may run
alone, beyond the client's limit, when the server's share has room for it.
"""

from __future__ import annotations

import trio

MiB = 1 << 20
#: What one client may hold: 8 x 1 MiB READs in flight or waiting to be sent.
CLIENT_BYTES = 8 * MiB
#: What all clients together may hold (beyond the one request each client may
#: always have): 32 stuck clients' worth, so 64 stuck clients cost at most
#: this plus 2 MiB each.
SERVER_BYTES = 256 * MiB
#: The request a client holding nothing may always start (and what a READ
#: sent a piece at a time holds).
ALONE_BYTES = 2 * MiB


class ServerBudget:
    """The bytes all clients of one NBD server hold; clients wait here for room."""

    def __init__(self, limit: int = SERVER_BYTES) -> None:
        self.limit = limit
        self.held = 0
        self._waiters = trio.lowlevel.ParkingLot()

    def freed(self) -> None:
        """Room was made: every waiting client checks again whether it fits now."""
        self._waiters.unpark_all()

    async def wait(self) -> None:
        await self._waiters.park()


class ClientBudget:
    """One client's bytes, counted against its own limit and the server's."""

    def __init__(self, server: ServerBudget, limit: int = CLIENT_BYTES) -> None:
        self.server = server
        self.limit = limit
        self.held = 0

    def fits(self, n: int) -> bool:
        if n == 0 or (self.held == 0 and n <= ALONE_BYTES):
            return True
        if self.held and self.held + n > self.limit:
            return False
        return self.server.held + n <= self.server.limit

    def take(self, n: int) -> None:
        """Hold ``n`` more bytes; only after :meth:`fits` said yes."""
        self.held += n
        self.server.held += n

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes fit, then hold them."""
        while not self.fits(n):
            await self.server.wait()
        self.take(n)

    def give(self, n: int) -> None:
        if n:
            self.held -= n
            self.server.held -= n
            self.server.freed()

    def close(self) -> None:
        """The client is gone: whatever it still held (unsent replies) is free."""
        self.give(self.held)
