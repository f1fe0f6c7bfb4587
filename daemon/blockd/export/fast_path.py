"""Plain READs and WRITEs without a task each: a thread round trip and a task
each cost more than a 4 KiB copy in the page cache.

The node resolves such a request to host-file positions from cached metadata
(:meth:`BlockNode.direct_io`).  Reads of cached data are answered at once on
the loop (``RWF_NOWAIT`` reads, which the kernel refuses rather than block; up
to :data:`blockd.export.client.INLINE_BYTES` per receive); the others go,
many per call, to worker threads (see :class:`blockd.export.client.Lane`), and
each call reports back through a loop callback, not a waiting task.  What the
node cannot resolve, and whatever arrives while a pivot holds the export,
goes to :mod:`blockd.export.slow_path`.
"""

from __future__ import annotations

import logging

import outcome

from blockd.block.direct import DirectJob, DirectResult, read_cached, start_direct
from blockd.block.node import BlockNode
from blockd.export import protocol as p
from blockd.export import replies as r
from blockd.export.client import (
    READ,
    STREAM_ABOVE,
    WRITE,
    Client,
    Frames,
    Lane,
    refusal,
    reply,
)
from blockd.export.errors import nbd_error
from blockd.export.exports import Export
from blockd.export.slow_path import start_request

log = logging.getLogger(__name__)

#: Requests received together go to one worker-thread call, up to about this many bytes.
BATCH_BYTES = 1024 * 1024

_FUA = int(p.CmdFlag.FUA)


def batchable(client: Client, request: p.Request) -> bool:
    """Whether a request may take the fast path: plain reads and writes (a FUA
    write or a write-through export needs its flush)."""
    kind = request.type
    if kind == READ:
        return 0 < request.length <= STREAM_ABOVE
    return (
        kind == WRITE
        and request.length > 0
        and not request.flags & _FUA
        and client.export is not None
        and not client.export.writethrough
    )


def queue(client: Client, request: p.Request) -> None:
    """Queue a READ or WRITE for a worker-thread call (see :func:`start_batches`)."""
    (client.writes if request.type == WRITE else client.reads).pending.append(request)


def read_reply(client: Client, request: p.Request) -> tuple[bytearray, memoryview]:
    """A READ's whole reply, and the part of it the data is to be read into."""
    answer = r.data_reply_buffer(request, client.structured)
    return answer, memoryview(answer)[len(answer) - request.length :]


def _enter(client: Client, requests: list[p.Request]) -> tuple[Export, BlockNode] | None:
    """The export and its node for requests that cannot wait (given back with
    ``export.leave()``); None while a pivot holds the export, when each
    request goes to the ordinary path, which waits for it."""
    export = client.export
    assert export is not None
    node = export.enter()
    if node is None:
        for request in requests:
            start_request(client, request)
        return None
    return export, node


def dispatch(client: Client, requests: list[p.Request]) -> None:
    """Answer READs of cached data at once; queue the rest for a worker thread.

    Most reads hit the page cache, and a read that would wait for the disk
    is refused by the kernel (:func:`read_cached`), so these need neither
    a task nor a thread.  For a big read this also spares a copy between
    CPUs: the loop sends the bytes it has just read.
    """
    entered = _enter(client, requests)
    if entered is None:
        return
    export, node = entered
    frames: Frames = []
    answered: list[p.Request] = []
    try:
        for request in requests:
            if request.type != READ or request.length > client.inline_left:
                queue(client, request)
                continue
            refused = refusal(client, export, request)
            if refused is not None:
                frames.append(refused)
                answered.append(request)
                continue
            io = node.direct_io(request.offset, request.length, False)
            if io is None:
                queue(client, request)
                continue
            answer, into = read_reply(client, request)
            try:
                cached = read_cached(io, into)
            finally:
                io.release()
            if cached:
                frames.append(answer)
                answered.append(request)
                client.inline_left -= request.length
            else:
                queue(client, request)
    finally:
        export.leave()
    reply(client, frames, answered)
    start_batches(client)


def start_batches(client: Client) -> None:
    """Start worker-thread calls for queued requests, as many as the lanes allow."""
    for lane in (client.reads, client.writes):
        pending = lane.pending
        while pending and lane.running < lane.limit:
            take = [pending.popleft()]
            size = take[0].length
            while pending and size + pending[0].length <= BATCH_BYTES:
                size += pending[0].length
                take.append(pending.popleft())
            _submit(client, lane, take)


def _submit(client: Client, lane: Lane, requests: list[p.Request]) -> None:
    """Start one worker-thread call for the READs and WRITEs that
    :meth:`BlockNode.direct_io` resolves; hand the others to the slow path.

    Each request holds its slot until its reply is queued.  Once started,
    the call runs to its end whatever happens to the client, so a write
    is never cut short.
    """
    entered = _enter(client, requests)
    if entered is None:
        return
    export, node = entered
    frames: Frames = []
    answered: list[p.Request] = []
    jobs: list[DirectJob] = []
    replies: list[tuple[p.Request, bytearray | None]] = []
    try:
        for request in requests:
            refused = refusal(client, export, request)
            if refused is not None:
                frames.append(refused)
                answered.append(request)
                continue
            write = request.type == WRITE
            io = node.direct_io(request.offset, request.length, write)
            if io is None:
                start_request(client, request)
                continue
            if write:
                jobs.append((io, True, memoryview(request.data)))
                replies.append((request, None))
            else:
                answer, into = read_reply(client, request)
                jobs.append((io, False, into))
                replies.append((request, answer))
    except BaseException:
        for io, _write, _buf in jobs:
            io.release()
        export.leave()
        raise
    if not jobs:
        export.leave()
        reply(client, frames, answered)
        return
    lane.running += 1

    def done(result: outcome.Outcome[DirectResult]) -> None:
        _finish(client, lane, export, jobs, replies, frames, answered, result)

    try:
        start_direct(jobs, done)
    except Exception as failure:
        # No worker thread to be had: these requests fail (and give back
        # what they hold), and the client is served on.
        done(outcome.Error(failure))


def _finish(
    client: Client,
    lane: Lane,
    export: Export,
    jobs: list[DirectJob],
    replies: list[tuple[p.Request, bytearray | None]],
    frames: Frames,
    answered: list[p.Request],
    result: outcome.Outcome[DirectResult],
) -> None:
    """A worker-thread call is over: reply, and start what waited for it.

    Runs as a loop callback, where an exception would take trio down, so
    nothing may escape.  A bug met here cuts the client off: some of its
    requests may never be answered, and a client that sees its connection
    drop can retry, where one waiting for those replies would wait forever.
    """
    answered.extend(request for request, _buf in replies)
    try:
        for io, _write, _buf in jobs:
            io.release()
        export.leave()
        try:
            errors: list[BaseException | None] = list(result.unwrap())
        except Exception as failure:
            log.exception("NBD batch failed unexpectedly")
            errors = [failure] * len(replies)
        for (request, buf), err in zip(replies, errors, strict=True):
            if err is not None:
                frames.append(
                    r.error_reply(request.handle, client.structured, nbd_error(err), str(err))
                )
            elif buf is not None:
                frames.append(buf)
            else:
                frames.append(r.simple_reply(request.handle))
    except Exception:
        log.exception("finishing an NBD batch failed; disconnecting the client")
        client.disconnect()
    finally:
        lane.running -= 1
        try:
            reply(client, frames, answered)
            start_batches(client)
        except Exception:
            log.exception("finishing an NBD batch failed; disconnecting the client")
            client.disconnect()
