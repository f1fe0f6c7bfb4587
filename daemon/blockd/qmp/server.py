"""The QMP server: the only code that touches client sockets.

Each connection gets a reader (bytes in, requests through the dispatcher, one
at a time and in order) and a writer draining the client's outbox.  Replies
and events share the outbox, so an event emitted while a command runs reaches
the client before that command's reply, as with QEMU.

Resource bounds (figures in README, "Command line"): a client can make the
daemon hold only so much for it.

- Input: one message at a time, capped in bytes, tokens and nesting by the
  JSON stream (json_stream.py); the reader takes 64 KiB per receive.
- Output: the outbox is counted in bytes.  While it holds ``outbox_bytes`` or
  more, the reader stops taking requests from that client (it is throttled,
  the way QEMU stops reading a monitor whose queue is full), so a client that
  sends commands without reading replies costs at most that plus one reply.
  Events are not the client's doing and cannot wait: one that arrives while
  the outbox holds more than ``outbox_max_bytes`` cuts the client off, so a
  client that never reads can never stall the emitter or grow the daemon.
- Across clients: at most ``max_clients`` connections are served at once;
  further ones wait in the listen backlog (as a second client of
  qemu-storage-daemon's monitor socket does) until one leaves.

Failure containment: a command, once started, runs to completion even if its
client vanishes (its effects must not be cut in half); nothing a client does
reaches other clients.  Stopping is bounded whatever a client is doing: the
reader is cancelled at once, and the writer gets ``DRAIN_SECONDS`` to hand
over what is owed, whether the client reads, stalls or never negotiated; a
command still running ``ABORT_SECONDS`` after the stop began is cancelled
(a hung command must not keep the daemon from stopping).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from blockd.errors import ErrorClass
from blockd.events import EmittedEvent, EventBus
from blockd.qmp.dispatch import Dispatcher
from blockd.qmp.protocol import BadRequest, QMPConnection

log = logging.getLogger(__name__)

#: Bytes owed to a client at which its requests stop being read.
OUTBOX_BYTES = 1 << 20
#: Bytes owed to a client past which an event cuts it off.
OUTBOX_MAX_BYTES = 4 << 20
#: Connections served at once; more wait in the listen backlog.
MAX_CLIENTS = 64
#: How long a closing connection may take to flush what it still owes.
DRAIN_SECONDS = 2.0
#: How long, once the server closes, a running command may still take before
#: it is cancelled: the one case where a command does not run to completion.
ABORT_SECONDS = 8.0
_RECEIVE_SIZE = 65536


class _Outbox:
    """The messages owed to one client, counted in bytes until fully sent."""

    def __init__(self) -> None:
        self._messages: deque[bytes] = deque()
        self.size = 0
        self.closed = False
        self._changed = trio.Event()

    def put(self, message: bytes) -> None:
        self._messages.append(message)
        self.size += len(message)
        self._notify()

    def close(self) -> None:
        """No more messages; the writer stops once the queued ones are sent."""
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_below(self, limit: int) -> None:
        while self.size >= limit:
            await self._changed.wait()

    async def next(self) -> bytes | None:
        """The oldest message, left counted until :meth:`sent`; None when closed and empty."""
        while not self._messages:
            if self.closed:
                return None
            await self._changed.wait()
        return self._messages[0]

    def sent(self) -> None:
        self.size -= len(self._messages.popleft())
        self._notify()


class _Client:
    """One connected client's state, as the server sees it."""

    def __init__(self, stream: trio.abc.Stream, conn: QMPConnection, max_bytes: int) -> None:
        self.stream = stream
        self.conn = conn
        self.outbox = _Outbox()
        self.max_bytes = max_bytes
        self.scope = trio.CancelScope()
        self.receive_scope = trio.CancelScope()
        self.writer_scope = trio.CancelScope()
        #: Shields the running command from its client going away.
        self.command_scope = trio.CancelScope(shield=True)
        self.closing = False

    def on_event(self, event: EmittedEvent) -> None:
        # Clients still negotiating get no events, and none are queued for later.
        if not self.conn.negotiated or self.closing:
            return
        if self.outbox.size > self.max_bytes:
            log.warning(
                "dropping a QMP client that stopped reading (%d bytes owed)", self.outbox.size
            )
            self.closing = True
            self.scope.cancel()
            return
        self.outbox.put(self.conn.event(event.name, event.data, event.seconds, event.microseconds))

    def close(self) -> None:
        """Stop reading; what is already queued is still flushed, for a while."""
        self.closing = True
        self.receive_scope.cancel()
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + DRAIN_SECONDS)

    def abort(self) -> None:
        """Cancel even a running command: the daemon is stopping and it hangs."""
        self.command_scope.shield = False
        self.command_scope.cancel()
        self.scope.cancel()


class QMPServer:
    def __init__(
        self,
        dispatcher: Dispatcher,
        bus: EventBus,
        version: Mapping[str, Any],
        *,
        outbox_bytes: int = OUTBOX_BYTES,
        outbox_max_bytes: int = OUTBOX_MAX_BYTES,
        max_clients: int = MAX_CLIENTS,
        abort_seconds: float = ABORT_SECONDS,
    ) -> None:
        self._dispatcher = dispatcher
        self._bus = bus
        self._version = version
        self._outbox_bytes = outbox_bytes
        self._outbox_max_bytes = outbox_max_bytes
        self._slots = trio.Semaphore(max_clients)
        self._clients: set[_Client] = set()
        self._client_left = trio.Event()
        self._abort_seconds = abort_seconds
        self._closed = trio.Event()

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`close`, then wait for every client to finish."""
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(self._accept_loop, listener, nursery)
                task_status.started()
                await self._closed.wait()
                acceptors.cancel_scope.cancel()
            for client in list(self._clients):
                client.close()
            nursery.start_soon(self._abort_stragglers)

    def close(self) -> None:
        """Stop accepting, and let each client flush its replies and go."""
        self._closed.set()

    async def _abort_stragglers(self) -> None:
        """Bound the stop: a command still running after ``abort_seconds`` is cancelled.

        Shielded, so that the caller's own deadline does not end the wait
        before the commands it is waiting for.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(self._abort_seconds):
            while self._clients:
                await self._client_left.wait()
        for client in list(self._clients):
            log.error("stopping: cancelling a command that did not finish")
            client.abort()

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        while True:
            # A connection is accepted only when it can be served.
            await self._slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as err:
                self._slots.release()
                # Out of descriptors and the like: keep serving the clients we have.
                log.error("accepting a QMP connection failed: %s", err)
                await trio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            nursery.start_soon(self._serve_client, stream)

    async def _serve_client(self, stream: trio.abc.Stream) -> None:
        client = _Client(stream, QMPConnection(self._version), self._outbox_max_bytes)
        self._clients.add(client)
        unsubscribe = self._bus.subscribe(client.on_event)
        try:
            with client.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, client)
                    client.outbox.put(client.conn.greeting())
                    await self._read(client)
                    client.closing = True
                    client.outbox.close()
                    client.writer_scope.deadline = trio.current_time() + DRAIN_SECONDS
        finally:
            unsubscribe()
            self._clients.discard(client)
            self._client_left.set()
            self._client_left = trio.Event()
            self._slots.release()
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
                # Throttle a client that does not take its replies.
                await client.outbox.wait_below(self._outbox_bytes)
                if client.closing:
                    return
                if isinstance(request, BadRequest):
                    reply = client.conn.reply_error(request.id, ErrorClass.GENERIC, request.desc)
                else:
                    client.command_scope = trio.CancelScope(shield=True)
                    with client.command_scope:
                        reply = await self._dispatcher.execute(client.conn, request)
                    if client.command_scope.cancelled_caught:
                        return
                client.outbox.put(reply)
                if client.closing:
                    return

    async def _write(self, client: _Client) -> None:
        with client.writer_scope:
            try:
                while (message := await client.outbox.next()) is not None:
                    await client.stream.send_all(message)
                    client.outbox.sent()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The peer went away; stop reading from it too.
                client.scope.cancel()
