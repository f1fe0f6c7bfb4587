"""Compressed clusters: QEMU writes a raw deflate stream (no zlib header).

zstd (compression type 1) needs a module Python 3.11 lacks, so such clusters
are refused with a clear error instead of being misread.
"""

from __future__ import annotations

import zlib

from blockd.block.drivers.qcow2.header import COMPRESSION_DEFLATE
from blockd.errors import BlockIOError, ImageError


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Inflate one cluster; input after the end of the stream belongs to others."""
    if compression_type != COMPRESSION_DEFLATE:
        raise ImageError(
            "qcow2: zstd-compressed clusters are not supported (compression_type="
            f"{compression_type}); convert the image with 'qemu-img convert' first"
        )
    # window 15 decodes streams made with any smaller window (QEMU uses 12)
    inflater = zlib.decompressobj(-15)
    try:
        out = inflater.decompress(data, cluster_size)
    except zlib.error as exc:
        raise BlockIOError(5, f"qcow2: corrupt compressed cluster: {exc}") from exc
    if len(out) != cluster_size:
        raise BlockIOError(5, "qcow2: compressed cluster decompresses to the wrong size")
    return out
