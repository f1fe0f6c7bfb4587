"""The NBD server: the only code that touches NBD client sockets.

It listens (:mod:`~blockd.export.listeners`) and runs one task per client
(:mod:`~blockd.export.session`).  Each client's requests are admitted within
its slots and bytes (:mod:`~blockd.export.client`); plain READs and WRITEs
take the fast path (:mod:`~blockd.export.fast_path`), every other request
a task of its own on the node's async path (:mod:`~blockd.export.slow_path`),
and a big READ is read and sent a piece at a time by the client's writer
(:mod:`~blockd.export.stream`).

Failure containment: garbage, a broken pipe or a vanished client ends only
that client.  A request that reached the block layer runs to completion even
if its client goes away (its node I/O is shielded), so a write is never cut in
half, and an acknowledged FUA write or FLUSH has been flushed to disk first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from blockd.export import protocol as p
from blockd.export.budget import ServerBudget
from blockd.export.client import Client
from blockd.export.exports import ExportRegistry
from blockd.export.listeners import accept_loop, close_listeners
from blockd.export.session import run_session

log = logging.getLogger(__name__)


class NBDServer:
    def __init__(
        self,
        registry: ExportRegistry,
        listeners: list[trio.SocketListener],
        max_connections: int,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self._registry = registry
        self._listeners = listeners
        self._connections = trio.Semaphore(max_connections) if max_connections > 0 else None
        self._cleanup = cleanup
        self._scope = trio.CancelScope()
        self._clients: set[Client] = set()
        self._stopped = trio.Event()
        self.budget = ServerBudget()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for listener in self._listeners:
                        nursery.start_soon(
                            accept_loop, listener, self._connections, self._serve_client, nursery
                        )
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            # Whatever fails here, :meth:`stop` must not wait forever for the end.
            try:
                await close_listeners(self._listeners, self._cleanup)
            finally:
                self._stopped.set()

    async def discard(self) -> None:
        """Close the listening sockets of a server that never served."""
        await close_listeners(self._listeners, None)

    async def stop(self) -> None:
        """Stop listening and drop every client (their running requests finish first)."""
        for client in list(self._clients):
            client.disconnect()
        self._scope.cancel()
        with trio.CancelScope(shield=True):
            await self._stopped.wait()

    async def _serve_client(self, stream: trio.abc.Stream) -> None:
        client = Client(self.budget, stream)
        self._clients.add(client)
        try:
            with client.scope:
                await run_session(self._registry, client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except p.ProtocolError as err:
            log.info("dropping an NBD client: %s", err)
        except Exception:
            log.exception("NBD client failed")
        finally:
            self._clients.discard(client)
            if client.export is not None:
                client.export.clients.discard(client)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            client.budget.close()
            if self._connections is not None:
                self._connections.release()
            client.closed.set()
