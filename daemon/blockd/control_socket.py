"""The control socket's file: created safely, never stolen, removed on exit.

A socket file left behind by a dead daemon is replaced; one that a live daemon
still answers on is refused, so starting a second instance by mistake cannot
cut the first one off from its clients.  Only the file this process created is
removed at exit (checked by inode), never one that replaced it meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path


class ControlSocketError(Exception):
    """The control socket cannot be set up; the daemon does not start."""


@dataclass(frozen=True)
class BoundSocket:
    sock: socket.socket
    path: Path
    identity: tuple[int, int]

    def remove(self) -> None:
        """Unlink the socket file if it is still the one this process made."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.path)


def _clear_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as err:
        raise ControlSocketError(f"cannot check whether {path} is in use: {err}") from None
    finally:
        probe.close()
    raise ControlSocketError(f"{path} is in use: another daemon is listening on it")


def bind_control_socket(path: Path, mode: int) -> BoundSocket:
    """Listen on a Unix stream socket at ``path`` with permissions ``mode``."""
    path = path.absolute()
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask makes the socket appear with no more than ``mode``: there
        # is no moment at which another user could connect.
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(128)
        st = os.lstat(path)
    except OSError as err:
        sock.close()
        raise ControlSocketError(f"cannot listen on {path}: {err.strerror or err}") from None
    return BoundSocket(sock=sock, path=path, identity=(st.st_dev, st.st_ino))
