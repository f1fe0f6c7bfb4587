"""List I/O (glibc lio_listio through ctypes) against plain pread/pwrite on real files."""

from __future__ import annotations

import errno
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockd.block import listio
from blockd.block.direct import DirectIO, _direct_all


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "f"
    path.write_bytes(bytes(64 * 1024))
    descriptor = os.open(path, os.O_RDWR)
    yield descriptor
    os.close(descriptor)


def test_available_where_ci_runs() -> None:
    # CI runs on Debian (glibc, 64-bit): a silent fall back to the slow loop
    # there would go unnoticed by every other test.
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and sys.maxsize > 2**32:
        assert listio.AVAILABLE


def test_scattered_writes_then_reads(fd: int) -> None:
    payload = bytes(range(256)) * 16  # a whole bytes object, as an NBD payload
    other = bytearray(b"\xaa" * 8192)
    ops: list[listio.Op] = [
        (fd, True, 40960, memoryview(payload), 0, 4096),
        (fd, True, 512, memoryview(other), 4096, 1000),
        (fd, True, 0, memoryview(payload), 100, 100),
    ]
    assert listio.transfer(ops) == [4096, 1000, 100]
    assert os.pread(fd, 4096, 40960) == payload
    assert os.pread(fd, 1000, 512) == b"\xaa" * 1000
    assert os.pread(fd, 100, 0) == payload[100:200]
    into = bytearray(6000)
    view = memoryview(into)
    reads: list[listio.Op] = [(fd, False, 40960, view, 0, 4096), (fd, False, 0, view, 5000, 100)]
    assert listio.transfer(reads) == [4096, 100]
    assert into[:4096] == payload
    assert into[5000:5100] == payload[100:200]


def test_end_of_file_and_errors_are_per_request(fd: int) -> None:
    into = memoryview(bytearray(8192))
    result = listio.transfer(
        [
            (fd, False, 64 * 1024 - 100, into, 0, 4096),  # 100 bytes left in the file
            (-1, False, 0, into, 4096, 4096),
            (fd, False, 0, into, 4096, 10),
        ]
    )
    assert result == [100, -errno.EBADF, 10]


def test_refuses_a_buffer_whose_address_it_cannot_take(fd: int) -> None:
    part = memoryview(b"x" * 100)[10:]  # read-only, and not a whole bytes object
    assert listio.transfer([(fd, True, 0, part, 0, 10), (fd, True, 10, part, 0, 10)]) is None
    assert os.pread(fd, 20, 0) == bytes(20)  # nothing was written


def test_direct_batch_finishes_what_list_io_leaves(fd: int) -> None:
    """_direct_all completes or reports what list I/O left: here a write on a bad descriptor."""
    data = b"\x22" * 4096
    jobs = [
        (DirectIO(fd, [(64 * 1024 - 2048, 2048), (0, 2048)]), True, memoryview(data)),
        (DirectIO(fd, [(8192, 4096)]), True, memoryview(data)),
        (DirectIO(-1, [(0, 10)]), True, memoryview(data)[:10]),
    ]
    errors = _direct_all(jobs)
    assert errors[:2] == [None, None]
    assert errors[2] is not None and errors[2].errno == errno.EBADF
    assert os.pread(fd, 2048, 64 * 1024 - 2048) == data[:2048]
    assert os.pread(fd, 2048, 0) == data[2048:]
    assert os.pread(fd, 4096, 8192) == data


def test_direct_batch_of_reads(fd: int) -> None:
    """Reads keep the plain calls; past the end of the file reads as zeros."""
    os.pwrite(fd, b"\x11" * 4096, 64 * 1024 - 4096)
    into = bytearray(8192)
    errors = _direct_all(
        [
            (DirectIO(fd, [(64 * 1024 - 2048, 4096)]), False, memoryview(into)[:4096]),
            (DirectIO(fd, [(64 * 1024 - 4096, 4096)]), False, memoryview(into)[4096:]),
        ]
    )
    assert errors == [None, None]
    assert into[:2048] == b"\x11" * 2048
    assert into[2048:4096] == bytes(2048)
    assert into[4096:] == b"\x11" * 4096
