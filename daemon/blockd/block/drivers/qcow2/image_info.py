"""The qcow2 part of QAPI ImageInfo, as ``qemu-img info`` and query-named-block-nodes show it."""

from __future__ import annotations

from typing import Any

from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2.snapshots import Snapshot


def format_info(
    h: hdr.Header, snapshots: list[Snapshot], corrupt: bool, full_backing_filename: str | None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "compat": "1.1" if h.version >= 3 else "0.10",
        "compression-type": "zstd" if h.compression_type == hdr.COMPRESSION_ZSTD else "zlib",
    }
    if h.version >= 3:
        data["lazy-refcounts"] = bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)
    data["refcount-bits"] = h.refcount_bits
    if h.version >= 3:
        data["corrupt"] = corrupt
        data["extended-l2"] = bool(h.incompatible_features & hdr.INCOMPAT_EXTL2)
    info: dict[str, Any] = {
        "cluster-size": h.cluster_size,
        "dirty-flag": bool(h.incompatible_features & hdr.INCOMPAT_DIRTY),
        "format-specific": {"type": "qcow2", "data": data},
    }
    if snapshots:
        info["snapshots"] = [s.info() for s in snapshots]
    if h.backing_file:
        info["backing-filename"] = h.backing_file
        info["full-backing-filename"] = full_backing_filename
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
    return info
