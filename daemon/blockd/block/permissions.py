"""Who may do what to a node: QEMU's permission model, for the cases blockd meets.

Every user of a node (a parent node through an edge, or an export) states what
it needs from the node and what it lets the others do.  A qcow2 node needs to
be the only writer of its file, whatever its own users want: an NBD client
writing raw bytes into that file would corrupt the image under the qcow2
node's feet.  So a new user is refused, with QEMU's words, when what it needs
is not shared by an existing user or the other way round.  Pure functions;
the graph knows the edges and applies them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

CONSISTENT_READ = 1 << 0
WRITE = 1 << 1
WRITE_UNCHANGED = 1 << 2
RESIZE = 1 << 3
GRAPH_MOD = 1 << 4
ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE | GRAPH_MOD
# what a filter hands down from its own users to its child unchanged
_PASSED_DOWN = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE

_NAMES = (
    (CONSISTENT_READ, "consistent read"),
    (WRITE, "write"),
    (WRITE_UNCHANGED, "write unchanged"),
    (RESIZE, "resize"),
)

UNNAMED_DEVICE = "an unnamed block device"


class Role(enum.Enum):
    """What a child is to its parent, which decides what the parent asks of it."""

    STORAGE = "storage"  # a format's file: its metadata and its data
    DATA = "data"  # a raw window (offset/size) onto its file: data only
    FILTERED = "filtered"  # passed through unchanged (raw, blkdebug)
    COW = "cow"  # a backing image: only ever read


@dataclass(frozen=True)
class Use:
    """One user of a node: who (as QEMU names it), through which edge, needing what."""

    user: str
    child: str
    perm: int
    shared: int
    sequence: int


def child_use(role: Role, perm: int, shared: int, writable: bool) -> tuple[int, int]:
    """(needed, shared) a parent asks of its child, given its own users' totals."""
    if role is Role.COW:
        lets = WRITE | RESIZE if shared & WRITE else 0
        return perm & CONSISTENT_READ, lets | CONSISTENT_READ | GRAPH_MOD | WRITE_UNCHANGED
    need = perm & _PASSED_DOWN
    lets = (shared & _PASSED_DOWN) | (ALL & ~_PASSED_DOWN)
    if role is Role.FILTERED:
        return need, lets
    if role is Role.STORAGE:
        if writable:
            need |= WRITE | RESIZE
        need |= CONSISTENT_READ
        lets &= ~(WRITE | RESIZE)
    lets &= ~RESIZE
    if need & WRITE_UNCHANGED:
        need |= WRITE
    if need & WRITE:
        need |= RESIZE
    return need, lets


def totals(uses: Sequence[Use]) -> tuple[int, int]:
    """What all users of a node need together, and what all of them share."""
    perm, shared = 0, ALL
    for use in uses:
        perm |= use.perm
        shared &= use.shared
    return perm, shared


def names(perm: int) -> str:
    return ", ".join(name for bit, name in _NAMES if perm & bit)


def conflict(node_name: str, uses: Sequence[Use]) -> str | None:
    """QEMU's complaint about the first pair of users that cannot coexist, if any.

    ``uses`` newest first: QEMU keeps a node's parents in that order and
    reports the first pair it meets.
    """
    for a in uses:
        for b in uses:
            if a is b or not b.perm & ~a.shared:
                continue
            return (
                f"Permission conflict on node '{node_name}': permissions "
                f"'{names(b.perm & ~a.shared)}' are both required by {b.user} "
                f"(uses node '{node_name}' as '{b.child}' child) and unshared by "
                f"{a.user} (uses node '{node_name}' as '{a.child}' child)."
            )
    return None
