"""Requests the fast path does not take, each in a task of its own on the node's async path.

Every command but a plain READ or WRITE comes here, and so does a READ or
WRITE the node cannot resolve to host-file positions from cached metadata,
or one that arrives while a pivot holds the export (it waits here).  Once
it has reached the node, a request runs to its end even if its client goes
away, so a write is never cut in half, and an acknowledged FUA write or
FLUSH has been flushed to disk first.
"""

from __future__ import annotations

import logging

import trio

from blockd.block.chain import sparse_read
from blockd.block.node import BlockNode
from blockd.errors import BlockdError
from blockd.export import protocol as p
from blockd.export import replies as r
from blockd.export.allocation import allocation_extents
from blockd.export.client import Client, cost, refusal, release, reply
from blockd.export.errors import nbd_error
from blockd.export.exports import Export

log = logging.getLogger(__name__)

#: Extents one BLOCK_STATUS reply may carry.
MAX_EXTENTS = 1024


def start_request(client: Client, request: p.Request) -> None:
    """Run one request (holding a slot) on the node's ordinary async path, in a task."""
    assert client.nursery is not None
    client.nursery.start_soon(_request, client, request)


async def _request(client: Client, request: p.Request) -> None:
    try:
        frames = await _run(client, request)
    except BaseException:
        release(client, [request], cost(request))
        raise
    reply(client, [frames], [request])


async def _run(client: Client, request: p.Request) -> bytes:
    export = client.export
    assert export is not None
    refused = refusal(client, export, request)
    if refused is not None:
        return refused
    try:
        async with export.use() as node:
            # Once started, node I/O is never cut short by a disconnect.
            with trio.CancelScope(shield=True):
                answer = await _execute(client, export, node, request)
    except Exception as err:
        if not isinstance(err, BlockdError | OSError):
            log.exception("NBD request %d failed unexpectedly", request.type)
        return r.error_reply(request.handle, client.structured, nbd_error(err), str(err))
    return answer


def _has_fast_zeroes(node: BlockNode) -> bool:
    return type(node)._do_write_zeroes is not BlockNode._do_write_zeroes


async def _execute(client: Client, export: Export, node: BlockNode, request: p.Request) -> bytes:
    kind, offset, length, flags = request.type, request.offset, request.length, request.flags
    handle = request.handle
    fua = bool(flags & p.CmdFlag.FUA) or export.writethrough
    if kind == p.Cmd.READ:
        if not client.structured:
            return r.simple_reply(handle, 0, await node.read(offset, length))
        if flags & p.CmdFlag.DF and length:  # (nothing to read: a NONE chunk, below)
            data = await node.read(offset, length)
            return b"".join(r.read_chunks(handle, offset, [(length, data)], df=True))
        return b"".join(r.read_chunks(handle, offset, await sparse_read(node, offset, length)))
    if kind == p.Cmd.WRITE:
        await node.write(offset, request.data)
        if fua:
            await node.flush(completing=True)
    elif kind == p.Cmd.FLUSH:
        await node.flush()
    elif kind == p.Cmd.TRIM:
        await node.discard(offset, length)
        if flags & p.CmdFlag.FUA:
            # A discard takes no FUA down the stack (nor a write-through
            # export's): QEMU's server flushes after it only when the client
            # asks, once it has finished (so it counts, if carried out).
            await node.flush()
    elif kind == p.Cmd.WRITE_ZEROES:
        if flags & p.CmdFlag.FAST_ZERO and not _has_fast_zeroes(node):
            return r.error_reply(
                handle, client.structured, p.ENOTSUP, "fast zeroing is not supported"
            )
        await node.write_zeroes(offset, length)
        if fua:
            await node.flush(completing=True)
    elif kind == p.Cmd.CACHE:
        pass
    elif kind == p.Cmd.BLOCK_STATUS:
        limit = 1 if flags & p.CmdFlag.REQ_ONE else MAX_EXTENTS
        ids = sorted(client.contexts)
        out = []
        for index, context_id in enumerate(ids):
            context = client.contexts[context_id]
            extents = await allocation_extents(node, offset, length, limit, context)
            out.append(
                r.block_status_chunk(handle, context_id, extents, done=index == len(ids) - 1)
            )
        return b"".join(out)
    return r.simple_reply(handle)
