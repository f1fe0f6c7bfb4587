"""JSON as QEMU writes it, for the wire and for ``json:`` pseudo-filenames.

QEMU's output is one compact line, pure ASCII with upper-case ``\\uXXXX``
escapes, floats in C's ``%.17g``, and object members in the order its QDict
hash table iterates.  Clients compare these texts (golden transcripts,
libvirt's parsing of ``json:`` filenames), so blockd writes them identically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any


def _qdict_hash(key: str) -> int:
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
    indexed = list(enumerate(message))
    indexed.sort(key=lambda item: (_qdict_hash(item[1]), -item[0]))
    return [key for _, key in indexed]


# After json.dumps, a \u escape is preceded by an odd number of backslashes;
# matching escaped backslashes first keeps a literal "\\u" in a string intact.
_ESCAPE = re.compile(r"(\\\\)|\\u([0-9a-f]{4})")


def _upper_escape(match: re.Match[str]) -> str:
    return match.group(1) or "\\u" + match.group(2).upper()


class _Text(str):
    """Output already in its final form (punctuation), as opposed to a value."""


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _ESCAPE.sub(_upper_escape, json.dumps(value, ensure_ascii=True))
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
    out: list[str] = []
    # Work left, last item first: values still to encode, or _Text to emit.
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        if type(item) is _Text:
            out.append(item)
        elif isinstance(item, Mapping):
            parts: list[Any] = [_Text("{")]
            for i, key in enumerate(qdict_order(item)):
                parts += [_Text((", " if i else "") + _scalar(key) + ": "), item[key]]
            parts.append(_Text("}"))
            todo.extend(reversed(parts))
        elif isinstance(item, list | tuple):
            parts = [_Text("[")]
            for i, element in enumerate(item):
                if i:
                    parts.append(_Text(", "))
                parts.append(element)
            parts.append(_Text("]"))
            todo.extend(reversed(parts))
        else:
            out.append(_scalar(item))
    return "".join(out)
