"""The ``sd_notify`` protocol: state lines sent as datagrams to ``$NOTIFY_SOCKET``.

A notification is one ``AF_UNIX`` datagram of ``KEY=value`` lines.  A socket
name starting with ``@`` is in the abstract namespace.  Failing to notify must
never take the daemon down: systemd would notice the missing ``READY=1`` or
``WATCHDOG=1`` itself, so errors are logged once and otherwise ignored.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self, address: str | None) -> None:
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as err:
            if not self._warned:
                log.warning("cannot notify the service manager at %s: %s", self._address, err)
                self._warned = True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "Stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None if off.

    As ``sd_watchdog_enabled``: ``$WATCHDOG_USEC`` sets the timeout, and
    ``$WATCHDOG_PID``, when set, must be this process.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


async def keep_watchdog_fed(notifier: Notifier, interval: float) -> None:
    """Ping from the trio loop itself: a wedged loop stops the pings."""
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
