"""QEMU-compatible JSON stream splitting and parsing, with no I/O.

QMP clients send a byte stream, not lines: commands may arrive back to back,
split across reads, or broken.  QEMU cuts the stream into messages by counting
brackets over a token stream, parses each message on its own, and after an
error resynchronises at the next structural character.  Clients depend on the
result (which input yields which error, and how many), so this module follows
the same rules and produces the same error texts, while keeping its own memory
bounded: a message larger than the limit is reported once and then skipped to
its end instead of being buffered.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: QEMU refuses messages nested deeper than this.
MAX_NESTING = 1024

#: Default cap on the bytes of one message; larger ones are refused unbuffered.
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20

#: Cap on the tokens of one message (QEMU allows 2 Mi).  Each token buffered,
#: and each value it becomes, costs ~100 bytes of Python objects, so without
#: this a 1 MiB message of ``[1,1,...`` would hold ~100 MiB per client.
MAX_TOKENS = 1 << 16

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1
#: The longest integer literal that may fit int64/uint64: a sign and 20 digits.
_MAX_INT_LITERAL = 21


class Tok(enum.Enum):
    LCURLY = "{"
    RCURLY = "}"
    LSQUARE = "["
    RSQUARE = "]"
    COLON = ":"
    COMMA = ","
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    KEYWORD = "keyword"
    ERROR = "error"


_STRUCTURAL = {
    ord("{"): Tok.LCURLY,
    ord("}"): Tok.RCURLY,
    ord("["): Tok.LSQUARE,
    ord("]"): Tok.RSQUARE,
    ord(":"): Tok.COLON,
    ord(","): Tok.COMMA,
}
_WHITESPACE = frozenset(b" \t\r\n")


class _State(enum.Enum):
    START = enum.auto()
    RECOVERY = enum.auto()
    DQ_STRING = enum.auto()
    DQ_ESCAPE = enum.auto()
    SQ_STRING = enum.auto()
    SQ_ESCAPE = enum.auto()
    KEYWORD = enum.auto()
    SIGN = enum.auto()
    ZERO = enum.auto()
    DIGITS = enum.auto()
    MANTISSA = enum.auto()
    MANTISSA_DIGITS = enum.auto()
    EXP_E = enum.auto()
    EXP_SIGN = enum.auto()
    EXP_DIGITS = enum.auto()


# Runs of bytes that keep the lexer in the same state; consumed in one step so
# that long strings do not cost a Python-level iteration per byte.
_RUNS = {
    _State.DQ_STRING: re.compile(rb'[^"\\\x00-\x1f\xfe\xff]+'),
    _State.SQ_STRING: re.compile(rb"[^'\\\x00-\x1f\xfe\xff]+"),
    _State.RECOVERY: re.compile(rb"[^\[\]{}:,\x00-\x08\x0a-\x1f\xfe\xff]+"),
    _State.KEYWORD: re.compile(rb"[a-z]+"),
    _State.DIGITS: re.compile(rb"[0-9]+"),
    _State.MANTISSA_DIGITS: re.compile(rb"[0-9]+"),
    _State.EXP_DIGITS: re.compile(rb"[0-9]+"),
}
_WS_RUN = re.compile(rb"[ \t\r\n]+")

# States in which the token ends (without consuming the byte) at any byte that
# does not continue it, and the token type it then becomes.
_TERMINAL = {
    _State.KEYWORD: Tok.KEYWORD,
    _State.ZERO: Tok.INTEGER,
    _State.DIGITS: Tok.INTEGER,
    _State.MANTISSA_DIGITS: Tok.FLOAT,
    _State.EXP_DIGITS: Tok.FLOAT,
}


class _Lexer:
    """Byte-at-a-time tokenizer with QEMU's token grammar and error recovery.

    QEMU's grammar extends JSON with single-quoted strings and the escape
    ``\\'``; keywords are any run of ``[a-z]`` (the parser rejects unknown
    ones), and an invalid byte produces an error token holding the text so far,
    after which input is skipped to the next structural or control character.
    """

    def __init__(self) -> None:
        self.state = _State.START
        self.text = bytearray()
        #: While set, token text is not kept: the streamer is skipping an
        #: oversized message and only needs token types.
        self.discard = False

    def feed(self, data: bytes | bytearray) -> Iterator[tuple[Tok, bytes]]:
        pos, end = 0, len(data)
        while pos < end:
            state = self.state
            run = _RUNS.get(state)
            if run is not None:
                m = run.match(data, pos)
                if m is not None:
                    if not self.discard and state is not _State.RECOVERY:
                        self.text += m.group()
                    pos = m.end()
                    continue
            elif state is _State.START:
                m = _WS_RUN.match(data, pos)
                if m is not None:
                    pos = m.end()
                    continue
            byte = data[pos]
            consumed, token = self._step(byte)
            if consumed:
                pos += 1
            if token is not None:
                yield token

    def _keep(self, byte: int) -> None:
        if not self.discard:
            self.text.append(byte)

    def _emit(self, tok: Tok) -> tuple[Tok, bytes]:
        text = bytes(self.text)
        self.text.clear()
        self.state = _State.RECOVERY if tok is Tok.ERROR else _State.START
        return tok, text

    def _error(self, byte: int) -> tuple[bool, tuple[Tok, bytes]]:
        self._keep(byte)
        return True, self._emit(Tok.ERROR)

    def _go(self, byte: int, state: _State) -> tuple[bool, None]:
        self._keep(byte)
        self.state = state
        return True, None

    def _step(self, b: int) -> tuple[bool, tuple[Tok, bytes] | None]:
        """Advance by one byte: (was the byte consumed, token completed)."""
        s = self.state
        if s is _State.START:
            if b in _STRUCTURAL:
                self._keep(b)
                return True, self._emit(_STRUCTURAL[b])
            if b == 0x22:
                return self._go(b, _State.DQ_STRING)
            if b == 0x27:
                return self._go(b, _State.SQ_STRING)
            if b == 0x30:
                return self._go(b, _State.ZERO)
            if 0x31 <= b <= 0x39:
                return self._go(b, _State.DIGITS)
            if b == 0x2D:
                return self._go(b, _State.SIGN)
            if 0x61 <= b <= 0x7A:
                return self._go(b, _State.KEYWORD)
            return self._error(b)
        if s is _State.RECOVERY:
            # Resynchronise on a structural or control byte (tab excepted) or
            # on 0xFE/0xFF, reprocessing that byte from the start state.
            if b in _STRUCTURAL or (b < 0x20 and b != 0x09) or b >= 0xFE:
                self.state = _State.START
                return False, None
            return True, None
        if s in (_State.DQ_STRING, _State.SQ_STRING):
            quote = 0x22 if s is _State.DQ_STRING else 0x27
            if b == quote:
                self._keep(b)
                return True, self._emit(Tok.STRING)
            if b == 0x5C:
                escape = _State.DQ_ESCAPE if s is _State.DQ_STRING else _State.SQ_ESCAPE
                return self._go(b, escape)
            if 0x20 <= b <= 0xFD:
                return self._go(b, s)
            return self._error(b)
        if s in (_State.DQ_ESCAPE, _State.SQ_ESCAPE):
            if 0x20 <= b <= 0xFD:
                back = _State.DQ_STRING if s is _State.DQ_ESCAPE else _State.SQ_STRING
                return self._go(b, back)
            return self._error(b)
        if s is _State.SIGN:
            if b == 0x30:
                return self._go(b, _State.ZERO)
            if 0x31 <= b <= 0x39:
                return self._go(b, _State.DIGITS)
            return self._error(b)
        if s is _State.ZERO:
            if 0x30 <= b <= 0x39:
                return self._error(b)
            if b == 0x2E:
                return self._go(b, _State.MANTISSA)
            return False, self._emit(Tok.INTEGER)
        if s is _State.DIGITS:
            if b == 0x2E:
                return self._go(b, _State.MANTISSA)
            if b in (0x65, 0x45):
                return self._go(b, _State.EXP_E)
            return False, self._emit(Tok.INTEGER)
        if s is _State.MANTISSA:
            if 0x30 <= b <= 0x39:
                return self._go(b, _State.MANTISSA_DIGITS)
            return self._error(b)
        if s is _State.MANTISSA_DIGITS:
            if b in (0x65, 0x45):
                return self._go(b, _State.EXP_E)
            return False, self._emit(Tok.FLOAT)
        if s is _State.EXP_E:
            if b in (0x2B, 0x2D):
                return self._go(b, _State.EXP_SIGN)
            if 0x30 <= b <= 0x39:
                return self._go(b, _State.EXP_DIGITS)
            return self._error(b)
        if s is _State.EXP_SIGN:
            if 0x30 <= b <= 0x39:
                return self._go(b, _State.EXP_DIGITS)
            return self._error(b)
        # A terminal state (keyword, number) meeting a byte that does not
        # continue it: the token ends and the byte is looked at again.
        return False, self._emit(_TERMINAL[s])

    def pending_size(self) -> int:
        return len(self.text)


class ParseError(Exception):
    """A message that is not valid JSON; ``str()`` is QEMU's error text."""


@dataclass(frozen=True)
class Message:
    """One complete JSON value cut from the stream."""

    value: Any


@dataclass(frozen=True)
class MessageError:
    """A stretch of input that could not be parsed; reported without an id."""

    desc: str


def _stray(text: bytes) -> str:
    return "JSON parse error, stray '%s'" % text.decode("utf-8", "replace")


class JSONStreamParser:
    """Cuts a byte stream into JSON values the way QEMU's monitor does.

    Feed bytes with :meth:`feed`; it yields a :class:`Message` per complete
    value and a :class:`MessageError` per error, in input order.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._lexer = _Lexer()
        self._tokens: list[tuple[Tok, bytes]] = []
        self._size = 0
        self._braces = 0
        self._brackets = 0
        self._max_size = max_message_size
        self._skipping = False

    def feed(self, data: bytes | bytearray) -> Iterator[Message | MessageError]:
        if self._idle() and _fast_candidate(data):
            chars = data.decode("ascii")
            pos = 0
            while (pos := _skip_whitespace(chars, pos)) < len(chars):
                value, end = _fast_object(chars, pos, self._max_size)
                if end < 0:
                    break
                yield Message(value)
                pos = end
            # the rest starts where a message would: the lexer takes over as
            # if it had read everything before
            data = data[pos:]
        for tok, text in self._lexer.feed(data):
            result = self._token(tok, text)
            if result is not None:
                yield result
        if not self._skipping and self._size + self._lexer.pending_size() > self._max_size:
            yield self._start_skipping("JSON token size limit exceeded")

    def _idle(self) -> bool:
        """Between messages: nothing buffered, no error being recovered from."""
        return (
            not self._tokens
            and not self._skipping
            and self._lexer.state is _State.START
            and not self._braces
            and not self._brackets
        )

    def _reset(self) -> None:
        self._tokens.clear()
        self._size = 0
        self._braces = 0
        self._brackets = 0

    def _message_open(self) -> bool:
        """Whether the tokens so far leave a message unfinished (QEMU's rule)."""
        braces, brackets = self._braces, self._brackets
        return (braces > 0 or brackets > 0) and braces >= 0 and brackets >= 0

    def _start_skipping(self, desc: str) -> MessageError:
        """Refuse the message being collected and drop the rest of it unread.

        Unlike QEMU, which keeps lexing the remainder as fresh input (and so
        reports one error per leftover bracket, or swallows the next command
        into the tail of a huge string), blockd stays in step with the
        message's structure and resumes after its end.
        """
        self._tokens.clear()
        self._size = 0
        self._lexer.text.clear()
        if self._message_open() or self._lexer.state is not _State.START:
            self._skipping = True
            self._lexer.discard = True
        else:
            self._reset()
        return MessageError(desc)

    def _token(self, tok: Tok, text: bytes) -> Message | MessageError | None:
        if tok is Tok.ERROR:
            skipped = self._skipping
            self._stop_skipping()
            self._reset()
            return None if skipped else MessageError(_stray(text))
        if tok is Tok.LCURLY:
            self._braces += 1
        elif tok is Tok.RCURLY:
            self._braces -= 1
        elif tok is Tok.LSQUARE:
            self._brackets += 1
        elif tok is Tok.RSQUARE:
            self._brackets -= 1
        if self._skipping:
            if not self._message_open():
                self._stop_skipping()
                self._reset()
            return None
        if self._braces + self._brackets > MAX_NESTING:
            return self._start_skipping("JSON nesting depth limit exceeded")
        if len(self._tokens) >= MAX_TOKENS:
            return self._start_skipping("JSON token count limit exceeded")
        self._tokens.append((tok, text))
        self._size += len(text)
        if self._size > self._max_size:
            return self._start_skipping("JSON token size limit exceeded")
        if self._message_open():
            return None
        tokens = self._tokens
        self._tokens = []
        self._reset()
        try:
            return Message(_Parser(tokens).parse())
        except ParseError as err:
            return MessageError(str(err))

    def _stop_skipping(self) -> None:
        self._skipping = False
        self._lexer.discard = False


# The fast path.  Almost every command a client sends is a small object of
# plain ASCII with no escapes, sent whole in one write; for such input
# Python's C JSON decoder gives exactly the value QEMU's parser gives, in a
# fraction of the time the lexer above takes.  Anything it is not sure of
# (an escape, a non-ASCII byte, QEMU's single quotes, a number QEMU reads
# otherwise or not at all, a duplicate key, deep nesting, a message cut short, any error)
# goes to the lexer instead, from the start of that message, so errors and
# their texts come from one place only.

#: Containers a chunk may open at most to be decoded fast: far below both
#: QEMU's nesting limit and the decoder's recursion limit.
_FAST_MAX_OPENERS = 256
_FAST_WHITESPACE = re.compile(r"[ \t\r\n]*")


class _NotSure(Exception):
    """The fast decoder met something whose meaning the lexer must decide."""


def _fast_int(text: str) -> int | float:
    return _number(Tok.INTEGER, text.encode("ascii"))


def _fast_float(text: str) -> float:
    digits = text.lstrip("-")
    if digits[:1] == "0" and digits[1:2] in ("e", "E"):
        raise _NotSure  # JSON's 0e5: QEMU's lexer takes no exponent right after a zero
    return float(text)


def _fast_constant(text: str) -> Any:
    raise _NotSure  # NaN and Infinity: not JSON, not QEMU's


def _fast_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _NotSure  # QEMU refuses a duplicate key
    return members


_FAST_DECODER = json.JSONDecoder(
    parse_int=_fast_int,
    parse_float=_fast_float,
    parse_constant=_fast_constant,
    object_pairs_hook=_fast_members,
)


def _fast_candidate(data: bytes | bytearray) -> bool:
    return (
        data.isascii()
        and b"\\" not in data
        and data.count(b"{") + data.count(b"[") <= _FAST_MAX_OPENERS
    )


def _skip_whitespace(text: str, pos: int) -> int:
    match = _FAST_WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _fast_object(text: str, pos: int, max_size: int) -> tuple[Any, int]:
    """The object starting at ``pos`` and where it ends, or end -1 when the
    lexer must read it (a candidate chunk only, see :func:`_fast_candidate`).

    The size bounds keep the lexer's limits: an object of at most that many
    bytes has no more token bytes, nor tokens, than its length.
    """
    if text[pos] != "{":
        return None, -1
    try:
        value, end = _FAST_DECODER.raw_decode(text, pos)
    except (ValueError, _NotSure):
        return None, -1
    if end - pos > min(max_size, MAX_TOKENS):
        return None, -1
    return value, end


_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX = frozenset(b"0123456789abcdefABCDEF")


# Code points QEMU refuses in strings, raw or escaped: surrogates (a pair is
# one escape) and the 66 noncharacters.
_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(
    chr(plane | low) for plane in range(0, 0x110000, 0x10000) for low in (0xFFFE, 0xFFFF)
)
_REFUSED = re.compile("[\ud800-\udfff" + _NONCHARACTERS + "]")


def _decode_string(raw: bytes) -> str:
    """Unquote a string token (either quote style), with QEMU's rules and texts.

    Raw bytes are modified UTF-8 as QEMU reads it: the overlong pair C0 80
    stands for U+0000, and noncharacters are invalid like any bad sequence.
    """
    body = raw[1:-1]
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        j = body.find(b"\\", i)
        chunk = body[i:] if j < 0 else body[i:j]
        try:
            text = chunk.replace(b"\xc0\x80", b"\x00").decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError("JSON parse error, invalid UTF-8 sequence in string") from None
        if _REFUSED.search(text):
            raise ParseError("JSON parse error, invalid UTF-8 sequence in string")
        out.append(text)
        if j < 0:
            break
        i = j + 1
        code = body[i] if i < n else -1
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 1
            continue
        if code != ord("u"):
            raise ParseError("JSON parse error, invalid escape sequence in string")
        cp, i = _hex4(body, i + 1)
        if 0xD800 <= cp <= 0xDBFF and body[i : i + 2] == b"\\u":
            low = _hex4_or_none(body, i + 2)
            if low is not None and 0xDC00 <= low <= 0xDFFF:
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                i += 6
        char = chr(cp)
        if _REFUSED.match(char):
            escape = body[j:i].decode("ascii")
            raise ParseError(f"JSON parse error, {escape} is not a valid Unicode character")
        out.append(char)
    return "".join(out)


def _hex4(body: bytes, start: int) -> tuple[int, int]:
    value = _hex4_or_none(body, start)
    if value is None:
        raise ParseError("JSON parse error, invalid hex escape sequence in string")
    return value, start + 4


def _hex4_or_none(body: bytes, start: int) -> int | None:
    digits = body[start : start + 4]
    if len(digits) != 4 or not all(d in _HEX for d in digits):
        return None
    return int(digits, 16)


def _number(tok: Tok, text: bytes) -> int | float:
    """A number as QEMU reads it: an integer while it fits int64 or uint64,
    otherwise the nearest double, which is infinite past DBL_MAX (QEMU echoes
    that as ``inf``).  No length or exponent makes this raise: Python's
    limit on converting long digit strings to int is never reached, because
    a literal too long for uint64 goes straight to ``float``."""
    if tok is Tok.INTEGER and len(text) <= _MAX_INT_LITERAL:
        value = int(text)
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
    return float(text)


_KEYWORDS: dict[bytes, Any] = {b"true": True, b"false": False, b"null": None}


class _Parser:
    """Parses one message's tokens, reporting the first error QEMU would.

    Iterative rather than recursive, because messages may nest 1024 deep.
    """

    def __init__(self, tokens: list[tuple[Tok, bytes]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _peek(self) -> Tok | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def _pop(self) -> tuple[Tok, bytes]:
        if self.pos >= len(self.tokens):
            raise ParseError("JSON parse error, premature EOI")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _scalar(self) -> tuple[bool, Any]:
        """Parse a value that opens no container: (opened container?, value)."""
        tok, text = self._pop()
        if tok is Tok.LCURLY:
            return True, {}
        if tok is Tok.LSQUARE:
            return True, []
        if tok is Tok.STRING:
            return False, _decode_string(text)
        if tok in (Tok.INTEGER, Tok.FLOAT):
            return False, _number(tok, text)
        if tok is Tok.KEYWORD:
            if text in _KEYWORDS:
                return False, _KEYWORDS[text]
            raise ParseError("JSON parse error, invalid keyword '%s'" % text.decode())
        raise ParseError("JSON parse error, expecting value")

    def parse(self) -> Any:
        # Each frame: the container being filled and, for objects, the key
        # whose value is being parsed (None while the key itself is parsed).
        stack: list[tuple[dict[str, Any] | list[Any], str | None]] = []
        opened, value = self._scalar()
        while True:
            if opened:
                # Just opened a container: it may close at once.
                close = Tok.RCURLY if isinstance(value, dict) else Tok.RSQUARE
                if self._peek() is None:
                    raise ParseError("JSON parse error, premature EOI")
                if self._peek() is close:
                    self.pos += 1
                else:
                    stack.append((value, None))
                    opened, value = self._scalar()
                    continue
            # ``value`` is complete; hand it to the enclosing container.
            if not stack:
                return value
            container, key = stack[-1]
            if isinstance(container, dict) and key is None:
                if not isinstance(value, str):
                    raise ParseError("JSON parse error, key is not a string in object")
                colon, _ = self._pop()
                if colon is not Tok.COLON:
                    raise ParseError("JSON parse error, missing : in object pair")
                stack[-1] = (container, value)
                opened, value = self._scalar()
                continue
            if isinstance(container, dict):
                assert key is not None
                if key in container:
                    raise ParseError("JSON parse error, duplicate key")
                container[key] = value
                stack[-1] = (container, None)
                close, what = Tok.RCURLY, "dict"
            else:
                container.append(value)
                close, what = Tok.RSQUARE, "list"
            sep, _ = self._pop()
            if sep is close:
                stack.pop()
                opened, value = False, container
                continue
            if sep is not Tok.COMMA:
                raise ParseError("JSON parse error, expected separator in %s" % what)
            opened, value = self._scalar()
