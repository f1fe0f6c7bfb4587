"""One connected NBD client's state, and what lets its requests in and out.

A request is admitted once it holds one of the client's
:data:`MAX_INFLIGHT` slots and the bytes it costs (:mod:`blockd.export.budget`);
both are held until its reply has been sent, so a client that floods us, or
stops reading its replies, is slowed down by TCP, not by our memory.  Replies
are queued whole on the client's outbox, which one writer task sends
(:mod:`blockd.export.session`), so frames never interleave mid-way.
"""

from __future__ import annotations

import collections
import math

import trio

from blockd.export import protocol as p
from blockd.export import replies as r
from blockd.export.budget import ALONE_BYTES, ClientBudget, ServerBudget
from blockd.export.exports import Export

#: Requests one client may have running or waiting for their replies to be sent
#: (their bytes are bounded by :mod:`blockd.export.budget`).
MAX_INFLIGHT = 32
#: Worker-thread calls one client may have running at once for reads...
_READ_CALLS = 2
#: ...and for writes: a file's buffered writes take its inode lock one at a time
#: anyway, so a second call would only queue there, and make batches smaller.
_WRITE_CALLS = 1
#: Bytes of reads served from the page cache on the event loop per receive, at most
#: (the rest go to worker threads), so that one client's big reads hold the loop
#: for a few milliseconds at a time, not for all the replies it may have asked for.
INLINE_BYTES = 8 * 1024 * 1024
#: A READ longer than this is read and sent a piece at a time by the writer,
#: holding the piece being sent and the next one: at most what any client
#: may always hold (:data:`blockd.export.budget.ALONE_BYTES`).
STREAM_ABOVE = ALONE_BYTES

# plain ints: enum operators cost microseconds on the per-request path
READ = int(p.Cmd.READ)
WRITE = int(p.Cmd.WRITE)

#: Replies queued together: whole frames, sent in order.
Frames = list[bytes | bytearray]
#: An outbox entry: the frames, the requests they answer (whose slots are
#: given back once sent) and the budget bytes given back then; or a big READ,
#: which the writer reads and sends itself when its turn comes.
Outgoing = tuple[Frames, list[p.Request], int]
Outbox = Outgoing | p.Request


class Lane:
    """Requests of one direction waiting for a worker-thread call, and the calls running.

    While ``limit`` calls run, newly received requests accumulate here, so
    under load each call carries many of them instead of each paying its own
    round trip.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending: collections.deque[p.Request] = collections.deque()
        self.running = 0


class Client:
    """What the session, the fast path and the slow path share about one
    client; the export keeps it (as a ClientHandle) to cut it off."""

    def __init__(self, budget: ServerBudget, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.scope = trio.CancelScope()
        self.closed = trio.Event()
        # Unbounded as a channel: what goes in is bounded by the slots and the budget.
        self.outbox, self.outbox_reader = trio.open_memory_channel[Outbox](math.inf)
        self.slots = trio.Semaphore(MAX_INFLIGHT)
        self.budget = ClientBudget(budget)
        self.reads = Lane(_READ_CALLS)
        self.writes = Lane(_WRITE_CALLS)
        self.nursery: trio.Nursery | None = None
        self.export: Export | None = None
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.size = 0
        #: what the fast path may still read on the loop for the current receive
        self.inline_left = INLINE_BYTES

    # ClientHandle
    def disconnect(self) -> None:
        self.scope.cancel()

    async def wait_closed(self) -> None:
        await self.closed.wait()


def cost(request: p.Request) -> int:
    """The budget bytes a request holds: a WRITE's payload or a READ's reply data
    (at most two pieces of a READ sent a piece at a time)."""
    kind = request.type
    if kind == READ:
        return min(request.length, STREAM_ABOVE)
    return request.length if kind == WRITE else 0


def try_admit(client: Client, nbytes: int) -> bool:
    """Take a request's slot and ``nbytes`` if they are free now; False if not."""
    if not client.slots.value or not client.budget.fits(nbytes):
        return False
    client.slots.acquire_nowait()
    client.budget.take(nbytes)
    return True


async def admit(client: Client, nbytes: int) -> None:
    """Wait for a request's slot and ``nbytes``; given back by :func:`release`."""
    await client.slots.acquire()
    try:
        await client.budget.acquire(nbytes)
    except BaseException:
        client.slots.release()
        raise


def release(client: Client, answered: list[p.Request], held: int) -> None:
    """Give back the slots of the ``answered`` requests and the ``held`` bytes."""
    for _request in answered:
        client.slots.release()
    client.budget.give(held)


def reply(client: Client, frames: Frames, answered: list[p.Request]) -> None:
    """Queue the replies to the ``answered`` requests; the writer gives back
    their slots and bytes once it has sent them."""
    held = sum(map(cost, answered))
    if not frames:
        release(client, answered, held)
        return
    try:
        client.outbox.send_nowait((frames, answered, held))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        release(client, answered, held)


def refusal(client: Client, export: Export, request: p.Request) -> bytes | None:
    """The error reply for a request the protocol refuses before any I/O, or None."""
    refused = p.check_request(
        request, client.size, export.writable, client.structured, client.contexts
    )
    if refused is None:
        return None
    return r.error_reply(request.handle, client.structured, refused.error, refused.message)
