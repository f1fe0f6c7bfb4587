"""Writing guest data: in place where the clusters allow it, else into new clusters.

An allocating write goes in two halves.  :meth:`Allocator.plan` claims the
new host clusters (counted, but held back from refcount write-backs until
the write's entries are on their way) and writes nothing;
:meth:`Allocator.fill` puts the data there, completing partial clusters from
what the guest sees now (copy-on-write).  Then the new entries are made
reachable: deferred to the next flush (``writeback.py``), which also drops
the references of the entries they replace (a cluster shared with an
internal snapshot, a compressed or zero-allocated one) once the new entries
are durable; a bulk copy's batch writes its entries at once after a flush
instead (:meth:`Allocator.finish`), and then, after another, drops those
references.
"""

from __future__ import annotations

import contextlib
import dataclasses

from blockd.block.drivers.qcow2.inflight import InFlight
from blockd.block.drivers.qcow2.mapping import FREEABLE, Mapping
from blockd.block.drivers.qcow2.overlap import MarkCorrupt, OverlapError
from blockd.block.drivers.qcow2.payload import BytesPayload, Payload
from blockd.block.drivers.qcow2.reading import Reader
from blockd.block.drivers.qcow2.refcount import Refcounts
from blockd.block.drivers.qcow2.tables import (
    OFFSET_MASK,
    OFLAG_COPIED,
    ClusterKind,
    classify,
    host_clusters_of_range,
)
from blockd.block.drivers.qcow2.writeback import L2Writeback
from blockd.block.node import Status
from blockd.errors import BlockIOError

#: a piece written in place: (guest offset, host offset, length)
Piece = tuple[int, int, int]


@dataclasses.dataclass
class Allocation:
    """What an allocating write claimed: in-place pieces and new host runs with
    the (guest cluster, old entry) pairs they replace."""

    in_place: list[Piece]
    runs: list[tuple[int, list[tuple[int, int]]]]


class Allocator:
    def __init__(
        self,
        mapping: Mapping,
        refs: Refcounts,
        inflight: InFlight,
        writeback: L2Writeback,
        reader: Reader,
        mark_corrupt: MarkCorrupt,
    ) -> None:
        self.mapping = mapping
        self.file = mapping.file
        self.meta = mapping.meta
        self.refs = refs
        self.inflight = inflight
        self.writeback = writeback
        self.reader = reader
        self.mark_corrupt = mark_corrupt
        self.cluster_bits = mapping.cluster_bits
        self.cluster_size = mapping.cluster_size

    # -- in place (caller holds the lock to plan; the data goes outside it) ---------

    async def in_place_plan(self, offset: int, length: int) -> list[Piece] | None:
        """The pieces if every cluster can be overwritten in place, else None.

        The clusters are pinned before the lock is released; the caller writes
        them outside the lock and unpins (:meth:`write_in_place` does both).
        """
        if self.mapping.shares_a_table(offset, length):
            return None
        extents = await self.mapping.map(offset, length, read=False)
        plan: list[Piece] = []
        for kind, goff, n, entry in extents:
            if kind is not ClusterKind.NORMAL or not entry & OFLAG_COPIED:
                return None
            plan.append((goff, self.mapping.host_offset(entry, goff), n))
        for _g, host, n in plan:
            self.meta.check(host, n, None)
        self.inflight.pin(self.mapping.host_clusters(extents))
        return plan

    def plan_clusters(self, plan: list[Piece]) -> list[int]:
        """The host clusters :meth:`in_place_plan` pinned for ``plan``."""
        bits = self.cluster_bits
        return [c for _g, host, n in plan for c in host_clusters_of_range(host, n, bits)]

    async def write_in_place(self, payload: Payload, plan: list[Piece]) -> None:
        try:
            for goff, host, n in plan:
                self.file.debug_event("write_aio")
                await payload.put(self.file, host, goff, n)
        finally:
            self.inflight.unpin(self.plan_clusters(plan))

    # -- allocating -----------------------------------------------------------------

    async def write(self, payload: Payload) -> None:
        """A whole write under the lock: data, flush, entries (then free what they replace)."""
        await self.finish(*await self.write_data(payload))

    async def write_data(self, payload: Payload) -> tuple[dict[int, int], list[int]]:
        """First half of an allocating write: data into place (in place or new
        clusters, whose refcounts are written).  Returns the L2 updates and the
        old entries to free, for :meth:`finish`.
        """
        alloc = await self.plan(payload)
        try:
            await self.fill(payload, alloc)
        except BaseException:
            await self.give_back(self.claimed(alloc))
            raise
        updates, old = self.result(alloc)
        return updates, list(old.values())

    async def plan(self, payload: Payload) -> Allocation:
        """Claim the new clusters a write needs (counted, held back from write-backs
        until the write's pointers are on their way); nothing is written."""
        cs = self.cluster_size
        mapping = self.mapping
        offset = payload.offset
        end = offset + payload.length
        first, last = offset // cs, (end - 1) // cs
        for l1_index in range(first // mapping.l2_entries, last // mapping.l2_entries + 1):
            await mapping.ensure_l2(l1_index)
        entries = await mapping.entries(first, last - first + 1)

        fresh: list[tuple[int, int]] = []  # (guest cluster, old entry) needing a new cluster
        in_place: list[Piece] = []  # coalesced
        if not any(entries):
            # all unallocated (a copy into an empty base): nothing to check or
            # keep, and no walk over what may be thousands of entries at once
            fresh = [(c, 0) for c in range(first, last + 1)]
            entries = []
        for i, entry in enumerate(entries):
            c = first + i
            kind = classify(entry)
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            # a partial write copies the rest of the cluster, so it reads the entry
            fault = mapping.entry_fault(entry, kind, c, read=hi - lo < cs)
            if fault:
                await self.mark_corrupt(fault)
            if kind is ClusterKind.NORMAL and entry & OFLAG_COPIED:
                host = mapping.host_offset(entry, lo)
                self.meta.check(host, hi - lo, None)
                if in_place and in_place[-1][0] + in_place[-1][2] == lo and (
                    in_place[-1][1] + in_place[-1][2] == host
                ):
                    g, h, n = in_place[-1]
                    in_place[-1] = (g, h, n + hi - lo)
                else:
                    in_place.append((lo, host, hi - lo))
            else:
                fresh.append((c, entry))
        alloc = Allocation(in_place, [])
        done = 0
        bits = self.cluster_bits
        try:
            while done < len(fresh):
                # may fail half-way (a full disk refusing a new refcount block)
                run_off, count = await self.refs.allocate_run(len(fresh) - done)
                # counters written back only once the data is in (finish, or the deferred commit)
                self.refs.hold(range(run_off >> bits, (run_off >> bits) + count))
                alloc.runs.append((run_off, fresh[done : done + count]))
                self.meta.check(run_off, count * cs, None)
                done += count
        except BaseException:
            await self.give_back(self.claimed(alloc))
            raise
        return alloc

    async def fill(self, payload: Payload, alloc: Allocation) -> None:
        for lo, host, n in alloc.in_place:
            self.file.debug_event("write_aio")
            await payload.put(self.file, host, lo, n)
        for run_off, batch in alloc.runs:
            await self._fill_run(payload, run_off, batch)

    async def give_back(self, claimed: list[int]) -> None:
        """Uncount clusters claimed for a write that failed before anything
        pointed at them (a full disk refusing the data), so that they are
        neither leaked nor skipped by later allocations; the caller holds the
        lock.  Should even this fail, they are merely leaked."""
        self.refs.release(claimed)
        with contextlib.suppress(BlockIOError, OverlapError):
            await self.refs.change(claimed, -1)

    def claimed(self, alloc: Allocation) -> list[int]:
        """The host clusters :meth:`plan` claimed."""
        return [(run_off >> self.cluster_bits) + i
                for run_off, batch in alloc.runs for i in range(len(batch))]

    def targets(self, updates: dict[int, int]) -> list[int]:
        """The host clusters new L2 entries (as :meth:`result` gives them) point at."""
        return [(e & OFFSET_MASK) >> self.cluster_bits for e in updates.values()]

    def result(self, alloc: Allocation) -> tuple[dict[int, int], dict[int, int]]:
        """The new L2 entries by guest cluster, and (by guest cluster) the old
        entries that held clusters."""
        cs = self.cluster_size
        updates = {c: (run_off + i * cs) | OFLAG_COPIED
                   for run_off, batch in alloc.runs for i, (c, _e) in enumerate(batch)}
        old = {c: e for _r, batch in alloc.runs for c, e in batch if classify(e) in FREEABLE}
        return updates, old

    async def finish(self, updates: dict[int, int], old: list[int]) -> None:
        """Second half, at once: make the new clusters reachable, then free what
        they replace.  The caller holds the lock."""
        if not updates:
            return
        self.refs.release(self.targets(updates))
        await self.refs.flush()  # data and refcounts durable before the L2 entries
        old = old + await self.writeback.write_now(updates)
        if old:
            await self.refs.flush()  # the unreference is durable before the decrement
            await self.writeback.release(old)

    async def complete(self, payload: Payload, alloc: Allocation) -> None:
        """Data into the claimed clusters (no lock), then L2 (locked).

        The new entries are committed at the next flush (``writeback.py``),
        and so are the references of the old entries they replace dropped,
        once the new entries are durable: as QEMU's metadata cache, not a
        flush per write over clusters an internal snapshot shares.
        """
        updates, old = self.result(alloc)
        claimed = self.claimed(alloc)
        lock = self.inflight.lock
        try:
            await self.fill(payload, alloc)
        except BaseException:
            # nothing points at the new clusters yet: give them back (or leak them)
            async with lock:
                await self.give_back(claimed)
            raise
        async with lock:
            # still held: the commit that writes their entries writes their counters
            backlog = self.writeback.defer(updates, old) if updates else False
        if backlog:
            await self.writeback.commit()

    # -- filling new clusters -------------------------------------------------------

    async def _fill_run(
        self, payload: Payload, run_off: int, batch: list[tuple[int, int]]
    ) -> None:
        """Write the new contents of ``batch``'s guest clusters into the host run.

        Whole clusters that follow each other in the guest go out in one
        request; a partial cluster is completed from what the guest sees now.
        """
        cs = self.cluster_size
        offset, end = payload.offset, payload.offset + payload.length
        buffered = isinstance(payload, BytesPayload)
        pending: list[bytes] = []  # buffered: the whole run, written at once
        cow = False

        def whole(c: int) -> bool:
            return min(end, (c + 1) * cs) - max(offset, c * cs) == cs

        i = 0
        while i < len(batch):
            c, entry = batch[i]
            host = run_off + i * cs
            if whole(c):
                j = i + 1
                while j < len(batch) and batch[j][0] == c + (j - i) and whole(batch[j][0]):
                    j += 1
                if isinstance(payload, BytesPayload):
                    pending.append(payload.get_now(c * cs, (j - i) * cs))
                else:
                    await payload.put(self.file, host, c * cs, (j - i) * cs)
                i = j
                continue
            # partial cluster: copy the rest from what the guest sees now
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            cow = await self._copy_on_write_event(c, entry, lo, hi) or cow
            content = await self.reader.cluster_content(c, entry)
            content[lo - c * cs : hi - c * cs] = await payload.get(lo, hi - lo)
            if buffered:
                pending.append(bytes(content))
            else:
                await self.file.write(host, bytes(content))
            i += 1
        if pending:
            self.file.debug_event("write_aio")
            if cow:
                self.file.debug_event("cow_write")
            await self.file.write(run_off, pending[0] if len(pending) == 1 else b"".join(pending))

    async def _copy_on_write_event(self, cluster: int, entry: int, lo: int, hi: int) -> bool:
        """Raise the blkdebug event of QEMU's copy-on-write for a partial cluster
        written at [lo, hi): ``cluster_alloc_space`` where the rest reads as
        zeros (QEMU zeroes the cluster first), else ``cow_read``.  True in the
        second case."""
        if not self.file.hears_debug_events:
            return False  # spare the backing chain's block status
        kind = classify(entry)
        zero = kind in (ClusterKind.ZERO_PLAIN, ClusterKind.ZERO_ALLOC)
        if kind is ClusterKind.UNALLOCATED:
            start, end = cluster * self.cluster_size, (cluster + 1) * self.cluster_size
            zero = all([await self._zeros_below(a, b) for a, b in ((start, lo), (hi, end))])
        self.file.debug_event("cluster_alloc_space" if zero else "cow_read")
        return not zero

    async def _zeros_below(self, start: int, end: int) -> bool:
        """Whether the backing chain shows only zeros in [start, end) (as far as
        block status tells at once; a mixed answer counts as data)."""
        layer = self.reader.backing()
        while layer is not None and start < min(end, layer.size):
            want = min(end, layer.size) - start
            status, n = await layer.block_status(start, want)
            if status is Status.DATA or n < want:
                return False
            if status is Status.ZERO:
                return True
            layer = layer.backing
        return True
