"""Stream: pull what the images between ``base`` and the device hold up into the device.

The device stays in use throughout (an export may read and write it): the
job copies a range only where the device holds nothing, and decides that
and writes with the range held exclusively on the device
(:class:`~blockd.block.serialise.RangeGate`), so a guest write is either
over before the job looks (the device then holds the range and the job
leaves it alone) or waits until the copy is in place (and then overwrites
it).  What the job writes is what the device showed there already, read
through its chain, so the copy is invisible to every reader at every
moment, and a crash at any point leaves the guest view as it was.

Once everything is copied the device is flushed, then its header names
base (or no backing file, when base was not given: the device then holds
all the chain had), which is the commit point, and the graph follows.
The device's exports are held meanwhile, so no request is in flight on the
old chain when implicit intermediates are closed.  Intermediates a client
added stay open, as in QEMU, with their data untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Unpack

from blockd.block.graph import BlockGraph
from blockd.block.info import display_filename
from blockd.block.node import BlockNode, Status
from blockd.errors import BlockError, BlockIOError
from blockd.events import EventSink
from blockd.jobs.active_commit import Pivot
from blockd.jobs.commit import find_in_chain
from blockd.jobs.copy import ChainCopy, CopyFailed, restore_read_only, step_size
from blockd.jobs.job import Job, JobFailed, JobOptions, OnError

log = logging.getLogger(__name__)

#: What ``blockdev-del`` and other jobs are told while a stream holds a node.
BLOCKER = "block device is in use by block job: stream"

#: Serialisation granularity when the device does not say (QEMU's default cluster).
_DEFAULT_CLUSTER = 65536


@dataclass(frozen=True)
class StreamPlan:
    """A validated stream: what is copied into ``device`` and what it backs onto then."""

    device: BlockNode
    #: the image the device backs onto afterwards; None: no backing file
    base: BlockNode | None
    #: the images between device and base, top down (their data moves up)
    intermediates: tuple[BlockNode, ...]
    #: what the device's header names afterwards (None with no base)
    backing_string: str | None


class StreamCopy(ChainCopy):
    """Copies what the intermediates hold into the device, where the device holds nothing.

    A :class:`ChainCopy` whose target is the device itself: its slow path
    reads through the device, which shows the chain wherever it holds
    nothing, which is exactly where this copy writes.
    """

    def __init__(self, graph: BlockGraph, device: BlockNode, base: BlockNode | None) -> None:
        super().__init__(graph, device, device)
        self.stream_base = base

    async def window(self, offset: int, end: int) -> int:
        device = self.top
        cluster = device.cluster_size or _DEFAULT_CLUSTER
        start = offset // cluster * cluster
        stop = min(-(-end // cluster) * cluster, device.size)
        # Whole clusters: a guest write into the same cluster (which the
        # driver completes from the chain) is ordered with the copy too.
        async with device.range_gate.exclusive(start, stop - start):
            return await super().window(offset, end)

    async def runs(self, offset: int, end: int) -> list[tuple[BlockNode, Status, int, int]]:
        """What the layers below the device and above base hold where the
        device holds nothing (a layer shorter than the device holds zeros
        past its end: they hide base there, so they are copied too)."""
        device = self.top
        runs: list[tuple[BlockNode, Status, int, int]] = []
        pos = offset
        while pos < end:
            layer, status, n = await self.graph.allocation_above(
                device, self.stream_base, pos, end - pos
            )
            if layer is not None and layer is not device:
                runs.append((layer, status, pos, n))
            pos += n
        return runs


class StreamJob(Job):
    job_type = "stream"

    def __init__(
        self,
        job_id: str,
        events: EventSink,
        graph: BlockGraph,
        plan: StreamPlan,
        hold: Pivot,
        **options: Unpack[JobOptions],
    ) -> None:
        super().__init__(job_id, events, **options)
        self.graph = graph
        self.plan = plan
        self._hold = hold
        self._copy = StreamCopy(graph, plan.device, plan.base)
        self._held: list[BlockNode] = []
        #: whether the graph holds claims of this job (another job may have
        #: this id when the command is refused for it: its claims stay)
        self._claimed = False
        self._reopened = False

    async def open_device(self) -> None:
        """Open a read-only device read-write (QEMU does it before the job
        exists); :meth:`clean` puts it back."""
        if self.plan.device.read_only:
            await self.plan.device.reopen(read_only=False)
            self._reopened = True

    def setup(self) -> None:
        """Take the nodes; undone by :meth:`clean`.

        Raises when a user of the nodes cannot live with the job; the caller
        then drops the job before it starts (and cleans up).
        """
        plan = self.plan
        self.graph.claim_for_stream(self.id, plan.device, plan.intermediates)
        self._claimed = True
        for node in (plan.device, *plan.intermediates):
            self.graph.add_blocker(node, BLOCKER)
            self._held.append(node)

    async def run(self) -> None:
        plan = self.plan
        if not plan.intermediates:
            return  # nothing between the device and base: QEMU reports no length
        length = plan.device.size
        self.length = length
        first_error: BlockIOError | None = None
        offset = 0
        while offset < length:
            await self.throttle()
            end = min(offset + step_size(self.speed), length)
            try:
                copied = await self._copy.window(offset, end)
            except CopyFailed as failed:
                # QEMU's stream reports every failure as a read (its copy-on-read)
                await self.io_error(failed.error, "read")
                if self.on_error is not OnError.IGNORE:
                    continue  # stopped and resumed: the same step again
                # ignored: go on, but the chain stays as it is
                first_error = first_error or failed.error
                copied = 0
            if copied:
                self.account(copied)
            offset = end
            self.offset = offset
        if first_error is not None:
            raise JobFailed(first_error.desc)

    async def prepare(self) -> None:
        plan = self.plan
        device = plan.device
        if device.backing is None:
            return  # a device without backing: there was nothing to stream
        if plan.backing_string is not None and plan.base is not None:
            device.check_backing_name(plan.backing_string, plan.base.driver)
        # Everything copied is durable before the header stops naming its source.
        await device.flush()
        await self._hold(device, device, self._repoint)
        for node in plan.intermediates:
            # as in QEMU, the ones a client added stay until it deletes them
            if not self.graph.is_monitor_owned(node):
                self._release_hold(node)
                await self.graph.release(node)

    async def _repoint(self) -> None:
        """The commit point: the device's header names base (flushed), then the graph."""
        plan = self.plan
        device = plan.device
        old = device.backing
        base_format = plan.base.driver if plan.base is not None else None
        await device.change_backing(plan.base, plan.backing_string, base_format)
        self.graph.relink(device, old, plan.base)
        if plan.base is not None and old is not plan.base:
            self.graph.adopt(plan.base, device)
        log.info(
            "job %s: %s now backs onto %s",
            self.id,
            device.node_name,
            plan.backing_string if plan.base is not None else "nothing",
        )

    def _release_hold(self, node: BlockNode) -> None:
        if node in self._held:
            self._held.remove(node)
            self.graph.remove_blocker(node, BLOCKER)

    async def clean(self) -> None:
        # As QEMU's block job, a stream keeps its hold on its nodes until it
        # is dismissed, whatever the outcome; only its claim on the device
        # goes now (QEMU's job gives up its permissions before the reopen).
        if self._claimed:
            self.graph.release_claims(self.id, keep_intermediates=True)
        device = self.plan.device
        if self._reopened and not device.closed:
            self._reopened = False
            await restore_read_only(self.id, device)

    def dismissed(self) -> None:
        if self._claimed:
            self.graph.release_claims(self.id)
            self._claimed = False
        for node in list(self._held):
            self._release_hold(node)


def _find_node(graph: BlockGraph, name: str) -> BlockNode:
    node = graph.get(name)
    if node is None:
        raise BlockError(f"Cannot find device='' nor node-name='{name}'")
    return node


def plan_stream(
    graph: BlockGraph,
    *,
    device: str,
    base: str | None = None,
    base_node: str | None = None,
    bottom: str | None = None,
    backing_file: str | None = None,
) -> StreamPlan:
    """Resolve and check a block-stream request in QEMU's order; change nothing."""
    if base is not None and base_node is not None:
        raise BlockError("'base' and 'base-node' cannot be specified at the same time")
    if base is not None and bottom is not None:
        raise BlockError("'base' and 'bottom' cannot be specified at the same time")
    if bottom is not None and base_node is not None:
        raise BlockError("'bottom' and 'base-node' cannot be specified at the same time")
    device_bs = graph.get(device)
    if device_bs is None:
        raise BlockError(f"Cannot find device='{device}' nor node-name='{device}'")
    chain = list(graph.chain(device_bs))

    base_bs: BlockNode | None = None
    if base is not None:
        base_bs = find_in_chain(graph, device_bs, base)
        if base_bs is None:
            raise BlockError(f"Can't find '{base}' in the backing chain")
    if base_node is not None:
        base_bs = _find_node(graph, base_node)
        if base_bs is device_bs or base_bs not in chain:
            raise BlockError(f"Node '{base_node}' is not a backing image of '{device}'")
    bottom_bs: BlockNode | None = None
    if bottom is not None:
        bottom_bs = _find_node(graph, bottom)
        if bottom_bs.driver == "blkdebug":
            raise BlockError(f"Node '{bottom}' is a filter, use a non-filter node as 'bottom'")
        if bottom_bs not in chain:
            raise BlockError(f"Node '{bottom}' is not in a chain starting from '{device}'")
        # The new interface: stream down to bottom, whatever backs it.
        base_bs = bottom_bs.backing

    # QEMU asks every node from the device down to base (or bottom) itself.
    end = chain.index(base_bs) if base_bs in chain else len(chain)
    for node in chain[:end]:
        reason = graph.blocker(node)
        if reason is not None:
            raise BlockError(f"Node '{node.node_name}' is busy: {reason}")
    if backing_file is not None and (base_bs is None or bottom is not None):
        raise BlockError("backing file specified, but streaming the entire chain")
    backing_string = None
    if base_bs is not None:
        backing_string = (
            backing_file if backing_file is not None else display_filename(graph, base_bs)
        )
    return StreamPlan(
        device=device_bs,
        base=base_bs,
        intermediates=tuple(chain[1:end]),
        backing_string=backing_string,
    )
