"""How much one NBD client may have in progress: 32 requests, holding at most its byte budget.

A real server on a Unix socket in this process, serving a node whose writes
wait on a gate, so the requests that reached the node can be counted while
the client keeps sending.
"""

from __future__ import annotations

import struct
from pathlib import Path

import trio

from blockd.export import protocol as p
from blockd.export.budget import CLIENT_BYTES
from blockd.export.client import MAX_INFLIGHT
from blockd.export.exports import ExportRegistry
from blockd.export.server import NBDServer

from .test_nbd_exports import MemoryNode, make_export
from .test_nbd_protocol import info_payload, option

MiB = 1 << 20


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


async def listening(registry: ExportRegistry, path: str) -> NBDServer:
    """An NBD server of ``registry``'s exports, its socket listening at ``path``."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    return NBDServer(registry, [trio.SocketListener(sock)], max_connections=0)


async def negotiate(stream: trio.SocketStream) -> None:
    await receive_exactly(stream, 18)  # magic, IHAVEOPT, handshake flags
    flags = struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
    await stream.send_all(flags + option(p.Opt.GO, info_payload("disk")))
    while True:  # option replies, up to the ACK
        _magic, _option, kind, length = struct.unpack(">QIII", await receive_exactly(stream, 20))
        await receive_exactly(stream, length)
        if kind == p.Rep.ACK:
            return


async def count_admitted(tmp_path: Path, requests: int, length: int) -> int:
    """Send ``requests`` WRITEs of ``length`` bytes; how many reach the node at once.

    Afterwards the gate opens and every request must be answered, in full.
    """
    node = MemoryNode("n", size=requests * length)
    node.gate = trio.Event()
    registry, _export = make_export(node)
    path = str(tmp_path / "nbd.sock")
    server = await listening(registry, path)

    def started() -> int:
        return sum(1 for what, _offset in node.log if what == "write-start")

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        stream = await trio.open_unix_socket(path)
        await negotiate(stream)

        async def send() -> None:
            for handle in range(requests):
                header = struct.pack(
                    ">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, handle, handle * length, length
                )
                await stream.send_all(header + bytes([handle % 251 + 1]) * length)

        nursery.start_soon(send)
        with trio.fail_after(20):
            admitted = -1
            while started() != admitted:  # until nothing more arrives for a while
                admitted = started()
                await trio.sleep(0.5)
        node.gate.set()
        handles = set()
        with trio.fail_after(20):
            for _ in range(requests):
                magic, error, handle = struct.unpack(">IIQ", await receive_exactly(stream, 16))
                assert (magic, error) == (p.SIMPLE_REPLY_MAGIC, 0)
                handles.add(handle)
        assert handles == set(range(requests))
        for handle in range(requests):
            chunk = node.data[handle * length : (handle + 1) * length]
            assert chunk == bytes([handle % 251 + 1]) * length
        await stream.aclose()
        await server.stop()
    return admitted


async def test_small_requests_up_to_max_inflight(tmp_path: Path) -> None:
    assert await count_admitted(tmp_path, MAX_INFLIGHT + 8, 4096) == MAX_INFLIGHT


async def test_big_requests_up_to_the_client_budget(tmp_path: Path) -> None:
    assert CLIENT_BYTES // (2 * MiB) < MAX_INFLIGHT
    assert await count_admitted(tmp_path, 8, 2 * MiB) == CLIENT_BYTES // (2 * MiB)


async def test_a_request_bigger_than_the_budget_runs_alone(tmp_path: Path) -> None:
    length = CLIENT_BYTES + MiB
    assert await count_admitted(tmp_path, 3, length) == 1


class HeldNode(MemoryNode):
    """Writes from ``held_from`` on wait for the gate; others go through at once."""

    def __init__(self, held_from: int) -> None:
        super().__init__("n", size=1 << 20)
        self.held_from = held_from
        self.held_started = trio.Event()
        self.quick_done = trio.Event()

    async def _do_write(self, offset: int, data: bytes) -> None:
        self.log.append(("write-start", offset))
        if offset >= self.held_from and self.gate is not None:
            self.held_started.set()
            await self.gate.wait()
        self.data[offset : offset + len(data)] = data
        self.log.append(("write-done", offset))
        if offset < self.held_from:
            self.quick_done.set()


async def test_a_write_that_reached_the_node_finishes_when_its_client_breaks(
    tmp_path: Path,
) -> None:
    # The second write's reply meets the closed socket, which ends the
    # client's session while the first is still in the node: that one must
    # finish all the same (a write cut in half is torn data).
    node = HeldNode(held_from=65536)
    node.gate = trio.Event()
    registry, _export = make_export(node)
    path = str(tmp_path / "nbd.sock")
    server = await listening(registry, path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        stream = await trio.open_unix_socket(path)
        await negotiate(stream)
        held = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 65536, 4096)
        await stream.send_all(held + b"\x11" * 4096)
        with trio.fail_after(10):
            await node.held_started.wait()
        quick = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 2, 0, 4096)
        await stream.send_all(quick + b"\x22" * 4096)
        await stream.aclose()  # before the quick write's reply can be sent
        with trio.fail_after(10):
            await node.quick_done.wait()
        await trio.sleep(0.2)  # its reply meets the closed socket meanwhile
        node.gate.set()
        await server.stop()
    assert ("write-done", 65536) in node.log
    assert node.data[65536 : 65536 + 4096] == b"\x11" * 4096
