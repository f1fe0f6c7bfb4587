"""The connection to the daemon: QMP through ``qemu.qmp``, failures as one clear line.

Everything that can go wrong between blockctl and the daemon becomes a
:class:`CtlError` here, so the command line has one place that turns errors
into a message and an exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate

#: The socket of the systemd units (systemd/blockd.socket, blockd.service).
DEFAULT_SOCKET = "/run/blockd/qmp.sock"

#: How long a socket may take to greet and negotiate: something listening that
#: never speaks QMP (an NBD socket, a stuck process) must not hang blockctl.
CONNECT_TIMEOUT = 10.0


class CtlError(Exception):
    """A failure to report as one line on stderr; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class DaemonError(CtlError):
    """The daemon refused a command (a QMP error reply): its words, after the command's name."""

    def __init__(self, command: str, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(f"{command}: {desc}")
        self.desc = desc
        #: QMP's error class: ``CommandNotFound`` tells a daemon without the command
        self.error_class = error_class


def socket_path(option: str | None) -> str:
    """``--socket``, else ``$BLOCKD_SOCKET``, else the systemd units' socket."""
    return option or os.environ.get("BLOCKD_SOCKET") or DEFAULT_SOCKET


class Daemon:
    """One negotiated QMP session with blockd."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._qmp = QMPClient("blockctl")

    async def __aenter__(self) -> Daemon:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._disconnect()

    async def _disconnect(self) -> None:
        # qemu.qmp re-raises here what ended a lost connection (EOFError when
        # blockd quit); that has been reported already, or did not matter.
        with contextlib.suppress(QMPError, EOFError, OSError):
            await self._qmp.disconnect()

    async def _connect(self) -> None:
        path = Path(self.path)
        if not path.exists():
            raise CtlError(
                f"no socket at {self.path}: is blockd running? (--socket PATH or $BLOCKD_SOCKET)"
            )
        if not path.is_socket():
            raise CtlError(f"{self.path} is not a socket")
        try:
            await asyncio.wait_for(self._qmp.connect(self.path), CONNECT_TIMEOUT)
        except TimeoutError:
            await self._disconnect()
            raise CtlError(
                f"{self.path}: no QMP greeting within {CONNECT_TIMEOUT:.0f} s "
                "(not a QMP socket? a monitor busy with another client?)"
            ) from None
        except ConnectError as err:
            await self._disconnect()
            raise CtlError(_connect_failure(self.path, err.exc)) from None

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        try:
            return await self._qmp.execute(command, arguments)
        except ExecuteError as err:
            raise DaemonError(command, str(err), err.error_class) from None
        except QMPError as err:
            raise CtlError(f"{command}: lost the connection to blockd ({err})") from None

    def listener(self) -> EventListener:
        """Every event from now on, queued until read."""
        listener = EventListener()
        self._qmp.register_listener(listener)
        return listener

    async def closed(self) -> None:
        """Returns when the daemon has closed the connection."""
        while self._qmp.runstate == Runstate.RUNNING:
            await self._qmp.runstate_changed()


def _connect_failure(path: str, cause: Exception) -> str:
    if isinstance(cause, ConnectionRefusedError):
        return f"{path}: nobody is listening (blockd not running? a stale socket?)"
    if isinstance(cause, PermissionError):
        return f"{path}: permission denied (run as a user allowed on the socket)"
    if isinstance(cause, QMPError | EOFError | ConnectionError):
        return f"{path}: not a QMP socket, or blockd closed the connection ({cause})"
    return f"{path}: cannot connect: {cause}"


def quiet_library_logs() -> None:
    """qemu.qmp logs connection trouble itself; blockctl says it once, its own way."""
    logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
    logging.getLogger("qemu.qmp").propagate = False
