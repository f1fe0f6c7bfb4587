"""Socket activation: the listening sockets systemd hands over, as ``sd_listen_fds``.

systemd passes ``$LISTEN_FDS`` descriptors starting at 3, says which process
they are for in ``$LISTEN_PID`` and names them in ``$LISTEN_FDNAMES``.  blockd
serves QMP on every one of them, so each must be a listening Unix stream
socket; anything else is refused before the daemon starts, rather than being
served wrongly.  The variables are removed from the environment once read, so
they are never passed on.  The socket files belong to systemd: blockd never
removes them.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

#: The first descriptor systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The inherited descriptors cannot be served; the daemon does not start."""


@dataclass(frozen=True)
class InheritedSocket:
    sock: socket.socket
    fd: int
    name: str

    def describe(self) -> str:
        """How the socket appears in logs: its path, else its fd and name."""
        try:
            address = self.sock.getsockname()
        except OSError:
            address = ""
        if isinstance(address, bytes):
            address = "@" + address[1:].decode(errors="replace") if address else ""
        return address or f"fd {self.fd} ({self.name})"


def _describe(sock: socket.socket, listening: bool) -> str:
    families = {socket.AF_UNIX: "Unix", socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
    types = {
        socket.SOCK_STREAM: "stream",
        socket.SOCK_DGRAM: "datagram",
        socket.SOCK_SEQPACKET: "seqpacket",
    }
    family = families.get(sock.family, str(int(sock.family)))
    kind = types.get(sock.type, str(int(sock.type)))
    return f"family {family}, type {kind}, {'listening' if listening else 'not listening'}"


def _adopt(fd: int, name: str) -> InheritedSocket:
    where = f"inherited fd {fd} ({name})"
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise ActivationError(f"{where} is not open: {err.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ActivationError(
            f"{where} is not a listening Unix stream socket (not a socket at all); "
            "blockd serves only those"
        )
    sock = socket.socket(fileno=fd)
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            raise ActivationError(
                f"{where} is not a listening Unix stream socket "
                f"({_describe(sock, bool(listening))}); blockd serves only those "
                "(ListenStream= with a path in the .socket unit, Accept=no)"
            )
        sock.set_inheritable(False)
    except BaseException:
        sock.detach()  # leave the descriptor as it was; the process exits anyway
        raise
    return InheritedSocket(sock=sock, fd=fd, name=name)


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[InheritedSocket]:
    """The sockets passed to this process, or none if it was not socket-activated.

    Raises :class:`ActivationError` if a passed descriptor is not a listening
    Unix stream socket or the variables are malformed.
    """
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, None) for name in _VARIABLES}
    pid, count = values["LISTEN_PID"], values["LISTEN_FDS"]
    if pid is None or count is None:
        return []
    if pid != str(os.getpid()):
        # Meant for another process (a parent that did not clean up).
        return []
    try:
        n = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number") from None
    if n < 0:
        raise ActivationError(f"LISTEN_FDS={count!r} is negative")
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    names += ["unknown"] * (n - len(names))
    return [_adopt(LISTEN_FDS_START + i, names[i]) for i in range(n)]
