"""The JSON stream splitter against QEMU's observed behaviour (qmp-protocol brief §1)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.qmp.json_stream import MAX_TOKENS, JSONStreamParser, Message, MessageError


def feed(*chunks: bytes, limit: int = 1 << 20) -> list[object]:
    parser = JSONStreamParser(limit)
    out: list[object] = []
    for chunk in chunks:
        for item in parser.feed(chunk):
            out.append(item.value if isinstance(item, Message) else ("error", item.desc))
    return out


_INF = float("inf")


def err(text: str) -> tuple[str, str]:
    return ("error", "JSON parse error, " + text)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"a": 1}', [{"a": 1}]),
        (b'{"a":1}{"b":2}', [{"a": 1}, {"b": 2}]),
        (b'{"a":\n\n 1\n}', [{"a": 1}]),
        (b'  \r\n\t {"a": [1, 2, {"b": null}]}', [{"a": [1, 2, {"b": None}]}]),
        (b"{'execute':'query-version'}", [{"execute": "query-version"}]),
        (b"{'a':'x\\'y\"z'}", [{"a": "x'y\"z"}]),
        (b'{"execute": }', [err("expecting value")]),
        (b'{"execute":"blockdev-del" "id": 6}', [err("expected separator in dict")]),
        (
            b'{"execute":"query-version","id":22} garbage\n',
            [{"execute": "query-version", "id": 22}, err("invalid keyword 'garbage'")],
        ),
        (b"}", [err("expecting value")]),
        (b"]", [err("expecting value")]),
        (b"[1,2]", [[1, 2]]),
        (b'"hello"', ["hello"]),
        (b'{"id":1,"id":2}', [err("duplicate key")]),
        (b'{"a":1,}', [err("expecting value")]),
        (b"[1 2]", [err("expected separator in list")]),
        (b'{"a" 1}', [err("missing : in object pair")]),
        (b"{1:2}", [err("key is not a string in object")]),
        (b"{[]:2}", [err("key is not a string in object")]),
        (b'{"a":tru}', [err("invalid keyword 'tru'")]),
        (b'{"a":"\\q"}', [err("invalid escape sequence in string")]),
        (b'{"a":"\\u12"}', [err("invalid hex escape sequence in string")]),
        (b'{"a":"\\ud83d\\ude00\\u00e9"}', [{"a": "\U0001f600\u00e9"}]),
        (b'{"a":"\xc3("}', [err("invalid UTF-8 sequence in string")]),
        (b'{"a":"\xc3\xa9"}', [{"a": "\u00e9"}]),
        # QEMU's modified UTF-8: C0 80 is U+0000; noncharacters and lone
        # surrogates are refused, raw or escaped (the escape quoted as written).
        (b'["a\xc0\x80b", "\\u0000"]', [["a\x00b", "\x00"]]),
        (b'["\xef\xb7\x90"]', [err("invalid UTF-8 sequence in string")]),
        (b'["\xf4\x8f\xbf\xbf"]', [err("invalid UTF-8 sequence in string")]),
        (b'["\xc0\x81"]', [err("invalid UTF-8 sequence in string")]),
        (b'["\\ufdd0"]', [err("\\ufdd0 is not a valid Unicode character")]),
        (b'["\\uDBFF\\uDFFF"]', [err("\\uDBFF\\uDFFF is not a valid Unicode character")]),
        (b'["\\ud800"]', [err("\\ud800 is not a valid Unicode character")]),
        (b'["\\ud800\\u0041"]', [err("\\ud800 is not a valid Unicode character")]),
        (b'["\\ud800\\uzzzz"]', [err("\\ud800 is not a valid Unicode character")]),
        (b"[1.5e3, -0.5, 12345678901234567890, -0]", [[1500.0, -0.5, 12345678901234567890, 0]]),
        (b"[123456789012345678901234567890]", [[1.2345678901234568e29]]),
        (b"[1e999, -1e999, 1e-999, 1e99999999999999999999]", [[_INF, -_INF, 0.0, _INF]]),
        # Past int64/uint64 an integer becomes a double, also far past the
        # 4300 digits Python's int() accepts.
        (b"[18446744073709551615, 18446744073709551616]", [[(1 << 64) - 1, 2.0**64]]),
        (b"[-9223372036854775808, -9223372036854775809]", [[-(1 << 63), -(2.0**63)]]),
        (b"[" + b"9" * 4301 + b"]", [[_INF]]),
        (b"[-" + b"9" * 100000 + b"]", [[-_INF]]),
        (b"[1" + b"0" * 308 + b", 1" + b"0" * 309 + b"]", [[1e308, _INF]]),
        (b"[0." + b"1" * 5000 + b"e-5000]", [[0.0]]),
        (b"[-0, -0.0]", [[0, -0.0]]),
        # JSON has 0e5; QEMU's lexer takes no exponent right after a zero
        (b'{"a": [0e5]}', [err("expected separator in list")]),
        # An invalid byte is a lexical error; recovery skips to the next
        # structural character, whose leftovers produce a second error.
        (
            b'{"a": "\xff"}',
            [("error", "JSON parse error, stray '\"\ufffd'"), err("expecting value")],
        ),
        (
            b'{"a":"a\x01"}',
            [("error", "JSON parse error, stray '\"a\x01'"), err("expecting value")],
        ),
        (b'{"a": 01}', [("error", "JSON parse error, stray '01'"), err("expecting value")]),
        (b'X {"b": 2}', [("error", "JSON parse error, stray 'X'"), {"b": 2}]),
    ],
)
def test_messages_and_errors(data: bytes, expected: list[object]) -> None:
    assert feed(data) == expected


def test_incomplete_message_waits_for_more() -> None:
    parser = JSONStreamParser()
    assert list(parser.feed(b'{"execute": "quit"')) == []
    assert [m.value for m in parser.feed(b"}") if isinstance(m, Message)] == [{"execute": "quit"}]


def test_nesting_limit_refused_once_and_skipped() -> None:
    deep = b"[" * 1100 + b"]" * 1100
    assert feed(deep + b'{"ok": 1}') == [("error", "JSON nesting depth limit exceeded"), {"ok": 1}]


def test_nesting_at_the_limit_is_accepted() -> None:
    data = b'{"a": ' + b"[" * 1023 + b"7" + b"]" * 1023 + b"}"
    [result] = feed(data)
    assert isinstance(result, dict)
    inner = result["a"]
    for _ in range(1022):
        inner = inner[0]
    assert inner == [7]


def test_huge_message_refused_without_buffering_it() -> None:
    parser = JSONStreamParser(max_message_size=4096)
    results: list[object] = []
    head = b'{"execute": "x", "arguments": {"blob": "'
    results += list(parser.feed(head))
    # Feed far more than the limit; the parser must not keep it.
    for _ in range(256):
        results += list(parser.feed(b"A" * 4096))
        assert parser._lexer.pending_size() + parser._size <= 4096 + 4096
    results += list(parser.feed(b'"}}{"execute": "after"}'))
    assert [type(r) for r in results] == [MessageError, Message]
    assert isinstance(results[0], MessageError)
    assert results[0].desc == "JSON token size limit exceeded"
    assert isinstance(results[1], Message)
    assert results[1].value == {"execute": "after"}


def test_huge_message_of_many_small_tokens() -> None:
    body = b"[" + b"1," * 5000 + b"1]"
    assert feed(body + b"[2]", limit=1024) == [("error", "JSON token size limit exceeded"), [2]]


def test_token_count_limit_refused_once_and_skipped() -> None:
    # Within the size limit but past the token cap: one error, then the next message.
    def tokens(count: int) -> bytes:  # "[1,1,...,1]" of ``count`` (odd) tokens
        return b"[" + b"1," * ((count - 3) // 2) + b"1]"

    assert feed(tokens(MAX_TOKENS - 1)) == [[1] * (MAX_TOKENS // 2 - 1)]
    assert feed(tokens(MAX_TOKENS + 1) + b'{"ok": 1}') == [
        ("error", "JSON token count limit exceeded"),
        {"ok": 1},
    ]


def test_huge_top_level_string() -> None:
    assert feed(b'"' + b"x" * 5000 + b'" "ok"', limit=1024) == [
        ("error", "JSON token size limit exceeded"),
        "ok",
    ]


# A conversation mixing valid messages, parse errors and recovery.
CONVERSATION = (
    b'{"execute":"qmp_capabilities"}'
    b'{"execute": "query-version", "id": {"deep": [1, 2.5, "x\\u00e9\\"", null, true]}}\n'
    b"{'execute':'q','arguments':{'s':'it\\'s'}}  "
    b'{"execute": }\n'
    b'{"id": 1, "id": 2}'
    b"  garbage  "
    b'{"a": "\xff"}'
    b'{"after": "error"}'
    b"[1,\r\n2]  -12.5e-3 0 "
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(CONVERSATION)), max_size=40))
def test_any_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [
        CONVERSATION[a:b] for a, b in zip([0, *points], [*points, len(CONVERSATION)], strict=True)
    ]
    assert feed(*chunks) == feed(CONVERSATION)


def test_conversation_reference_result() -> None:
    assert feed(CONVERSATION) == [
        {"execute": "qmp_capabilities"},
        {"execute": "query-version", "id": {"deep": [1, 2.5, 'x\u00e9"', None, True]}},
        {"execute": "q", "arguments": {"s": "it's"}},
        err("expecting value"),
        err("duplicate key"),
        err("invalid keyword 'garbage'"),
        ("error", "JSON parse error, stray '\"\ufffd'"),
        err("expecting value"),
        {"after": "error"},
        [1, 2],
        -0.0125,
        0,
    ]


def _qemu_accepts(char: str) -> bool:
    """QEMU's parser refuses Unicode's noncharacters (U+FDD0-U+FDEF and the last
    two of every plane) in strings, as the cases above show: no round trip."""
    point = ord(char)
    return not 0xFDD0 <= point <= 0xFDEF and (point & 0xFFFE) != 0xFFFE


def _containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    keys = st.text(st.characters(exclude_categories=("Cs",)).filter(_qemu_accepts), max_size=8)
    return st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)


qemu_text = st.text(st.characters(exclude_categories=("Cs",)).filter(_qemu_accepts))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | qemu_text,
    _containers,
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=5), st.data())
def test_roundtrip_of_arbitrary_json(values: list[object], data: st.DataObject) -> None:
    encoded = b"".join(
        json.dumps(v, ensure_ascii=data.draw(st.booleans())).encode() + b" " for v in values
    )
    cut = data.draw(st.integers(0, len(encoded)))
    assert feed(encoded[:cut], encoded[cut:]) == values


def _one_byte_at_a_time(data: bytes, limit: int) -> list[object]:
    """Fed a byte at a time, no chunk is ever a whole message: the lexer reads all."""
    return [repr(item) for item in _feed_items(*(data[i : i + 1] for i in range(len(data))),
                                               limit=limit)]  # fmt: skip


def _feed_items(*chunks: bytes, limit: int) -> list[object]:
    parser = JSONStreamParser(limit)
    return [item for chunk in chunks for item in parser.feed(chunk)]


# Pieces of well-formed and broken JSON, mostly the ASCII the fast path takes.
_PIECES = st.sampled_from(
    [b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b"\t", b'"a"', b'"execute"', b'"id"',
     b"'q'", b"1", b"-0", b"0", b"01", b"1.5e3", b"0e5", b"-0E1", b"0.0e1", b"1E+2", b"1e999",
     b"18446744073709551616",
     b"9223372036854775807", b"-9223372036854775809", b"true", b"false", b"null", b"NaN",
     b"Infinity", b"tru", b"x", b'"\\u0041"', b'"\\n"', b'"\xc3\xa9"', b"\xff", b"\x01",
     b'"a\tb"', b'{"a": 1}', b'{"a": 1, "a": 2}', b'{"execute": "query-block-jobs"}',
     b'{"execute": "q", "arguments": {"x": [1, 2.5, null, "s"]}, "id": {"k": [true]}}']
)  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(st.lists(_PIECES, max_size=30), st.sampled_from([1 << 20, 40]))
def test_fast_path_reads_what_the_lexer_reads(pieces: list[bytes], limit: int) -> None:
    """Whole chunks go through the C decoder where it is sure of QEMU's reading;
    whatever it takes, it must give the messages and errors the lexer gives."""
    data = b"".join(pieces)
    assert [repr(item) for item in _feed_items(data, limit=limit)] == _one_byte_at_a_time(
        data, limit
    )


def test_fast_path_hands_over_mid_chunk() -> None:
    """After whole messages, the rest of the chunk (here a message cut short)
    is the lexer's, which then completes it from the next chunk."""
    assert feed(b'{"a": 1} {"b": [2', b"]}") == [{"a": 1}, {"b": [2]}]
    assert feed(b'{"a": 1}{"a": 1, "a": 2} {"c": 3}') == [{"a": 1}, err("duplicate key"), {"c": 3}]
