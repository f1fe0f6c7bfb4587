"""Block exports: which node each one serves, who is connected, and how one goes away.

An :class:`Export` keeps the node it serves behind one attribute, and every
request reaches the node through :meth:`Export.use`.  That is the hook for an
active commit's pivot: :meth:`ExportRegistry.switch_node` stops new requests
to every export of a node from starting, waits for those in flight to finish
on the node they started on, swaps the node and lets the waiting requests go
on, on the new node.  Clients stay connected throughout.

The :class:`ExportRegistry` owns the NBD server's lifetime (start, stop) and
the exports by id; the QMP commands are thin wrappers around it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import BlockdError
from blockd.events import BlockExportDeleted, EventSink
from blockd.export.protocol import MAX_STRING, ExportInfo
from blockd.ids import well_formed

log = logging.getLogger(__name__)

SECTOR = 512


class ClientHandle(Protocol):
    """What an export needs from a connected client: a way to cut it off."""

    def disconnect(self) -> None: ...

    async def wait_closed(self) -> None: ...


class ServerHandle(Protocol):
    """What the registry needs from the NBD server it runs
    (:class:`blockd.export.server.NBDServer`, which itself looks exports up here)."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    async def stop(self) -> None: ...

    async def discard(self) -> None: ...


class Export:
    def __init__(
        self,
        export_id: str,
        name: str,
        node: BlockNode,
        *,
        writable: bool,
        writethrough: bool,
        description: str | None,
        allocation_depth: bool = False,
    ) -> None:
        self.id = export_id
        self.allocation_depth = allocation_depth
        self.name = name
        self.writable = writable
        self.writethrough = writethrough
        self.description = description
        self.shutting_down = False
        #: Set once the export is deleted and its clients are gone.
        self.gone = trio.Event()
        self.clients: set[ClientHandle] = set()
        self._node = node
        self._inflight = 0
        self._drained = trio.Event()
        self._gate: trio.Event | None = None

    @property
    def node(self) -> BlockNode:
        """The node requests go to; change it only with :meth:`ExportRegistry.switch_node`."""
        return self._node

    def info(self) -> ExportInfo:
        # QEMU exports whole 512-byte sectors: a partial last one is left out.
        size = self._node.size // SECTOR * SECTOR
        return ExportInfo(self.name, size, self.writable, self.description, self.allocation_depth)

    @asynccontextmanager
    async def use(self) -> AsyncIterator[BlockNode]:
        """The node one request runs on, held until the request is done."""
        while (node := self.enter()) is None:
            assert self._gate is not None
            await self._gate.wait()
        try:
            yield node
        finally:
            self.leave()

    def enter(self) -> BlockNode | None:
        """:meth:`use` for a caller that cannot wait: the node, to be given
        back with :meth:`leave`, or None while a pivot holds the export."""
        if self._gate is not None:
            return None
        self._inflight += 1
        return self._node

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    async def drain(self) -> None:
        """Wait until no request is running on the node."""
        while self._inflight:
            self._drained = trio.Event()
            await self._drained.wait()

    async def hold(self) -> trio.Event:
        """Stop new requests from starting (they wait); returns the gate to :meth:`release`."""
        while self._gate is not None:
            await self._gate.wait()
        gate = trio.Event()
        self._gate = gate
        return gate

    def release(self, gate: trio.Event) -> None:
        if self._gate is gate:
            self._gate = None
        gate.set()


async def _call(prepare: Callable[[], Any] | None) -> None:
    if prepare is not None:
        result = prepare()
        if hasattr(result, "__await__"):
            await result


class ExportRegistry:
    """Exports by id, plus the NBD server they are reached through."""

    def __init__(self, events: EventSink, graph: BlockGraph) -> None:
        self._events = events
        self._graph = graph
        self._exports: dict[str, Export] = {}
        self._nursery: trio.Nursery | None = None
        #: the NBD server, while one runs
        self.server: ServerHandle | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the NBD server's tasks until cancelled; :meth:`shutdown` first."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise BlockdError("the export registry is not serving")
        return self._nursery

    # -- lookup -----------------------------------------------------------------------

    def __iter__(self) -> Any:
        return iter(list(self._exports.values()))

    def get(self, export_id: str) -> Export | None:
        return self._exports.get(export_id)

    def by_name(self, name: str) -> Export | None:
        for export in self._exports.values():
            if export.name == name and not export.shutting_down:
                return export
        return None

    def exports_of(self, node: BlockNode) -> list[Export]:
        """Exports serving ``node`` (blockdev-del refuses such a node)."""
        return [e for e in self._exports.values() if e.node is node]

    def listing(self) -> list[ExportInfo]:
        return [e.info() for e in self._exports.values() if not e.shutting_down]

    async def switch_node(
        self, old: BlockNode, new: BlockNode, prepare: Callable[[], Any] | None = None
    ) -> list[Export]:
        """The pivot hook: every export of ``old`` serves ``new``, all at one moment.

        New requests on those exports wait, in-flight ones finish on ``old``,
        ``prepare`` runs once while none is in flight (an active commit copies
        its last dirty clusters and rewrites the chain there), then all swap
        and resume.  Clients stay connected.  Returns the exports switched.
        """
        exports = self.exports_of(old)
        held: list[tuple[Export, trio.Event]] = []
        try:
            for export in exports:
                held.append((export, await export.hold()))
            for export in exports:
                await export.drain()
            await _call(prepare)
            for export in exports:
                self._graph.move_user(old, new, export.id)
                await self._serve_from(export, new)
        finally:
            for export, gate in held:
                export.release(gate)
        return exports

    async def _serve_from(self, export: Export, new: BlockNode) -> None:
        """Point a held, drained export at ``new`` (its graph entry already moved)."""
        old, export._node = export._node, new
        self._graph.add_user(new, export.id)
        await self._graph.remove_user(old, export.id)

    @asynccontextmanager
    async def quiesced(self) -> AsyncIterator[None]:
        """Every export held (new requests wait) and drained while the body runs.

        A ``transaction`` runs inside, as QEMU drains all I/O around one: its
        actions may then move exports with :meth:`retarget`, and undo those
        moves, without a client ever seeing a half-done graph.  Clients stay
        connected; their requests continue, on whatever node their export
        serves by then, once the body is done.
        """
        held: list[tuple[Export, trio.Event]] = []
        try:
            for export in list(self._exports.values()):
                held.append((export, await export.hold()))
            for export, _gate in held:
                await export.drain()
            yield
        finally:
            for export, gate in held:
                export.release(gate)

    async def retarget(self, old: BlockNode, new: BlockNode) -> list[Export]:
        """Inside :meth:`quiesced`: every export of ``old`` serves ``new`` from now on.

        Refused (BlockError, nothing moved) when ``new`` cannot give the
        exports what they need of it, e.g. a writable export and a read-only
        ``new``.  Returns the exports moved.
        """
        exports = self.exports_of(old)
        self._graph.hand_over(old, new, [export.id for export in exports])
        for export in exports:
            await self._serve_from(export, new)
        return exports

    # -- changes ------------------------------------------------------------------------

    def check_new_id(self, export_id: str) -> None:
        if not well_formed(export_id):
            raise BlockdError("Invalid block export id")
        if export_id in self._exports:
            raise BlockdError(f"Block export id '{export_id}' is already in use")

    def add(
        self,
        export_id: str,
        node: BlockNode,
        *,
        name: str | None,
        description: str | None,
        writable: bool,
        writethrough: bool,
        allocation_depth: bool = False,
    ) -> Export:
        """Create an NBD export, checking as QEMU's ``nbd_export_create`` does."""
        if self.server is None:
            raise BlockdError("NBD server not running")
        if writable and node.read_only:
            raise BlockdError("Cannot export read-only node as writable")
        # QEMU attaches first (refusing what the node's users cannot share),
        # then checks names, then forbids resizing under its clients.
        self._graph.attach_user(node, export_id, writable=writable)
        try:
            name = self._check_name(node, name, description)
            self._graph.forbid_resize(node, export_id)
        except BlockdError:
            self._graph.detach_user(node, export_id)
            raise
        export = Export(
            export_id,
            name,
            node,
            writable=writable,
            writethrough=writethrough,
            description=description,
            allocation_depth=allocation_depth,
        )
        self._exports[export_id] = export
        self._graph.add_user(node, export_id)
        log.info("export %s: node %s as NBD export %r", export_id, node.node_name, name)
        return export

    def _check_name(self, node: BlockNode, name: str | None, description: str | None) -> str:
        name = node.node_name if name is None else name
        if len(name.encode()) > MAX_STRING:
            raise BlockdError(f"export name '{name}' too long")
        if description is not None and len(description.encode()) > MAX_STRING:
            raise BlockdError(f"description '{description}' too long")
        if self.by_name(name) is not None:
            raise BlockdError(f"NBD server already has export named '{name}'")
        return name

    async def delete(self, export_id: str, mode: str = "safe") -> None:
        export = self._exports.get(export_id)
        if export is None:
            raise BlockdError(f"Export '{export_id}' is not found")
        if mode == "safe" and export.clients:
            raise BlockdError(f"export '{export_id}' still in use")
        await self._remove(export, wait=False)

    async def _remove(self, export: Export, *, wait: bool = True) -> None:
        """Disconnect the clients; the export is gone (and the event sent) once they are.

        With ``wait=False`` (``block-export-del`` in hard mode) the command
        returns at once and the export stays listed as shutting down until its
        clients are gone, as in QEMU.
        """
        if export.shutting_down:
            if wait:
                with trio.CancelScope(shield=True):
                    await export.gone.wait()
            return
        export.shutting_down = True
        clients = list(export.clients)
        for client in clients:
            client.disconnect()

        async def finish() -> None:
            with trio.CancelScope(shield=True):
                for client in clients:
                    await client.wait_closed()
                await export.drain()
                self._exports.pop(export.id, None)
                self._graph.detach_user(export.node, export.id)
                await self._graph.remove_user(export.node, export.id)
            log.info("export %s deleted", export.id)
            self._events.emit(BlockExportDeleted(export.id))
            export.gone.set()

        if wait or not clients:
            await finish()
        else:
            self.nursery.start_soon(finish)

    async def remove_all(self) -> None:
        """Hard-delete every export, newest first; those without clients go at once."""
        exports = list(reversed(self._exports.values()))
        for export in exports:
            await self._remove(export, wait=False)
        with trio.CancelScope(shield=True):
            for export in exports:
                await export.gone.wait()

    # -- the server -------------------------------------------------------------------

    async def start_server(self, server: ServerHandle) -> None:
        """Run ``server`` until :meth:`stop_server`; one already running wins, and
        ``server`` is discarded (its listening sockets closed)."""
        if self.server is not None:
            await server.discard()
            raise BlockdError("NBD server already running")
        self.server = server
        await self.nursery.start(server.serve)

    async def stop_server(self) -> None:
        if self.server is None:
            raise BlockdError("NBD server not running")
        await self.remove_all()
        server, self.server = self.server, None
        await server.stop()

    async def shutdown(self) -> None:
        """Daemon stop: every export deleted (events included), the server closed."""
        if self.server is not None:
            await self.stop_server()
        else:
            await self.remove_all()
