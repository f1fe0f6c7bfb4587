"""The composition root: builds the daemon's parts and runs them until stopped.

Nothing else wires layers together; each layer gets what it needs from here.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

from blockd.commands import HANDLERS, CommandContext
from blockd.control_socket import bind_control_socket
from blockd.events import EventBus
from blockd.jobs.registry import JobRegistry
from blockd.qmp.dispatch import Dispatcher
from blockd.qmp.schema import load_command_schemas
from blockd.qmp.server import QMPServer
from blockd.version import version_info

log = logging.getLogger("blockd")

#: How long stopping waits for cancelled jobs to finish their clean-up.
JOB_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Settings:
    socket_path: Path
    socket_mode: int = 0o600


async def _stop_on_signal(signals: AsyncIterator[int], stop: trio.Event) -> None:
    async for signum in signals:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()
        return


async def run(settings: Settings) -> None:
    """Serve QMP on the control socket until ``quit``, SIGTERM or SIGINT."""
    stop = trio.Event()
    bus = EventBus()
    jobs = JobRegistry()
    context = CommandContext(events=bus, jobs=jobs, request_shutdown=stop.set)
    dispatcher = Dispatcher(load_command_schemas(), HANDLERS, context)
    server = QMPServer(dispatcher, bus, version_info())
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        bound = bind_control_socket(settings.socket_path, settings.socket_mode)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(bound.sock))
        try:
            async with trio.open_nursery() as job_host:
                await job_host.start(jobs.serve)
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.serve, [listener])
                    log.info("listening on %s", bound.path)
                    async with trio.open_nursery() as waiting:
                        waiting.start_soon(_stop_on_signal, signals, stop)
                        await stop.wait()
                        waiting.cancel_scope.cancel()
                    log.info("stopping")
                    # Jobs end first, so clients still hear how they ended.
                    await jobs.shutdown(grace=JOB_GRACE_SECONDS)
                    server.close()
                    # Clients get a bounded time to take their last replies.
                    nursery.cancel_scope.deadline = trio.current_time() + 10
                job_host.cancel_scope.cancel()
        finally:
            await listener.aclose()
            bound.remove()
    log.info("stopped")
