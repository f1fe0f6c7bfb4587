"""Bytes that are not UTF-8 go out as QEMU sends them: U+FFFD, never a lone surrogate.

An image header's backing file name is raw bytes.  blockd keeps such bytes as
lone surrogates internally (so a commit writes the same name back), but a
strict JSON client rejects a ``\\udcff`` escape; QEMU replaces each invalid
run with U+FFFD.  The images are made by qemu-img and patched in place: the
backing name's placeholder bytes become 0xff, truncated, overlong,
surrogate, noncharacter and out-of-range sequences (and two that QEMU passes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import qemu_img

pytestmark = pytest.mark.qsd

BAD_NAMES = (
    b"\xff", b"\xe2\x82-", b"\xed\xa0\x80", b"\xc1\x81", b"\xef\xbf\xbe", b"\xf8\x88\x80\x80\x80",
    b"\xc0\x80", b"\x80\x80", b"\xf0\x9f\x98\x80",
)


def patch_backing_name(image: Path, marker: bytes, replacement: bytes) -> None:
    data = bytearray(image.read_bytes())
    at = data.index(marker)
    data[at : at + len(marker)] = replacement
    image.write_bytes(bytes(data))


def make_images(d: Path) -> list[Path]:
    """Overlays whose header names a backing file with bad bytes in its name."""
    overlays = []
    for i, bad in enumerate(BAD_NAMES):
        marker = b"X" * len(bad)
        base = d / f"base{i}-{marker.decode()}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
        overlay = d / f"top{i}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
        patch_backing_name(overlay, marker, bad)
        # the base under its bad name, so that the backing chain opens too
        os.rename(base, os.fsencode(base).replace(marker, bad))
        overlays.append(overlay)
    return overlays


def replies(start: Callable[[Path], DaemonProcess], d: Path) -> list[Any]:
    sock = d / "qmp.sock"
    daemon = start(sock)
    out: list[Any] = []
    try:
        with RawQMP(sock) as qmp:
            qmp.negotiate()
            for i, overlay in enumerate(make_images(d)):
                file = {"driver": "file", "filename": str(overlay)}
                for backing in ({"backing": None}, {}):
                    args = {"driver": "qcow2", "node-name": f"n{i}", "file": file, **backing}
                    qmp.send(json.dumps({"execute": "blockdev-add", "arguments": args}))
                    out.append(qmp.read_line())
                    qmp.send(json.dumps({"execute": "query-named-block-nodes"}))
                    line = qmp.read_line()
                    # what a strict client needs: the text decodes to valid Unicode
                    json.dumps(json.loads(line), ensure_ascii=False).encode("utf-8")
                    out.append(line)
                    qmp.send(json.dumps({"execute": "blockdev-del",
                                         "arguments": {"node-name": f"n{i}"}}))  # fmt: skip
                    out.append(qmp.read_line())
    finally:
        daemon.stop()
    return out


def normalise(lines: list[bytes], d: Path) -> list[Any]:
    """Replies as data, paths made alike, generated names and sizes that differ left out."""
    out = []
    for line in lines:
        text = line.decode("ascii").replace(json.dumps(str(d))[1:-1], "D")
        reply = json.loads(text)
        if isinstance(reply.get("return"), list):
            reply = [(n["file"], n["drv"], n["image"].get("backing-filename"),
                      n["image"].get("full-backing-filename"), n.get("backing_file"))
                     for n in reply["return"]]  # fmt: skip
        out.append(reply)
    return out


def test_bad_bytes_sent_as_qsd_sends_them(sock_dir: Path) -> None:
    require_tool("qemu-storage-daemon")
    results = []
    for name, start in (("qsd", start_qsd), ("blockd", start_blockd)):
        d = sock_dir / name
        d.mkdir()
        results.append(normalise(replies(start, d), d))
    qsd, blockd = results
    assert blockd == qsd
    assert "\ufffd" in str(qsd)
