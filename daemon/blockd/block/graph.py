"""The node registry: names, chains, and the allocation question commit asks.

Kept separate from the nodes so that a node never needs to know who else
refers to it; ownership (which children were opened implicitly along with a
node) is recorded here so closing a node can drop exactly those.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import trio

from blockd import logs
from blockd.block.chain import layer_above, layers, runs_above
from blockd.block.node import BlockNode, Status
from blockd.block.permissions import (
    ALL,
    CONSISTENT_READ,
    GRAPH_MOD,
    RESIZE,
    UNNAMED_DEVICE,
    WRITE,
    WRITE_UNCHANGED,
    Role,
    Use,
    child_use,
    conflict,
    totals,
)
from blockd.errors import BlockdError, BlockError, BlockIOError
from blockd.events import EventSink
from blockd.ids import well_formed

_NODE_NAME_MAX = 31


class BlockGraph:
    """All open nodes of one daemon, by node name."""

    def __init__(self, first_auto_index: int = 100, events: EventSink | None = None) -> None:
        self._events = events
        self._nodes: dict[str, BlockNode] = {}
        # children opened implicitly together with a parent (inline file, header backing)
        self._implicit: dict[str, list[BlockNode]] = {}
        self._auto = itertools.count(first_auto_index)
        self._monitor_owned: set[str] = set()
        # Why a node may not go away, oldest first, each with a sequence
        # number: operations (jobs) in _blockers, overlays in _backing_users.
        self._blockers: dict[str, list[tuple[int, str]]] = {}
        self._backing_users: dict[str, list[tuple[int, str]]] = {}
        self._sequence = itertools.count()
        # Nodes something outside the graph works on (exports by their id,
        # jobs unnamed); such a node outlives the image that opened it, as an
        # orphan closed when its last user goes (QEMU's reference counting,
        # for this one case).
        self._users: dict[str, list[str | None]] = {}
        self._orphans: set[str] = set()
        # Nodes whose users reach them through a job's filter for now (QEMU
        # inserts one above an actively committed node): not "in use" directly.
        # The users the node had then, while they stay: later ones attach to
        # the node itself, and a user that leaves leaves the filter.
        self._covered: dict[str, list[str | None]] = {}
        # Permissions: when each node joined (its edges date from then), the
        # users that are not nodes (exports) as [sequence, key, needed,
        # shared], and a would-be user being tried out by a check.
        self._joined: dict[str, int] = {}
        self._roots: dict[str, list[list[Any]]] = {}
        self._trial: dict[str, Use] = {}
        # Users a job's filter stands in front of (QEMU's commit filter): by
        # job, the node and who used it when the job began.
        self._hidden: dict[object, tuple[str, set[object]]] = {}
        # Nodes a job has made (or is making) read-write, by job.
        self._reopened: dict[object, str] = {}
        # Node names in the order QEMU would have created the nodes.
        self._order: list[str] = []
        # Nodes whose backing was opened from options the client gave, not
        # from the name in the image header.
        self._backing_given: set[str] = set()

    # -- naming ---------------------------------------------------------------------

    def auto_name(self) -> str:
        """A fresh ``#blockNNN`` name; '#' cannot appear in user names, so no clash."""
        while True:
            name = f"#block{next(self._auto):03d}"
            if name not in self._nodes:
                return name

    def check_new_name(self, name: str) -> None:
        """Refuse a user-given node name the way QEMU does, before anything is opened."""
        if name in self._nodes:
            raise BlockError(f"Duplicate nodes with node-name='{name}'")
        if len(name) > _NODE_NAME_MAX:
            raise BlockError("Node name too long")
        if not well_formed(name):
            raise BlockError(f"Invalid node-name: '{name}'")

    # -- registry -------------------------------------------------------------------

    def add(self, node: BlockNode, implicit_children: list[BlockNode] | None = None) -> None:
        if node.node_name in self._nodes:
            raise BlockError(f"Duplicate nodes with node-name='{node.node_name}'")
        self._nodes[node.node_name] = node
        self._joined[node.node_name] = next(self._sequence)
        try:
            for child in (node.file, node.backing):
                if child is not None:
                    self._check_permissions(child)
        except BlockError:
            del self._nodes[node.node_name]
            raise
        self._implicit[node.node_name] = list(implicit_children or [])
        self._list(node)
        if self._events is not None:
            node.events = self._events
        if node.backing is not None:
            self._note_backing(node, node.backing)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __iter__(self) -> Iterator[BlockNode]:
        """Newest first, as QEMU lists named nodes (query-named-block-nodes)."""
        listed = [self._nodes.get(name) for name in reversed(self._order)]
        return iter([node for node in listed if node is not None])

    def _list(self, node: BlockNode) -> None:
        """Place ``node`` where QEMU lists it: after its file, before the backing
        chain opened along with it (QEMU names a node before opening its backing)."""
        if node.node_name in self._order:
            self._order.remove(node.node_name)
        position = len(self._order)
        if node.backing is not None and node.backing in self._implicit[node.node_name]:
            family, todo = set(), [node.backing]
            while todo:
                each = todo.pop()
                family.add(each.node_name)
                todo.extend(self._implicit.get(each.node_name, []))
            position = min(i for i, name in enumerate(self._order) if name in family)
        self._order.insert(position, node.node_name)

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, name: str) -> BlockNode | None:
        return self._nodes.get(name)

    def lookup(self, name_or_filename: str) -> BlockNode | None:
        """By node name first, then by filename (QEMU's deprecated ``top``/``base`` form).

        For a filename the topmost format node wins over its protocol child.
        """
        node = self._nodes.get(name_or_filename)
        if node is not None:
            return node
        return self.by_filename(name_or_filename)

    def by_filename(self, filename: str) -> BlockNode | None:
        want = os.path.realpath(filename)
        matches = [
            n for n in self._nodes.values() if n.filename and os.path.realpath(n.filename) == want
        ]
        if not matches:
            return None
        children = {id(n.file) for n in matches if n.file is not None}
        tops = [n for n in matches if id(n) not in children]
        return (tops or matches)[0]

    def parents(self, node: BlockNode) -> list[tuple[BlockNode, str]]:
        """Every (parent, edge name) pointing at ``node``."""
        out: list[tuple[BlockNode, str]] = []
        for n in self._nodes.values():
            if n.file is node:
                out.append((n, "file"))
            if n.backing is node:
                out.append((n, "backing"))
        return out

    # -- permissions ------------------------------------------------------------------

    def check_new_parent(self, name: str, child: BlockNode, role: Role, writable: bool) -> None:
        """Refuse, before it opens anything, a parent that ``child``'s users cannot live with.

        A qcow2 node opened read-write writes its header while opening, so the
        conflict must be found before, as QEMU finds it when attaching.
        """
        need, lets = child_use(role, 0, ALL, writable)
        self._trial[child.node_name] = Use(f"node '{name}'", "file", need, lets, -1)
        try:
            self._check_permissions(child)
        finally:
            del self._trial[child.node_name]

    def attach_user(self, node: BlockNode, key: object, *, writable: bool) -> None:
        """Let an export (``key``) read, and maybe write, ``node``; refused on a conflict.

        It shares everything at first, as QEMU's export does when attaching;
        :meth:`forbid_resize` then takes resizing away.
        """
        self._attach_root(node, key, CONSISTENT_READ | (WRITE if writable else 0))

    def attach_creator(self, node: BlockNode, key: object) -> None:
        """Let ``key`` write and resize ``node`` (an image being made in it),
        sharing everything, as QEMU's blockdev-create asks; refused on a conflict."""
        self._attach_root(node, key, WRITE | RESIZE)

    def _attach_root(self, node: BlockNode, key: object, need: int) -> None:
        entry: list[Any] = [next(self._sequence), key, need, ALL, UNNAMED_DEVICE, "root"]
        self._roots.setdefault(node.node_name, []).append(entry)
        try:
            self._check_permissions(node)
        except BlockError:
            self.detach_user(node, key)
            raise

    def forbid_resize(self, node: BlockNode, key: object) -> None:
        """The NBD export's second step: nobody may resize the node under its clients."""
        for entry in self._roots.get(node.node_name, []):
            if entry[1] == key:
                entry[3] = ALL & ~RESIZE
                try:
                    self._check_permissions(node)
                except BlockError:
                    entry[3] = ALL
                    raise

    def detach_user(self, node: BlockNode, key: object) -> None:
        self._drop_user(node.node_name, key)

    def _drop_user(self, name: str, key: object) -> None:
        entries = self._roots.get(name, [])
        entries[:] = [e for e in entries if e[1] != key]
        if not entries:
            self._roots.pop(name, None)

    def move_user(self, old: BlockNode, new: BlockNode, key: object) -> None:
        """A pivot: the export's needs go with it to the node it now serves."""
        for entry in self._roots.get(old.node_name, []):
            if entry[1] == key:
                self.detach_user(old, key)
                self._roots.setdefault(new.node_name, []).append(entry)
                return

    def hand_over(self, old: BlockNode, new: BlockNode, keys: list[object]) -> None:
        """Move the users ``keys`` (exports) from ``old`` to ``new`` at once; refused,
        with nothing moved, when ``new`` and the nodes below it cannot take them
        (QEMU's permission update when it replaces a node under its parents)."""
        moved = [e for e in self._roots.get(old.node_name, []) if e[1] in keys]
        if not moved:
            return
        for key in keys:
            self._drop_user(old.node_name, key)
        self._roots.setdefault(new.node_name, []).extend(moved)
        try:
            self._check_permissions(new)
        except BlockError:
            for key in keys:
                self._drop_user(new.node_name, key)
            self._roots.setdefault(old.node_name, []).extend(moved)
            raise

    def needs(self, node: BlockNode) -> int:
        """What the users of ``node`` need of it together (QEMU's cumulative permissions)."""
        return totals(self._uses(node, {}))[0]

    def claim_for_commit(
        self, job_id: str, top: BlockNode, base: BlockNode, *, active: bool, trial: bool = False
    ) -> None:
        """What a commit job holds while it runs, as QEMU's job takes it; refused
        (nothing taken) when a user of these nodes cannot live with it.

        The nodes between top and base are read by nobody else (their data is
        moving); base gets a writer.  QEMU puts a filter above the top it
        commits, so whoever used that top before reaches it through the filter,
        which asks nothing of it (an active commit's: at most to write, never
        to read consistently); only users that come later meet the job.

        A ``trial`` takes nothing either way: the commit plan asks it for the
        refusal block-commit would meet, under a key no job's release touches.
        """
        user = f"commit job '{job_id}'"
        key = ("trial" if trial else "job", job_id)
        self._reopened[key] = base.node_name
        try:
            self._hidden[key] = (top.node_name, self._user_ids(top))
            for node in self.chain(top):
                if node is base:
                    break
                if node is top and active:
                    continue  # the mirror's filter only passes writes down to it
                self._claim(node, key, user, "intermediate node", 0, WRITE | WRITE_UNCHANGED)
            if active:  # the mirror's target, written while the chain is read
                need = WRITE | (RESIZE if base.size < top.size else 0)
                lets = ALL & ~RESIZE
            else:
                need, lets = CONSISTENT_READ | WRITE, CONSISTENT_READ | WRITE_UNCHANGED | GRAPH_MOD
            self._claim(base, key, UNNAMED_DEVICE, "root", need, lets)
        except BlockError:
            self._release(key)
            raise
        if trial:
            self._release(key)

    def claim_for_stream(
        self, job_id: str, device: BlockNode, intermediates: tuple[BlockNode, ...]
    ) -> None:
        """What a stream job holds while it runs, as QEMU's job takes it; refused
        (nothing taken) when a user of these nodes cannot live with it.

        The device is read consistently and written by the job (its users may
        go on writing, but nobody may resize it or change the graph there);
        the images between it and base are read and may be written by nobody.
        The device is opened read-write for the job.
        """
        user = f"stream job '{job_id}'"
        key = ("job", job_id)
        self._reopened[key] = device.node_name
        shared = CONSISTENT_READ | WRITE_UNCHANGED | WRITE
        try:
            self._claim(device, key, UNNAMED_DEVICE, "root", CONSISTENT_READ, shared)
            self._claim(device, key, user, "active node", 0, shared)
            for node in intermediates:
                self._claim(
                    node, key, user, "intermediate node", 0, CONSISTENT_READ | WRITE_UNCHANGED
                )
        except BlockError:
            self.release_claims(job_id)
            raise

    def release_claims(self, job_id: str, *, keep_intermediates: bool = False) -> None:
        """Drop a job's claims; ``keep_intermediates`` keeps those on
        the nodes between top and base (a QEMU commit that completed keeps
        them until the job is dismissed; one that failed drops them all)."""
        self._release(("job", job_id), keep_intermediates=keep_intermediates)

    def _release(self, key: object, *, keep_intermediates: bool = False) -> None:
        self._hidden.pop(key, None)
        self._reopened.pop(key, None)
        for name in list(self._roots):
            if keep_intermediates:
                entries = self._roots[name]
                entries[:] = [e for e in entries if e[1] != key or e[5] == "intermediate node"]
                if not entries:
                    self._roots.pop(name)
            else:
                self._drop_user(name, key)

    def _claim(
        self, node: BlockNode, key: object, user: str, child: str, need: int, lets: int
    ) -> None:
        entry: list[Any] = [next(self._sequence), key, need, lets, user, child]
        self._roots.setdefault(node.node_name, []).append(entry)
        self._check_permissions(node)

    def _writable(self, node: BlockNode) -> bool:
        """Read-write, or about to be: a commit opens base and the files below
        it read-write once it holds it (QEMU reopens first; the outcome of the
        check is the same)."""
        if not node.read_only:
            return True
        for name in self._reopened.values():
            below = self._nodes.get(name)
            while below is not None:
                if below is node:
                    return True
                below = below.file
        return False

    def _user_ids(self, node: BlockNode) -> set[object]:
        ids: set[object] = {entry[1] for entry in self._roots.get(node.node_name, [])}
        ids.update((parent.node_name, edge) for parent, edge in self.parents(node))
        return ids

    def _uses(self, node: BlockNode, memo: dict[str, tuple[int, int]]) -> list[Use]:
        """Everyone using ``node`` and what each needs and shares, newest first."""
        hidden: set[object] = set()
        for name, ids in self._hidden.values():
            if name == node.node_name:
                hidden |= ids
        uses = [
            Use(user, child, need, lets, seq)
            for seq, key, need, lets, user, child in self._roots.get(node.node_name, [])
            if key not in hidden
        ]
        for parent, edge in self.parents(node):
            if (parent.node_name, edge) in hidden:
                continue
            if parent.node_name not in memo:
                memo[parent.node_name] = totals(self._uses(parent, memo))
            perm, shared = memo[parent.node_name]
            role, child = (
                (parent.file_role, parent.file_edge) if edge == "file" else (Role.COW, "backing")
            )
            need, lets = child_use(role, perm, shared, self._writable(parent))
            seq = self._joined.get(parent.node_name, 0)
            uses.append(Use(f"node '{parent.node_name}'", child, need, lets, seq))
        uses.sort(key=lambda use: use.sequence, reverse=True)
        trial = self._trial.get(node.node_name)
        return uses if trial is None else [trial, *uses]

    def _check_permissions(self, top: BlockNode) -> None:
        """Check ``top`` and everything below it, parents first, as QEMU does."""
        memo: dict[str, tuple[int, int]] = {}
        queue, seen = [top], set()
        while queue:
            node = queue.pop(0)
            if id(node) in seen:
                continue
            seen.add(id(node))
            uses = self._uses(node, memo)
            trouble = conflict(node.node_name, uses)
            if trouble is not None:
                raise BlockError(trouble)
            if not self._writable(node) and totals(uses)[0] & (WRITE | WRITE_UNCHANGED):
                raise BlockError("Block node is read-only")
            queue.extend(c for c in (node.file, node.backing) if c is not None)

    # -- chains ---------------------------------------------------------------------

    @staticmethod
    def chain(top: BlockNode) -> Iterator[BlockNode]:
        """``top``, its backing, its backing's backing, ... (loops are cut)."""
        return layers(top)

    async def is_allocated_above(
        self, top: BlockNode, base: BlockNode | None, offset: int, length: int
    ) -> tuple[bool, int]:
        """Whether any layer from ``top`` down to (excluding) ``base`` holds the extent.

        Zero clusters count as allocated: they hide what is below.  Returns the
        answer for the run starting at ``offset`` and that run's length, so a
        caller can walk a range in as few questions as there are runs.
        """
        layer, _status, run = await self.allocation_above(top, base, offset, length)
        return layer is not None, run

    async def allocation_above(
        self, top: BlockNode, base: BlockNode | None, offset: int, length: int
    ) -> tuple[BlockNode | None, Status, int]:
        """Like :meth:`is_allocated_above`, also naming the layer that holds the run.

        Returns (layer, status, run length): the topmost layer above ``base``
        that holds the whole run and whether it holds data or zeros there, or
        (None, UNALLOCATED, run).  A layer shorter than ``offset`` holds zeros.
        """
        if length <= 0 or offset < 0 or offset >= top.size:
            raise BlockError(
                f"is_allocated_above: range {offset}+{length} outside '{top.node_name}'"
            )
        _depth, layer, status, run = await layer_above(
            top, base, offset, min(length, top.size - offset)
        )
        return layer, status, run

    async def allocation_runs_above(
        self, top: BlockNode, base: BlockNode | None, offset: int, length: int
    ) -> list[tuple[BlockNode | None, Status, int, int]]:
        """:meth:`allocation_above` for every run of the range at once:
        (layer, status, offset, length) in order, covering it (up to top's end)."""
        if length <= 0 or offset < 0 or offset >= top.size:
            raise BlockError(
                f"is_allocated_above: range {offset}+{length} outside '{top.node_name}'"
            )
        runs = await runs_above(top, base, offset, min(length, top.size - offset))
        return [(layer, status, pos, n) for _depth, layer, status, pos, n in runs]

    # -- who may change or drop a node --------------------------------------------

    def set_monitor_owned(self, node: BlockNode) -> None:
        """Mark a node added by blockdev-add: only those may be blockdev-del'd."""
        self._monitor_owned.add(node.node_name)

    def is_monitor_owned(self, node: BlockNode) -> bool:
        return node.node_name in self._monitor_owned

    def add_blocker(self, node: BlockNode, reason: str) -> None:
        """Record that an operation (a job) holds ``node`` until it removes the blocker."""
        self._blockers.setdefault(node.node_name, []).append((next(self._sequence), reason))

    def remove_blocker(self, node: BlockNode, reason: str) -> None:
        _remove_reason(self._blockers, node.node_name, reason)

    def blocker(self, node: BlockNode) -> str | None:
        """Why an operation holds ``node`` (the most recent reason), if one does."""
        reasons = self._blockers.get(node.node_name)
        return reasons[-1][1] if reasons else None

    def deletion_blocker(self, node: BlockNode) -> str | None:
        """Why ``node`` cannot be deleted: the newest of its jobs and overlays.

        QEMU keeps one list of blockers per node, newest first, so the reason
        a client is given is whichever hold was taken last.
        """
        held = self._blockers.get(node.node_name, []) + self._backing_users.get(node.node_name, [])
        return max(held)[1] if held else None

    def _note_backing(self, overlay: BlockNode, backing: BlockNode) -> None:
        reason = _backing_reason(overlay)
        self._backing_users.setdefault(backing.node_name, []).append((next(self._sequence), reason))

    def _forget_backing(self, overlay: BlockNode, backing: BlockNode) -> None:
        reason = _backing_reason(overlay)
        _remove_reason(self._backing_users, backing.node_name, reason)

    def oldest_link_first(self, node: BlockNode, overlays: list[BlockNode]) -> list[BlockNode]:
        """``overlays`` of ``node`` in the order their backing links to it were made.

        Moved onto another node in this order, the newest link stays the
        newest there (what blockdev-del names), as QEMU's two list reversals
        (into its commit filter, then onto base) leave it."""
        age = {reason: seq for seq, reason in self._backing_users.get(node.node_name, [])}
        return sorted(overlays, key=lambda o: age.get(_backing_reason(o), -1))

    def relink(self, overlay: BlockNode, old: BlockNode | None, new: BlockNode | None) -> None:
        """Record that ``overlay`` now backs onto ``new`` instead of ``old``."""
        if old is not None:
            self._forget_backing(overlay, old)
        if new is not None:
            self._note_backing(overlay, new)

    def adopt(self, child: BlockNode, owner: BlockNode) -> None:
        """Make ``owner`` the node that ``child`` is closed with, unless a client owns it.

        A commit moves base under the overlay when the image that had opened
        it leaves the chain.
        """
        if self.is_monitor_owned(child):
            return
        for children in self._implicit.values():
            if child in children:
                children.remove(child)
        self._implicit.setdefault(owner.node_name, []).append(child)

    def add_user(self, node: BlockNode, who: str | None = None) -> None:
        """Record that an export (``who``: its id) or a job works on ``node``."""
        self._users.setdefault(node.node_name, []).append(who)

    def in_use(self, node: BlockNode) -> bool:
        return node.node_name in self._users

    def attached(self, node: BlockNode) -> bool:
        """Whether a user works on ``node`` itself: ``blockdev-del`` says "in use"."""
        name = node.node_name
        return len(self._users.get(name, [])) > len(self._covered.get(name, []))

    def cover(self, node: BlockNode) -> None:
        """Record that a job now stands between ``node`` and its users."""
        self._covered[node.node_name] = list(self._users.get(node.node_name, []))

    def uncover(self, node: BlockNode) -> None:
        self._covered.pop(node.node_name, None)

    async def remove_user(self, node: BlockNode, who: str | None = None) -> None:
        """Undo :meth:`add_user`; an orphan without users left is closed now."""
        name = node.node_name
        users = self._users.get(name, [])
        if who in users:
            users.remove(who)
        covered = self._covered.get(name, [])
        if who in covered:
            covered.remove(who)
        if users:
            return
        self._users.pop(name, None)
        if name in self._orphans and self._nodes.get(name) is node and not self.parents(node):
            self._orphans.discard(name)
            await self.close_node(node)

    async def release(self, node: BlockNode) -> None:
        """Close ``node`` if it was opened implicitly and nothing refers to it any more.

        Used when a commit drops intermediate images from a chain: the ones a
        client added stay open until it deletes them, as in QEMU.
        """
        if (
            node.node_name in self._nodes
            and not self.is_monitor_owned(node)
            and not self.parents(node)
            and self.blocker(node) is None
        ):
            await self._close_unless_used(node)

    async def _close_unless_used(self, node: BlockNode) -> None:
        if self.in_use(node):
            self._orphans.add(node.node_name)
        else:
            await self.close_node(node)

    # -- teardown -------------------------------------------------------------------

    def note_backing_given(self, node: BlockNode) -> None:
        """Record that the client described ``node``'s backing itself (inline options)."""
        self._backing_given.add(node.node_name)

    def backing_given(self, node: BlockNode) -> bool:
        return node.node_name in self._backing_given

    def implicit_children(self, node: BlockNode) -> list[BlockNode]:
        return list(self._implicit.get(node.node_name, []))

    async def flush_for_close(self, node: BlockNode) -> None:
        """Make what ``node`` holds durable before it is closed.

        Run first so that a failure leaves everything open as it was: the
        unwritten data stays in memory and a later attempt may still write it.
        """
        try:
            await node.flush()
        except BlockIOError as exc:
            reason = os.strerror(exc.errno)
            raise BlockIOError(exc.errno, f"Error flushing drive: {reason}") from exc

    async def close_node(self, node: BlockNode) -> None:
        """Close ``node`` and the children opened with it that nobody else uses.

        Every one of them leaves the registry before the first is closed, so a
        close that fails (logged, like QEMU's) can leave no half-removed graph
        behind: no child without the parent that named it, none unreachable.
        """
        doomed = self._detach(node)
        with trio.CancelScope(shield=True):  # detached ones must all be closed
            for each in doomed:
                await _close_logged(each)

    def _detach(self, node: BlockNode) -> list[BlockNode]:
        """Drop ``node`` and, recursively, its now unused implicit children from
        the registry; the ones to close, parents before their children."""
        self._nodes.pop(node.node_name, None)
        self._joined.pop(node.node_name, None)
        if node.node_name in self._order:
            self._order.remove(node.node_name)
        self._monitor_owned.discard(node.node_name)
        self._orphans.discard(node.node_name)
        if node.backing is not None:
            self._forget_backing(node, node.backing)
        out = [node]
        for child in self._implicit.pop(node.node_name, []):
            if self._nodes.get(child.node_name) is not child or self.parents(child):
                continue
            if self.in_use(child):
                self._orphans.add(child.node_name)
            else:
                out.extend(self._detach(child))
        return out

    async def close_all(self) -> None:
        """Close every node, parents before children so flushes go top-down.

        One that fails to close is logged and the rest still closed: each
        other image deserves its own flush.
        """
        while self._nodes:
            roots = [n for n in self._nodes.values() if not self.parents(n)]
            if not roots:  # a cycle should be impossible; close whatever is left
                roots = list(self._nodes.values())
            for node in roots:
                if node.node_name in self._nodes:
                    self._nodes.pop(node.node_name, None)
                    self._implicit.pop(node.node_name, None)
                    await _close_logged(node)


async def _close_logged(node: BlockNode) -> None:
    """Close ``node``; a failure is logged, not raised, as QEMU reports a failed
    flush on close: the node is gone either way and the caller has nothing
    left to undo."""
    try:
        await node.close()
    except (BlockdError, OSError) as exc:
        logs.node_close_failed(node.node_name, str(exc))


def _backing_reason(overlay: BlockNode) -> str:
    return f"node is used as backing hd of '{overlay.node_name}'"


def _remove_reason(table: dict[str, list[tuple[int, str]]], name: str, reason: str) -> None:
    entries = table.get(name, [])
    for entry in entries:
        if entry[1] == reason:
            entries.remove(entry)
            break
    if not entries:
        table.pop(name, None)
