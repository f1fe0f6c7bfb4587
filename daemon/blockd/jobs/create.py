"""The ``create`` job of blockdev-create: one image or host file made in the background.

As in QEMU 7.2 it is a plain job, not a block job: ``query-jobs`` lists it,
``query-block-jobs`` and the ``block-job-*`` verbs do not know it, and it
sends only ``JOB_STATUS_CHANGE``.  It is finalized at once but stays
``concluded`` until ``job-dismiss`` (QEMU creates it with manual dismiss), so
a client can read a failure's text in ``query-jobs``.  Its progress is 0 of 1
until the work is over, then 1 of 1, failed or not.

The work has no pause point: a cancel, as in QEMU, lets the creation finish
and then ends the job as cancelled (``aborting``); the image is left made.
Every check QEMU makes inside its job (the node reference, the options) is
made here too, so its failure is the job's ``error``, not the command's.
"""

from __future__ import annotations

from typing import Any

from blockd.block import create
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.block.open import open_node
from blockd.errors import BlockdError
from blockd.events import EventSink
from blockd.jobs.job import Job


class CreateJob(Job):
    job_type = "create"
    is_block_job = False

    def __init__(self, job_id: str, events: EventSink, graph: BlockGraph,
                 options: dict[str, Any]) -> None:
        super().__init__(job_id, events, auto_dismiss=False)
        self.graph = graph
        self.options = options
        self.length = 1

    async def run(self) -> None:
        try:
            if self.options["driver"] == "file":
                await self._create_file()
            else:
                await self._create_qcow2()
        finally:
            self.offset = 1

    async def _create_file(self) -> None:
        o = self.options
        await create.create_file(
            o["filename"], o["size"], preallocation=o.get("preallocation", "off"),
            nocow=o.get("nocow", False), extent_size_hint=o.get("extent-size-hint"),
        )

    async def _create_qcow2(self) -> None:
        o = self.options
        file, temporary = await self._file_node(o["file"])
        try:
            options = create.validate_qcow2(create.Qcow2Request(
                size=o["size"], version=o.get("version"), cluster_size=o.get("cluster-size"),
                refcount_bits=o.get("refcount-bits"), lazy_refcounts=o.get("lazy-refcounts"),
                preallocation=o.get("preallocation"), compression_type=o.get("compression-type"),
                backing_file=o.get("backing-file"), backing_fmt=o.get("backing-fmt"),
                extended_l2=o.get("extended-l2"), data_file=o.get("data-file"),
                data_file_raw=o.get("data-file-raw"), encrypt=o.get("encrypt"),
                data_file_missing=self._missing(o.get("data-file")),
            ))
            self.graph.attach_creator(file, self)
            self.graph.add_user(file)  # blockdev-del: "in use" until the image is made
            try:
                await create.format_qcow2(file, options)
            finally:
                self.graph.detach_user(file, self)
                await self.graph.remove_user(file)
        finally:
            if temporary:
                await self.graph.close_node(file)

    def _missing(self, ref: object) -> str | None:
        if isinstance(ref, str) and self.graph.get(ref) is None:
            return f"Cannot find device='{ref}' nor node-name='{ref}'"
        return None

    async def _file_node(self, ref: str | dict[str, Any]) -> tuple[BlockNode, bool]:
        """The node the image goes into: an existing one by name, or one opened
        (read-write unless told otherwise) for the job and closed after it."""
        if isinstance(ref, dict):
            return await open_node(self.graph, ref), True
        missing = self._missing(ref)
        if missing is not None:
            raise BlockdError(missing)
        node = self.graph.get(ref)
        assert node is not None
        return node, False
