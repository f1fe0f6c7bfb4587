"""Request framing with big WRITE payloads, which the parser collects piecewise."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.export import protocol as p

from .test_nbd_protocol import info_payload, option

DISK = p.ExportInfo("disk", 1 << 30, writable=True)
SIZES = [0, 1, 4096, 65535, 65536, 65537, 300_000, 1 << 20]


def negotiated() -> p.NBDConnection:
    conn = p.NBDConnection(lambda name: DISK if name == "disk" else None, lambda: [DISK])
    conn.greeting()
    flags = struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
    conn.receive_data(flags + option(p.Opt.GO, info_payload("disk")))
    conn.data_to_send()
    return conn


def traffic(seed: int) -> tuple[bytes, list[tuple[int, int, int, bytes]]]:
    rng = random.Random(seed)
    wire = b""
    expected = []
    for handle in range(24):
        if rng.random() < 0.6:
            data = rng.randbytes(rng.choice(SIZES))
            wire += struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, handle, 0, len(data))
            wire += data
            expected.append((p.Cmd.WRITE, handle, len(data), data))
        else:
            wire += struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, handle, 0, 512)
            expected.append((p.Cmd.READ, handle, 512, b""))
    return wire, expected


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 1000), st.lists(st.sampled_from([1, 7, 28, 4096, 65536, 1 << 18, 3 << 20]),
                                      min_size=1, max_size=8))
def test_any_chunking_of_big_writes_gives_the_same_requests(seed: int, steps: list[int]) -> None:
    wire, expected = traffic(seed)
    conn = negotiated()
    got: list[p.Event] = []
    pos = 0
    i = 0
    while pos < len(wire):
        step = steps[i % len(steps)]
        got += conn.receive_data(wire[pos : pos + step])
        pos += step
        i += 1
    assert all(isinstance(e, p.Request) for e in got)
    assert [(e.type, e.handle, e.length, e.data) for e in got if isinstance(e, p.Request)] == (
        expected
    )


def test_payload_due_names_the_write_still_coming() -> None:
    """The server counts a WRITE's payload from its header on (budget)."""
    conn = negotiated()
    for length in (5, 3 << 20):
        header = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, length)
        assert conn.receive_data(header[:20]) == [] and conn.payload_due == 0
        assert conn.receive_data(header[20:] + b"x" * (length - 1)) == []
        assert conn.payload_due == length
        events = conn.receive_data(b"x")
        assert conn.payload_due == 0
        assert [(e.type, len(e.data)) for e in events if isinstance(e, p.Request)] == [
            (p.Cmd.WRITE, length)
        ]
