"""Export commands: nbd-server-start/stop/add/remove, block-export-add/del, query-block-exports.

Checks run in the order qemu-storage-daemon 7.2 runs them, with its texts.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from typing import Any

import trio

from blockd.commands.context import CommandContext
from blockd.errors import BlockdError
from blockd.export.listeners import unix_listener_cleanup
from blockd.export.server import NBDServer

_UINT32_MAX = (1 << 32) - 1
#: getaddrinfo's texts for EAI_NONAME and EAI_SERVICE (glibc).
_EAI_NONAME = "Name or service not known"
_EAI_SERVICE = "Servname not supported for ai_socktype"


#: Bytes in ``sun_path``; QEMU takes a path that fills it without a terminating NUL.
_SUN_PATH = 108


def _bind_unix(path: str) -> trio.SocketListener:
    """A listening Unix socket at ``path``, checked first as QEMU checks it.

    A NUL would end the name the kernel sees (a socket named after the part
    before it would appear, which the server could then not remove), so such
    a path is refused as the kernel refuses a bad address, before anything
    is created or replaced.
    """
    if "\0" in path:
        raise BlockdError(f"Failed to bind socket to {path}: {os.strerror(errno.EINVAL)}")
    if len(os.fsencode(path)) > _SUN_PATH:
        raise BlockdError(f"UNIX socket path '{path}' is too long")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # QEMU replaces a stale socket file.
        try:
            if os.path.exists(path) and not os.path.isdir(path):
                os.unlink(path)
        except OSError:
            pass
        sock.bind(path)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise BlockdError(
            f"Failed to bind socket to {path}: {os.strerror(err.errno or errno.EIO)}"
        ) from None
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def _bind_inet(data: Mapping[str, Any]) -> list[trio.SocketListener]:
    host, port = data["host"], data["port"]
    # The resolver would read a name only up to a NUL: refuse it as it refuses
    # a name it does not know, in the words QEMU passes on from it.
    if "\0" in host:
        raise BlockdError(f"address resolution failed for {host}:{port}: {_EAI_NONAME}")
    if "\0" in port:
        raise BlockdError(f"address resolution failed for {host}:{port}: {_EAI_SERVICE}")
    try:
        number = int(port)
    except ValueError:
        try:
            number = socket.getservbyname(port, "tcp")
        except OSError:
            raise BlockdError(f"Service '{port}' is not known") from None
    family = socket.AF_UNSPEC
    if data.get("ipv4") and not data.get("ipv6"):
        family = socket.AF_INET
    elif data.get("ipv6") and not data.get("ipv4"):
        family = socket.AF_INET6
    try:
        infos = await trio.socket.getaddrinfo(
            host or None, number, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise BlockdError(f"address resolution failed for {host}:{port}: {err.strerror}") from None
    listeners: list[trio.SocketListener] = []
    try:
        for fam, kind, proto, _name, sockaddr in infos[:1]:
            sock = trio.socket.socket(fam, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                await sock.bind(sockaddr)
                sock.listen(128)
            except OSError as err:
                sock.close()
                raise BlockdError(
                    f"Failed to bind socket: {os.strerror(err.errno or errno.EIO)}"
                ) from None
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


def _uint32(value: int, name: str) -> int:
    """QEMU's uint32 visitor: the integer as uint64 (negatives wrap), then the range.

    (A value that is no integer at all fails schema validation first, worded
    as for any integer member, where QEMU says "expects uint64".)
    """
    number = value % (1 << 64)
    if number > _UINT32_MAX:
        raise BlockdError(f"Parameter '{name}' expects uint32_t")
    return number


async def nbd_server_start(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    max_connections = _uint32(args.get("max-connections", 0), "max-connections")
    if ctx.exports.server is not None:
        raise BlockdError("NBD server already running")
    addr = args["addr"]
    kind, data = addr["type"], addr["data"]
    if kind == "fd":
        raise BlockdError("only QEMU supports file descriptor passing")
    if kind == "vsock":
        raise BlockdError("blockd does not support vsock addresses; use unix or inet")
    if "tls-creds" in args:
        # blockd has no object-add, so no TLS credentials object can exist.
        raise BlockdError(f"No TLS credentials with id '{args['tls-creds']}'")
    if kind == "unix":
        if data.get("abstract"):
            raise BlockdError("blockd does not support abstract Unix sockets")
        path = data["path"]
        listeners = [_bind_unix(path)]
        cleanup = unix_listener_cleanup(path)
    else:
        listeners = await _bind_inet(data)
        cleanup = None
    await ctx.exports.start_server(NBDServer(ctx.exports, listeners, max_connections, cleanup))
    return {}


async def nbd_server_stop(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    await ctx.exports.stop_server()
    return {}


async def block_export_add(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    if args["type"] != "nbd":
        raise BlockdError(f"Export type '{args['type']}' is not supported by blockd (only nbd)")
    export_id = args["id"]
    ctx.exports.check_new_id(export_id)
    node_name = args["node-name"]
    node = ctx.graph.get(node_name)
    if node is None:
        raise BlockdError(f"Cannot find device='' nor node-name='{node_name}'")
    if "iothread" in args:
        # No iothread objects exist in blockd (it has no object-add).
        raise BlockdError(f'iothread "{args["iothread"]}" not found')
    writable = args.get("writable", False)
    if writable and node.read_only:
        raise BlockdError("Cannot export read-only node as writable")
    if ctx.exports.server is None:
        raise BlockdError("NBD server not running")
    for bitmap in args.get("bitmaps", []):
        # blockd keeps no dirty bitmaps, persistent or not.
        raise BlockdError(f"Bitmap '{bitmap}' is not found")
    ctx.exports.add(
        export_id,
        node,
        name=args.get("name"),
        description=args.get("description"),
        writable=writable,
        writethrough=args.get("writethrough", False),
        allocation_depth=args.get("allocation-depth", False),
    )
    return {}


async def block_export_del(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    await ctx.exports.delete(args["id"], args.get("mode", "safe"))
    return {}


async def nbd_server_add(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    # QSD 7.2 looks the device up first, then goes on as block-export-add.
    device = args["device"]
    node = ctx.graph.get(device)
    if node is None:
        raise BlockdError(f"Cannot find device='{device}' nor node-name='{device}'")
    name = args.get("name", device)
    export: dict[str, Any] = {"type": "nbd", "id": name, "node-name": node.node_name, "name": name}
    if "description" in args:
        export["description"] = args["description"]
    # This older command exports a read-only node read-only instead of refusing.
    export["writable"] = args.get("writable", False) and not node.read_only
    if "bitmap" in args:
        export["bitmaps"] = [args["bitmap"]]
    return await block_export_add(ctx, export)


async def nbd_server_remove(ctx: CommandContext, args: Mapping[str, Any]) -> dict[str, Any]:
    # Every export blockd has is an NBD export: this is block-export-del.
    return await block_export_del(ctx, {"id": args["name"], "mode": args.get("mode", "safe")})


async def query_block_exports(ctx: CommandContext, args: Mapping[str, Any]) -> list[Any]:
    # QEMU lists the newest export first.
    return [
        {
            "id": export.id,
            "type": "nbd",
            "node-name": export.node.node_name,
            "shutting-down": export.shutting_down,
        }
        for export in reversed(list(ctx.exports))
    ]
