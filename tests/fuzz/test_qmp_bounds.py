"""The QMP side's resource bounds, on a real daemon (figures in README).

A client that sends commands and never reads its replies is throttled (its
requests stay unread) while others are served, and costs the daemon a bounded
amount of memory; a client over the connection cap waits for a free slot; and
``quit`` or SIGTERM ends the daemon whatever state its clients are in.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.fuzz.qmp_harness import Line, open_session, reply_class
from tests.helpers import DaemonProcess, start_blockd

#: blockd's cap on connections served at once (blockd.qmp.server.MAX_CLIENTS).
MAX_CLIENTS = 64


def rss_kib(daemon: DaemonProcess) -> int:
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def flood(path: Path, request: bytes) -> tuple[Line, int]:
    """Send ``request`` (with ids 0, 1, ...) without reading until the daemon stops taking them."""
    conn = open_session(path, negotiate=True)
    conn.sock.settimeout(2)
    sent = 0
    try:
        while sent < 1_000_000:
            conn.send(request.replace(b"ID", b"%d" % sent))
            sent += 1
    except TimeoutError:
        pass  # the daemon stopped reading: kernel buffers on both sides are full
    conn.sock.settimeout(20)
    return conn, sent


def test_client_that_does_not_read_is_throttled(blockd: DaemonProcess) -> None:
    before = rss_kib(blockd)
    # Each reply is 3 times its request: a 64 KiB id of "\u00e9" comes back as 192 KiB.
    request = b'{"execute": "query-version", "id": ["ID", "' + "\u00e9".encode() * 32768 + b'"]}'
    stuck, sent = flood(blockd.socket_path, request)
    assert sent < 1_000_000, "the daemon never stopped reading"
    grown = rss_kib(blockd) - before
    print(f"one stuck client: {sent} requests taken, daemon RSS +{grown} KiB")
    # Outbox bound 1 MiB plus a reply, the input in flight, and allocator slack.
    assert grown < 64 * 1024, f"daemon grew by {grown} KiB for one stuck client"
    # Others are served meanwhile.
    other = open_session(blockd.socket_path, negotiate=True)
    other.send(b'{"execute": "query-version", "id": "other"}')
    assert reply_class(other.until_id(b"other")[-1]) == "return"
    other.close()
    # Nothing was lost: once the stuck client reads, every accepted request is answered in order.
    stuck.sock.shutdown(socket.SHUT_WR)
    answered = 0
    while True:
        try:
            line = stuck.read_line()
        except EOFError:
            break
        assert line.startswith(b'{"return": ') and b'"id": ["%d", ' % answered in line
        answered += 1
    assert sent - 1 <= answered <= sent  # the last request may have been cut mid-send
    stuck.close()


def test_connections_beyond_the_cap_wait_for_a_slot(blockd: DaemonProcess) -> None:
    conns = [Line.connect(blockd.socket_path) for _ in range(MAX_CLIENTS)]
    for conn in conns:
        assert conn.read_line().startswith(b'{"QMP"')
    waiting = Line.connect(blockd.socket_path)  # queued in the listen backlog
    waiting.sock.settimeout(1)
    with pytest.raises(TimeoutError):
        waiting.read_line()
    conns.pop().close()
    waiting.sock.settimeout(20)
    assert waiting.read_line().startswith(b'{"QMP"')
    for conn in [*conns, waiting]:
        conn.close()


@pytest.mark.parametrize("how", ["quit", "SIGTERM"])
def test_stop_is_bounded_whatever_clients_do(sock_dir: Path, how: str) -> None:
    daemon = start_blockd(sock_dir / "qmp.sock")
    path = daemon.socket_path
    request = b'{"execute": "query-version", "id": ["ID", "' + b"x" * 4096 + b'"]}'
    stuck, _ = flood(path, request)  # never reads; replies owed
    silent = Line.connect(path)  # never negotiates, never reads its greeting
    half = open_session(path, negotiate=True)
    half.send(b'{"execute": "query-version", "id": "hal')  # half a message
    unread_greeting = Line.connect(path)
    unread_greeting.send(b'{"execute": "qmp_capabilities"}')
    if how == "quit":
        control = open_session(path, negotiate=True)
        control.send(b'{"execute": "quit", "id": "bye"}')
        assert control.until_id(b"bye")[-1] == b'{"return": {}, "id": "bye"}'
    else:
        daemon.signal(signal.SIGTERM)
    # Bounded by DRAIN_SECONDS per client (run in parallel) and STOP_SECONDS overall.
    assert daemon.wait(timeout=30) == 0
    assert not path.exists()
    for conn in (stuck, silent, half, unread_greeting):
        conn.close()


async def test_stop_cancels_a_command_that_hangs(tmp_path: Path) -> None:
    """In-process, with a planted command that never finishes on its own."""
    import trio

    from blockd.qmp.server import QMPServer
    from blockd.version import version_info
    from tests.integration.test_server_inprocess import Harness, connect

    harness = Harness(tmp_path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(harness.path))
    sock.listen(4)
    server = QMPServer(harness.dispatcher, harness.bus, version_info(), abort_seconds=0.2)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [trio.SocketListener(sock)])
            client = await connect(harness)
            await client.negotiate()
            await client.send({"execute": "slow", "id": 1})  # waits for harness.release
            await trio.sleep(0.1)
            server.close()
        # serve() returned although the command was never released.
    assert not harness.finished.is_set()
    await client.stream.aclose()
