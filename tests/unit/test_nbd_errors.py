"""The NBD error each failure is reported as: by its type and errno, never its text."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blockd.block.drivers.file import FileNode
from blockd.errors import BlockdError, BlockError, BlockIOError, ReadOnlyError
from blockd.export import protocol as p
from blockd.export.errors import nbd_error


async def test_a_write_to_a_read_only_node_is_eperm(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(65536))
    node = await FileNode.open("f", str(image), read_only=True)
    try:
        with pytest.raises(ReadOnlyError) as caught:
            await node.write(0, b"x" * 512)
        with pytest.raises(ReadOnlyError):
            await node.write_zeroes(0, 512)
    finally:
        await node.close()
    assert nbd_error(caught.value) == p.EPERM
    assert image.read_bytes() == bytes(65536)


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (BlockIOError(errno.ENOSPC), p.ENOSPC),
        (BlockIOError(errno.EDQUOT), p.ENOSPC),
        (BlockIOError(errno.EROFS), p.EPERM),
        (BlockIOError(errno.ENXIO), p.EINVAL),  # QEMU: an unknown errno is EINVAL
        (OSError(errno.EIO, "Input/output error"), p.EIO),
        (ReadOnlyError("whatever it says"), p.EPERM),
        # the text does not matter: only the type does
        (BlockError("Block node 'x' is read-only"), p.EIO),
        (BlockdError("read-only"), p.EIO),
        (RuntimeError("read-only"), p.EIO),
    ],
)
def test_mapping_goes_by_type_and_errno(err: BaseException, expected: int) -> None:
    assert nbd_error(err) == expected
