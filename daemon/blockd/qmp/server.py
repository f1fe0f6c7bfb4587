"""The QMP server: the only code that touches client sockets.

Each connection gets a reader (bytes in, requests through the dispatcher, one
at a time and in order) and a writer draining a bounded outbox.  Replies and
events share the outbox, so an event emitted while a command runs reaches the
client before that command's reply, as with QEMU.

Failure containment: a command, once started, runs to completion even if its
client vanishes (its effects must not be cut in half); a client that stops
reading while events pile up is dropped when its outbox overflows, so it can
never stall the emitter; nothing a client does reaches other clients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from blockd.errors import ErrorClass
from blockd.events import EmittedEvent, EventBus
from blockd.qmp.dispatch import Dispatcher
from blockd.qmp.protocol import BadRequest, QMPConnection

log = logging.getLogger(__name__)

#: Messages that may wait for a slow client before it is dropped.
OUTBOX_LIMIT = 1024
#: How long a closing connection may take to flush what it still owes.
DRAIN_SECONDS = 2.0
_RECEIVE_SIZE = 65536


class _Client:
    """One connected client's state, as the server sees it."""

    def __init__(self, stream: trio.abc.Stream, conn: QMPConnection, limit: int) -> None:
        self.stream = stream
        self.conn = conn
        self.outbox, self.outbox_reader = trio.open_memory_channel[bytes](limit)
        self.scope = trio.CancelScope()
        self.receive_scope = trio.CancelScope()
        self.writer_scope = trio.CancelScope()
        self.closing = False

    def on_event(self, event: EmittedEvent) -> None:
        # Clients still negotiating get no events, and none are queued for later.
        if not self.conn.negotiated or self.closing:
            return
        message = self.conn.event(event.name, event.data, event.seconds, event.microseconds)
        try:
            self.outbox.send_nowait(message)
        except trio.WouldBlock:
            log.warning("dropping a QMP client that stopped reading events")
            self.scope.cancel()
        except trio.ClosedResourceError:
            pass

    def close(self) -> None:
        """Stop reading; what is already queued is still flushed, for a while."""
        self.closing = True
        self.receive_scope.cancel()
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + DRAIN_SECONDS)


class QMPServer:
    def __init__(
        self,
        dispatcher: Dispatcher,
        bus: EventBus,
        version: Mapping[str, Any],
        *,
        outbox_limit: int = OUTBOX_LIMIT,
    ) -> None:
        self._dispatcher = dispatcher
        self._bus = bus
        self._version = version
        self._outbox_limit = outbox_limit
        self._clients: set[_Client] = set()
        self._accepting = trio.CancelScope()
        self._closed = trio.Event()

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`close`, then wait for every client to finish."""
        async with trio.open_nursery() as nursery:
            with self._accepting:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, nursery)
                    task_status.started()
                    await self._closed.wait()
                    acceptors.cancel_scope.cancel()
            for client in list(self._clients):
                client.close()

    def close(self) -> None:
        """Stop accepting, and let each client flush its replies and go."""
        self._closed.set()

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as err:
                # Out of descriptors and the like: keep serving the clients we have.
                log.error("accepting a QMP connection failed: %s", err)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_client, stream)

    async def _serve_client(self, stream: trio.abc.Stream) -> None:
        client = _Client(stream, QMPConnection(self._version), self._outbox_limit)
        self._clients.add(client)
        unsubscribe = self._bus.subscribe(client.on_event)
        try:
            with client.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, client)
                    client.outbox.send_nowait(client.conn.greeting())
                    await self._read(client)
                    client.closing = True
                    client.outbox.close()
                    client.writer_scope.deadline = trio.current_time() + DRAIN_SECONDS
        finally:
            unsubscribe()
            self._clients.discard(client)
            await trio.aclose_forcefully(stream)

    async def _read(self, client: _Client) -> None:
        while not client.closing:
            with client.receive_scope:
                try:
                    data = await client.stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if client.receive_scope.cancelled_caught or not data:
                return
            client.receive_scope = trio.CancelScope()
            for request in client.conn.receive_data(data):
                if isinstance(request, BadRequest):
                    reply = client.conn.reply_error(request.id, ErrorClass.GENERIC, request.desc)
                else:
                    with trio.CancelScope(shield=True):
                        reply = await self._dispatcher.execute(client.conn, request)
                await client.outbox.send(reply)
                if client.closing:
                    return

    async def _write(self, client: _Client) -> None:
        with client.writer_scope:
            try:
                async for message in client.outbox_reader:
                    await client.stream.send_all(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The peer went away; stop reading from it too.
                client.scope.cancel()
