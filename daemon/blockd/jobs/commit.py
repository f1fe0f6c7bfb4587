"""Intermediate commit: merge the images between ``top`` and ``base`` into ``base``.

The copy never changes what the chain's user sees: until the job finishes,
every image above base still overrides what was copied into it, so a cancel
or a failure at any point leaves the guest view as it was (base keeps the
copied clusters; only readers of base alone could see them, as with QEMU).
The chain is stitched only in :meth:`CommitJob.prepare`, after base has been
flushed: first the overlay's header is rewritten to name base (the commit
point, flushed before the graph follows), then the intermediates leave.

As in QEMU, which replaces ``top`` by ``base`` in the graph, every parent of
``top`` follows, not only the device's overlay: each other open overlay
backed by ``top`` gets base (and the same backing string) in its header,
and every export of ``top`` serves base.  All their headers are checked
before any is written, and base is flushed before the first, so a power cut
between two header writes leaves each overlay naming either ``top`` (whose
data is intact) or base (which holds it): every view stays the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Unpack

from blockd.block.graph import BlockGraph
from blockd.block.info import display_filename
from blockd.block.node import BlockNode
from blockd.errors import BlockdError, BlockError, BlockIOError, DeviceNotFound, ImageError
from blockd.events import EventSink
from blockd.jobs.active_commit import ActiveCommitPlan, Pivot, Writers, no_writers
from blockd.jobs.copy import (
    BLOCKER,
    CHUNK,
    ChainCopy,
    CopyFailed,
    CopyRun,
    Steps,
    restore_read_only,
    step_size,
)
from blockd.jobs.job import Job, JobOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitPlan:
    """A validated commit: which nodes, and what to write into the overlay."""

    device: BlockNode
    top: BlockNode
    base: BlockNode
    #: The image whose backing is ``top``; it will point at ``base``.
    overlay: BlockNode
    backing_string: str
    #: ``top`` down to, but not including, ``base``.
    intermediates: tuple[BlockNode, ...]
    #: ``device`` down to the overlay: the images that read through ``top``.
    overlay_chain: tuple[BlockNode, ...]


def refuse_writable_top(plan: CommitPlan, writers: Writers) -> None:
    """QEMU turns the commit of a top exported writable into an active commit;
    blockd would lose the writes that land behind the copy, so it refuses.
    (An export of a node below top meets the job's claim, as in QEMU.)"""
    for node in plan.intermediates[:1]:
        if writers(node):
            raise BlockdError(
                f"Cannot commit '{node.node_name}' while it is exported writable: "
                "writes to it during the commit would be lost"
            )


class CommitJob(Job):
    job_type = "commit"

    def __init__(
        self,
        job_id: str,
        events: EventSink,
        graph: BlockGraph,
        plan: CommitPlan,
        pivot: Pivot | None = None,
        writers: Writers = no_writers,
        **options: Unpack[JobOptions],
    ) -> None:
        super().__init__(job_id, events, **options)
        self.graph = graph
        self.plan = plan
        self._pivot = pivot
        self._writers = writers
        self._held: list[BlockNode] = []
        self._committed = False
        self._used: list[BlockNode] = []
        self._base_was_read_only = plan.base.read_only
        self._copy = ChainCopy(graph, plan.top, plan.base)
        #: the overlays of top when the job started (see :meth:`_overlays`)
        self._overlays_at_start: list[BlockNode] = []

    def _nodes(self) -> list[BlockNode]:
        """What QEMU's commit job holds: the device, top down to base, and base
        (an overlay between the device and top is held only while it is rewritten)."""
        plan = self.plan
        return [plan.device, *plan.intermediates, plan.base]

    async def setup(self) -> None:
        """Take the nodes and open base read-write; undone by :meth:`clean`.

        Raises if base cannot be written; the caller then drops the job
        before it starts (the command fails, nothing changed).
        """
        self.graph.claim_for_commit(self.id, self.plan.top, self.plan.base, active=False)
        for node in self._nodes():
            self.graph.add_blocker(node, BLOCKER)
            self._held.append(node)
        # Like QEMU's commit job, the job works on top and base directly:
        # blockdev-del calls them in use.
        for node in (self.plan.top, self.plan.base):
            self.graph.add_user(node)
            self._used.append(node)
        self._overlays_at_start = self._overlays()
        try:
            # after the claims, which QEMU checks too, and before anything changes
            refuse_writable_top(self.plan, self._writers)
            self._check_overlays_writable()
            await self.plan.base.reopen(read_only=False)
        except BaseException:
            await self.clean()
            raise

    def _check_overlays_writable(self) -> None:
        """Refuse now what :meth:`prepare` could not do after the whole copy:
        reopen a read-only overlay read-write to write base's name into it
        (an image marked corrupt, for one, opens read-only only)."""
        for overlay in self._overlays():
            if overlay.read_only:
                refusal = overlay.read_write_refusal()
                if refusal is not None:
                    raise ImageError(refusal)

    async def run(self) -> None:
        top, base = self.plan.top, self.plan.base
        length = top.size
        self.length = length
        if base.size < length:
            try:
                await base.truncate(length)
            except BlockIOError as err:
                # QEMU's job asks its truncate for no message: the client gets errno's words
                raise BlockIOError(err.errno) from err
        steps = Steps(self._copy, 0, length)
        step: tuple[int, list[CopyRun]] | None = None
        while self.offset < length:
            await self.throttle()
            try:
                if step is None:
                    step = await steps.next(step_size(self.speed), gather=not self.speed)
                copied = await self._copy.copy(step[1])
            except CopyFailed as failed:
                # the whole step is retried: copying a piece again is harmless
                await self.io_error(failed.error, failed.operation)
                continue
            if copied:
                self.account(copied)
            self.offset = step[0]
            step = None
        await self._hide_base_past_top()

    async def _hide_base_past_top(self) -> None:
        """Zero what base holds past top's end where the overlay can see it.

        Above a short ``top`` the chain reads zeros past its end; once the
        overlay backs onto base directly, base's own data there would show.
        """
        plan = self.plan
        visible = max(n.size for n in plan.overlay_chain)
        start, end = plan.top.size, min(plan.base.size, visible)
        while start < end:
            await self.pause_point()
            n = min(CHUNK, end - start)
            try:
                holds, n = await self.graph.is_allocated_above(plan.base, None, start, n)
                if holds:
                    await plan.base.write_zeroes(start, n)
            except BlockIOError as err:
                await self.io_error(err, "write")
                continue
            start += n

    def _overlays(self) -> list[BlockNode]:
        """Every open image backed by top, the device's overlay first.

        Once the job runs, only those that were there when it started: QEMU
        puts its filter above top under those, and moves the filter's
        parents onto base; an overlay added on top later uses top itself
        and stays on it."""
        plan = self.plan
        others = [p for p, edge in self.graph.parents(plan.top) if edge == "backing"]
        now = [plan.overlay, *(p for p in others if p is not plan.overlay)]
        if not self._overlays_at_start:
            return now
        return [p for p in now if p in self._overlays_at_start]

    async def prepare(self) -> None:
        plan = self.plan
        overlays = self._overlays()
        # Nothing is written until every header is known to take the new name.
        for overlay in overlays:
            overlay.check_backing_name(plan.backing_string, plan.base.driver)
        # No other command may close an overlay while its header is rewritten.
        held = [o for o in overlays if o not in self._held]
        for overlay in held:
            self.graph.add_blocker(overlay, BLOCKER)
        try:
            await plan.base.flush()
            for overlay in self.graph.oldest_link_first(plan.top, overlays):
                await self._repoint(overlay)
        finally:
            for overlay in held:
                self.graph.remove_blocker(overlay, BLOCKER)
        if self._pivot is not None:
            # Exports of top serve base from now on (its view is top's).
            await self._pivot(plan.top, plan.base, _nothing)
        # Base belongs with the overlay now; intermediates opened along with
        # the chain (not by a client) are closed, their files untouched.
        self.graph.adopt(plan.base, plan.overlay)
        self._committed = True
        for node in plan.intermediates:
            # as in QEMU, the job keeps the ones a client added until it is dismissed
            if not self.graph.is_monitor_owned(node):
                self._release_hold(node)
                await self.graph.release(node)

    async def _repoint(self, overlay: BlockNode) -> None:
        """Make ``overlay`` name base in its header (flushed), then in the graph."""
        plan = self.plan
        was_read_only = overlay.read_only
        if was_read_only:
            await overlay.reopen(read_only=False)
        try:
            # The commit point for this overlay: once this header write is
            # flushed, it names base and the intermediates are out of its chain.
            await overlay.change_backing(plan.base, plan.backing_string, plan.base.driver)
            self.graph.relink(overlay, plan.top, plan.base)
        finally:
            if was_read_only and not overlay.read_only:
                await restore_read_only(self.id, overlay)
        log.info(
            "job %s: %s now backs onto %s (%s)",
            self.id,
            overlay.node_name,
            plan.base.node_name,
            plan.backing_string,
        )

    def _release_hold(self, node: BlockNode) -> None:
        if node in self._held:
            self._held.remove(node)
            self.graph.remove_blocker(node, BLOCKER)

    async def clean(self) -> None:
        # QEMU's commit drops its hold (and the nodes between top and base)
        # when it aborts; one that completed keeps them until it is dismissed.
        self.graph.release_claims(self.id, keep_intermediates=self._committed)
        if not self._committed:
            self.dismissed()
        while self._used:
            # an intermediate the commit dropped from the chain is closed here
            await self.graph.remove_user(self._used.pop())
        base = self.plan.base
        if self._base_was_read_only and not base.read_only and not base.closed:
            await restore_read_only(self.id, base)

    def dismissed(self) -> None:
        self.graph.release_claims(self.id)
        for node in list(self._held):
            self._release_hold(node)


async def _nothing() -> None:
    """What an export pivot has to do while the exports are held: nothing here."""


def _is_root(graph: BlockGraph, node: BlockNode) -> bool:
    return not graph.parents(node) and graph.blocker(node) is None


def _matches(graph: BlockGraph, node: BlockNode, name: str, relative_to: BlockNode | None) -> bool:
    """Whether ``name`` (the deprecated filename form of top/base) names ``node``."""
    shown = display_filename(graph, node)
    if shown == name:
        return True
    if shown.startswith("json:") or "\0" in name:
        return False  # a name with NUL names no file on the host
    if not os.path.isabs(name) and relative_to is not None:
        name = os.path.join(os.path.dirname(relative_to.filename), name)
    return os.path.realpath(name) == os.path.realpath(node.filename)


def find_in_chain(graph: BlockGraph, top: BlockNode, name: str) -> BlockNode | None:
    """The image below ``top`` that ``name`` (a file name, as the deprecated
    ``top`` / ``base`` arguments give it) names, as QEMU finds a backing image."""
    above: BlockNode | None = None
    for node in graph.chain(top):
        if above is not None and _matches(graph, node, name, above):
            return node
        above = node
    return None


def _node_in_chain(graph: BlockGraph, name: str, chain: list[BlockNode]) -> BlockNode:
    node = graph.get(name)
    if node is None:
        raise BlockError(f"Cannot find device='' nor node-name='{name}'")
    if node not in chain:
        raise BlockError(f"'{name}' is not in this backing file chain")
    return node


def plan_commit(
    graph: BlockGraph,
    *,
    device: str,
    top_node: str | None = None,
    top: str | None = None,
    base_node: str | None = None,
    base: str | None = None,
    backing_file: str | None = None,
    has_writer: Callable[[BlockNode], bool] = lambda node: False,
) -> CommitPlan | ActiveCommitPlan:
    """Resolve and check a block-commit request in QEMU's order; change nothing.

    Committing the active layer (``top`` is ``device``) gives an
    :class:`ActiveCommitPlan`, for :class:`~blockd.jobs.active_commit.ActiveCommitJob`.
    ``has_writer`` tells whether a user (an export) writes to a node.
    """
    device_bs = graph.get(device)
    if device_bs is None:
        raise DeviceNotFound(f"Device '{device}' not found")
    if not _is_root(graph, device_bs):
        raise BlockError("Need a root block node")
    chain = list(graph.chain(device_bs))

    top_bs: BlockNode | None = device_bs
    if top_node is not None and top is not None:
        raise BlockError("'top-node' and 'top' are mutually exclusive")
    if top_node is not None:
        top_bs = _node_in_chain(graph, top_node, chain)
    elif top is not None and not _matches(graph, device_bs, top, None):
        top_bs = find_in_chain(graph, device_bs, top)
    if top_bs is None:
        raise BlockError(f"Top image file {top} not found")

    below_top = list(graph.chain(top_bs))
    if base_node is not None and base is not None:
        raise BlockError("'base-node' and 'base' are mutually exclusive")
    if base_node is not None:
        base_bs = _node_in_chain(graph, base_node, below_top)
    elif base is not None:
        found = find_in_chain(graph, top_bs, base)
        if found is None:
            raise BlockError(f"Can't find '{base}' in the backing chain")
        base_bs = found
    else:
        base_bs = below_top[-1]

    intermediates = tuple(below_top[: below_top.index(base_bs)])
    # QEMU asks every node from top down to base itself (a job may hold base)
    # before anything else about the pair
    for node in (*intermediates, base_bs):
        reason = graph.blocker(node)
        if reason is not None:
            raise BlockError(f"Node '{node.node_name}' is busy: {reason}")
    if top_bs is base_bs:
        raise BlockError("cannot commit an image into itself")
    active = top_bs is device_bs
    if active and backing_file is not None:
        raise BlockError("'backing-file' specified, but 'top' is the active layer")
    if backing_file is not None and has_writer(top_bs):
        # QEMU would make this an active commit, which takes no backing-file
        raise BlockError("'backing-file' specified, but 'top' has a writer on it")
    overlay = None if active else chain[chain.index(top_bs) - 1]
    # Every parent of top will be moved onto base (QEMU replaces the node).
    overlays = [p for p, edge in graph.parents(top_bs) if edge == "backing"] if overlay else []
    for parent in overlays:
        reason = graph.blocker(parent)
        if reason is not None:
            raise BlockError(f"Node '{parent.node_name}' is busy: {reason}")
    if overlay is not None:
        for parent, edge in graph.parents(top_bs):
            if edge != "backing":
                raise BlockError(
                    f"Cannot commit '{top_bs.node_name}': node '{parent.node_name}' uses it "
                    f"as '{edge}', and blockd re-points only overlays and exports onto the base"
                )
    for parent, edge in graph.parents(base_bs):
        if edge == "backing" and parent not in intermediates:
            raise BlockError(
                f"Conflicts with use by node '{parent.node_name}' as 'backing', which does "
                f"not allow 'write' on {base_bs.node_name}: committing into "
                f"'{base_bs.node_name}' would change what '{parent.node_name}' reads"
            )
    if overlay is None:
        return ActiveCommitPlan(top=top_bs, base=base_bs, intermediates=intermediates)
    backing_string = backing_file if backing_file is not None else base_bs.filename
    for parent in overlays:
        parent.check_backing_name(backing_string, base_bs.driver)
    return CommitPlan(
        device=device_bs,
        top=top_bs,
        base=base_bs,
        overlay=overlay,
        backing_string=backing_string,
        intermediates=intermediates,
        overlay_chain=tuple(chain[: chain.index(top_bs)]),
    )
