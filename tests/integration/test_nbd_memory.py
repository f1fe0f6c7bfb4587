"""NBD clients that stop reading their replies cannot grow the daemon (issue 12, defect 3).

Each stuck client pipelines 1 MiB (or 32 MiB) requests and never reads a
reply; the daemon must stop reading its requests once the client holds its
budget (:mod:`blockd.export.budget`), and a 32 MiB READ holds two 1 MiB
pieces at a time, not its whole reply.  RSS is the measure (not a timing):
with margin, one stuck client costs at most 16 MiB, and 64 together leave
the daemon under 512 MiB, while a well-behaved client still reads and writes.

Big READs sent a piece at a time must still carry the image's bytes, as
``qemu-img convert`` reads them, in simple and structured replies, and a
read error part-way must never pass for data.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz.nbd_clients import (
    MiB,
    close_all,
    connect,
    go_option,
    negotiate,
    receive_exactly,
    request,
    settled_rss,
    structured_options,
    stuck_reader,
)
from tests.helpers import RawQMP, start_blockd
from tests.images import chain, create, guest_view, qemu_img, qemu_io
from tests.integration.test_active_commit import serving
from tests.integration.test_nbd import Served, check_image, io, nbdsh, start_served

SPAN = 64 * MiB


@pytest.fixture
def served(sock_dir: Path, tmp_path: Path) -> Iterator[Served]:
    image = create(tmp_path / "disk.qcow2", str(SPAN))
    qemu_io(image, f"write -P 0x5a 0 {SPAN}")
    s = start_served(sock_dir, image)
    try:
        yield s
    finally:
        s.qmp.close()
        s.daemon.stop()
    assert "Traceback" not in s.daemon.stderr(), s.daemon.stderr()[-3000:]


def good_client_works(served: Served) -> None:
    """A well-behaved client beside the stuck ones: writes, then reads back."""
    sock = connect(served.nbd_sock, timeout=30)
    negotiate(sock)
    sock.sendall(request(1, 5 * MiB, 4096, handle=1) + b"\x42" * 4096)
    assert receive_exactly(sock, 16)[4:] == b"\0\0\0\0" + (1).to_bytes(8, "big")
    sock.sendall(request(0, 5 * MiB, MiB, handle=2))
    assert receive_exactly(sock, 16)[4:] == b"\0\0\0\0" + (2).to_bytes(8, "big")
    # (stuck writers may have written here too, with their own pattern)
    assert receive_exactly(sock, MiB)[:4096] in (b"\x42" * 4096, b"\x77" * 4096)
    sock.close()


def test_stuck_clients_stay_within_their_bounds(served: Served) -> None:
    pid = served.daemon.proc.pid
    good_client_works(served)  # the page cache and the daemon warmed up
    base = settled_rss(pid)
    readers = [stuck_reader(served.nbd_sock, SPAN) for _ in range(8)]
    eight = settled_rss(pid)
    try:
        # QSD: ~16 MiB each; blockd holds at most 8 MiB of data per client
        assert (eight - base) / 8 <= 16 * MiB, (base, eight)
        readers += [stuck_reader(served.nbd_sock, SPAN) for _ in range(56)]
        total = settled_rss(pid)
        assert total < 512 * MiB, (base, total)
        good_client_works(served)
        assert served.qmp.execute("query-block-exports")["return"][0]["id"] == "e"
    finally:
        close_all(readers)
    # once they are gone, the server's budget is whole again: many requests in flight
    sock = connect(served.nbd_sock, timeout=30)
    negotiate(sock)
    sock.sendall(b"".join(request(0, i * MiB, MiB, handle=i) for i in range(32)))
    for _ in range(32):
        assert receive_exactly(sock, 16)[4:8] == b"\0\0\0\0"
        receive_exactly(sock, MiB)
    sock.close()
    assert served.qmp.execute("quit") == {"return": {}}
    assert served.daemon.wait() == 0
    check_image(served.image)


def test_stuck_clients_with_the_biggest_requests(served: Served) -> None:
    """32 MiB READs (NBD's maximum; QSD holds 16 of them per client): each is
    read and sent 1 MiB at a time, so a stuck client holds a few MiB, not the
    30 MiB of one whole reply."""
    pid = served.daemon.proc.pid
    good_client_works(served)
    base = settled_rss(pid)
    socks = [stuck_reader(served.nbd_sock, SPAN, length=32 * MiB)]
    try:
        one = settled_rss(pid)
        assert one - base <= 16 * MiB, (base, one)
        socks += [stuck_reader(served.nbd_sock, SPAN, length=32 * MiB) for _ in range(23)]
        total = settled_rss(pid)
        assert (total - base) / 24 <= 16 * MiB, (base, total)
        good_client_works(served)  # 4 KiB and 1 MiB requests still go through
    finally:
        close_all(socks)
    assert served.qmp.execute("quit") == {"return": {}}
    assert served.daemon.wait() == 0


def reads_then_a_big_write(path: Path) -> socket.socket:
    """A client that asks for 7 MiB of READs, reads no reply, then sends a
    32 MiB WRITE: as much of it as the daemon takes within a second."""
    sock = connect(path, timeout=30)
    negotiate(sock)
    sock.sendall(b"".join(request(0, i * MiB, MiB, handle=i) for i in range(7)))
    time.sleep(0.3)  # the replies are waiting, and the client is under its 8 MiB
    message = memoryview(request(1, 0, 32 * MiB, handle=99) + b"\x33" * (32 * MiB))
    sock.settimeout(1)
    with contextlib.suppress(TimeoutError):
        while message:
            message = message[sock.send(message[: 4 * MiB]) :]
    return sock


def test_a_write_payload_counts_before_it_comes(served: Served) -> None:
    """The payload of a WRITE is counted from its header on: a client whose
    unread replies leave no room for it is not read from, so its 32 MiB stay
    in the socket rather than in the daemon (QSD takes them)."""
    pid = served.daemon.proc.pid
    good_client_works(served)
    base = settled_rss(pid)
    socks = [reads_then_a_big_write(served.nbd_sock) for _ in range(4)]
    try:
        total = settled_rss(pid)
        assert (total - base) / 4 <= 16 * MiB, (base, total)
        good_client_works(served)
    finally:
        close_all(socks)
    # a client that reads its replies while it sends gets a 32 MiB WRITE through
    sock = connect(served.nbd_sock, timeout=30)
    negotiate(sock)
    message = request(0, 0, MiB, handle=1) + request(1, 0, 32 * MiB, handle=2)
    sender = threading.Thread(target=sock.sendall, args=(message + b"\x44" * (32 * MiB),))
    sender.start()
    assert receive_exactly(sock, 16)[4:] == b"\0\0\0\0" + (1).to_bytes(8, "big")
    receive_exactly(sock, MiB)
    assert receive_exactly(sock, 16)[4:] == b"\0\0\0\0" + (2).to_bytes(8, "big")
    sender.join()
    sock.close()
    assert served.qmp.execute("quit") == {"return": {}}
    assert served.daemon.wait() == 0
    check_image(served.image)
    qemu_io(served.image, f"read -P 0x44 0 {32 * MiB}")


# -- big READs, a piece at a time ---------------------------------------------------------

BIG = 32 * MiB


def read_simple(sock: socket.socket, offset: int, length: int, handle: int = 7) -> bytes:
    sock.sendall(request(0, offset, length, handle=handle))
    magic, error, got = struct.unpack(">IIQ", receive_exactly(sock, 16))
    assert (magic, error, got) == (0x67446698, 0, handle)
    return receive_exactly(sock, length)


def read_structured(
    sock: socket.socket, offset: int, length: int, flags: int = 0, handle: int = 9
) -> tuple[bytes, list[tuple[int, int, int]], list[tuple[int, bytes]]]:
    """The data a structured READ reply carries (holes as zeros), its chunks as
    (type, offset, length), and its error chunks as (error, message)."""
    sock.sendall(request(0, offset, length, flags=flags, handle=handle))
    return structured_reply(sock, offset, length, handle)


def structured_reply(
    sock: socket.socket, offset: int, length: int, handle: int
) -> tuple[bytes, list[tuple[int, int, int]], list[tuple[int, bytes]]]:
    """The reply to a READ already sent, as :func:`read_structured` returns it."""
    data = bytearray(length)
    chunks: list[tuple[int, int, int]] = []
    errors: list[tuple[int, bytes]] = []
    while True:
        magic, chunk_flags, kind, got, size = struct.unpack(">IHHQI", receive_exactly(sock, 20))
        assert (magic, got) == (0x668E33EF, handle)
        payload = receive_exactly(sock, size)
        if kind == 1:
            (at,) = struct.unpack_from(">Q", payload)
            data[at - offset : at - offset + size - 8] = payload[8:]
            chunks.append((kind, at, size - 8))
        elif kind == 2:
            at, n = struct.unpack(">QI", payload)
            chunks.append((kind, at, n))  # (data is zeros already)
        else:
            assert kind == 0x8001, kind
            error, text_length = struct.unpack_from(">IH", payload)
            errors.append((error, payload[6 : 6 + text_length]))
        if chunk_flags & 1:
            return bytes(data), chunks, errors


def structured_client(path: Path, name: bytes = b"disk") -> socket.socket:
    sock = connect(path, timeout=60)
    assert receive_exactly(sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
    sock.sendall(struct.pack(">I", 3) + structured_options(name) + go_option(name))
    while True:
        _magic, option, kind, length = struct.unpack(">QIII", receive_exactly(sock, 20))
        receive_exactly(sock, length)
        assert not kind & 0x80000000, hex(kind)
        if option == 7 and kind == 1:
            return sock


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it ends the connection."""
    got = bytearray()
    while part := sock.recv(MiB):
        got += part
    return bytes(got)


def covered(chunks: list[tuple[int, int, int]], offset: int, length: int) -> bool:
    """The chunks tile the request exactly, in order."""
    pos = offset
    for _kind, at, n in chunks:
        if at != pos:
            return False
        pos += n
    return pos == offset + length


def test_big_reads_carry_the_images_bytes(sock_dir: Path, tmp_path: Path) -> None:
    """32 MiB READs over a backing chain (data in every layer, zero clusters,
    unallocated runs, unaligned edges), read as simple replies, structured
    ones and structured with DF, equal what qemu-img reads from the image;
    libnbd and qemu-io, reading through the export, agree."""
    base_writes = [f"write -P {i + 1} {i}M 1M" for i in range(64) if i % 7 != 3]
    _base, _mid, top = chain(
        tmp_path,
        tuple(base_writes),
        ("write -z 10M 3M", f"write -P 0xcd {20 * MiB + 4096} 70000", "write -z 40M 64k"),
        (f"write -P 0xee {MiB + 512} 1536", "write -P 0xab 33M 2M", "write -z 50M 1M"),
    )
    qemu_img("resize", str(top), "96M")
    qemu_io(top, "write -P 0x5a 64M 32M")
    reference = guest_view(top, tmp_path / "view.raw").read_bytes()
    assert len(reference) == 96 * MiB
    served = start_served(sock_dir, top)
    try:
        cases = [(0, BIG), (3 * MiB + 512, BIG), (96 * MiB - BIG, BIG), (7 * MiB + 1, 5 * MiB + 3)]
        sock = connect(served.nbd_sock, timeout=60)
        negotiate(sock)
        for offset, length in cases:
            assert read_simple(sock, offset, length) == reference[offset : offset + length]
        sock.close()
        sock = structured_client(served.nbd_sock)
        for offset, length in cases:
            data, chunks, errors = read_structured(sock, offset, length)
            assert not errors and covered(chunks, offset, length)
            assert data == reference[offset : offset + length], (offset, length)
            # holes are told as holes; no chunk carries more than 1 MiB of data
            assert all(n <= MiB for kind, _at, n in chunks if kind == 1), chunks
            data, chunks, errors = read_structured(sock, offset, length, flags=4)  # DF
            assert not errors and chunks == [(1, offset, length)]
            assert data == reference[offset : offset + length]
        holes = read_structured(sock, 8 * MiB, BIG)[1]
        assert any(kind == 2 for kind, _at, _n in holes), holes
        sock.close()
        digests = nbdsh(
            f"""
            import hashlib, nbd
            h = nbd.NBD()
            h.connect_uri({served.uri()!r})
            for offset in (0, {3 * MiB + 512}, {64 * MiB}):
                print(hashlib.sha256(h.pread({BIG}, offset)).hexdigest())
            """
        ).split()
        assert digests == [
            hashlib.sha256(reference[o : o + BIG]).hexdigest() for o in (0, 3 * MiB + 512, 64 * MiB)
        ]
        io(served.uri(), f"read -P 0x5a 64M {BIG}", f"read -P 0x5a {64 * MiB + 4096} {BIG - 4096}")
        assert served.qmp.execute("quit") == {"return": {}}
        assert served.daemon.wait() == 0
    finally:
        served.qmp.close()
        served.daemon.stop()
    assert "Traceback" not in served.daemon.stderr(), served.daemon.stderr()[-3000:]


def failing_export(sock_dir: Path, tmp_path: Path, sector: int) -> tuple[Any, RawQMP, Path]:
    """A raw image of 64 MiB (each MiB its own pattern) behind blkdebug, where
    every read of ``sector`` fails with EIO; exported as "disk"."""
    image = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", str(image), "64M")
    qemu_io(image, *[f"write -P {i + 1} {i}M 1M" for i in range(64)], fmt="raw")
    daemon = start_blockd(sock_dir / "qmp.sock")
    qmp = RawQMP(sock_dir / "qmp.sock")
    qmp.negotiate()
    nbd_sock = sock_dir / "nbd.sock"
    steps: list[tuple[str, dict[str, Any]]] = [
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "d",
                "file": {
                    "driver": "blkdebug",
                    "inject-error": [{"event": "none", "sector": sector}],
                    "image": {"driver": "file", "filename": str(image)},
                },
            },
        ),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}}),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "d", "name": "disk"}),
    ]
    for command, arguments in steps:
        assert qmp.execute(command, arguments) == {"return": {}}, command
    return daemon, qmp, nbd_sock


def test_a_read_error_part_way_is_never_taken_for_data(sock_dir: Path, tmp_path: Path) -> None:
    """EIO in the sixth MiB of a 32 MiB READ, after five 1 MiB pieces went out.

    Structured replies: the five data chunks, then an EIO error chunk ends the
    reply (QEMU 7.2 drops the connection there).  A simple reply, or a DF
    chunk, has promised 32 MiB in its header: the connection ends short of
    them.  A failure in the first piece is a plain error reply, and the
    daemon serves everyone else throughout.
    """
    daemon, qmp, nbd_sock = failing_export(sock_dir, tmp_path, sector=(5 * MiB + 4096) // 512)
    try:
        pattern = b"".join(bytes([i + 1]) * MiB for i in range(64))
        sock = structured_client(nbd_sock)
        data, chunks, errors = read_structured(sock, 0, BIG)
        assert chunks == [(1, i * MiB, MiB) for i in range(5)]
        assert data[: 5 * MiB] == pattern[: 5 * MiB]
        assert [error for error, _text in errors] == [5]
        # the connection goes on; the first piece failing is a plain error chunk
        data, chunks, errors = read_structured(sock, 5 * MiB, BIG, handle=10)
        assert not chunks and [error for error, _text in errors] == [5]
        assert read_structured(sock, 32 * MiB, BIG, handle=11)[0] == pattern[32 * MiB :]
        with pytest.raises(EOFError):  # DF: one chunk promised, cut short
            read_structured(sock, 0, BIG, flags=4, handle=12)
        sock.close()

        sock = connect(nbd_sock, timeout=60)
        negotiate(sock)
        sock.sendall(request(0, 5 * MiB, BIG, handle=3))
        assert struct.unpack(">IIQ", receive_exactly(sock, 16)) == (0x67446698, 5, 3)
        assert read_simple(sock, 6 * MiB, BIG) == pattern[6 * MiB : 38 * MiB]
        sock.sendall(request(0, 0, BIG, handle=4))
        assert struct.unpack(">IIQ", receive_exactly(sock, 16)) == (0x67446698, 0, 4)
        got = until_closed(sock)
        assert len(got) < BIG and got == pattern[: len(got)]
        sock.close()

        sock = connect(nbd_sock, timeout=60)  # others are served all along
        negotiate(sock)
        assert read_simple(sock, 32 * MiB, BIG) == pattern[32 * MiB :]
        sock.close()
        assert qmp.execute("quit") == {"return": {}}
        assert daemon.wait() == 0
    finally:
        qmp.close()
        daemon.stop()
    assert "Traceback" not in daemon.stderr(), daemon.stderr()[-3000:]


def test_a_stuck_big_read_does_not_hold_up_a_pivot(tmp_path: Path, sock_dir: Path) -> None:
    """Clients stuck in the middle of 32 MiB READ replies (structured and simple)
    on the exported active layer: an active commit still completes and pivots
    the export to base, since a reply holds the export only while a piece is
    read, and the clients' later pieces come from base."""
    with serving(tmp_path, sock_dir) as disk:
        simple = stuck_reader(disk.nbd_sock, 64 * MiB, length=BIG)
        structured = structured_client(disk.nbd_sock)
        structured.sendall(b"".join(request(0, 0, BIG, handle=h) for h in range(4)))
        try:
            disk.commit()
            disk.qmp.wait_event("BLOCK_JOB_READY", device="j")
            assert disk.execute("block-job-complete", device="j") == {"return": {}}
            done = disk.qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
            assert "error" not in done["data"]
            assert disk.export_node() == "base"
            # the structured client reads its four replies now: the image's bytes
            for handle in range(4):
                data, _chunks, errors = structured_reply(structured, 0, BIG, handle)
                assert not errors and data == bytes(disk.model[:BIG])
        finally:
            close_all([simple, structured])
        disk.stop()
