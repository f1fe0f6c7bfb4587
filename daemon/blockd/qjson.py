"""JSON as QEMU writes it, for the wire and for ``json:`` pseudo-filenames.

QEMU's output is one compact line, pure ASCII with upper-case ``\\uXXXX``
escapes, floats in C's ``%.17g``, and object members in the order its QDict
hash table iterates.  Clients compare these texts (golden transcripts,
libvirt's parsing of ``json:`` filenames), so blockd writes them identically.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from json.encoder import encode_basestring_ascii
from typing import Any


def qdict_bucket(key: str) -> int:
    """The bucket QEMU's QDict puts a key in (tdb hash, 512 buckets)."""
    raw = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, byte in enumerate(raw):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def qdict_order(message: Mapping[str, Any]) -> list[str]:
    """Keys in the order QEMU iterates a QDict: by bucket, newest first in one.

    QEMU reports the first envelope problem it meets in that order, so
    checking in the same order gives the same answer when there are several.
    """
    return list(_ordered(tuple(message))[0])


#: Orders already computed, by the keys in insertion order: the order depends
#: only on those, and replies and events of one kind share them, while the
#: hash is a Python loop over each key's bytes.  Bounded in entries and in key
#: text per entry, so that clients' own keys (an echoed ``id`` object) cannot
#: grow it.
_ORDERS: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {}
_ORDERS_MAX = 1024
_ORDERS_MAX_KEY_CHARS = 512


def _ordered(keys: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A dict's keys in QDict order, and the text before each one's value."""
    known = _ORDERS.get(keys)
    if known is not None:
        return known
    indexed = sorted(enumerate(keys), key=lambda item: (qdict_bucket(item[1]), -item[0]))
    order = tuple(key for _, key in indexed)
    texts = tuple((", " if i else "") + _scalar(key) + ": " for i, key in enumerate(order))
    if sum(map(len, keys)) <= _ORDERS_MAX_KEY_CHARS:
        if len(_ORDERS) >= _ORDERS_MAX:
            _ORDERS.clear()
        _ORDERS[keys] = order, texts
    return order, texts


# After encode_basestring_ascii, a \u escape is preceded by an odd number of backslashes;
# matching escaped backslashes first keeps a literal "\\u" in a string intact.
_ESCAPE = re.compile(r"(\\\\)|\\u([0-9a-f]{4})")


def _upper_escape(match: re.Match[str]) -> str:
    return match.group(1) or "\\u" + match.group(2).upper()


_REPLACEMENT = "\ufffd"


def _valid_code_point(cp: int) -> bool:
    """Whether QEMU passes a decoded code point through: no surrogates, none
    beyond Unicode, no noncharacters (U+FDD0..U+FDEF, U+xxFFFE/F)."""
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return False
    return not (0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE)


def _code_points(raw: bytes) -> Iterator[int | None]:
    """Decode as QEMU's modified UTF-8 reader does; None for each invalid run.

    An invalid run is a stray byte, or a sequence up to the byte that broke
    it, or a whole well-formed sequence whose value QEMU does not accept
    (overlong, surrogate, noncharacter); ``C0 80`` is U+0000.
    """
    i, n = 0, len(raw)
    while i < n:
        lead = raw[i]
        i += 1
        if lead < 0x80:
            yield lead
            continue
        if lead >= 0xFE or not lead & 0x40:
            yield None
            continue
        length = 8 - (lead ^ 0xFF).bit_length()  # the lead's count of leading ones
        cp = lead & (0x7F >> length)
        complete = True
        for _ in range(length - 1):
            if i >= n or raw[i] & 0xC0 != 0x80:
                complete = False
                break
            cp = cp << 6 | raw[i] & 0x3F
            i += 1
        overlong = cp < (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
        if not complete or not _valid_code_point(cp) or (overlong and (cp, length) != (0, 2)):
            yield None
        else:
            yield cp


def as_qemu_text(value: str) -> str:
    """The text QEMU sends for a string that came from raw bytes.

    blockd keeps bytes that are not UTF-8 (a backing file name in an image
    header, a file name) as lone surrogates so they survive a round trip to
    the disk; on the wire QEMU sends U+FFFD for each invalid run instead, and
    a strict JSON client would reject a lone surrogate escape.
    """
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogatepass")
    return "".join(_REPLACEMENT if cp is None else chr(cp) for cp in _code_points(raw))


def _string(value: str) -> str:
    if not value.isascii():
        value = as_qemu_text(value)
    text: str = encode_basestring_ascii(value)
    # only control characters and what as_qemu_text made need an escape
    return _ESCAPE.sub(_upper_escape, text) if "\\u" in text else text


#: Types never taken for a mapping, to spare them the ABC check.
_SCALARS = frozenset({type(None), bool, int, float})


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Infinity (a client's 1e999, or an integer past DBL_MAX) comes out as
        # QEMU writes it, "inf": not JSON, but what qemu-storage-daemon echoes.
        return "%.17g" % value
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode(value: Any) -> str:
    """Serialise like QEMU: compact one-line JSON, ASCII only.

    Floats use C's ``%.17g`` (QEMU echoes ``1.5e3`` as ``1500``); escapes use
    upper-case hex; object members come in QDict iteration order, which is the
    order every QEMU reply and event shows (``return`` before ``id``, ``id``
    before ``error``, ``device, len, offset, speed, type`` in job events), so
    callers need not arrange members themselves.

    Iterative, not recursive: a client's ``id`` may nest 1024 levels deep and
    is echoed, and Python's recursion limit would be hit long before that.
    """
    if type(value) is str:
        return _string(value)
    out: list[str] = []
    # Work left, last item first: values still to encode, or (as plain str)
    # text already rendered.  Strings and integers, most of any reply, are
    # rendered as they are queued, with the text before them.
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        kind = type(item)
        if kind is str:
            out.append(item)
        elif kind is dict or (
            kind not in _SCALARS and kind is not list and isinstance(item, Mapping)
        ):
            out.append("{")
            todo.append("}")
            order, texts = _ordered(tuple(item))
            for i in range(len(order) - 1, -1, -1):
                member = item[order[i]]
                if type(member) is str:
                    todo.append(texts[i] + _string(member))
                elif type(member) is int:
                    todo.append(texts[i] + str(member))
                else:
                    todo += (member, texts[i])
        elif kind is list or kind is tuple:
            out.append("[")
            todo.append("]")
            for i in range(len(item) - 1, -1, -1):
                element = item[i]
                if type(element) is str:
                    todo.append((", " if i else "") + _string(element))
                elif type(element) is int:
                    todo.append((", " if i else "") + str(element))
                else:
                    todo.append(element)
                    if i:
                        todo.append(", ")
        else:
            out.append(_scalar(item))
    return "".join(out)
