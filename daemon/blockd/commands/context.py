"""What a command handler may use: the daemon's state, never the wire.

Handlers are thin: they translate validated QMP arguments into calls on the
block and job layers.  Everything they need is reachable from this context,
which the composition root (``blockd.app``) builds once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.events import EventSink
from blockd.export.exports import ExportRegistry
from blockd.jobs.registry import JobRegistry


@dataclass(frozen=True)
class CommandContext:
    events: EventSink
    graph: BlockGraph
    jobs: JobRegistry
    #: Ask the daemon to stop once the current command has been answered.
    request_shutdown: Callable[[], None]
    #: Block exports and the NBD server, sharing ``events`` and ``graph``.
    exports: ExportRegistry

    def writers(self, node: BlockNode) -> bool:
        """Whether a user outside the graph (a writable export) writes to ``node``."""
        return any(export.writable for export in self.exports.exports_of(node))


Handler = Callable[[CommandContext, Mapping[str, Any]], Awaitable[Any]]
