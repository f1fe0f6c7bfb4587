"""The backing file name and format recorded in the header (cluster 0).

The name is changed with one sector-sized pointer write where the layout
allows it (:meth:`BackingName._repoint`), else the header is rewritten in
one write that covers the whole old extent.
"""

from __future__ import annotations

import dataclasses
import struct

from blockd.block.drivers.qcow2 import header as hdr
from blockd.block.drivers.qcow2.overlap import MetadataMap, MetaKind
from blockd.block.drivers.qcow2.refcount import Refcounts
from blockd.block.node import BlockNode


def header_extent(h: hdr.Header) -> int:
    """Bytes of cluster 0 the header currently uses (fields, extensions, name)."""
    pos = h.header_length
    for ext in h.extensions:
        pos += 8 + len(ext.data) + (-len(ext.data) % 8)
    pos += 8
    if h.backing_file_offset:
        pos = max(pos, h.backing_file_offset + h.backing_file_size)
    return pos


class BackingName:
    def __init__(
        self, file: BlockNode, header: hdr.Header, meta: MetadataMap, refs: Refcounts
    ) -> None:
        self.file = file
        self.header = header
        self.meta = meta
        self.refs = refs
        self._extent = header_extent(header)

    async def change(self, backing_string: str | None, backing_format: str | None) -> None:
        """Record a new backing name and format (callers hold the lock, shielded)."""
        new = hdr.with_backing(self.header, backing_string, backing_format)
        if backing_string and await self._repoint(new, backing_string):
            return
        raw = hdr.serialize(new)
        extent = max(len(raw), self._extent)
        self.meta.check(0, extent, MetaKind.HEADER)
        # one write covering the whole old extent, so no stale name bytes remain
        await self.file.write(0, raw + bytes(extent - len(raw)))
        await self.refs.flush()
        parsed = hdr.parse_fixed(raw)
        new.end_marker_stored = True  # serialize ends the extensions with one
        new.backing_file_offset = parsed.backing_file_offset
        new.backing_file_size = parsed.backing_file_size
        for field in dataclasses.fields(hdr.Header):
            setattr(self.header, field.name, getattr(new, field.name))
        self._extent = len(raw)

    async def _repoint(self, new: hdr.Header, name: str) -> bool:
        """Change the backing name with one sector-sized pointer write, if possible.

        The new name goes to free bytes of cluster 0 first (flushed); then the
        12 bytes that locate it (offset and length, in the first sector) are
        rewritten at once.  Nothing is read: the header as parsed at open (and
        as we wrote it since) says where free bytes are, as QEMU's in-memory
        header does for its rewrite.  A crash before that write leaves the old name in
        force, after it the new one: never a torn header, even on power loss.
        Returns False when the layout does not allow it (the extensions change,
        or there is no end marker or no room), for the caller's full rewrite.
        """
        h = self.header
        if new.extensions != h.extensions:
            return False
        raw = name.encode("utf-8", "surrogateescape")
        cs = h.cluster_size
        ext_end = h.header_length
        for ext in h.extensions:
            ext_end += 8 + len(ext.data) + (-len(ext.data) % 8)
        ext_end += 8
        old_start = h.backing_file_offset
        old_end = old_start + h.backing_file_size
        if old_start and old_start < ext_end:
            return False
        above_old = max(ext_end, old_end) + (-max(ext_end, old_end) % 8)
        if above_old + len(raw) <= cs:
            start = above_old
        elif not old_start or ext_end + len(raw) <= old_start:
            start = ext_end
        else:
            return False
        if not h.end_marker_stored:
            return False  # name bytes after the extensions could pass for more of them
        self.meta.check(0, max(ext_end, start + len(raw)), MetaKind.HEADER)
        await self.file.write(start, raw)
        await self.refs.flush()
        await self.file.write(8, struct.pack(">QI", start, len(raw)))
        await self.refs.flush()
        h.backing_file = name
        h.backing_file_offset = start
        h.backing_file_size = len(raw)
        self._extent = max(ext_end, start + len(raw))
        return True
