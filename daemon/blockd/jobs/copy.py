"""Copying what the images above ``base`` hold down into ``base``: both commits' hot path.

Each run of a window comes from the one layer that holds it: zeros become a
zero write; data runs are copied file to file, all of the window's in one
batch (one worker-thread call, one metadata update) where both images allow
it, else run by run (read through top, write), with bounded buffers.  What
nothing above base holds is left alone: base already shows it.
"""

from __future__ import annotations

import logging

from blockd.block.chain import layers
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode, HostExtents, Status
from blockd.errors import BlockError, BlockIOError

log = logging.getLogger(__name__)

#: Largest buffer of the read-and-write path (runs that cannot go file to file).
BUFFER = 4 * 1024 * 1024

#: Smallest step (QEMU's COMMIT_BUFFER_SIZE), used when a low speed limit is set;
#: progress, pause, cancel and the rate limit act per step.
CHUNK = 512 * 1024

#: Bytes per step without a speed limit: runs are coalesced up to this size
#: and copied in as few requests as the images' layouts allow (into a sparse
#: base, one flush per step: 8 MiB -> 32 MiB took a 1 GiB commit from 2.9-4.5 s
#: to 1.8-2.0 s).
WINDOW = 32 * 1024 * 1024

#: The smallest unit a layer without clusters (raw, a file) is assumed to allocate in.
SECTOR = 512

#: What ``blockdev-del`` and other jobs are told while a commit holds a node.
BLOCKER = "block device is in use by block job: commit"


def step_size(speed: int) -> int:
    """Bytes per step: large when unthrottled, ~ a tenth of a second's worth otherwise."""
    if not speed:
        return WINDOW
    return max(CHUNK, min(WINDOW, speed // 10 // CHUNK * CHUNK))


#: The most of the virtual range one :class:`Steps` step looks through.
SCAN = 16 * 1024 * 1024 * 1024

#: The most clusters (of the smallest size above base) one question of a
#: step's walk covers: what bounds the runs held at once where fragmented
#: data follows a long empty stretch (64 KiB clusters: 4 GiB, 1 MB of runs).
CHUNK_CLUSTERS = 65536

#: (layer, data or zeros, offset, length): a run some layer above base holds
CopyRun = tuple[BlockNode, Status, int, int]


class CopyFailed(Exception):
    """A read or a write of the copy failed: ``operation`` is what on-error reports."""

    def __init__(self, error: BlockIOError, operation: str) -> None:
        super().__init__(error.desc)
        self.error = error
        self.operation = operation


class ChainCopy:
    """Copies ranges of ``top``'s view of the chain, above ``base``, into ``base``."""

    def __init__(self, graph: BlockGraph, top: BlockNode, base: BlockNode) -> None:
        self.graph = graph
        self.top = top
        self.base = base

    async def window(self, offset: int, end: int) -> int:
        """Copy what the layers above base hold in ``[offset, end)``; bytes copied.

        Raises :class:`CopyFailed`; copying the window again is harmless.
        """
        return await self.ranges([(offset, end - offset)])

    async def ranges(self, ranges: list[tuple[int, int]]) -> int:
        """:meth:`window` for several (offset, length) ranges, ascending and
        disjoint, as one batch (an active commit's scattered dirty chunks)."""
        runs: list[tuple[BlockNode, Status, int, int]] = []
        try:
            for offset, n in ranges:
                runs += await self.runs(offset, offset + n)
        except BlockIOError as err:
            raise CopyFailed(err, "read") from err
        return await self.copy(runs)

    async def copy(self, runs: list[CopyRun]) -> int:
        """Copy runs of :meth:`runs`: the zero runs first, then the data runs;
        bytes copied.  Raises :class:`CopyFailed`; copying them again is harmless."""
        data: list[tuple[BlockNode, int, int]] = []
        for layer, status, pos, n in runs:
            if status is Status.ZERO:
                try:
                    await self.base.write_zeroes(pos, n)
                except BlockIOError as err:
                    raise CopyFailed(err, "write") from err
            else:
                data.append((layer, pos, n))
        if data:
            await self._data_runs(data)
        return sum(n for _l, _s, _p, n in runs)

    async def runs(self, offset: int, end: int) -> list[CopyRun]:
        """What :meth:`window` copies: (layer, data or zeros, offset, length) for
        each run in ``[offset, end)`` some layer above base holds, in order."""
        return [
            (layer, status, pos, n)
            for layer, status, pos, n in await self.graph.allocation_runs_above(
                self.top, self.base, offset, end - offset
            )
            if layer is not None
        ]

    async def _data_runs(self, runs: list[tuple[BlockNode, int, int]]) -> None:
        """Copy data runs file to file: every layer's runs are mapped (each
        layer once: its host clusters stay pinned until written, and pins
        must never be held while waiting for another mapping of the same
        layer, see :meth:`BlockNode.map_data`), then written as one batch, so
        a step of a deep chain costs one metadata update and its flushes,
        not one per layer.  A batch base cannot take goes layer by layer."""
        by_layer: dict[BlockNode, list[tuple[int, int]]] = {}
        for layer, pos, n in runs:
            by_layer.setdefault(layer, []).append((pos, n))
        mapped: dict[BlockNode, list[tuple[int, int, HostExtents]]] = {}
        rest: list[tuple[int, int]] = []
        try:
            for layer, ranges in by_layer.items():
                try:
                    sources = await layer.map_data(ranges)
                except BlockIOError as err:
                    raise CopyFailed(err, "read") from err
                pairs = list(zip(ranges, sources, strict=True))
                mapped[layer] = [(pos, n, src) for (pos, n), src in pairs if src is not None]
                rest += [r for r, src in pairs if src is None]
            batch = sorted((w for ws in mapped.values() for w in ws), key=lambda w: w[0])
            try:
                done = len(batch) > 1 and len(mapped) > 1 and await self.base.write_many_from_host(
                    batch
                )
            except BlockIOError as err:
                raise CopyFailed(err, "write") from err
            if not done:
                for writes in mapped.values():
                    rest += await self._layer_writes(writes)
        finally:
            for writes in mapped.values():
                for _p, _n, src in writes:
                    src.release()
        for pos, n in sorted(rest):
            await self._read_write(pos, n)

    async def _layer_writes(
        self, writes: list[tuple[int, int, HostExtents]]
    ) -> list[tuple[int, int]]:
        """Write one layer's mapped runs file to file; the ranges base could not take."""
        base = self.base
        rest: list[tuple[int, int]] = []
        try:
            done = await base.write_many_from_host(writes) if len(writes) > 1 else False
        except BlockIOError as err:
            raise CopyFailed(err, "write") from err
        if not done:
            for pos, n, src in writes:
                try:
                    ok = await base.write_from_host(pos, n, src)
                except BlockIOError as err:
                    raise CopyFailed(err, "write") from err
                if not ok:
                    rest.append((pos, n))
        return rest

    async def _read_write(self, offset: int, n: int) -> None:
        """Copy one data run the slow way, BUFFER bytes at a time."""
        for pos in range(offset, offset + n, BUFFER):
            m = min(BUFFER, offset + n - pos)
            try:
                data = await self.top.read(pos, m)
            except BlockIOError as err:
                raise CopyFailed(err, "read") from err
            try:
                # Zeros (data that happens to be zero) become zero writes: base
                # stays sparse where it can.
                if not data[:1].strip(b"\0") and data == bytes(len(data)):
                    await self.base.write_zeroes(pos, len(data))
                else:
                    await self.base.write(pos, data)
            except BlockIOError as err:
                raise CopyFailed(err, "write") from err


class Steps:
    """A commit's steps through ``[offset, end)`` of a chain whose layers above
    base do not change meanwhile (the job's intermediate images are read-only).

    A step ends on a multiple of the step size (``unit``) as soon as its runs
    add up to ``unit`` bytes, or once it has looked through SCAN bytes: where
    the layers above base hold much, a step is one unit, as a plain window
    was; where they hold little (scattered clusters in a huge image), one
    step gathers many units' runs and copies them as one batch, and the walk
    looks ahead in chunks that double while they find little, so its cost
    follows the L2 tables and runs, not the number of units.
    """

    def __init__(self, copy: ChainCopy, offset: int, end: int) -> None:
        self._copy = copy
        smallest = SCAN
        for node in layers(copy.top):
            if node is copy.base:
                break
            smallest = min(smallest, node.cluster_size or SECTOR)
        self._chunk_max = min(SCAN, CHUNK_CLUSTERS * smallest)
        self._end = end
        self._start = offset
        #: runs already found in [_start, _scanned)
        self._ahead: list[CopyRun] = []
        self._scanned = offset

    async def next(self, unit: int, *, gather: bool = True) -> tuple[int, list[CopyRun]]:
        """(end, runs) of the next step, which the caller copies before asking
        again.  Raises :class:`CopyFailed`; asking again is harmless.

        Without ``gather`` a step is one unit at most (a rate-limited job:
        QEMU's commit copies one request's worth, then sleeps, so how far a
        throttled job got when it is cancelled stays where QEMU's is)."""
        total = sum(run[3] for run in self._ahead)
        chunk = unit
        while total < unit and self._scanned < self._end and self._scanned - self._start < SCAN:
            stop = min(self._end, self._scanned + chunk)
            try:
                more = await self._copy.runs(self._scanned, stop)
            except BlockIOError as err:
                raise CopyFailed(err, "read") from err
            self._ahead += more
            total += sum(run[3] for run in more)
            self._scanned = stop
            chunk = min(2 * chunk, self._chunk_max)
            if not gather:
                break
        cut = self._scanned
        if total >= unit:
            seen = 0
            for _layer, _status, pos, n in self._ahead:
                if seen + n >= unit:
                    reached = pos + unit - seen
                    cut = min(cut, -(-reached // unit) * unit)
                    break
                seen += n
        step: list[CopyRun] = []
        rest: list[CopyRun] = []
        for layer, status, pos, n in self._ahead:
            if pos + n <= cut:
                step.append((layer, status, pos, n))
            elif pos >= cut:
                rest.append((layer, status, pos, n))
            else:
                step.append((layer, status, pos, cut - pos))
                rest.append((layer, status, cut, pos + n - cut))
        self._ahead = rest
        self._start = cut
        return cut, step


async def restore_read_only(job_id: str, node: BlockNode) -> None:
    """Put a base a job opened read-write back to read-only, if it can be.

    The reopen flushes first.  When that flush fails (a failing disk), the
    node stays read-write and usable, as QEMU leaves it (it ignores the
    failed reopen): the job's outcome is decided by then, and staying
    writable loses nothing.
    """
    try:
        await node.reopen(read_only=True)
    except BlockError as err:
        log.warning("job %s: %s stays read-write: %s", job_id, node.node_name, err)
