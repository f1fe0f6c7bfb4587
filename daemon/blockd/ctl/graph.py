"""The node graph as a person wants to read it, rebuilt from QMP queries.

QMP names a node's backing image and its protocol file by file name, not by
node name (``query-named-block-nodes`` nests image information, and gives
``json:{...}`` pseudo-filenames for images with an explicit backing), so the
links are found by matching plain file names, driver and chain depth.  When
no open node matches, the file name itself is shown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Node:
    name: str
    driver: str
    file: str
    size: int | None
    allocated: int | None
    read_only: bool
    depth: int
    #: Node name of the backing node when it is open, else its file name; "" if none.
    backing: str = ""
    backing_is_node: bool = False
    users: list[str] = field(default_factory=list)
    raw: Mapping[str, Any] = field(default_factory=dict)


def plain_filename(name: str) -> str:
    """The host file behind a QMP file name, ``json:{...}`` pseudo-names included."""
    if not name.startswith("json:"):
        return name
    try:
        options: Any = json.loads(name[len("json:") :])
    except ValueError:
        return name
    while isinstance(options, dict):
        if isinstance(options.get("filename"), str):
            return str(options["filename"])
        options = options.get("file")
    return name


def build(infos: Sequence[Mapping[str, Any]], exports: Sequence[Mapping[str, Any]]) -> list[Node]:
    """Nodes from ``query-named-block-nodes``, linked, with their users filled in."""
    nodes = [_node(info) for info in infos]
    by_file: dict[tuple[str, str], list[Node]] = {}
    for node in nodes:
        by_file.setdefault((node.driver, node.file), []).append(node)
    for node in nodes:
        backing = node.raw.get("image", {}).get("backing-image")
        if backing is not None:
            target = plain_filename(str(backing.get("filename", "")))
            candidates = [
                c
                for c in by_file.get((str(backing.get("format", "")), target), [])
                if c.depth == node.depth - 1 and c is not node
            ]
            if candidates:
                node.backing, node.backing_is_node = candidates[0].name, True
                candidates[0].users.append(f"backing of {node.name}")
            else:
                node.backing = target
        if node.driver != "file":
            children = [c for c in by_file.get(("file", node.file), []) if c.depth == 0]
            if children:
                children[0].users.append(f"file of {node.name}")
    names = {node.name: node for node in nodes}
    for export in exports:
        exported = names.get(str(export.get("node-name")))
        if exported is not None:
            exported.users.append(f"export {export.get('id')}")
    return nodes


def _node(info: Mapping[str, Any]) -> Node:
    image = info.get("image", {})
    driver = str(info.get("drv", ""))
    size = image.get("virtual-size")
    return Node(
        name=str(info.get("node-name", "")),
        driver=driver,
        file=plain_filename(str(info.get("file", ""))),
        size=int(size) if size is not None else None,
        allocated=image.get("actual-size"),
        read_only=bool(info.get("ro", False)),
        depth=int(info.get("backing_file_depth", 0)),
        raw=info,
    )


def chain(nodes: Sequence[Node], start: str) -> list[Node]:
    """``start`` and its backing nodes, top first (stops where a backing is not open)."""
    names = {node.name: node for node in nodes}
    result = [names[start]]
    while result[-1].backing_is_node and result[-1].backing not in {n.name for n in result}:
        result.append(names[result[-1].backing])
    return result
