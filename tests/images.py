"""Real images for tests, made and judged by qemu's own tools."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import require_tool

MiB = 1 << 20


def qemu_img(*args: str) -> str:
    result = subprocess.run(
        [require_tool("qemu-img"), *args], check=True, capture_output=True, text=True
    )
    return result.stdout


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> str:
    argv = [require_tool("qemu-io"), "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, str(image)], check=True, capture_output=True, text=True)
    return result.stdout


def create(path: Path, size: str = "64M", backing: str | None = None, options: str = "") -> Path:
    argv = ["create", "-q", "-f", "qcow2"]
    if options:
        argv += ["-o", options]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    qemu_img(*argv, str(path), *([size] if size else []))
    return path


def chain(
    d: Path, base: tuple[str, ...], mid: tuple[str, ...], top: tuple[str, ...]
) -> tuple[Path, Path, Path]:
    """base.qcow2 <- mid.qcow2 <- top.qcow2 in ``d`` (relative backing names),
    each filled by its qemu-io commands."""
    images = []
    backing = None
    for name, commands in (("base", base), ("mid", mid), ("top", top)):
        image = create(d / f"{name}.qcow2", backing=backing)
        if commands:
            qemu_io(image, *commands)
        images.append(image)
        backing = image.name
    return images[0], images[1], images[2]


def guest_view(image: Path, out: Path) -> Path:
    """The chain's data as a raw file (qemu-img convert is the reference reader)."""
    qemu_img("convert", "-O", "raw", str(image), str(out))
    return out


def check(image: Path) -> dict[str, Any]:
    """qemu-img check's verdict; asserts there is no corruption and no leak."""
    result = subprocess.run(
        [require_tool("qemu-img"), "check", "--output=json", str(image)],
        capture_output=True,
        text=True,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


def same_data(raw: Path, image: Path) -> bool:
    result = subprocess.run(
        [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(raw), str(image)],
        capture_output=True,
        text=True,
    )
    return result.returncode == 0


def backing_of(image: Path) -> str | None:
    info = json.loads(qemu_img("info", "--output=json", "-U", str(image)))
    name: str | None = info.get("backing-filename")
    return name


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_consistent(image: Path) -> dict[str, Any]:
    """qemu-img check after a crash: leaked clusters are allowed, corruption is not."""
    result = subprocess.run(
        [require_tool("qemu-img"), "check", "--output=json", str(image)],
        capture_output=True,
        text=True,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode in (0, 3), report  # 3: leaks only
    assert report.get("corruptions", 0) == 0, report
    return report


def nbd_io(socket_path: Path, export: str, *commands: str) -> subprocess.CompletedProcess[str]:
    """qemu-io (raw) against an NBD export on a Unix socket; the caller judges the result."""
    argv = [require_tool("qemu-io"), "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    uri = f"nbd+unix:///{export}?socket={socket_path}"
    return subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)
