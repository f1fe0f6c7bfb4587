"""The block layer: nodes, the node graph, and the drivers that read and write images.

Nothing here knows about QMP or jobs; callers get byte-addressed async nodes and
exceptions from :mod:`blockd.errors`.  (The package imports none of its
modules, so they can import each other's without a circle through it.)
"""
