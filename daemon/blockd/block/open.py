"""Opening nodes from ``blockdev-add`` options, including header-named backing chains.

Everything a failed open created is closed and unregistered again, so a
refused ``blockdev-add`` leaves the graph exactly as it was.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from blockd.block.blkdebug import BlkdebugNode, rules_from_options, strong_options
from blockd.block.drivers.file import FileNode, lock_image, run_io
from blockd.block.drivers.qcow2.node import Qcow2Node
from blockd.block.drivers.raw import RawNode
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import BlockError, BlockIOError, ImageError

log = logging.getLogger(__name__)

_FORMATS = ("raw", "qcow2")


class _Opening:
    """Bookkeeping for one top-level open: what to undo, which files are in the chain."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self.created: list[BlockNode] = []
        self.chain_files: list[str] = []
        self.path: list[str] = []  # where in the nested options we are, for messages
        self.force_share = False  # inherited by implicitly opened children
        #: Child files opened but not locked yet: their parent locks them.
        self.unlocked: list[FileNode] = []

    def param(self, name: str) -> str:
        return ".".join([*self.path, name])

    async def rollback(self) -> None:
        for node in reversed(self.created):
            if node.node_name in self.graph and self.graph.get(node.node_name) is node:
                await self.graph.close_node(node)
            else:
                await node.close()


async def open_node(graph: BlockGraph, options: dict[str, Any]) -> BlockNode:
    """Open the node described by ``options`` (already schema-validated) and register it."""
    ctx = _Opening(graph)
    ctx.force_share = bool(options.get("force-share", False))
    if ctx.force_share and not options.get("read-only", False):
        raise BlockError("force-share=on can only be used with read-only images")
    try:
        return await _open(ctx, options, read_only=bool(options.get("read-only", False)))
    except BaseException:
        await ctx.rollback()
        raise


def _name(ctx: _Opening, options: dict[str, Any]) -> str:
    name = options.get("node-name")
    if name is None:
        return ctx.graph.auto_name()
    ctx.graph.check_new_name(str(name))
    return str(name)


async def _open(ctx: _Opening, options: dict[str, Any], *, read_only: bool) -> BlockNode:
    node = await _open_driver(ctx, options, read_only=read_only)
    node.detect_zeroes = str(options.get("detect-zeroes", "off"))
    node.unmap = options.get("discard", "ignore") == "unmap"
    return node


async def _open_driver(ctx: _Opening, options: dict[str, Any], *, read_only: bool) -> BlockNode:
    driver = options.get("driver")
    if driver == "file":
        return await _open_file(ctx, options, read_only)
    if driver in _FORMATS:
        return await _open_format(ctx, str(driver), options, read_only)
    if driver == "blkdebug":
        return await _open_blkdebug(ctx, options, read_only)
    if driver is None:
        raise BlockError(f"Parameter '{ctx.param('driver')}' is missing")
    raise BlockError(f"Parameter '{ctx.param('driver')}' does not accept value '{driver}'")


async def _open_file(ctx: _Opening, options: dict[str, Any], read_only: bool) -> BlockNode:
    name = _name(ctx, options)
    filename = options.get("filename")
    if not isinstance(filename, str):
        raise BlockError(f"Parameter '{ctx.param('filename')}' is missing")
    if "\0" in filename:
        # QEMU carries a NUL inside a string as the bytes C0 80 (modified
        # UTF-8), so its open() looks for a file nobody has; the OS cannot
        # even be asked about a name with a NUL.
        raise ImageError(f"Could not open '{filename}': {os.strerror(errno.ENOENT)}")
    locking = options.get("locking", "auto") != "off"
    # As in QEMU, a child's file is locked only once its parent takes it, so
    # the parent's own name is checked before a lock conflict is reported.
    deferred = locking and bool(ctx.path)
    node = await FileNode.open(name, filename, read_only=read_only,
                               locking=locking and not deferred,
                               force_share=bool(options.get("force-share", False)))
    ctx.created.append(node)
    ctx.graph.add(node)
    if deferred:
        ctx.unlocked.append(node)
    return node


async def _take(ctx: _Opening, child: BlockNode) -> None:
    """Lock a child file opened for this parent, as QEMU does when it attaches it."""
    if isinstance(child, FileNode) and child in ctx.unlocked:
        ctx.unlocked.remove(child)
        await run_io(lambda: lock_image(child.fd, child.read_only, child.force_share))
        child.locking = True


async def _open_blkdebug(ctx: _Opening, options: dict[str, Any], read_only: bool) -> BlockNode:
    name = _name(ctx, options)
    if "image" not in options:
        raise BlockError(f"Parameter '{ctx.param('image')}' is missing")
    rules, transitions = rules_from_options(options)
    image, implicit = await _child_ref(ctx, options["image"], read_only=read_only, what="image")
    for member in ("inject-error", "set-state"):
        if options.get(member) == []:
            # QEMU's option flattening keeps an empty list as it is, where the
            # driver looks for numbered keys, so the option is left unused.
            raise BlockError(f"Block protocol 'blkdebug' doesn't support the option '{member}'")
    await _take(ctx, image)
    node = BlkdebugNode(
        name,
        image,
        read_only=read_only,
        rules=rules,
        transitions=transitions,
        strong=strong_options(options, ctx.path),
    )
    ctx.created.append(node)
    ctx.graph.add(node, [image] if implicit else [])
    return node


async def _child_ref(
    ctx: _Opening, ref: Any, *, read_only: bool, what: str
) -> tuple[BlockNode, bool]:
    """Resolve a BlockdevRef: (node, opened implicitly by us)."""
    if isinstance(ref, str):
        node = ctx.graph.get(ref)
        if node is None:
            raise BlockError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        return node, False
    if isinstance(ref, dict):
        opts = dict(ref)
        opts.setdefault("read-only", read_only)
        # As in QEMU, only the node a client names ignores discards by default:
        # what lies below honours those its parent lets through.
        opts.setdefault("discard", "unmap")
        if ctx.force_share:
            opts.setdefault("force-share", True)
        ctx.path.append(what)
        try:
            return await _open(ctx, opts, read_only=bool(opts["read-only"])), True
        finally:
            ctx.path.pop()
    raise BlockError(f"Parameter '{ctx.param(what)}' is missing")


async def _open_format(
    ctx: _Opening, driver: str, options: dict[str, Any], read_only: bool
) -> BlockNode:
    if "file" not in options:
        _name(ctx, options)
        raise BlockError(f"Parameter '{ctx.param('file')}' is missing")
    # QEMU opens the file child before it names the parent.
    file, file_implicit = await _child_ref(ctx, options["file"], read_only=read_only,
                                           what="file")
    name = _name(ctx, options)
    # A read-write qcow2 node needs to write its file; a raw one only when its
    # own users write (the permission check refuses a read-only file then).
    if driver == "qcow2":
        ctx.graph.check_new_parent(name, file, Qcow2Node.file_role, not read_only)
    await _take(ctx, file)
    implicit = [file] if file_implicit else []
    node: BlockNode
    if driver == "raw":
        node = RawNode(
            name,
            file,
            read_only=read_only,
            offset=int(options.get("offset", 0)),
            size=options.get("size"),
        )
        ctx.created.append(node)
    else:
        qnode = await Qcow2Node.open(name, file, read_only=read_only)
        node = qnode
        ctx.created.append(node)
        backing, backing_implicit = await _open_backing(ctx, qnode, options)
        node.backing = backing
        if backing is not None and backing_implicit:
            implicit.append(backing)
    ctx.graph.add(node, implicit)
    if isinstance(options.get("backing"), dict):
        ctx.graph.note_backing_given(node)
    return node


async def _open_backing(
    ctx: _Opening, node: Qcow2Node, options: dict[str, Any]
) -> tuple[BlockNode | None, bool]:
    if "backing" in options:
        ref = options["backing"]
        if ref == "":
            # QEMU still takes the old spelling of "no backing", with a warning.
            log.warning('Use of "backing": "" is deprecated; use "backing": null instead')
            ref = None
        if ref is None:
            return None, False
        try:
            return await _child_ref(ctx, ref, read_only=True, what="backing")
        except BlockError as exc:
            raise _backing_error(exc) from exc
    if not node.backing_file:
        return None, False
    try:
        return await _open_header_backing(ctx, node), True
    except BlockError as exc:
        raise _backing_error(exc) from exc


def _backing_error(exc: BlockError) -> BlockError:
    """The same kind of error, worded as QEMU words a failed backing open."""
    text = f"Could not open backing file: {exc}"
    if isinstance(exc, BlockIOError):
        return BlockIOError(exc.errno, text)
    if isinstance(exc, ImageError):
        return ImageError(text)
    return BlockError(text)


def _resolve_backing_name(overlay: str, backing: str) -> str:
    if backing.startswith("json:"):
        raise ImageError(f"'{backing}': json: pseudo-filenames are not supported")
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(overlay), backing)


async def _open_header_backing(ctx: _Opening, node: Qcow2Node) -> BlockNode:
    assert node.backing_file is not None
    overlay = node.filename
    if not ctx.chain_files:
        ctx.chain_files.append(os.path.realpath(overlay))
    path = _resolve_backing_name(overlay, node.backing_file)
    fmt = node.backing_format
    if fmt is None:
        # QEMU would probe; probing a raw image can be a security hole, so refuse
        raise ImageError(
            f"Backing file format of '{overlay}' is not recorded in the image header "
            "(probing is not supported; set it with 'qemu-img rebase -u -F')"
        )
    if fmt not in _FORMATS:
        raise ImageError(f"Unknown driver '{fmt}'")
    real = os.path.realpath(path)
    if real in ctx.chain_files:
        raise ImageError(f"Backing file '{path}' creates a loop in the backing chain")
    ctx.chain_files.append(real)
    return await _open(
        ctx,
        {
            "driver": fmt,
            "read-only": True,
            "discard": "unmap",
            "file": {"driver": "file", "filename": path, "read-only": True, "discard": "unmap"},
        },
        read_only=True,
    )
