"""NBD replies, byte for byte: simple replies and structured-reply chunks.

Every reply the server sends is framed here, from the request and what the
block layer answered, so the bytes on the wire can be tested without a
socket; :mod:`blockd.export.protocol` parses what clients send.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from blockd.export.protocol import (
    CHUNK_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Request,
)


def simple_reply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle) + data


_SIMPLE = struct.Struct(">IIQ")
_DATA_CHUNK = struct.Struct(">IHHQIQ")


def data_reply_buffer(request: Request, structured: bool) -> bytearray:
    """A successful READ's whole reply with room for the data at its end.

    The data is read straight into the last ``request.length`` bytes, so the
    reply is never copied to put a header in front of it.  With structured
    replies it is the single OFFSET_DATA chunk QEMU sends for data (and for
    ``DF``).
    """
    if not structured:
        buf = bytearray(_SIMPLE.size + request.length)
        _SIMPLE.pack_into(buf, 0, SIMPLE_REPLY_MAGIC, 0, request.handle)
        return buf
    buf = bytearray(_DATA_CHUNK.size + request.length)
    _DATA_CHUNK.pack_into(
        buf, 0, STRUCTURED_REPLY_MAGIC, CHUNK_DONE, Chunk.OFFSET_DATA, request.handle,
        8 + request.length, request.offset,
    )
    return buf


#: One part of a READ reply sent a piece at a time: the bytes that go first
#: (headers), then where the data that follows them starts and how long it is.
ReplyPiece = tuple[bytes, int, int]
_HOLE_CHUNK = struct.Struct(">IHHQIQI")


def read_reply_pieces(
    handle: int,
    offset: int,
    extents: Sequence[tuple[int, bool]],
    structured: bool,
    df: bool,
    piece: int,
) -> list[ReplyPiece]:
    """A successful READ reply cut so that no part carries over ``piece`` data bytes.

    ``extents`` cover the request in order, as ``(length, reads as zeros)``.
    A simple reply, or a structured one with ``DF``, is one frame whatever
    the extents: its header goes with the first piece and the rest is raw
    data.  A structured reply otherwise holds one OFFSET_HOLE chunk per hole,
    as :func:`read_chunks`, and one OFFSET_DATA chunk per piece of data, so
    a data run longer than ``piece`` takes several chunks where QEMU sends
    one; an error while reading can then still be told in an error chunk.
    """
    end = offset + sum(length for length, _hole in extents)
    if not structured or df:
        if structured:
            first = _DATA_CHUNK.pack(
                STRUCTURED_REPLY_MAGIC, CHUNK_DONE, Chunk.OFFSET_DATA, handle,
                8 + end - offset, offset,
            )
        else:
            first = _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, handle)
        return [
            (first if pos == offset else b"", pos, min(piece, end - pos))
            for pos in range(offset, end, piece)
        ]
    runs: list[tuple[int, int, bool]] = []  # (position, length, hole)
    pos = offset
    for length, hole in extents:
        if hole:
            runs.append((pos, length, True))
        else:
            runs += [(at, min(piece, pos + length - at), False)
                     for at in range(pos, pos + length, piece)]
        pos += length
    out: list[ReplyPiece] = []
    for index, (pos, length, hole) in enumerate(runs):
        flags = CHUNK_DONE if index == len(runs) - 1 else 0
        if hole:
            out.append((_HOLE_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, Chunk.OFFSET_HOLE,
                                         handle, 12, pos, length), pos, 0))
        else:
            out.append((_DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, Chunk.OFFSET_DATA,
                                         handle, 8 + length, pos), pos, length))
    return out


def chunk(handle: int, kind: int, payload: bytes, done: bool) -> bytes:
    header = struct.pack(
        ">IHHQI", STRUCTURED_REPLY_MAGIC, CHUNK_DONE if done else 0, kind, handle, len(payload)
    )
    return header + payload


def error_chunk(handle: int, error: int, message: str) -> bytes:
    text = message.encode()[:4096]
    return chunk(handle, Chunk.ERROR, struct.pack(">IH", error, len(text)) + text, done=True)


def error_reply(handle: int, structured: bool, error: int, message: str) -> bytes:
    """A failed request: an error chunk once structured replies are on, else a simple reply."""
    if structured:
        return error_chunk(handle, error, message)
    return simple_reply(handle, error)


def read_chunks(
    handle: int, offset: int, extents: Sequence[tuple[int, bytes | None]], df: bool = False
) -> list[bytes]:
    """A structured READ reply, as QEMU's sparse read builds it.

    ``extents`` cover the request in order: ``(length, data)`` for data and
    ``(length, None)`` for a run that reads as zeros (sent as a hole).  With
    ``DF`` everything goes in one data chunk.
    """
    if df:
        whole = b"".join(d if d is not None else bytes(n) for n, d in extents)
        return [chunk(handle, Chunk.OFFSET_DATA, struct.pack(">Q", offset) + whole, done=True)]
    merged = [(length, piece) for length, piece in extents if length]
    if not merged:
        return [chunk(handle, Chunk.NONE, b"", done=True)]
    out = []
    pos = offset
    for index, (length, data) in enumerate(merged):
        done = index == len(merged) - 1
        if data is None:
            out.append(chunk(handle, Chunk.OFFSET_HOLE, struct.pack(">QI", pos, length), done))
        else:
            out.append(chunk(handle, Chunk.OFFSET_DATA, struct.pack(">Q", pos) + data, done))
        pos += length
    return out


STATE_HOLE: Final = 1
STATE_ZERO: Final = 2


def block_status_chunk(
    handle: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool
) -> bytes:
    payload = struct.pack(">I", context_id)
    for length, flags in extents:
        payload += struct.pack(">II", length, flags)
    return chunk(handle, Chunk.BLOCK_STATUS, payload, done)


def merge_extents(extents: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join adjacent extents with equal flags (as QEMU does); lengths stay u32."""
    out: list[tuple[int, int]] = []
    for length, flags in extents:
        if out and out[-1][1] == flags and out[-1][0] + length < 1 << 32:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out
