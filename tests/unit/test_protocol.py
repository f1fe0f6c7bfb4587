"""The QMP envelope and serialisation, without sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd.qjson import encode
from blockd.qmp.protocol import NO_ID, BadRequest, QMPConnection, Request

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "test"}


def receive(data: bytes, oob: bool = False) -> list[Request | BadRequest]:
    conn = QMPConnection(VERSION)
    if oob:
        conn.enter_command_mode(["oob"])
    return conn.receive_data(data)


def test_greeting_is_one_crlf_line() -> None:
    assert QMPConnection(VERSION).greeting() == (
        b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
        b'"package": "test"}, "capabilities": ["oob"]}}\r\n'
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"execute": "x"}', Request("x")),
        (b'{"execute": "x", "id": null}', Request("x", id=None)),
        (b'{"execute": "x", "arguments": {"a": 1}, "id": [1]}', Request("x", {"a": 1}, [1])),
        (b"[1]", BadRequest("QMP input must be a JSON object")),
        (
            b'{"execute": "x", "foo": 1, "id": 3}',
            BadRequest("QMP input member 'foo' is unexpected", 3),
        ),
        (b'{"id": 9, "foo": 1, "bar": 2}', BadRequest("QMP input member 'bar' is unexpected", 9)),
        (b'{"execute": 5, "id": 1}', BadRequest("QMP input member 'execute' must be a string", 1)),
        (b'{"id": 1}', BadRequest("QMP input lacks member 'execute'", 1)),
        (
            b'{"execute": "x", "arguments": null}',
            BadRequest("QMP input member 'arguments' must be an object"),
        ),
        (
            b'{"execute": "x", "arguments": []}',
            BadRequest("QMP input member 'arguments' must be an object"),
        ),
        (b'{"exec-oob": "x"}', BadRequest("QMP input member 'exec-oob' is unexpected")),
        (
            b'{"execute": "x", "control": {}}',
            BadRequest("QMP input member 'control' is unexpected"),
        ),
        (b'{"execute": }', BadRequest("JSON parse error, expecting value")),
    ],
)
def test_envelope(data: bytes, expected: Request | BadRequest) -> None:
    assert receive(data) == [expected]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"exec-oob": "q", "id": 7}', Request("q", id=7, oob=True)),
        (
            b'{"exec-oob": "x", "execute": "y", "id": 5}',
            BadRequest("QMP input member 'execute' clashes with 'exec-oob'", 5),
        ),
        (
            b'{"execute": "y", "exec-oob": "x", "id": 6}',
            BadRequest("QMP input member 'execute' clashes with 'exec-oob'", 6),
        ),
        (
            b'{"execute": 5, "exec-oob": "x", "id": 4}',
            BadRequest("QMP input member 'execute' must be a string", 4),
        ),
    ],
)
def test_envelope_with_oob(data: bytes, expected: Request | BadRequest) -> None:
    assert receive(data, oob=True) == [expected]


def test_reply_member_order_and_id_presence() -> None:
    conn = QMPConnection(VERSION)
    assert conn.reply(NO_ID, {}) == b'{"return": {}}\r\n'
    assert conn.reply(None, []) == b'{"return": [], "id": null}\r\n'
    assert conn.reply_error(4, "CommandNotFound", "no") == (
        b'{"id": 4, "error": {"class": "CommandNotFound", "desc": "no"}}\r\n'
    )
    assert conn.reply_error(NO_ID, "GenericError", "x") == (
        b'{"error": {"class": "GenericError", "desc": "x"}}\r\n'
    )
    assert conn.event("E", {"a": 1}, 5, 6) == (
        b'{"timestamp": {"seconds": 5, "microseconds": 6}, "event": "E", "data": {"a": 1}}\r\n'
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("a\u00e9", '"a\\u00E9"'),
        ("\U0001f600\x7f/", '"\\uD83D\\uDE00\\u007F/"'),
        ("back\\u00e9slash", '"back\\\\u00e9slash"'),
        ("\n\t\x01", '"\\n\\t\\u0001"'),
        # noncharacters, which QEMU's UTF-8 reader calls invalid
        ("\ufdd0\U0010ffff", '"\\uFFFD\\uFFFD"'),
        (1500.0, "1500"),
        (0.1, "0.10000000000000001"),
        (-0.0, "-0"),
        (1e300, "1.0000000000000001e+300"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        (12345678901234567890, "12345678901234567890"),
        ({"a": [True, False, None]}, '{"a": [true, false, null]}'),
    ],
)
def test_encode_like_qemu(value: object, text: str) -> None:
    assert encode(value) == text


def _round_trips(ch: str) -> bool:
    """Whether QEMU writes the character as itself: noncharacters (U+FDD0..U+FDEF,
    U+xxFFFE/F) and lone surrogates (no UTF-8 form) become U+FFFD
    (test_encode_like_qemu pins that)."""
    cp = ord(ch)
    return not (0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE or 0xD800 <= cp <= 0xDFFF)


_CHARS = st.characters().filter(_round_trips)


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(_CHARS),
        lambda c: (
            st.lists(c, max_size=3) | st.dictionaries(st.text(_CHARS, max_size=5), c, max_size=3)
        ),
        max_leaves=15,
    )
)
def test_encoding_is_ascii_json_that_round_trips(value: object) -> None:
    text = encode(value)
    assert text.isascii() and "\n" not in text
    assert json.loads(text) == value


def test_negotiation_phase() -> None:
    conn = QMPConnection(VERSION)
    assert not conn.negotiated and not conn.oob_enabled
    conn.enter_command_mode([])
    assert conn.negotiated and not conn.oob_enabled


@pytest.mark.parametrize(
    ("members", "wire_order"),
    [
        (["id", "return"], ["return", "id"]),
        (["error", "id"], ["id", "error"]),
        (["data", "event", "timestamp"], ["timestamp", "event", "data"]),
        (
            ["type", "device", "len", "offset", "speed", "error"],
            ["device", "len", "offset", "speed", "type", "error"],
        ),
        (["id", "status"], ["status", "id"]),
        (
            [
                "type",
                "device",
                "len",
                "offset",
                "busy",
                "paused",
                "speed",
                "ready",
                "status",
                "auto-finalize",
                "auto-dismiss",
                "io-status",
            ],
            [
                "auto-finalize",
                "io-status",
                "device",
                "auto-dismiss",
                "busy",
                "len",
                "offset",
                "status",
                "paused",
                "speed",
                "ready",
                "type",
            ],
        ),
        # Same bucket: the member inserted last comes first, as in a QDict.
        (["major", "minor", "micro"], ["micro", "minor", "major"]),
    ],
)
def test_members_in_qdict_order(members: list[str], wire_order: list[str]) -> None:
    decoded = json.loads(encode(dict.fromkeys(members, 0)))
    assert list(decoded) == wire_order
