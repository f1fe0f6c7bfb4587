"""Compressed clusters: a raw deflate stream (no zlib header), or a zstd frame.

Either way the stored bytes run to a sector boundary, so whatever follows
the end of the stream belongs to other clusters and is ignored.  zstd comes
from the ``zstandard`` package (Python 3.11 has no zstd of its own).
"""

from __future__ import annotations

import zlib

import zstandard

from blockd.block.drivers.qcow2.header import COMPRESSION_DEFLATE, COMPRESSION_ZSTD
from blockd.errors import BlockIOError, ImageError


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decompress one cluster; input after the end of the stream belongs to others."""
    try:
        if compression_type == COMPRESSION_DEFLATE:
            # window 15 decodes streams made with any smaller window (QEMU uses 12)
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        else:
            raise ImageError(f"qcow2: unknown compression type {compression_type}")
    except (zlib.error, zstandard.ZstdError) as exc:
        raise BlockIOError(5, f"qcow2: corrupt compressed cluster: {exc}") from exc
    if len(out) != cluster_size:
        raise BlockIOError(5, "qcow2: compressed cluster decompresses to the wrong size")
    return out
