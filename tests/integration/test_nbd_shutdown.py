"""Stopping the NBD server, or the daemon, whatever its listeners and clients are doing.

Issue 12, defect 2: ``nbd-server-start`` with a Unix path holding a NUL used
to succeed (binding a socket named after the part before the NUL); the
server's clean-up then failed on that path, before it marked itself stopped,
so ``nbd-server-stop`` waited forever and took ``quit``, new QMP clients and
SIGTERM with it.  Here the path is refused, and the stop paths are driven
with clients stuck at every stage of a connection.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blockd.export.server import NBDServer
from tests.helpers import TIMEOUT, RawQMP
from tests.images import create
from tests.integration.test_nbd import Served, check_image, go, raw_client, start_served

MiB = 1 << 20
REQUEST = 0x25609513
IHAVEOPT = 0x49484156454F5054


@pytest.fixture
def served(sock_dir: Path, tmp_path: Path) -> Iterator[Served]:
    image = create(tmp_path / "disk.qcow2", str(16 * MiB))
    s = start_served(sock_dir, image)
    try:
        yield s
    finally:
        s.qmp.close()
        s.daemon.stop()
    assert "Traceback" not in s.daemon.stderr(), s.daemon.stderr()[-3000:]
    assert "Internal error" not in s.daemon.stderr()


def test_unix_path_with_nul_is_refused_and_changes_nothing(sock_dir: Path) -> None:
    from tests.helpers import start_blockd

    daemon = start_blockd(sock_dir / "qmp.sock", cwd=sock_dir)
    try:
        with RawQMP(sock_dir / "qmp.sock") as qmp:
            qmp.negotiate()
            before = sorted(p.name for p in sock_dir.iterdir())
            reply = qmp.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": "n\u0000.sock"}}}
            )
            assert reply["error"] == {
                "class": "GenericError",
                "desc": "Failed to bind socket to n\u0000.sock: Invalid argument",
            }
            assert sorted(p.name for p in sock_dir.iterdir()) == before
            assert qmp.execute("nbd-server-stop")["error"]["desc"] == "NBD server not running"
            long_path = str(sock_dir / ("x" * 120))
            reply = qmp.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": long_path}}}
            )
            assert reply["error"]["desc"] == f"UNIX socket path '{long_path}' is too long"
            # a good path still works, and stops
            good = str(sock_dir / "nbd.sock")
            assert qmp.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": good}}}
            ) == {"return": {}}
            assert qmp.execute("nbd-server-stop") == {"return": {}}
            assert qmp.execute("quit") == {"return": {}}
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr()


def inet_reply(qmp: RawQMP, host: str, port: str) -> str:
    reply = qmp.execute(
        "nbd-server-start", {"addr": {"type": "inet", "data": {"host": host, "port": port}}}
    )
    desc: str = reply["error"]["desc"]
    return desc


def test_inet_names_with_nul_are_refused_as_qemu_words_it(served: Served) -> None:
    qmp = served.qmp
    assert qmp.execute("nbd-server-stop") == {"return": {}}
    assert inet_reply(qmp, "127.0.0.1\u0000x", "10809") == (
        "address resolution failed for 127.0.0.1\u0000x:10809: Name or service not known"
    )
    assert inet_reply(qmp, "127.0.0.1", "108\u000009") == (
        "address resolution failed for 127.0.0.1:108\u000009: "
        "Servname not supported for ai_socktype"
    )


def stuck_clients(served: Served) -> list[socket.socket]:
    """One client at each stage where a connection can stall."""
    socks = []
    # connected, greeting unread, nothing sent
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(str(served.nbd_sock))
    socks.append(silent)
    # half an option header
    half_option = raw_client(served.nbd_sock)
    half_option.sendall(struct.pack(">I", 3) + struct.pack(">Q", IHAVEOPT)[:5])
    socks.append(half_option)
    # an option announcing more data than it sends
    long_option = raw_client(served.nbd_sock)
    long_option.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 4000) + b"ab")
    socks.append(long_option)
    # a WRITE cut off half-way through its payload
    half_write = raw_client(served.nbd_sock)
    go(half_write)
    half_write.sendall(struct.pack(">IHHQQI", REQUEST, 0, 1, 1, 0, 4 * MiB) + b"w" * MiB)
    socks.append(half_write)
    # pipelining big READs and never reading the replies (4 MiB ones are sent
    # a MiB at a time: stuck mid-reply)
    for length in (MiB, MiB, 4 * MiB):
        greedy = raw_client(served.nbd_sock)
        go(greedy)
        greedy.setblocking(False)
        request = struct.pack(">IHHQQI", REQUEST, 0, 0, 2, 0, length)
        try:
            for _ in range(400):
                greedy.send(request)
        except BlockingIOError:
            pass
        socks.append(greedy)
    return socks


def test_nbd_server_stop_with_stuck_clients(served: Served) -> None:
    socks = stuck_clients(served)
    # the reply comes (RawQMP would time out after TIMEOUT seconds)
    served.qmp.send(json.dumps({"execute": "nbd-server-stop"}))
    assert served.qmp.read_reply() == {"return": {}}
    assert not served.nbd_sock.exists()
    # a new QMP client is greeted and served
    with RawQMP(served.daemon.socket_path) as other:
        other.negotiate()
        assert other.execute("query-block-exports") == {"return": []}
    assert served.qmp.execute("quit") == {"return": {}}
    assert served.daemon.wait() == 0
    for sock in socks:
        sock.close()
    check_image(served.image)


@pytest.mark.parametrize("how", ["quit", "SIGTERM"])
def test_daemon_stops_with_stuck_clients(served: Served, how: str) -> None:
    socks = stuck_clients(served)
    if how == "quit":
        served.qmp.send(json.dumps({"execute": "quit"}))
        assert served.qmp.read_reply() == {"return": {}}
    else:
        served.daemon.signal(signal.SIGTERM)
    assert served.daemon.wait(TIMEOUT) == 0
    for sock in socks:
        sock.close()
    check_image(served.image)


def test_stop_returns_even_when_the_listener_cleanup_fails(tmp_path: Path) -> None:
    """The old wedge itself: an exception in the server's clean-up must not keep
    :meth:`NBDServer.stop` waiting (it comes out of ``serve`` instead).

    The server runs in a thread of its own: a stop that waits forever (in a
    shielded scope, which no timeout in its own run can cut short) then fails
    this test instead of hanging it.
    """
    from tests.unit.test_nbd_exports import MemoryNode, make_export

    failures: list[BaseException] = []

    def broken_cleanup() -> None:
        raise ValueError("embedded null byte")

    async def scenario() -> None:
        registry, _export = make_export(MemoryNode("n", size=MiB))
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(tmp_path / "s"))
        sock.listen()
        server = NBDServer(registry, [trio.SocketListener(sock)], 0, broken_cleanup)

        async def serve() -> None:
            try:
                await server.serve()
            except ValueError as err:
                failures.append(err)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await trio.sleep(0.05)
            await server.stop()

    runner = threading.Thread(target=trio.run, args=(scenario,), daemon=True)
    runner.start()
    runner.join(TIMEOUT)
    assert not runner.is_alive(), "nbd server stop never returned"
    assert [str(f) for f in failures] == ["embedded null byte"]
