"""The NBD server's listening sockets: accepting clients, and closing and removing them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)


async def accept_loop(
    listener: trio.SocketListener,
    connections: trio.Semaphore | None,
    serve_client: Callable[[trio.abc.Stream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept clients while ``connections`` has room, each served in a task of
    its own (which gives its connection back when it ends)."""
    while True:
        if connections is not None:
            await connections.acquire()
        try:
            stream = await listener.accept()
        except OSError as err:
            if connections is not None:
                connections.release()
            log.error("accepting an NBD connection failed: %s", err)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(serve_client, stream)


async def close_listeners(
    listeners: list[trio.SocketListener], cleanup: Callable[[], None] | None
) -> None:
    """Close the listening sockets, even while being cancelled, then run ``cleanup``."""
    with trio.CancelScope(shield=True):
        for listener in listeners:
            with contextlib.suppress(OSError):
                await listener.aclose()
    if cleanup is not None:
        cleanup()


def unix_listener_cleanup(path: str) -> Callable[[], None]:
    """Removes the Unix socket file the server created, once it stops."""

    def remove() -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    return remove
