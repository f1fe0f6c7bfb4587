"""Guest reads: mapped under the metadata lock, copied outside it.

Each extent of the range is read from where it lies: this image's host
clusters, a compressed cluster (inflated), the backing node, or zeros.  The
host clusters are pinned while their bytes are copied (``inflight.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from blockd.block.drivers.qcow2.compress import decompress_cluster
from blockd.block.drivers.qcow2.inflight import InFlight
from blockd.block.drivers.qcow2.mapping import Extent, Mapping
from blockd.block.drivers.qcow2.tables import ClusterKind, classify, compressed_range
from blockd.block.node import BlockNode


class Reader:
    def __init__(
        self,
        mapping: Mapping,
        inflight: InFlight,
        backing: Callable[[], BlockNode | None],
    ) -> None:
        self.mapping = mapping
        self.file = mapping.file
        self.inflight = inflight
        #: the node's current backing (it changes with the graph)
        self.backing = backing
        self._inflated: tuple[int, bytes] | None = None

    async def read(self, offset: int, length: int) -> bytes:
        async with self.inflight.lock:
            extents = await self.mapping.map(offset, length)
            pinned = self.mapping.host_clusters(extents)
            self.inflight.pin(pinned)
        try:
            parts = [await self.read_extent(ext) for ext in extents]
        finally:
            self.inflight.unpin(pinned)
        return b"".join(parts)

    async def readinto(self, offset: int, view: memoryview) -> None:
        async with self.inflight.lock:
            extents = await self.mapping.map(offset, len(view))
            pinned = self.mapping.host_clusters(extents)
            self.inflight.pin(pinned)
        try:
            for ext in extents:
                kind, goff, n, entry = ext
                part = view[goff - offset : goff - offset + n]
                if kind is ClusterKind.NORMAL:
                    self.file.debug_event("read_aio")
                    await self.file.readinto(self.mapping.host_offset(entry, goff), part)
                elif kind is ClusterKind.UNALLOCATED:
                    backing = self.backing()
                    if backing is not None:
                        self.file.debug_event("read_backing_aio")
                    m = 0 if backing is None else max(0, min(n, backing.size - goff))
                    if backing is not None and m:
                        await backing.readinto(goff, part[:m])
                    if m < n:
                        part[m:] = bytes(n - m)
                else:
                    part[:] = await self.read_extent(ext)
        finally:
            self.inflight.unpin(pinned)

    async def read_extent(self, ext: Extent) -> bytes:
        kind, goff, n, entry = ext
        if kind is ClusterKind.NORMAL:
            self.file.debug_event("read_aio")
            return await self.file.read(self.mapping.host_offset(entry, goff), n)
        if kind is ClusterKind.UNALLOCATED:
            return await self._read_backing(goff, n)
        if kind is ClusterKind.COMPRESSED:
            within = goff % self.mapping.cluster_size
            return (await self._read_compressed(entry))[within : within + n]
        return bytes(n)

    async def cluster_content(self, cluster: int, entry: int) -> bytearray:
        """Current guest view of a whole cluster (for copy-on-write)."""
        cs = self.mapping.cluster_size
        return bytearray(await self.read_extent((classify(entry), cluster * cs, cs, entry)))

    def forget_inflated(self) -> None:
        """Drop the last inflated cluster: its host bytes may be reused from now on."""
        self._inflated = None

    async def _read_backing(self, offset: int, length: int) -> bytes:
        backing = self.backing()
        if backing is None:
            return bytes(length)
        self.file.debug_event("read_backing_aio")
        if offset >= backing.size:
            return bytes(length)
        n = min(length, backing.size - offset)
        data = await backing.read(offset, n)
        return data if n == length else data + bytes(length - n)

    async def _read_compressed(self, entry: int) -> bytes:
        self.file.debug_event("read_compressed")
        # sequential small reads hit the same cluster many times: keep the last one
        if self._inflated is not None and self._inflated[0] == entry:
            return self._inflated[1]
        bits = self.mapping.cluster_bits
        host, nbytes = compressed_range(entry, bits)
        raw = await self.file.read(host, nbytes)
        data = decompress_cluster(raw, 1 << bits, self.mapping.header.compression_type)
        self._inflated = (entry, data)
        return data
