"""Making new images: blockdev-create's drivers, and the overlay a snapshot needs.

The layers above ask for a file or an image by its options and never see a
driver module: the layout of a qcow2 image is the qcow2 driver's
(``drivers/qcow2/create.py``), creating a host file is the file driver's.

An image is written so that a failure part-way (a full disk) never leaves
something blockd or QEMU would open as an image: cluster 0 is zeroed first,
then every table is written and flushed, and only then the header goes into
cluster 0 and is flushed.  Until that last write the file has no qcow2 magic.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from blockd.block import workers
from blockd.block.drivers.file import FileNode
from blockd.block.drivers.file import create_file as _create_file
from blockd.block.drivers.qcow2.create import (
    DEFAULT_CLUSTER_SIZE,
    CreateError,
    Plan,
    Qcow2CreateOptions,
    plan_image,
)
from blockd.block.node import BlockNode
from blockd.errors import BlockError, BlockIOError

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "CreateError",
    "Qcow2CreateOptions",
    "Qcow2Request",
    "create_file",
    "create_qcow2_image",
    "format_qcow2",
    "validate_qcow2",
]

_UINT32_MAX = (1 << 32) - 1
_MAX_CLUSTER = 2 << 20
_MIN_CLUSTER = 512
_WRITE_BATCH = 1 << 20


async def create_file(filename: str, size: int, *, preallocation: str = "off",
                      nocow: bool = False, extent_size_hint: int | None = None) -> None:
    """blockdev-create's ``file`` driver, with QEMU's checks and texts."""
    if extent_size_hint is not None and extent_size_hint > _UINT32_MAX:
        raise CreateError("Extent size hint is too large", errno.EINVAL)
    await _create_file(filename, size, preallocation=preallocation, nocow=nocow,
                       extent_size_hint=(1 << 20) if extent_size_hint is None
                       else extent_size_hint)


@dataclass(frozen=True)
class Qcow2Request:
    """blockdev-create's qcow2 members as given (None: not given), before QEMU's checks."""

    size: int
    version: str | None = None
    cluster_size: int | None = None
    refcount_bits: int | None = None
    lazy_refcounts: bool | None = None
    preallocation: str | None = None
    compression_type: str | None = None
    backing_file: str | None = None
    backing_fmt: str | None = None
    extended_l2: bool | None = None
    data_file: object | None = None
    data_file_raw: bool | None = None
    encrypt: object | None = None
    #: why ``data_file`` names no node (QEMU looks it up among the checks)
    data_file_missing: str | None = None


def validate_qcow2(r: Qcow2Request) -> Qcow2CreateOptions:
    """QEMU 7.2's checks of a new qcow2 image, in its order and words; then the
    features blockd cannot make (refused in the words its driver uses for them)."""
    size = r.size
    if size % 512:
        raise CreateError("Image size must be a multiple of 512 bytes", errno.EINVAL)
    version = 2 if r.version == "v2" else 3
    cluster_size = DEFAULT_CLUSTER_SIZE if r.cluster_size is None else r.cluster_size
    extended_l2 = bool(r.extended_l2)
    if extended_l2:
        if version < 3:
            raise CreateError("Extended L2 entries are only supported with compatibility "
                              "level 1.1 and above (use version=v3 or greater)", errno.EINVAL)
        if cluster_size < 16384:
            raise CreateError("Extended L2 entries are only supported with cluster sizes "
                              "of at least 16384 bytes", errno.EINVAL)
    if (cluster_size & (cluster_size - 1) or not _MIN_CLUSTER <= cluster_size <= _MAX_CLUSTER):
        raise CreateError("Cluster size must be a power of two between 512 and 2048k",
                          errno.EINVAL)
    preallocation = r.preallocation or "off"
    if r.backing_file is not None and preallocation != "off" and not extended_l2:
        raise CreateError("Backing file and preallocation can only be used at the same "
                          "time if extended_l2 is on", errno.EINVAL)
    if r.backing_fmt is not None and r.backing_file is None:
        raise CreateError("Backing format cannot be used without backing file", errno.EINVAL)
    lazy = bool(r.lazy_refcounts)
    if version < 3 and lazy:
        raise CreateError("Lazy refcounts only supported with compatibility level 1.1 and "
                          "above (use version=v3 or greater)", errno.EINVAL)
    refcount_bits = 16 if r.refcount_bits is None else r.refcount_bits
    if refcount_bits > 64 or refcount_bits & (refcount_bits - 1) or refcount_bits == 0:
        raise CreateError("Refcount width must be a power of two and may not exceed 64 bits",
                          errno.EINVAL)
    if version < 3 and refcount_bits != 16:
        raise CreateError("Different refcount widths than 16 bits require compatibility "
                          "level 1.1 or above (use version=v3 or greater)", errno.EINVAL)
    if r.data_file_raw and r.data_file is None:
        raise CreateError("data-file-raw requires data-file", errno.EINVAL)
    if r.data_file_raw and r.backing_file is not None:
        raise CreateError("Backing file and data-file-raw cannot be used at the same time",
                          errno.EINVAL)
    if r.data_file is not None and version < 3:
        raise CreateError("External data files are only supported with compatibility level "
                          "1.1 and above (use version=v3 or greater)", errno.EINVAL)
    if r.data_file_missing is not None:
        raise CreateError(r.data_file_missing, errno.ENOENT)
    zstd = r.compression_type not in (None, "zlib")
    if zstd and version < 3:
        raise CreateError("Non-zlib compression type is only supported with compatibility "
                          "level 1.1 and above (use version=v3 or greater)", errno.EINVAL)
    # what QEMU would make but blockd's driver cannot open
    if r.data_file is not None:
        raise CreateError("Unsupported qcow2 feature(s): external data file", errno.ENOTSUP)
    if extended_l2:
        raise CreateError("Unsupported qcow2 feature(s): extended L2 entries", errno.ENOTSUP)
    if r.encrypt is not None:
        raise CreateError("qcow2: encrypted images are not supported", errno.ENOTSUP)
    return Qcow2CreateOptions(
        size=size, version=version, cluster_size=cluster_size, refcount_bits=refcount_bits,
        lazy_refcounts=lazy, preallocation=preallocation, zstd=zstd,
        backing_file=r.backing_file, backing_fmt=r.backing_fmt,
    )


async def format_qcow2(file: BlockNode, options: Qcow2CreateOptions) -> None:
    """Write a new qcow2 image ``options`` into ``file`` (opened read-write), as
    QEMU's qcow2 driver would; what lies beyond its writes is left alone."""
    start_length = file.size
    plan = await workers.run(lambda: plan_image(options, start_length))
    await _write_plan(file, plan, options.preallocation)


async def _write_plan(file: BlockNode, plan: Plan, preallocation: str) -> None:
    cs = plan.cluster_size
    head = plan.clusters[0]
    try:
        await file.write(0, bytes(cs))
    except BlockIOError as exc:
        raise BlockIOError(exc.errno, f"Could not write qcow2 header: {exc}") from exc
    # a failure is worded as QEMU words the step it would fail in
    step = ("Allocating clusters failed" if preallocation == "metadata"
            else "Failed to grow the L1 table")
    try:
        run_start, run = -1, bytearray()
        for c, data in plan.clusters.items():
            if c == 0:
                continue
            if run and (c * cs != run_start + len(run) or len(run) >= _WRITE_BATCH):
                await file.write(run_start, bytes(run))
                run = bytearray()
            if not run:
                run_start = c * cs
            run += data
        if run:
            await file.write(run_start, bytes(run))
        if plan.preallocate is not None:
            lo, hi = plan.preallocate
            step = "Failed to resize underlying file: " + (
                "Could not preallocate new data" if preallocation == "falloc"
                else "Could not write zeros for preallocation")
            await _preallocate(file, lo, hi, preallocation)
        if plan.length > file.size:
            await file.truncate(plan.length)
        await file.flush()
    except BlockIOError as exc:
        raise BlockIOError(exc.errno, f"Could not resize image: {step}: {exc}") from exc
    try:
        await file.write(0, bytes(head))
        await file.flush()
    except BlockIOError as exc:
        raise BlockIOError(exc.errno, f"Could not update qcow2 header: {exc}") from exc


async def _preallocate(file: BlockNode, lo: int, hi: int, mode: str) -> None:
    """The data area of a falloc/full image: reserved, or written with zeros."""
    if mode == "falloc":
        await file.write_zeroes(lo, hi - lo)
        return
    zeros = bytes(min(_WRITE_BATCH, hi - lo))
    pos = lo
    while pos < hi:
        n = min(len(zeros), hi - pos)
        await file.write(pos, zeros[:n])
        pos += n


async def create_qcow2_image(
    path: str,
    size: int,
    *,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    cluster_size: int | None = None,
    version: str | None = None,
    refcount_bits: int | None = None,
    lazy_refcounts: bool | None = None,
    preallocation: str | None = None,
    compression_type: str | None = None,
) -> None:
    """Create ``path`` as a qcow2 image, byte for byte what ``qemu-img create -f
    qcow2`` makes with the same options (``-b backing_file -F backing_fmt``;
    ``version`` "v2"/"v3"; ``compression_type`` "zlib"/"zstd"), for a new
    snapshot's overlay among others.  The file is created or emptied first;
    every check and failure is QEMU's (:class:`CreateError`,
    :class:`~blockd.errors.BlockIOError`).  Nothing runs on the event loop."""
    options = validate_qcow2(Qcow2Request(
        size=size, version=version, cluster_size=cluster_size, refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts, preallocation=preallocation,
        compression_type=compression_type, backing_file=backing_file, backing_fmt=backing_fmt,
    ))
    await create_file(path, 0)
    try:
        node = await FileNode.open("", path, read_only=False)
    except BlockError as exc:
        raise BlockIOError(errno.EIO, str(exc)) from exc
    try:
        await format_qcow2(node, options)
    finally:
        await node.close()
