"""blockdev-add, query-named-block-nodes and blockdev-del against qemu-storage-daemon 7.2.

The same images, the same commands: what a client reads back must agree,
apart from the names QEMU generates at random for implicit nodes (masked by
mapping every node to its driver and file).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd

pytestmark = pytest.mark.qsd

MiB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run([require_tool("qemu-img"), *args], check=True, capture_output=True)


def qemu_io(image: Path, *commands: str) -> None:
    argv = [require_tool("qemu-io"), "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """base.qcow2 (v3) <- mid.qcow2 (v2, 512 B clusters) <- top.qcow2, relative names."""
    qemu_img("create", "-f", "qcow2", str(tmp_path / "base.qcow2"), "64M")
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=512",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        str(tmp_path / "mid.qcow2"),
        "64M",
    )
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=1,lazy_refcounts=off",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        str(tmp_path / "top.qcow2"),
        "64M",
    )
    qemu_img("create", "-f", "raw", str(tmp_path / "plain.raw"), "1000")
    qemu_io(tmp_path / "base.qcow2", "write -P 1 0 1M")
    qemu_io(tmp_path / "mid.qcow2", "write -P 2 1M 2M", "write -z 8M 1M")
    qemu_io(tmp_path / "top.qcow2", "write -P 3 2M 1M")
    return tmp_path


def normalise(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace generated node names by (driver, file); order by the same key."""

    def key(n: dict[str, Any]) -> str:
        return f"{n['drv']}:{n['file']}"

    out = []
    for node in nodes:
        node = dict(node)
        if str(node.get("node-name", "")).startswith("#block"):
            node["node-name"] = "<auto>"
        out.append(node)
    return sorted(out, key=key)


CONVERSATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "header chain": [
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "top",
                "file": {"driver": "file", "filename": "{d}/top.qcow2"},
            },
        ),
    ],
    "explicit chain": [
        ("blockdev-add", {"driver": "file", "node-name": "f-base", "filename": "{d}/base.qcow2"}),
        (
            "blockdev-add",
            {"driver": "qcow2", "node-name": "base", "file": "f-base", "backing": None},
        ),
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "mid",
                "read-only": True,
                "file": {"driver": "file", "filename": "{d}/mid.qcow2", "node-name": "f-mid"},
                "backing": "base",
            },
        ),
        ("blockdev-del", {"node-name": "f-base"}),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-del", {"node-name": "f-mid"}),
        ("blockdev-del", {"node-name": "nosuch"}),
    ],
    "raw and unaligned file": [
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "r",
                "file": {"driver": "file", "filename": "{d}/plain.raw"},
            },
        ),
    ],
    "detect zeroes": [
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "dz",
                "detect-zeroes": "unmap",
                "discard": "unmap",
                "file": {"driver": "file", "filename": "{d}/base.qcow2", "detect-zeroes": "on"},
            },
        ),
    ],
    "no backing": [
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "alone",
                "backing": None,
                "file": {"driver": "file", "filename": "{d}/top.qcow2"},
            },
        ),
    ],
    "errors": [
        (
            "blockdev-add",
            {"driver": "qcow2", "file": {"driver": "file", "filename": "{d}/top.qcow2"}},
        ),
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "x",
                "file": {"driver": "file", "filename": "{d}/nosuch.qcow2"},
            },
        ),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "nosuchnode"}),
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "x",
                "backing": "nosuchnode",
                "file": {"driver": "file", "filename": "{d}/base.qcow2"},
            },
        ),
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "1bad",
                "file": {"driver": "file", "filename": "{d}/plain.raw"},
            },
        ),
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "a" * 32,
                "file": {"driver": "file", "filename": "{d}/plain.raw"},
            },
        ),
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "ok",
                "file": {"driver": "file", "filename": "{d}/plain.raw"},
            },
        ),
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "ok",
                "file": {"driver": "file", "filename": "{d}/plain.raw", "locking": "off"},
            },
        ),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": 5}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": {"driver": "file"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": {"driver": "nbd2"}}),
        ("blockdev-add", {"node-name": "x"}),
    ],
}


def substitute(value: Any, directory: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{d}", str(directory))
    if isinstance(value, dict):
        return {k: substitute(v, directory) for k, v in value.items()}
    return value


def run_conversation(
    daemon: DaemonProcess, steps: list[tuple[str, dict[str, Any]]], directory: Path
) -> list[Any]:
    seen: list[Any] = []
    with RawQMP(daemon.socket_path) as client:
        client.negotiate()
        for command, arguments in steps:
            reply = client.execute(command, substitute(arguments, directory), id=command)
            seen.append(reply)
        for flat in (False, True):
            nodes = client.execute("query-named-block-nodes", {"flat": flat})["return"]
            seen.append(normalise(nodes))
        seen.append(client.execute("query-block"))
    return seen


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_same_nodes_same_answers(images: Path, sock_dir: Path, name: str) -> None:
    steps = CONVERSATIONS[name]
    qsd = start_qsd(sock_dir / "qsd.sock")
    try:
        expected = run_conversation(qsd, steps, images)
    finally:
        qsd.stop()
    ours = start_blockd(sock_dir / "blockd.sock")
    try:
        actual = run_conversation(ours, steps, images)
    finally:
        ours.stop()
    for want, got in zip(expected, actual, strict=True):
        assert got == want
