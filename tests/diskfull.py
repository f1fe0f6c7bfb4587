"""A real, small file system that runs out of space: a size-limited tmpfs.

Tests of full disks need the kernel to say ENOSPC where it really would, in
the middle of whatever write the daemon happens to make, not an injected
error at a chosen call.  A tmpfs mounted for the test gives that cheaply
and in memory; a filler file takes the space a test wants gone, and giving
it back (deleting or shrinking the filler) is "an administrator freed
space".

What tmpfs does that the tests rely on:

* a write needs a free page (4 KiB on x86-64) for each page of the file it touches
  that holds nothing yet; one that fills the last page stops short, and
  the next write fails with ENOSPC;
* overwriting pages the file already has needs no space;
* ``fallocate`` (mode 0) reserves pages, all or nothing: a request for
  more than is free fails with ENOSPC and reserves none (so the filler is
  sized from ``statvfs`` exactly); tmpfs has no ``FALLOC_FL_ZERO_RANGE``
  (a zero write falls back to writing zeros, which takes pages), but
  punches holes (which give pages back).

Mounting needs root (CI runs as root): under CI a mount that fails fails
the test, elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import in_ci

MiB = 1 << 20
#: tmpfs hands out space a page at a time
PAGE = os.sysconf("SC_PAGESIZE")


@dataclass
class SmallFs:
    """A mounted tmpfs of ``size`` bytes at ``path``, with a filler file."""

    path: Path
    size: int
    _filler: int | None = field(default=None)
    _filler_size: int = 0

    def free(self) -> int:
        """Bytes free for a writer now (tmpfs counts whole pages)."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def leave(self, nbytes: int) -> None:
        """Grow the filler until exactly ``nbytes`` (whole pages) are free."""
        assert nbytes % PAGE == 0, nbytes
        if self._filler is None:
            self._filler = os.open(self.path / ".filler", os.O_RDWR | os.O_CREAT, 0o600)
        take = self.free() - nbytes
        assert take >= 0, f"only {self.free()} bytes free, cannot leave {nbytes}"
        if take:
            os.posix_fallocate(self._filler, self._filler_size, take)
            self._filler_size += take
        assert self.free() == nbytes, (self.free(), nbytes)

    def give(self, nbytes: int) -> None:
        """Free ``nbytes`` (whole pages) of the filler, as someone deleting files would."""
        assert self._filler is not None and nbytes % PAGE == 0, nbytes
        nbytes = min(nbytes, self._filler_size)
        self._filler_size -= nbytes
        os.ftruncate(self._filler, self._filler_size)

    def give_all(self) -> None:
        """Delete the filler."""
        if self._filler is not None:
            os.close(self._filler)
            self._filler = None
            self._filler_size = 0
            (self.path / ".filler").unlink()

    def filler_size(self) -> int:
        return self._filler_size


def _mount(path: Path, size: int) -> None:
    path.mkdir()
    result = subprocess.run(
        # huge=never: pages of the base size, whatever the kernel's default for shmem
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700,huge=never", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        message = (
            f"cannot mount a {size}-byte tmpfs at {path} for the full-disk tests "
            f"(they need root): {result.stderr.strip() or result.returncode}"
        )
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


def _unmount(path: Path) -> None:
    """Unmount, lazily if something (a daemon that outlived a failed test) still
    has files open there: a mount is never left behind."""
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@contextmanager
def small_fs(path: Path, size: int = 4 * MiB) -> Iterator[SmallFs]:
    """Mount a tmpfs of ``size`` bytes at ``path`` (made here) for the block, and
    unmount it after, however the block ends.

    Daemons using it must be stopped inside the block.
    """
    _mount(path, size)
    fs = SmallFs(path, size)
    try:
        yield fs
    finally:
        fs.give_all()
        _unmount(path)
