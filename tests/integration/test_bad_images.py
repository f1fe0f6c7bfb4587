"""Bad images through QMP: a clear GenericError, the file untouched, the daemon up."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, RawQMP
from tests.images import create, digest, qemu_img, qemu_io


def patch(fmt: str, offset: int, *values: int) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(fmt, *values))

    return apply


def truncate(size: int) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with open(path, "r+b") as f:
            f.truncate(size)

    return apply


CASES = {
    "bad magic": (patch(">I", 0, 0x12345678), "not in qcow2 format"),
    "truncated": (truncate(60), "too short"),
    "cluster bits": (patch(">I", 20, 30), "Unsupported cluster size"),
    "L1 past end of file": (patch(">Q", 40, 1 << 40), "Invalid L1 table offset"),
    "L1 in the header": (patch(">Q", 40, 0), "Invalid L1 table offset"),
    "refcount table past end of file": (patch(">Q", 48, 1 << 40), "reference count table"),
    "refcount width": (patch(">I", 96, 9), "Reference count entry width too large"),
    "unknown incompatible bit": (patch(">Q", 72, 1 << 40), "Unknown incompatible feature"),
    "encrypted": (patch(">I", 32, 2), "encrypted"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_image_is_refused(blockd: DaemonProcess, tmp_path: Path, case: str) -> None:
    damage, words = CASES[case]
    image = create(tmp_path / "bad.qcow2", "16M")
    qemu_io(image, "write -P 1 0 1M")
    damage(image)
    before = digest(image)
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        args = {
            "driver": "qcow2",
            "node-name": "bad",
            "file": {"driver": "file", "filename": str(image)},
        }
        reply = client.execute("blockdev-add", args)
        assert reply["error"]["class"] == "GenericError"
        assert words.lower() in reply["error"]["desc"].lower(), reply
        # Nothing was left open, and the daemon carries on.
        assert client.execute("query-named-block-nodes") == {"return": []}
        assert "qemu" in client.execute("query-version")["return"]
    assert digest(image) == before


def test_backing_loop_and_missing_backing(blockd: DaemonProcess, tmp_path: Path) -> None:
    a = create(tmp_path / "a.qcow2", "16M")
    create(tmp_path / "b.qcow2", "16M", backing="a.qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(a))
    create(tmp_path / "gone.qcow2", "16M")
    orphan = create(tmp_path / "orphan.qcow2", "16M", backing="gone.qcow2")
    (tmp_path / "gone.qcow2").unlink()
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        loop = client.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": "a", "file": {"driver": "file", "filename": str(a)}},
        )
        assert loop["error"]["class"] == "GenericError"
        assert "loop" in loop["error"]["desc"]
        missing = client.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "o",
                "file": {"driver": "file", "filename": str(orphan)},
            },
        )
        assert missing["error"]["desc"] == (
            f"Could not open backing file: Could not open '{tmp_path / 'gone.qcow2'}': "
            "No such file or directory"
        )
        assert client.execute("query-named-block-nodes") == {"return": []}
