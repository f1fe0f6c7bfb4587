"""The qcow2 format driver, one concern per module.

On-disk formats: ``header`` (cluster 0), ``tables`` (L1/L2 entries and the
L2 cache), ``refcount`` (refcount table/blocks and cluster allocation),
``snapshots`` (the internal snapshot table), ``compress`` (compressed
clusters), ``overlap`` (which host clusters hold metadata).

The node and its parts, lowest first:

* ``inflight``: the metadata lock, pinned host clusters, guest clusters
  being allocated (what concurrent requests wait for);
* ``mapping``: L1 and cached L2 tables, extents of a guest range, block
  status, host offsets; new L2 tables and L1 entries;
* ``writeback``: L2 entries written at once or deferred to the next flush;
* ``payload``: what a write carries (bytes, or another file's extents);
* ``reading``: guest reads (own clusters, compressed, backing, zeros);
* ``allocation``: in-place writes and allocating writes (claim, fill, finish);
* ``zeroing``: zero writes and discards;
* ``writes``: each kind of change under the lock, data outside it;
* ``resize``, ``backing``, ``image_info``: growth, the header's backing
  name, the ImageInfo fields;
* ``repair``: the refcount rebuild of a dirty image before its first write;
* ``direct_path``: the NBD fast path from cached tables;
* ``node``: :class:`Qcow2Node`, the facade opening the image and handing
  each block-layer operation to the part above that owns it (import it from
  ``blockd.block.drivers.qcow2.node``: this package imports none of its
  modules, so they can import each other's without a circle through it).
"""
