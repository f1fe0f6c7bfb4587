"""Each request flag does what it says and nothing else, on the export's slow
path: DF alone makes a read one data chunk, FUA on a read or BLOCK_STATUS
changes nothing a client sees, REQ_ONE alone cuts block status to one extent,
and CACHE reads nothing back and writes nothing.  And a failure the block
layer reports is answered without alarm, while one it does not is logged.
On the fast path (plain writes over cached metadata): FUA or a write-through
export keeps a write off it, a refused write leaves the rest of its batch to
run, and a batch that fails unexpectedly is still answered.

A real server on a Unix socket in this process, over a qcow2 image made by
qemu-img with data in its first 64 KiB and a hole after, structured replies
and ``base:allocation`` negotiated, as libnbd would.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from blockd.block import direct
from blockd.block.direct import DirectJob, DirectResult
from blockd.block.drivers.file import FileNode
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.graph import BlockGraph
from blockd.events import EventBus
from blockd.export import fast_path as fast_path_module
from blockd.export import protocol as p
from blockd.export.exports import ExportRegistry
from tests.images import create, qemu_io
from tests.power import count_syncs

from .test_nbd_inflight import listening, receive_exactly
from .test_nbd_protocol import info_payload, meta_payload, option, request

KiB = 1024
DATA = 64 * KiB  # data from 0; a hole from here to the end
SIZE = 1 << 20


@asynccontextmanager
async def served(
    tmp_path: Path, writethrough: bool = False
) -> AsyncIterator[tuple[trio.SocketStream, Qcow2Node]]:
    image = create(tmp_path / "disk.qcow2", str(SIZE))
    qemu_io(image, f"write -P 0x5a 0 {DATA}")
    file = await FileNode.open("f", str(image), read_only=False)
    node = await Qcow2Node.open("q", file, read_only=False)
    registry = ExportRegistry(EventBus(), BlockGraph())
    registry.server = object()  # pretend it runs: the server below serves the registry
    registry.add("e", node, name="disk", description=None, writable=True,
                 writethrough=writethrough)  # fmt: skip
    path = str(tmp_path / "nbd.sock")
    server = await listening(registry, path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            stream = await trio.open_unix_socket(path)
            await negotiate_structured(stream)
            with trio.fail_after(30):
                yield stream, node
            await stream.aclose()
            await server.stop()
    finally:
        await node.close()
        await file.close()


async def negotiate_structured(stream: trio.SocketStream) -> None:
    await receive_exactly(stream, 18)  # magic, IHAVEOPT, handshake flags
    await stream.send_all(
        struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
        + option(p.Opt.STRUCTURED_REPLY)
        + option(p.Opt.SET_META_CONTEXT, meta_payload("disk", "base:allocation"))
        + option(p.Opt.GO, info_payload("disk"))
    )
    acks = 0
    while acks < 3:  # each option ends with an ACK (GO's after its infos)
        _magic, _option, kind, length = struct.unpack(">QIII", await receive_exactly(stream, 20))
        await receive_exactly(stream, length)
        acks += kind == p.Rep.ACK


async def chunks(stream: trio.SocketStream) -> list[tuple[int, bytes]]:
    """The chunks of one structured reply, up to the one marked done: (type, payload)."""
    out = []
    while True:
        magic, flags, kind, _handle, length = struct.unpack(
            ">IHHQI", await receive_exactly(stream, 20)
        )
        assert magic == p.STRUCTURED_REPLY_MAGIC
        out.append((kind, await receive_exactly(stream, length)))
        if flags & p.CHUNK_DONE:
            return out


async def read(stream: trio.SocketStream, flags: int) -> list[tuple[int, int, int]]:
    """A READ across data and hole: (chunk type, offset, length) of its chunks."""
    await stream.send_all(request(p.Cmd.READ, offset=0, length=2 * DATA, flags=flags))
    out = []
    for kind, payload in await chunks(stream):
        (offset,) = struct.unpack_from(">Q", payload)
        if kind == p.Chunk.OFFSET_DATA:
            assert payload[8:] == (b"\x5a" * DATA + bytes(DATA))[offset : offset + len(payload) - 8]
            out.append((kind, offset, len(payload) - 8))
        else:
            out.append((kind, offset, struct.unpack_from(">I", payload, 8)[0]))
    return out


async def test_df_makes_a_read_one_chunk_and_fua_changes_nothing(tmp_path: Path) -> None:
    async with served(tmp_path) as (stream, _node):
        sparse = [(p.Chunk.OFFSET_DATA, 0, DATA), (p.Chunk.OFFSET_HOLE, DATA, DATA)]
        assert await read(stream, p.CmdFlag.FUA) == sparse
        assert await read(stream, p.CmdFlag.DF) == [(p.Chunk.OFFSET_DATA, 0, 2 * DATA)]
        assert await read(stream, p.CmdFlag.DF | p.CmdFlag.FUA) == [
            (p.Chunk.OFFSET_DATA, 0, 2 * DATA)
        ]


async def block_status(stream: trio.SocketStream, flags: int) -> list[tuple[int, int]]:
    await stream.send_all(request(p.Cmd.BLOCK_STATUS, offset=0, length=SIZE, flags=flags))
    [(kind, payload)] = await chunks(stream)
    assert kind == p.Chunk.BLOCK_STATUS
    words = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
    return list(zip(words[::2], words[1::2], strict=True))


async def test_only_req_one_cuts_block_status_to_one_extent(tmp_path: Path) -> None:
    both = [(DATA, 0), (SIZE - DATA, 3)]
    async with served(tmp_path) as (stream, _node):
        assert await block_status(stream, 0) == both
        assert await block_status(stream, p.CmdFlag.FUA) == both
        assert await block_status(stream, p.CmdFlag.REQ_ONE) == both[:1]


async def test_cache_writes_nothing(tmp_path: Path) -> None:
    async with served(tmp_path) as (stream, node):
        await stream.send_all(request(p.Cmd.CACHE, offset=0, length=2 * DATA))
        magic, error, _handle = struct.unpack(">IIQ", await receive_exactly(stream, 16))
        assert (magic, error) == (p.SIMPLE_REPLY_MAGIC, 0)
        assert await node.read(0, 2 * DATA) == b"\x5a" * DATA + bytes(DATA)


@pytest.mark.parametrize(
    ("failure", "logged"),
    [(OSError(5, "Input/output error"), False), (RuntimeError("a bug"), True)],
)
async def test_only_an_unexpected_failure_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: Exception, logged: bool
) -> None:
    async def failing(offset: int, length: int) -> bytes:
        raise failure

    async with served(tmp_path) as (stream, node):
        node.read = failing  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="blockd.export.slow_path"):
            await stream.send_all(request(p.Cmd.READ, offset=0, length=DATA, flags=p.CmdFlag.DF))
            [(kind, _payload)] = await chunks(stream)
        assert kind == p.Chunk.ERROR
    assert any("failed unexpectedly" in r.getMessage() for r in caplog.records) is logged


def write_request(flags: int, byte: int, handle: int = 1, offset: int = 0) -> bytes:
    return request(p.Cmd.WRITE, handle, offset, 4 * KiB, flags, bytes([byte]) * 4 * KiB)


async def write_reply(stream: trio.SocketStream) -> tuple[int, int]:
    """The next reply to a WRITE: (handle, NBD error), simple or an error chunk."""
    (magic,) = struct.unpack(">I", await receive_exactly(stream, 4))
    if magic == p.SIMPLE_REPLY_MAGIC:
        error, handle = struct.unpack(">IQ", await receive_exactly(stream, 12))
        return handle, error
    assert magic == p.STRUCTURED_REPLY_MAGIC
    flags, kind, handle, length = struct.unpack(">HHQI", await receive_exactly(stream, 16))
    assert kind == p.Chunk.ERROR and flags & p.CHUNK_DONE
    (error,) = struct.unpack_from(">I", await receive_exactly(stream, length))
    return handle, error


async def write(stream: trio.SocketStream, flags: int, byte: int) -> int:
    """A 4 KiB WRITE at 0, over the image's data: the NBD error of its reply."""
    await stream.send_all(write_request(flags, byte))
    _handle, error = await write_reply(stream)
    return error


@asynccontextmanager
async def fast_path(
    tmp_path: Path, writethrough: bool = False
) -> AsyncIterator[tuple[trio.SocketStream, list[int]]]:
    """A served image whose first cluster's metadata is cached (after a read),
    so a plain write there takes the fast path; the fast path's batches are
    counted."""
    batches: list[int] = []
    start = fast_path_module.start_direct

    def counted(jobs: list[DirectJob], done: Callable[..., object]) -> None:
        batches.append(len(jobs))
        start(jobs, done)

    async with served(tmp_path, writethrough) as (stream, _node):
        await read(stream, 0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fast_path_module, "start_direct", counted)
            yield stream, batches


@pytest.mark.parametrize(
    ("fua", "writethrough"),
    [(False, False), (True, False), (False, True)],
    ids=["plain", "FUA", "write-through export"],
)
async def test_a_write_is_durable_before_its_reply_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fua: bool, writethrough: bool
) -> None:
    """A plain write takes the fast path, with no flush; a FUA write, or any
    write to a write-through export, is flushed before it is answered (the
    fast path has no flush: it must not take those)."""
    durable = fua or writethrough
    async with fast_path(tmp_path, writethrough) as (stream, batches):
        syncs = count_syncs(monkeypatch)
        assert await write(stream, p.CmdFlag.FUA if fua else 0, 0x77) == 0
        synced = len(syncs)
        monkeypatch.undo()
    assert batches == ([] if durable else [1])
    assert bool(synced) is durable


async def test_a_fast_path_batch_that_fails_unexpectedly_is_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker call that raises what no I/O error is (a bug) answers each of
    its requests with EIO, and says so in the log; nothing is left waiting."""

    def broken(jobs: list[DirectJob]) -> DirectResult:
        raise RuntimeError("a bug")

    monkeypatch.setattr(direct, "_direct_all", broken)
    async with fast_path(tmp_path) as (stream, batches):
        with caplog.at_level(logging.ERROR, logger="blockd.export.fast_path"):
            assert await write(stream, 0, 0x78) == errno.EIO
    assert batches == [1]
    assert any("failed unexpectedly" in r.getMessage() for r in caplog.records)


async def test_a_refused_write_leaves_the_rest_of_its_batch_to_run(tmp_path: Path) -> None:
    """Writes received together go to the fast path as one batch: one the
    protocol refuses (past the end) is answered alone, the next still runs."""
    async with fast_path(tmp_path) as (stream, batches):
        await stream.send_all(write_request(0, 0x79, handle=2, offset=SIZE)
                              + write_request(0, 0x7A, handle=3))  # fmt: skip
        replies = dict([await write_reply(stream), await write_reply(stream)])
    assert replies == {2: errno.EINVAL, 3: 0}
    assert batches == [1]
