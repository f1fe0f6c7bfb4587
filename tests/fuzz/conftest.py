"""Fixtures of the qcow2 metadata fuzzer and its regression cases."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.fuzz.qcow2_corpus import build
from tests.fuzz.qcow2_fuzz import Runner, base_template


@pytest.fixture(scope="session")
def qcow2_seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed images, built once per session by qemu-img and qemu-io."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("qcow2-seeds")
    build(d)
    return d


@pytest.fixture
def qcow2_runner(qcow2_seeds: Path) -> Iterator[Runner]:
    require_tool("qemu-storage-daemon")
    with tempfile.TemporaryDirectory(prefix="qf-") as name:  # short: sun_path
        short = Path(name)
        # the mutants sit next to the seeds' backing file (relative names)
        work = qcow2_seeds / f"work-{os.getpid()}-{time.monotonic_ns()}"
        work.mkdir()
        for image in qcow2_seeds.glob("*.qcow2"):
            (work / image.name).write_bytes(image.read_bytes())
        run = Runner(work, short, base_template(short))
        try:
            yield run
        finally:
            run.close()
