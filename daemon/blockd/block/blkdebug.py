"""``blkdebug``: a filter node that fails chosen requests, for testing error paths.

Jobs need to be tested against ENOSPC and EIO (``on-error`` policies) without
filling real disks, and a rule written for qemu-storage-daemon has to fail the
same request here.  So this follows QEMU's model, not a simpler one of our own:

* The driver above (qcow2, raw) raises an *event* (a QAPI ``BlkdebugEvent``
  name) on this node just before the I/O the event stands for; so does this
  node for each write it receives (``pwritev``, ``pwritev_zero``, then
  ``pwritev_done``) and a parent's flush (``flush_to_os``, ``flush_to_disk``).
  Opening raises ``none``.
* An event with ``inject-error`` rules (for the current state) makes exactly
  those rules the active ones; an event without leaves the active rules alone.
* Every request that reaches this node checks the active rules, in the order
  they were given: the first whose iotype matches and whose ``sector`` (if
  any) lies inside the request fails it with its errno; a ``once`` rule is
  then gone for good.  So a rule fails the first matching request *after*
  its event, which is what makes "the L2 table load" or "the guest data
  write" addressable.
* ``set-state`` rules move the state machine (initially 1) on their event;
  ``state`` on a rule limits it to events raised in that state.
"""

from __future__ import annotations

import dataclasses
import errno as errno_module
from typing import Any

import trio

from blockd.block.node import BlockNode, Status
from blockd.errors import BlockError, BlockIOError
from blockd.qjson import qdict_bucket, qdict_order

IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
#: what a rule without ``iotype`` fails (QEMU leaves block-status out)
DEFAULT_IOTYPES = frozenset(("read", "write", "write-zeroes", "discard", "flush"))

#: QAPI ``BlkdebugEvent`` (QEMU 7.2).  Which ones blockd's drivers raise, and
#: where, is listed in block/README.md; the others are accepted and never fire.
EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write",
    "reftable_load", "reftable_grow", "reftable_update",
    "refblock_load", "refblock_update", "refblock_update_part", "refblock_alloc",
    "refblock_alloc_hookup", "refblock_alloc_write", "refblock_alloc_write_blocks",
    "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail",
    "pwritev_rmw_after_tail", "pwritev", "pwritev_zero", "pwritev_done",
    "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters",
    "cor_write", "cluster_alloc_space", "none",
)  # fmt: skip


@dataclasses.dataclass(eq=False)
class Rule:
    """One ``inject-error`` rule; ``offset`` is the byte the rule's ``sector`` starts at."""

    event: str
    state: int = 0
    iotypes: frozenset[str] = DEFAULT_IOTYPES
    errno: int = errno_module.EIO
    offset: int | None = None
    once: bool = False
    immediately: bool = False

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> Rule:
        """A rule from QEMU's ``BlkdebugInjectErrorOptions``."""
        event = _event(opts)
        iotype = opts.get("iotype")
        if iotype is not None and iotype not in IOTYPES:
            raise BlockError(f"Parameter 'iotype' does not accept value '{iotype}'")
        sector = int(opts.get("sector", -1))
        return cls(
            event=event,
            state=int(opts.get("state", 0)),
            iotypes=DEFAULT_IOTYPES if iotype is None else frozenset((iotype,)),
            errno=int(opts.get("errno", errno_module.EIO)),
            offset=None if sector == -1 else sector * 512,
            once=bool(opts.get("once", False)),
            immediately=bool(opts.get("immediately", False)),
        )

    def matches(self, iotype: str, offset: int, length: int) -> bool:
        if iotype not in self.iotypes:
            return False
        # QEMU compares unsigned: a negative sector other than -1 never matches
        return self.offset is None or (length > 0 and offset <= self.offset < offset + length)


@dataclasses.dataclass
class Transition:
    """One ``set-state`` rule: on ``event`` in ``state`` (0: any), go to ``new_state``."""

    event: str
    new_state: int
    state: int = 0

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> Transition:
        if "new_state" not in opts:
            raise BlockError("Parameter 'new_state' is missing")
        return cls(_event(opts), int(opts["new_state"]), int(opts.get("state", 0)))


def _event(opts: dict[str, Any]) -> str:
    event = opts.get("event")
    if event is None:
        raise BlockError("Parameter 'event' is missing")
    if event not in EVENTS:
        raise BlockError(f"Parameter 'event' does not accept value '{event}'")
    return str(event)


def rules_from_options(options: dict[str, Any]) -> tuple[list[Rule], list[Transition]]:
    """The ``inject-error`` and ``set-state`` lists of a blkdebug node's options."""
    rules = [Rule.from_options(r) for r in options.get("inject-error", [])]
    transitions = [Transition.from_options(t) for t in options.get("set-state", [])]
    return rules, transitions


#: QAPI member order of BlockdevOptionsBlkdebug and of its list elements:
#: QEMU builds its option dictionaries in this order, and the order decides
#: which of two keys in one hash bucket its JSON shows first.
_MEMBERS = (
    "image", "config", "align", "max-transfer", "opt-write-zero", "max-write-zero",
    "opt-discard", "max-discard", "inject-error", "set-state", "take-child-perms",
    "unshare-child-perms",
)  # fmt: skip
_ELEMENT_MEMBERS = {
    "inject-error": ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
    "set-state": ("event", "state", "new_state"),
}
#: QEMU's "strong" blkdebug options: those that change what the node does, so
#: that its file name must spell them out (a trailing dot: every key under it).
STRONG = (
    "config", "inject-error.", "set-state.", "align", "max-transfer", "opt-write-zero",
    "max-write-zero", "opt-discard", "max-discard",
)  # fmt: skip


def _in_qapi_order(members: tuple[str, ...], given: dict[str, Any]) -> list[str]:
    return qdict_order({m: None for m in members if m in given})


def strong_options(options: dict[str, Any], path: list[str]) -> list[tuple[str, Any]]:
    """The strong options of a blkdebug node as QEMU keeps them: flattened keys
    (``inject-error.0.event``) in the order they went into the node's options.

    ``path`` is where the node's options sat in the ``blockdev-add`` (``file``,
    ``backing.file``, ...).  QEMU flattens the whole command into one
    dictionary, then each level hands a copy (``qdict_clone_shallow``) to its
    driver, which extracts its child's keys from it by iterating it; so the
    order the child sees is that of repeated stable sorts by the hash bucket
    each key has at each level.  That order is invisible except between keys
    that share a bucket in the file name's JSON (the same member of two
    rules always do), and there it is what QEMU prints.
    """
    flat: list[tuple[str, Any]] = []
    for member in _in_qapi_order(_MEMBERS, options):
        value = options[member]
        if member in _ELEMENT_MEMBERS and isinstance(value, list):
            for i, element in enumerate(value):
                for key in _in_qapi_order(_ELEMENT_MEMBERS[member], element):
                    flat.append((f"{member}.{i}.{key}", element[key]))
        elif member != "image" and not isinstance(value, list | dict):
            flat.append((member, value))
    for level in range(len(path)):
        prefix = "".join(f"{edge}." for edge in path[level:])
        flat.sort(key=lambda item: qdict_bucket(prefix + item[0]))
    return [(k, v) for k, v in flat if any(_is_strong(k, s) for s in STRONG)]


def _is_strong(key: str, strong: str) -> bool:
    return key.startswith(strong) if strong.endswith(".") else key == strong


class BlkdebugNode(BlockNode):
    """Passes everything to ``file`` (QEMU's ``image`` child) unless a rule fires."""

    driver = "blkdebug"
    file_edge = "image"
    hears_debug_events = True
    is_filter = True

    def __init__(
        self,
        node_name: str,
        image: BlockNode,
        *,
        read_only: bool,
        rules: list[Rule] | None = None,
        transitions: list[Transition] | None = None,
        strong: list[tuple[str, Any]] | None = None,
    ) -> None:
        super().__init__(node_name, read_only=read_only, file=image)
        self.rules: list[Rule] = list(rules or [])
        self.transitions: list[Transition] = list(transitions or [])
        self.state = 1
        self._active: list[Rule] = []
        #: see :func:`strong_options`
        self.strong: list[tuple[str, Any]] = list(strong or [])
        self._reopens = 0
        self.debug_event("none")

    def filename_options(self) -> dict[str, Any]:
        """The strong options as QEMU's ``json:`` file name lists them (after
        ``driver``, before ``image``), in an order :func:`blockd.qjson.encode`
        turns into QEMU's.

        QEMU copies them out of the node's options by iterating those (newest
        key first within a bucket).  A reopen rebuilds the node's options from
        copies: the first keeps their order, and after that every second one
        turns it around (the explicitly given options, which a reopen merges
        first, are kept as a copy of the merged result).
        """
        indexed = list(enumerate(self.strong))
        turned = self._reopens >= 2 and self._reopens % 2 == 0
        indexed.sort(
            key=lambda item: (qdict_bucket(item[1][0]), item[0] if turned else -item[0])
        )
        ordered = [item for _, item in indexed]
        out: dict[str, Any] = {}
        for strong in STRONG:
            out.update((k, v) for k, v in ordered if _is_strong(k, strong))
        return out

    async def _do_reopen(self, read_only: bool) -> None:
        await super()._do_reopen(read_only)
        self._reopens += 1

    def inject(self, rule: Rule) -> None:
        self.rules.append(rule)

    def clear(self) -> None:
        self.rules.clear()
        self._active.clear()

    def debug_event(self, event: str) -> None:
        raised = [r for r in self.rules if r.event == event and r.state in (0, self.state)]
        if raised:
            self._active = raised
        # every set-state rule of the event sees the old state; the first given wins
        for t in self.transitions:
            if t.event == event and t.state in (0, self.state):
                new_state = t.new_state
                break
        else:
            return
        self.state = new_state

    async def _check(self, iotype: str, offset: int, length: int) -> None:
        rule = next((r for r in self._active if r.matches(iotype, offset, length)), None)
        if rule is None or not rule.errno:
            return
        if rule.once:
            self._active.remove(rule)
            self.rules.remove(rule)
        if not rule.immediately:
            await trio.lowlevel.checkpoint()  # the error comes back asynchronously
        raise BlockIOError(rule.errno)

    @property
    def _image(self) -> BlockNode:
        assert self.file is not None
        return self.file

    @property
    def size(self) -> int:
        return self._image.size

    @property
    def growable(self) -> bool:  # type: ignore[override]
        return self._image.growable

    async def _do_read(self, offset: int, length: int) -> bytes:
        await self._check("read", offset, length)
        return await self._image.read(offset, length)

    async def _do_write(self, offset: int, data: bytes) -> None:
        self.debug_event("pwritev")
        try:
            await self._check("write", offset, len(data))
            await self._image.write(offset, data)
        finally:
            self.debug_event("pwritev_done")

    async def _do_write_zeroes(self, offset: int, length: int) -> None:
        self.debug_event("pwritev_zero")
        try:
            await self._check("write-zeroes", offset, length)
            await self._image.write_zeroes(offset, length)
        finally:
            self.debug_event("pwritev_done")

    async def _do_discard(self, offset: int, length: int) -> None:
        await self._check("discard", offset, length)
        await self._image.discard(offset, length)

    async def _do_block_status(self, offset: int, length: int) -> tuple[Status, int]:
        await self._check("block-status", offset, length)
        return await self._image.block_status(offset, length)

    async def _do_flush(self) -> None:
        # as in QEMU, a flush with no write since the last one checks no rule
        if self._flush_gen != self._flushed_gen:
            self._flush_to_disk_event()
            await self._check("flush", 0, 0)
        await self._image.flush()

    async def _do_truncate(self, size: int) -> None:
        await self._image.truncate(size)
