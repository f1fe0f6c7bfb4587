"""The block layer: nodes, the node graph, and the drivers that read and write images.

Nothing here knows about QMP or jobs; callers get byte-addressed async nodes and
exceptions from :mod:`blockd.errors`.
"""

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode, Status

__all__ = ["BlockGraph", "BlockNode", "Status"]
