"""How new L2 entries reach the disk: at once, or at the next flush.

An allocating write's new L2 entries may only reach the disk after its data
and refcounts are durable (a flush).  Rather than flush once per write, the
entries are set in the cached table at once (so reads see the data) and
recorded as uncommitted (:meth:`L2Writeback.defer`); the next flush (a
client's FLUSH or FUA, closing or reopening the node), or the write that
makes the backlog too big, flushes once for everything recorded and then
writes those entries (:meth:`L2Writeback.commit`).  A crash before that
leaves only leaked clusters, and loses only writes no flush has covered, as
the NBD and qcow2 contracts allow (QEMU's writeback metadata cache does the
same).  Each record carries a token, so an entry that was changed meanwhile
(discarded and even allocated anew) is never committed with a stale meaning.

A deferred entry may replace one that holds a reference (a cluster shared
with an internal snapshot, a compressed or zero-allocated one): the record
keeps the old entry, and the commit drops its reference only after the new
entry is durable (a second flush), so a crash in between leaks at most.
Zero writes and discards write their entries at once instead
(:meth:`L2Writeback.write_now`), after a flush, and then drop what the old
entries held (:meth:`L2Writeback.release`), again after a flush: the
unreference must be durable before the decrement.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable

import trio

from blockd.block.drivers.qcow2.inflight import InFlight
from blockd.block.drivers.qcow2.mapping import Mapping, referenced_clusters
from blockd.block.drivers.qcow2.overlap import MarkCorrupt, MetaKind, OverlapError
from blockd.block.drivers.qcow2.refcount import Refcounts
from blockd.block.drivers.qcow2.tables import OFFSET_MASK, encode_entries

#: Uncommitted L2 entries that make a write commit them.  A commit flushes
#: everything written so far; at 8192 a 1 GiB sequential write through NBD
#: stalled mid-way on a 512 MiB fdatasync that QSD never does.  What it
#: bounds is how many clusters a crash can leak (leaks only, never
#: corruption); memory is bounded by the kept-tables limit.
COMMIT_ENTRIES = 65536


#: one uncommitted entry: (entry, token, L2 table offset, old entries whose
#: references go once it is durable)
Record = tuple[int, int, int, tuple[int, ...]]


class L2Writeback:
    def __init__(
        self,
        mapping: Mapping,
        refs: Refcounts,
        inflight: InFlight,
        forget_inflated: Callable[[], None],
        mark_corrupt: MarkCorrupt,
    ) -> None:
        self.mapping = mapping
        self.refs = refs
        self.inflight = inflight
        self.lock = inflight.lock
        #: drops the reader's last inflated cluster, whose host bytes a release may free
        self.forget_inflated = forget_inflated
        self.mark_corrupt = mark_corrupt
        #: guest cluster -> its record
        self._uncommitted: dict[int, Record] = {}
        self._tokens = itertools.count()

    def _forget(self, cluster: int) -> tuple[int, ...]:
        """Drop a cluster's record; returns the old entries it was to release
        (the disk may still point at them: whoever replaces the entry there
        releases them)."""
        record = self._uncommitted.pop(cluster, None)
        if record is None:
            return ()
        self.mapping.l2.unkeep(record[2])
        # Its host cluster stays held (since the allocation claimed it):
        # nothing on disk will point at it, so its counter never needs
        # writing, and the decrement that frees it cancels the increment
        # in memory.
        return record[3]

    def defer(self, updates: dict[int, int], old: dict[int, int]) -> bool:
        """Set new entries in the cached tables, to be committed later.

        ``old``: by guest cluster, the replaced entries that hold a
        reference, dropped once the new entry is durable.  The caller holds
        the lock.  True when the backlog has grown enough that the caller
        should :meth:`commit` now (the tables holding it cannot be evicted).
        """
        mapping = self.mapping
        l2 = mapping.l2
        for c, entry in updates.items():
            l1_index, index = divmod(c, mapping.l2_entries)
            off = mapping.l1[l1_index] & OFFSET_MASK
            table = l2.get(off)
            assert table is not None, "the allocation has just loaded the table"
            replaced = self._forget(c) + ((old[c],) if c in old else ())
            table[index] = entry
            l2.keep(off)
            self._uncommitted[c] = (entry, next(self._tokens), off, replaced)
        return len(self._uncommitted) >= COMMIT_ENTRIES or l2.kept_tables() > l2.capacity // 2

    async def commit(self) -> bool:
        """Flush, then write the uncommitted entries (not flushed again); any written?

        The entries written are exactly those recorded when the refcounts
        to write back are chosen: their counters go out in that write-back
        and nobody else's do, so a crash at any point leaves no counted
        cluster unreferenced for longer than the flush before the entries.
        Takes the lock itself.
        """
        if not self._uncommitted and not self.refs.unwritten():
            return False  # no flush either (QEMU flushes only to order metadata it writes)
        batch: dict[int, Record] = {}

        def take() -> None:
            batch.update(self._uncommitted)
            bits = self.mapping.cluster_bits
            self.refs.release((e & OFFSET_MASK) >> bits for e, _t, _o, _r in batch.values())

        with trio.CancelScope(shield=True):
            try:
                await self.refs.flush(take)  # their data and refcounts before the entries
            except OverlapError as exc:
                await self.mark_corrupt(str(exc), exc.offset, exc.size)
            if not batch:
                return False
            async with self.lock:
                n = self.mapping.l2_entries
                by_table: dict[int, list[int]] = {}
                for c, record in batch.items():
                    if self._uncommitted.get(c) == record:
                        by_table.setdefault(record[2], []).append(c)
                replaced: list[int] = []
                for off, clusters in by_table.items():
                    table = self.mapping.l2.get(off)
                    assert table is not None, "uncommitted tables stay cached"
                    await self._write_entries(off, table, sorted(c % n for c in clusters))
                    for c in clusters:
                        replaced.extend(self._forget(c))
                if replaced:
                    try:
                        await self.refs.flush()  # the new entries durable before the decrement
                        await self.release(replaced)
                    except OverlapError as exc:
                        await self.mark_corrupt(str(exc), exc.offset, exc.size)
        return True

    async def write_now(self, updates: dict[int, int]) -> list[int]:
        """Write new L2 entries (tables must exist) through to the file.

        The caller holds the lock and has made whatever the entries need
        durable.  Only the updated entries are written (one write per run of
        adjacent ones): a neighbour may hold an allocation not yet
        committed, whose entry must not reach the disk before its data.
        Returns the old entries the records of those clusters were to
        release: the disk pointed at them until now, so the caller releases
        them with what it replaced, after a flush.
        """
        n = self.mapping.l2_entries
        by_table: dict[int, list[int]] = {}
        replaced: list[int] = []
        for c in updates:
            by_table.setdefault(c // n, []).append(c)
            replaced.extend(self._forget(c))
        changed: list[int] = []
        try:
            writes: list[tuple[int, bytes]] = []
            for l1_index, clusters in sorted(by_table.items()):
                loaded = await self.mapping.l2_table(l1_index)
                assert loaded is not None, "L2 table must have been allocated"
                off, table = loaded
                changed.append(off)
                for c in clusters:
                    table[c % n] = updates[c]
                writes += self._entry_writes(off, table, sorted(c % n for c in clusters))
            await self._write(writes)
        except BaseException:
            for off in changed:
                self.mapping.l2.drop(off)  # the cache must never be ahead of the disk
            raise
        return replaced

    async def release(self, entries: list[int]) -> None:
        """Drop the references old entries held, once nothing on disk points at
        them any more, durably (the caller flushed since).  Caller holds the lock."""
        self.forget_inflated()
        bits = self.mapping.cluster_bits
        clusters = [c for entry in entries for c in referenced_clusters(entry, bits)]
        if clusters:
            await self.inflight.wait_unpinned(clusters)
            self.mapping.file.debug_event("cluster_free")
            await self.refs.change(clusters, -1)
            # at once, not at the next flush: until then a crash would leak them
            await self.refs.write_back()
            await self.refs.punch_freed()

    async def _write_entries(self, off: int, table: array[int], indices: list[int]) -> None:
        """Write the table's entries at ``indices`` (ascending), a run per write."""
        await self._write(self._entry_writes(off, table, indices))

    def _entry_writes(
        self, off: int, table: array[int], indices: list[int]
    ) -> list[tuple[int, bytes]]:
        """The writes of the table's entries at ``indices`` (ascending), one per run."""
        out: list[tuple[int, bytes]] = []
        i = 0
        while i < len(indices):
            j = i + 1
            while j < len(indices) and indices[j] == indices[j - 1] + 1:
                j += 1
            lo, hi = indices[i], indices[j - 1] + 1
            self.mapping.meta.check(off + lo * 8, (hi - lo) * 8, MetaKind.L2)
            out.append((off + lo * 8, encode_entries(table[lo:hi])))
            i = j
        return out

    async def _write(self, writes: list[tuple[int, bytes]]) -> None:
        """Entry writes in one go: scattered 8-byte writes (a commit into a
        sparse base updates one entry per cluster) cost a thread round trip
        each otherwise.  Under blkdebug, one by one, each after its event."""
        file = self.mapping.file
        if file.hears_debug_events:
            for pos, data in writes:
                file.debug_event("l2_update")
                await file.write(pos, data)
        else:
            await file.write_many(writes)
