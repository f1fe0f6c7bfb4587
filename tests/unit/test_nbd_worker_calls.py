"""The fast path's worker-thread calls: a READ the page cache cannot answer
on the loop is read in a worker call and answered with the image's bytes,
and one client has at most two read calls and one write call running at
once (a buffered write takes the file's inode lock anyway; the bound keeps
one client from taking every worker thread), while what waits for a call
goes in a later one.

A real server on a Unix socket in this process, over a qcow2 image made by
qemu-img (see test_nbd_request_flags); a request's metadata is cached by a
first read, so the fast path can resolve it.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from blockd.block.direct import DirectJob
from blockd.export import fast_path as fast_path_module
from blockd.export import protocol as p
from tests.images import qemu_io

from .test_nbd_inflight import receive_exactly
from .test_nbd_protocol import request
from .test_nbd_request_flags import (
    DATA,
    SIZE,
    chunks,
    negotiate_structured,
    served,
    write_reply,
    write_request,
)

KiB = 1024

Held = list[tuple[list[DirectJob], Callable[..., object]]]


def image_bytes(offset: int, length: int) -> bytes:
    whole = b"\x5a" * DATA + bytes(SIZE - DATA)
    return whole[offset : offset + length]


def read_request(handle: int, length: int) -> bytes:
    """A READ from 0 as one data chunk (DF), however the path that serves it."""
    return request(p.Cmd.READ, handle, 0, length, p.CmdFlag.DF)


async def read_data(stream: trio.SocketStream) -> tuple[int, bytes]:
    """One structured READ reply of a single data chunk: (handle, data)."""
    magic, flags, kind, handle, length = struct.unpack(">IHHQI", await receive_exactly(stream, 20))
    assert (magic, kind) == (p.STRUCTURED_REPLY_MAGIC, p.Chunk.OFFSET_DATA)
    assert flags & p.CHUNK_DONE
    payload = await receive_exactly(stream, length)
    (offset,) = struct.unpack_from(">Q", payload)
    assert payload[8:] == image_bytes(offset, length - 8)
    return handle, payload[8:]


async def cache_metadata(stream: trio.SocketStream) -> None:
    """A first READ (answered on the loop, or by the slow path) caches its
    metadata, so the fast path can resolve the requests after it."""
    await stream.send_all(read_request(1, DATA))
    await read_data(stream)


async def settled(stream: trio.SocketStream) -> None:
    """Return once the server has handled every request sent before: a
    BLOCK_STATUS, which the slow path answers, sent after them is answered."""
    await stream.send_all(request(p.Cmd.BLOCK_STATUS, handle=99, offset=0, length=SIZE))
    [(kind, _payload)] = await chunks(stream)
    assert kind == p.Chunk.BLOCK_STATUS


async def test_an_uncached_read_is_read_in_a_worker_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page cache dropped (posix_fadvise): the loop's RWF_NOWAIT read is
    refused, and the READ is answered from a worker call, with the image's
    bytes.  (The kernel may keep a page it has just read in a per-CPU batch,
    out of fadvise's reach: then the loop answers, and the test drops and
    reads again.)"""
    calls: list[list[bool]] = []
    start = fast_path_module.start_direct

    def counted(jobs: list[DirectJob], done: Callable[..., object]) -> None:
        calls.append([write for _io, write, _buf in jobs])
        start(jobs, done)

    async with served(tmp_path) as (stream, _node):
        await cache_metadata(stream)
        monkeypatch.setattr(fast_path_module, "start_direct", counted)
        for handle in range(2, 12):
            fd = os.open(tmp_path / "disk.qcow2", os.O_RDONLY)
            try:
                os.fsync(fd)  # (dirty pages stay cached)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            await stream.send_all(read_request(handle, DATA))
            assert (await read_data(stream))[0] == handle
            if calls:
                break
    assert calls == [[False]]


@pytest.mark.timeout(60)  # a failed check leaves calls held: the server's shielded stop waits
async def test_reads_and_writes_in_worker_calls_a_bounded_number_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READs the cache cannot answer, received one after another while the
    calls before them run: two read calls run, the third READ waits for one
    of them; the same for WRITEs with one call.  Every request is answered,
    reads with the image's bytes."""
    held: Held = []
    start = fast_path_module.start_direct

    def hold(jobs: list[DirectJob], done: Callable[..., object]) -> None:
        held.append((jobs, done))

    def release_first() -> None:
        jobs, done = held.pop(0)
        start(jobs, done)

    async def running_after(*requests: bytes) -> int:
        for sent in requests:
            await stream.send_all(sent)
            await settled(stream)
        return len(held)

    async with served(tmp_path) as (stream, _node):
        await cache_metadata(stream)
        monkeypatch.setattr(fast_path_module, "read_cached", lambda io, buf: False)
        monkeypatch.setattr(fast_path_module, "start_direct", hold)

        assert await running_after(*(read_request(h, DATA) for h in (2, 3, 4))) == 2
        release_first()
        assert (await read_data(stream))[0] == 2
        assert await running_after() == 2  # the third READ's call started
        release_first()
        release_first()
        assert {(await read_data(stream))[0] for _ in range(2)} == {3, 4}

        writes = (
            write_request(0, 0x61, handle=5),
            write_request(0, 0x62, handle=6, offset=8 * KiB),
        )
        assert await running_after(*writes) == 1  # the second WRITE waits
        release_first()
        assert await write_reply(stream) == (5, 0)
        assert await running_after() == 1  # and goes next
        # the bound holds after a call is over too: a third WRITE waits
        assert await running_after(write_request(0, 0x63, handle=7, offset=16 * KiB)) == 1
        release_first()
        assert await write_reply(stream) == (6, 0)
        assert await running_after() == 1
        release_first()
        assert await write_reply(stream) == (7, 0)


@pytest.mark.timeout(60)  # a range never given back hangs the shielded stop of the server
async def test_a_call_that_fails_while_being_put_together_gives_back_what_it_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug met while a worker call is put together (here the node fails
    to resolve the second of two WRITEs) drops the client, and gives back
    the first WRITE's range: nothing waits on it for ever.  (The client's
    end runs what it had received, the two WRITEs included.)"""
    with trio.fail_after(20):
        async with served(tmp_path) as (stream, node):
            await cache_metadata(stream)
            resolve = node.direct_io
            resolved: list[int] = []

            def failing(offset: int, length: int, write: bool) -> object:
                resolved.append(offset)
                if len(resolved) == 2:
                    raise RuntimeError("a bug")
                return resolve(offset, length, write)

            monkeypatch.setattr(node, "direct_io", failing)
            with caplog.at_level(logging.ERROR, logger="blockd.export.server"):
                await stream.send_all(
                    write_request(0, 0x61, handle=2)
                    + write_request(0, 0x62, handle=3, offset=8 * KiB)
                )
                received = b""
                while data := await stream.receive_some(4096):
                    received += data
            # the two were queued again with the client's end, and answered
            assert [struct.unpack_from(">IIQ", received, at) for at in (0, 16)] == [
                (p.SIMPLE_REPLY_MAGIC, 0, 2),
                (p.SIMPLE_REPLY_MAGIC, 0, 3),
            ]
            with trio.fail_after(5):
                await node.writes_settled()
    assert "NBD client failed" in caplog.text


@pytest.mark.timeout(60)  # a session that never ends hangs the shielded stop of the server
async def test_the_server_stops_once_the_worker_calls_of_its_clients_are_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping the server cuts its clients off, but a worker call already
    running is waited for (a write is never cut short): the stop, with the
    image's close, ends only once the call is over, and the write is in the
    image."""
    held: Held = []
    start = fast_path_module.start_direct

    async def release_later() -> None:
        await trio.sleep(0.3)  # the server is stopping meanwhile
        start(*held.pop())

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with served(tmp_path) as (stream, _node):
                await cache_metadata(stream)
                monkeypatch.setattr(
                    fast_path_module, "start_direct", lambda jobs, done: held.append((jobs, done))
                )
                await stream.send_all(write_request(0, 0x61, handle=2))
                await settled(stream)
                assert len(held) == 1
                nursery.start_soon(release_later)
            # served() has stopped the server: its client's session ended
            assert held == []
    assert "Pattern verification failed" not in qemu_io(
        tmp_path / "disk.qcow2", "read -P 0x61 0 4k"
    )


@pytest.mark.parametrize("where", ["building its reply", "queueing its reply"])
async def test_a_bug_met_finishing_a_worker_call_cuts_the_client_off_and_the_server_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """Finishing a worker call runs as a loop callback, where an exception
    would take trio, and the whole daemon, down.  A bug there is logged and
    drops that client's connection (its WRITE would otherwise never be
    answered, and the client wait forever); the server goes on serving, and
    a new connection writes."""
    owner, name, argument = (
        (fast_path_module.r, "simple_reply", 0)
        if where == "building its reply"
        else (fast_path_module, "reply", 2)
    )
    working = getattr(owner, name)

    def broken(*args: Any) -> Any:
        """Fails for the WRITE with handle 2 (the loop also queues other replies)."""
        answers = args[argument]
        if 2 not in ([answers] if isinstance(answers, int) else [a.handle for a in answers]):
            return working(*args)
        raise RuntimeError("a bug")

    with trio.fail_after(20):
        async with served(tmp_path) as (stream, _node):
            await cache_metadata(stream)
            monkeypatch.setattr(owner, name, broken)
            with caplog.at_level(logging.ERROR, logger="blockd.export.fast_path"):
                await stream.send_all(write_request(0, 0x61, handle=2))
                unanswered = b""
                while data := await stream.receive_some():
                    unanswered += data
            assert unanswered == b""  # no reply: the connection was closed
            again = await trio.open_unix_socket(str(tmp_path / "nbd.sock"))
            async with again:
                await negotiate_structured(again)
                await again.send_all(write_request(0, 0x62, handle=3))
                assert await write_reply(again) == (3, 0)
    assert "finishing an NBD batch failed; disconnecting the client" in caplog.text


@pytest.mark.timeout(60)  # a request never answered hangs the shielded stop of the server
async def test_a_write_that_finds_no_worker_thread_fails_and_the_client_is_served_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker call that cannot start (the process is at its thread limit
    and no worker thread runs) fails its requests with EIO and gives back
    what they hold (before, they held their slots, their ranges and the
    export for ever); the client's next WRITE, with a thread to be had,
    works."""
    start = fast_path_module.start_direct

    def no_thread(jobs: list[DirectJob], done: Callable[..., object]) -> None:
        raise RuntimeError("can't start new thread")

    with trio.fail_after(20):
        async with served(tmp_path) as (stream, node):
            await cache_metadata(stream)
            monkeypatch.setattr(fast_path_module, "start_direct", no_thread)
            await stream.send_all(write_request(0, 0x61, handle=2))
            assert await write_reply(stream) == (2, p.EIO)
            with trio.fail_after(5):
                await node.writes_settled()
            monkeypatch.setattr(fast_path_module, "start_direct", start)
            await stream.send_all(write_request(0, 0x62, handle=3))
            assert await write_reply(stream) == (3, 0)
    assert "Pattern verification failed" not in qemu_io(
        tmp_path / "disk.qcow2", "read -P 0x62 0 4k"
    )
