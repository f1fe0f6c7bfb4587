"""The qcow2 format driver, one on-disk concept per module.

``header`` (cluster 0), ``tables`` (L1/L2 entries and the L2 cache),
``refcount`` (refcount table/blocks and cluster allocation), ``compress``
(compressed clusters) and ``node`` (the Qcow2Node tying them together).
"""

from blockd.block.drivers.qcow2.node import Qcow2Node

__all__ = ["Qcow2Node"]
