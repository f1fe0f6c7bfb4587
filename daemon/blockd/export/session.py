"""One NBD client's connection: the handshake, the receive loop, and the writer.

The receive loop runs the handshake through the sans-I/O
:class:`~blockd.export.protocol.NBDConnection`, then admits each request
(:mod:`blockd.export.client`) and hands it to the fast path, the slow path
or, for a big READ, to the writer.  Replies may finish out of order; each is
queued whole on the client's outbox and the writer sends them, so frames
never interleave mid-way; a request's slot and bytes are given back once its
reply has been sent.

Garbage, a broken pipe or a vanished client ends only that client.
"""

from __future__ import annotations

import logging

import trio

from blockd.export import protocol as p
from blockd.export.client import (
    INLINE_BYTES,
    MAX_INFLIGHT,
    READ,
    STREAM_ABOVE,
    WRITE,
    Client,
    Frames,
    Outbox,
    admit,
    cost,
    release,
    try_admit,
)
from blockd.export.exports import ExportRegistry
from blockd.export.fast_path import BATCH_BYTES, batchable, dispatch, queue, start_batches
from blockd.export.slow_path import start_request
from blockd.export.stream import ReplyCut, start_stream, stream

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 256 * 1024
#: Replies queued together are sent in one write, up to about this many bytes.
_COALESCE_BYTES = 256 * 1024
#: A reply at least this big is sent by itself rather than copied into a bigger write.
_SEND_ALONE = 64 * 1024


async def run_session(registry: ExportRegistry, client: Client) -> None:
    """The handshake, then requests until the client leaves; running requests
    finish and their replies go out before this returns."""

    def lookup(name: str) -> p.ExportInfo | None:
        export = registry.by_name(name)
        return export.info() if export is not None else None

    conn = p.NBDConnection(lookup, registry.listing)
    await client.stream.send_all(conn.greeting())
    async with trio.open_nursery() as nursery:
        client.nursery = nursery
        nursery.start_soon(_write, client)
        try:
            await _read(registry, client, conn)
        except p.ProtocolError as err:
            log.info("dropping an NBD client: %s", err)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            # Let running requests finish and their replies go out, then stop the writer.
            async with trio.open_nursery() as waiter:
                waiter.start_soon(_wait_requests, client)
            client.outbox.close()


async def _wait_requests(client: Client) -> None:
    """Every slot back: every request answered.  A request holds its slot
    until its reply is sent, which is after its worker-thread call (those
    hold no task): so no call of this client runs any more.  (A cut-off
    client does not wait for its calls; closing the image does.)"""
    for _ in range(MAX_INFLIGHT):
        await client.slots.acquire()


async def _read(registry: ExportRegistry, client: Client, conn: p.NBDConnection) -> None:
    batch: list[p.Request] = []
    batch_bytes = 0
    #: bytes taken for a WRITE whose payload was still coming (see below)
    prepaid = 0
    try:
        while True:
            data = await client.stream.receive_some(_RECEIVE_SIZE)
            client.inline_left = INLINE_BYTES
            if not data:
                return
            events = conn.receive_data(data)
            reply = conn.data_to_send()
            if reply:
                # handshake replies count too: a client may ask and never read
                await client.budget.acquire(len(reply))
                client.outbox.send_nowait(([reply], [], len(reply)))
            for event in events:
                if isinstance(event, p.Closed):
                    return
                if isinstance(event, p.Negotiated):
                    export = registry.by_name(event.export.name)
                    if export is None:
                        return
                    client.export = export
                    client.structured = event.structured
                    client.contexts = event.contexts
                    client.size = event.export.size
                    export.clients.add(client)
                    continue
                nbytes = cost(event)
                if prepaid and event.type == WRITE:
                    nbytes = prepaid = 0  # (the first WRITE to come whole is that one)
                if not try_admit(client, nbytes):
                    # what is batched holds slots too: start it before waiting
                    if batch:
                        dispatch(client, batch)
                        batch, batch_bytes = [], 0
                    await admit(client, nbytes)
                if event.type == READ and event.length > STREAM_ABOVE:
                    start_stream(client, event)
                    continue
                if not batchable(client, event):
                    start_request(client, event)
                    continue
                batch.append(event)
                batch_bytes += event.length
                if batch_bytes >= BATCH_BYTES:
                    dispatch(client, batch)
                    batch, batch_bytes = [], 0
            if batch:
                dispatch(client, batch)
                batch, batch_bytes = [], 0
            due = conn.payload_due
            if due and not prepaid:
                # A WRITE's payload is counted before it is received, not once
                # it is whole: else a client holding its replies could still
                # make us buffer up to 32 MiB more, uncounted.
                await client.budget.acquire(due)
                prepaid = due
    finally:
        if batch:
            for request in batch:
                queue(client, request)
            start_batches(client)


async def _write(client: Client) -> None:
    """Send the replies, then give back what they held (until then, a client
    that does not read them holds its slots and bytes, and is not read from)."""
    reader = client.outbox_reader
    try:
        async for first in reader:
            entry: Outbox | None = first
            while entry is not None:
                if isinstance(entry, p.Request):
                    await stream(client, entry)
                    release(client, [entry], cost(entry))
                    entry = None
                    continue
                # Coalesce the replies that are already waiting into one send.
                sent = [entry]
                frames = list(entry[0])
                size = sum(map(len, frames))
                entry = None
                while size < _COALESCE_BYTES:
                    try:
                        more = reader.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if isinstance(more, p.Request):
                        entry = more  # (sent after these)
                        break
                    sent.append(more)
                    frames.extend(more[0])
                    size += sum(map(len, more[0]))
                await _send_frames(client.stream, frames)
                for _frames, answered, held in sent:
                    release(client, answered, held)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ReplyCut):
        client.scope.cancel()


async def _send_frames(stream: trio.abc.Stream, frames: Frames) -> None:
    """Send replies in as few writes as possible without copying big ones."""
    small: list[bytes | bytearray] = []
    for frame in frames:
        if len(frame) >= _SEND_ALONE:
            if small:
                await stream.send_all(small[0] if len(small) == 1 else b"".join(small))
                small = []
            await stream.send_all(frame)
        else:
            small.append(frame)
    if small:
        await stream.send_all(small[0] if len(small) == 1 else b"".join(small))
