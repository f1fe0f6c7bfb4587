"""NBD clients that stop reading their replies cannot grow the daemon (issue 12, defect 3).

Each stuck client pipelines 1 MiB requests and never reads a reply; the
daemon must stop reading its requests once the client holds its budget
(:mod:`blockd.export.budget`).  RSS is the measure (not a timing): with
margin, one stuck client costs at most 16 MiB, and 64 together leave the
daemon under 512 MiB, while a well-behaved client still reads and writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.nbd_clients import (
    MiB,
    close_all,
    connect,
    negotiate,
    receive_exactly,
    request,
    settled_rss,
    stuck_reader,
)
from tests.images import create, qemu_io
from tests.integration.test_nbd import Served, check_image, start_served

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
    """32 MiB READs (NBD's maximum; QSD holds 16 of them per client): beyond the
    server's 256 MiB share, a client gets no request of over 2 MiB started."""
    pid = served.daemon.proc.pid
    good_client_works(served)
    base = settled_rss(pid)
    socks = [stuck_reader(served.nbd_sock, SPAN, length=32 * MiB) for _ in range(24)]
    try:
        total = settled_rss(pid)
        assert total - base < 400 * MiB, (base, total)
        good_client_works(served)  # 4 KiB and 1 MiB requests still go through
    finally:
        close_all(socks)
    assert served.qmp.execute("quit") == {"return": {}}
    assert served.daemon.wait() == 0
