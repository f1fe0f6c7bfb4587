"""The composition root: builds the daemon's parts and runs them until stopped.

Nothing else wires layers together; each layer gets what it needs from here.

Start-up order, each step only once the previous one succeeded: take the
control socket (inherited from systemd, or created), open the start-up nodes
by running ``blockdev-add`` through the dispatcher as a client would, start
serving, then tell systemd ``READY=1``.  Clients that connect meanwhile wait
in the socket's backlog.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from blockd import __version__, logs
from blockd.block.graph import BlockGraph
from blockd.commands import HANDLERS, CommandContext
from blockd.commands.misc import wind_down
from blockd.config import StartupCommand
from blockd.control_socket import BoundSocket, bind_control_socket
from blockd.errors import BlockdError
from blockd.events import EventBus
from blockd.export.exports import ExportRegistry
from blockd.jobs.registry import JobRegistry
from blockd.qmp.dispatch import Dispatcher
from blockd.qmp.protocol import QMPConnection, Request
from blockd.qmp.schema import load_command_schemas
from blockd.qmp.server import QMPServer
from blockd.systemd.activation import InheritedSocket
from blockd.systemd.notify import Notifier, keep_watchdog_fed, watchdog_interval
from blockd.version import version_info

log = logging.getLogger("blockd")

#: How long clients get, once the daemon stops, to take their last replies.
STOP_SECONDS = 10
#: How often the ``STATUS=`` line is recomputed (sent only when it changed).
STATUS_SECONDS = 1.0


class StartupError(Exception):
    """A start-up command failed (a node, the NBD server, an export); the daemon does not start."""


@dataclass(frozen=True)
class Settings:
    #: The socket to create; unused when systemd passed ``inherited`` sockets.
    socket_path: Path | None
    socket_mode: int = 0o600
    #: Listening sockets from socket activation, served instead of ``socket_path``.
    inherited: tuple[InheritedSocket, ...] = ()
    #: Nodes to open, NBD server and exports to start before ``READY=1``, in order.
    startup: tuple[StartupCommand, ...] = ()


class _Stop:
    """The request to stop, and what asked for it (for the log)."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reason = "quit command"

    def set(self) -> None:
        self.event.set()


async def _stop_on_signal(signals: AsyncIterator[int], stop: _Stop) -> None:
    async for signum in signals:
        stop.reason = signal.Signals(signum).name
        stop.set()
        return


def service_status(nodes: int, jobs: int) -> str:
    """The ``STATUS=`` line systemctl shows."""
    return f"{nodes} node{'s' * (nodes != 1)} open, {jobs} job{'s' * (jobs != 1)} running"


async def _report_status(notifier: Notifier, status: Callable[[], str]) -> None:
    last = None
    while True:
        line = status()
        if line != last:
            notifier.status(line)
            last = line
        await trio.sleep(STATUS_SECONDS)


async def run_startup(dispatcher: Dispatcher, steps: tuple[StartupCommand, ...]) -> None:
    """Run the start-up commands in order, as a QMP client would send them."""
    conn = QMPConnection(version_info())
    conn.enter_command_mode([])
    for step in steps:
        request = Request(command=step.command, arguments=dict(step.arguments))
        reply = json.loads(await dispatcher.execute(conn, request))
        if "error" in reply:
            raise StartupError(f"{step.origin}: {reply['error']['desc']}")


def _listen(settings: Settings) -> tuple[list[trio.SocketListener], BoundSocket | None, list[str]]:
    if settings.inherited:
        socks = [inherited.sock for inherited in settings.inherited]
        names = [inherited.describe() for inherited in settings.inherited]
        bound = None
        if settings.socket_path is not None:
            log.info(
                "socket-activated: serving inherited sockets, not creating %s", settings.socket_path
            )
    else:
        if settings.socket_path is None:
            raise ValueError("no socket to serve on")
        bound = bind_control_socket(settings.socket_path, settings.socket_mode)
        socks, names = [bound.sock], [str(bound.path)]
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
    return listeners, bound, names


async def run(settings: Settings) -> None:
    """Serve QMP on the control socket(s) until ``quit``, SIGTERM or SIGINT."""
    stop = _Stop()
    bus = EventBus()
    graph = BlockGraph(events=bus)
    jobs = JobRegistry()
    exports = ExportRegistry(bus, graph)
    context = CommandContext(
        events=bus, graph=graph, jobs=jobs, request_shutdown=stop.set, exports=exports
    )
    dispatcher = Dispatcher(load_command_schemas(), HANDLERS, context)
    server = QMPServer(dispatcher, bus, version_info())

    def status() -> str:
        return service_status(nodes=len(graph), jobs=len(jobs.running()))

    notifier = Notifier.from_environ()
    watchdog = watchdog_interval()
    log.debug(
        "settings: socket %s (mode %04o), %d inherited socket(s), %d start-up command(s), "
        "notify %s, watchdog every %s s",
        settings.socket_path,
        settings.socket_mode,
        len(settings.inherited),
        len(settings.startup),
        "on" if notifier.enabled else "off",
        watchdog,
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        listeners, bound, names = _listen(settings)
        try:
            failed: StartupError | None = None
            async with trio.open_nursery() as service:
                await service.start(jobs.serve)
                await service.start(exports.serve)
                try:
                    await run_startup(dispatcher, settings.startup)
                except StartupError as err:
                    failed = err
                    notifier.status(f"Start-up failed: {err}")
                    await wind_down(jobs, exports)
                else:
                    if watchdog is not None:
                        service.start_soon(keep_watchdog_fed, notifier, watchdog)
                    async with trio.open_nursery() as nursery:
                        await nursery.start(server.serve, listeners)
                        logs.started(__version__, names)
                        notifier.ready(status())
                        if notifier.enabled:
                            service.start_soon(_report_status, notifier, status)
                        async with trio.open_nursery() as waiting:
                            waiting.start_soon(_stop_on_signal, signals, stop)
                            await stop.event.wait()
                            waiting.cancel_scope.cancel()
                        logs.stopping(stop.reason)
                        notifier.stopping()
                        await wind_down(jobs, exports)
                        server.close()
                        # Clients get a bounded time to take their last replies.
                        nursery.cancel_scope.deadline = trio.current_time() + STOP_SECONDS
                service.cancel_scope.cancel()
            if failed is not None:
                raise failed
        finally:
            # Every image is flushed and closed, also after a failed start-up.
            with trio.CancelScope(shield=True):
                try:
                    await graph.close_all()
                except BlockdError as err:
                    # An image that cannot be flushed (EIO, ENOSPC): worth an
                    # error line, not a traceback; it is not a bug in blockd.
                    log.error("closing the block nodes failed: %s", err.desc)
                except Exception:
                    log.exception("closing the block nodes failed")
            for listener in listeners:
                await listener.aclose()
            # Only a socket this process created; systemd's stay where they are.
            if bound is not None:
                bound.remove()
            notifier.close()
    logs.stopped()
