# ruff: noqa: E501
"""The sans-I/O NBD core: handshake answers, request framing, reply bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.export import protocol as p
from blockd.export import replies as r

DISK = p.ExportInfo("disk", 4 << 20, writable=True, description="my disk")
RO = p.ExportInfo("ro", 1 << 20, writable=False)


def lookup(name: str) -> p.ExportInfo | None:
    return {"disk": DISK, "ro": RO}.get(name)


def listing() -> list[p.ExportInfo]:
    return [DISK, RO]


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, code, len(data)) + data


def info_payload(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_payload(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(kind: int, handle: int = 1, offset: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"") -> bytes:  # fmt: skip
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, kind, handle, offset, length) + data


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Parse option replies: (option, reply type, payload)."""
    out = []
    while data:
        magic, opt, rep, n = struct.unpack_from(">QIII", data)
        assert magic == p.REPLY_MAGIC
        out.append((opt, rep, data[20 : 20 + n]))
        data = data[20 + n :]
    return out


def connected(flags: int = 3) -> p.NBDConnection:
    conn = p.NBDConnection(lookup, listing)
    assert conn.greeting() == b"NBDMAGICIHAVEOPT\x00\x03"
    assert conn.receive_data(struct.pack(">I", flags)) == []
    return conn


def test_unknown_client_flags_end_the_connection() -> None:
    conn = p.NBDConnection(lookup, listing)
    with pytest.raises(p.ProtocolError, match="Unknown client flags"):
        conn.receive_data(struct.pack(">I", 4 | 1))


def test_list_sends_each_export_with_its_description() -> None:
    conn = connected()
    assert conn.receive_data(option(p.Opt.LIST)) == []
    got = replies(conn.data_to_send())
    assert got == [
        (3, p.Rep.SERVER, b"\x00\x00\x00\x04diskmy disk"),
        (3, p.Rep.SERVER, b"\x00\x00\x00\x02ro"),
        (3, p.Rep.ACK, b""),
    ]


def test_list_with_data_is_invalid() -> None:
    conn = connected()
    conn.receive_data(option(p.Opt.LIST, b"x"))
    assert replies(conn.data_to_send()) == [
        (3, p.Rep.ERR_INVALID, b"option 'list' has unexpected length")
    ]


def test_info_answers_as_qemu_and_stays_in_negotiation() -> None:
    conn = connected()
    assert conn.receive_data(option(p.Opt.INFO, info_payload("disk", 1, 3))) == []
    got = replies(conn.data_to_send())
    assert [r[2] for r in got] == [
        b"\x00\x01disk",
        b"\x00\x02my disk",
        struct.pack(">HIII", 3, 1, 4096, 32 << 20),
        struct.pack(">HQH", 0, 4 << 20, 0x0D6D),
        b"",
    ]
    assert conn.phase is p.Phase.OPTIONS


def test_go_after_structured_reply_negotiates_with_contexts() -> None:
    conn = connected()
    conn.receive_data(option(p.Opt.STRUCTURED_REPLY))
    conn.receive_data(option(p.Opt.STRUCTURED_REPLY))
    conn.receive_data(option(p.Opt.SET_META_CONTEXT, meta_payload("disk", "base:allocation")))
    events = conn.receive_data(option(p.Opt.GO, info_payload("disk")))
    got = replies(conn.data_to_send())
    assert got[0] == (8, p.Rep.ACK, b"")
    assert got[1] == (8, p.Rep.ERR_INVALID, b"structured reply already negotiated")
    assert got[2] == (10, p.Rep.META_CONTEXT, b"\x00\x00\x00\x00base:allocation")
    assert got[3] == (10, p.Rep.ACK, b"")
    assert got[-2] == (7, p.Rep.INFO, struct.pack(">HQH", 0, 4 << 20, 0x0DED))
    assert events == [p.Negotiated(DISK, True, {0: "base:allocation"})]
    assert conn.phase is p.Phase.TRANSMISSION


def test_meta_context_before_structured_reply_is_refused() -> None:
    conn = connected()
    conn.receive_data(option(p.Opt.SET_META_CONTEXT, meta_payload("disk", "base:allocation")))
    assert replies(conn.data_to_send()) == [
        (
            10,
            p.Rep.ERR_INVALID,
            b"request option 'set meta context' when structured reply is not negotiated",
        )
    ]


@pytest.mark.parametrize(
    ("queries", "listed"),
    [((), True), (("base:",), True), (("base:allocation",), True), (("qemu:x", "nope"), False)],
)
def test_list_meta_context(queries: tuple[str, ...], listed: bool) -> None:
    conn = connected()
    conn.receive_data(option(p.Opt.STRUCTURED_REPLY))
    conn.data_to_send()
    conn.receive_data(option(p.Opt.LIST_META_CONTEXT, meta_payload("disk", *queries)))
    got = replies(conn.data_to_send())
    assert (got[0][1] == p.Rep.META_CONTEXT) is listed
    assert got[-1] == (9, p.Rep.ACK, b"")


def test_set_meta_context_with_base_alone_selects_nothing() -> None:
    conn = connected()
    conn.receive_data(option(p.Opt.STRUCTURED_REPLY))
    conn.receive_data(option(p.Opt.SET_META_CONTEXT, meta_payload("disk", "base:")))
    events = conn.receive_data(option(p.Opt.GO, info_payload("disk")))
    assert events == [p.Negotiated(DISK, True, {})]


def test_unknown_export_and_unknown_option() -> None:
    conn = connected()
    conn.receive_data(option(p.Opt.GO, info_payload("nope")))
    conn.receive_data(option(11))
    conn.receive_data(option(p.Opt.STARTTLS))
    assert replies(conn.data_to_send()) == [
        (7, p.Rep.ERR_UNKNOWN, b"export 'nope' not present"),
        (11, p.Rep.ERR_UNSUP, b"Unsupported option 11 (<unknown>)"),
        (5, p.Rep.ERR_POLICY, b"TLS not configured"),
    ]


@pytest.mark.parametrize(("flags", "padding"), [(1, 124), (3, 0)])
def test_export_name_replies_without_header(flags: int, padding: int) -> None:
    conn = connected(flags)
    events = conn.receive_data(option(p.Opt.EXPORT_NAME, b"ro"))
    assert conn.data_to_send() == struct.pack(">QH", 1 << 20, 0x050F) + bytes(padding)
    assert events == [p.Negotiated(RO, False, {})]


def test_export_name_unknown_closes() -> None:
    conn = connected()
    assert conn.receive_data(option(p.Opt.EXPORT_NAME, b"nope")) == [
        p.Closed("unknown export name")
    ]
    assert conn.data_to_send() == b""


def test_abort_is_acknowledged() -> None:
    conn = connected()
    assert conn.receive_data(option(p.Opt.ABORT)) == [p.Closed("client aborted")]
    assert replies(conn.data_to_send()) == [(2, p.Rep.ACK, b"")]


def test_bad_option_magic_is_fatal() -> None:
    conn = connected()
    with pytest.raises(p.ProtocolError):
        conn.receive_data(b"\x00" * 16)


def go(conn: p.NBDConnection, structured: bool = False) -> None:
    if structured:
        conn.receive_data(option(p.Opt.STRUCTURED_REPLY))
    conn.receive_data(option(p.Opt.GO, info_payload("disk")))
    conn.data_to_send()


def test_requests_are_framed_with_write_payloads() -> None:
    conn = connected()
    go(conn)
    stream = request(p.Cmd.WRITE, 7, 512, 3, p.CmdFlag.FUA, b"abc") + request(p.Cmd.READ, 8, 0, 9)
    events = conn.receive_data(stream + request(p.Cmd.DISC, 9))
    assert events == [
        p.Request(1, p.Cmd.WRITE, 7, 512, 3, b"abc"),
        p.Request(0, p.Cmd.READ, 8, 0, 9),
        p.Closed("client disconnected"),
    ]


def test_bad_request_magic_is_fatal() -> None:
    conn = connected()
    go(conn)
    with pytest.raises(p.ProtocolError, match="invalid magic"):
        conn.receive_data(b"\x11" * 28)


def test_huge_write_is_fatal() -> None:
    conn = connected()
    go(conn)
    with pytest.raises(p.ProtocolError, match="larger than max"):
        conn.receive_data(request(p.Cmd.WRITE, 1, 0, (32 << 20) + 1))


@pytest.mark.parametrize(
    ("req", "writable", "structured", "contexts", "expected"),
    [
        (p.Request(0, 0, 1, 0, 512), True, False, {}, None),
        (
            p.Request(0, 0, 1, 4193792, 1024),
            True,
            True,
            {},
            p.Refusal(22, "operation past EOF; From: 4193792, Len: 1024, Size: 4194304"),
        ),
        (p.Request(0, 99, 1, 0, 0), True, True, {}, p.Refusal(22, "invalid request type (99) received")),
        (p.Request(0, 1, 1, 0, 1), False, False, {}, p.Refusal(22, "Export is read-only")),
        (p.Request(0, 7, 1, 0, 1), True, True, {}, p.Refusal(22, "CMD_BLOCK_STATUS not negotiated")),
        (p.Request(0, 7, 1, 0, 1), True, True, {0: "base:allocation"}, None),
        (p.Request(4, 0, 1, 0, 1), True, False, {}, p.Refusal(22, "unsupported flags for command read (got 0x4)")),
        (p.Request(4, 0, 1, 0, 1), True, True, {}, None),
        (p.Request(0x12, 6, 1, 0, 1), True, False, {}, None),
        (p.Request(0, 3, 1, 0, 0), False, False, {}, None),
    ],
)  # fmt: skip
def test_check_request(
    req: p.Request,
    writable: bool,
    structured: bool,
    contexts: dict[int, str],
    expected: p.Refusal | None,
) -> None:
    assert p.check_request(req, 4 << 20, writable, structured, contexts) == expected


def test_read_chunks_place_each_extent_and_mark_the_last_done() -> None:
    extents = [(65536, b"x" * 65536), (131072, None), (65536, None), (10, b"y" * 10)]
    chunks = r.read_chunks(5, 0, extents)
    kinds = [struct.unpack_from(">IHHQI", c)[1:3] for c in chunks]
    assert kinds == [(0, 1), (0, 2), (0, 2), (1, 1)]
    assert struct.unpack_from(">QI", chunks[1], 20) == (65536, 131072)
    assert struct.unpack_from(">Q", chunks[3], 20) == (4 * 65536,)
    df = r.read_chunks(5, 0, extents, df=True)
    assert len(df) == 1 and len(df[0]) == 20 + 8 + 4 * 65536 + 10


def _joined(pieces: list[p.ReplyPiece], image: bytes) -> bytes:
    """A reply sent a piece at a time, as the client receives it."""
    return b"".join(head + image[at : at + n] for head, at, n in pieces)


@pytest.mark.parametrize("piece", [1000, 65536, 1 << 20])
def test_read_reply_pieces_are_the_whole_reply_cut_up(piece: int) -> None:
    image = bytes(range(256)) * 2048  # 512 KiB
    offset, length = 1000, 300_000
    data = image[offset : offset + length]
    extents = [(length, False)]
    simple = r.read_reply_pieces(7, offset, extents, structured=False, df=False, piece=piece)
    assert _joined(simple, image) == r.simple_reply(7, 0, data)
    assert all(n <= piece for _head, _at, n in simple)
    df = r.read_reply_pieces(7, offset, extents, structured=True, df=True, piece=piece)
    assert _joined(df, image) == b"".join(r.read_chunks(7, offset, [(length, data)], df=True))
    # structured: the same holes, data cut into chunks of at most ``piece`` bytes
    runs = [(70_000, False), (65536, True), (100_000, False), (64_464, True)]
    sparse = r.read_reply_pieces(7, offset, runs, structured=True, df=False, piece=piece)
    assert sum(n for _head, _at, n in sparse) == 170_000
    if piece >= 100_000:
        expected, pos = [], offset
        for n, hole in runs:
            expected.append((n, None if hole else image[pos : pos + n]))
            pos += n
        assert _joined(sparse, image) == b"".join(r.read_chunks(7, offset, expected))
    else:
        heads = [struct.unpack_from(">IHHQI", head) for head, _at, _n in sparse]
        assert [flags for _m, flags, _k, _h, _s in heads] == [0] * (len(heads) - 1) + [1]
        data_chunks = [(at, n) for (head, at, n) in sparse if n]
        assert all(n <= piece for _at, n in data_chunks)
        assert sum(n for _at, n in data_chunks) == 170_000


def test_error_replies() -> None:
    assert r.error_reply(3, False, 22, "x") == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 22, 3)
    assert (
        r.error_reply(3, True, 22, "bad")
        == struct.pack(">IHHQIIH", p.STRUCTURED_REPLY_MAGIC, 1, 0x8001, 3, 9, 22, 3) + b"bad"
    )


def test_merge_extents() -> None:
    assert r.merge_extents([(1, 0), (2, 0), (3, 3), (4, 3), (1, 0)]) == [(3, 0), (7, 3), (1, 0)]


HANDSHAKE = (
    struct.pack(">I", 3)
    + option(p.Opt.LIST)
    + option(p.Opt.STRUCTURED_REPLY)
    + option(p.Opt.SET_META_CONTEXT, meta_payload("disk", "base:allocation"))
    + option(p.Opt.INFO, info_payload("disk", 1, 2, 3))
    + option(p.Opt.GO, info_payload("disk"))
)
TRAFFIC = (
    request(p.Cmd.WRITE, 1, 0, 5, 0, b"hello")
    + request(p.Cmd.READ, 2, 0, 5)
    + request(p.Cmd.BLOCK_STATUS, 3, 0, 4096)
    + request(p.Cmd.DISC, 4)
)


def run_split(data: bytes, cuts: list[int]) -> tuple[list[p.Event], bytes]:
    conn = p.NBDConnection(lookup, listing)
    events: list[p.Event] = []
    out = b""
    last = 0
    for cut in [*sorted(cuts), len(data)]:
        events += conn.receive_data(data[last:cut])
        out += conn.data_to_send()
        last = cut
    return events, out


@given(st.lists(st.integers(0, len(HANDSHAKE) + len(TRAFFIC)), max_size=20))
def test_any_chunking_gives_the_same_conversation(cuts: list[int]) -> None:
    whole = run_split(HANDSHAKE + TRAFFIC, [])
    assert run_split(HANDSHAKE + TRAFFIC, cuts) == whole
    events = whole[0]
    assert isinstance(events[0], p.Negotiated)
    assert [type(e) for e in events[1:]] == [p.Request, p.Request, p.Request, p.Closed]


@settings(max_examples=300)
@given(st.binary(max_size=400), st.booleans())
def test_garbage_only_ever_raises_protocol_error(garbage: bytes, after_handshake: bool) -> None:
    conn = p.NBDConnection(lookup, listing)
    prefix = HANDSHAKE if after_handshake else struct.pack(">I", 3)
    conn.receive_data(prefix)
    try:
        for i in range(0, len(garbage), 7):
            conn.receive_data(garbage[i : i + 7])
            conn.data_to_send()
    except p.ProtocolError:
        pass


@settings(max_examples=200)
@given(
    st.sampled_from([*list(p.Opt), 0, 4, 11, 0xFFFFFFFF]),
    st.binary(max_size=64),
)
def test_any_option_payload_gets_a_reply_or_ends_cleanly(code: int, payload: bytes) -> None:
    conn = connected()
    try:
        events = conn.receive_data(option(code, payload))
    except p.ProtocolError:
        return
    out = conn.data_to_send()
    if (not events or code == p.Opt.ABORT) and code != p.Opt.EXPORT_NAME:
        assert out, "every option that does not end the handshake is answered"
