"""Helpers the benchmarks share: sizes, tools, source data."""

from __future__ import annotations

import json
import os
import random
import shlex
import socket
import struct
import subprocess
import time
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def parse_size(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": GiB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stdout}{proc.stderr}")
    return proc


def make_source(raw: str, size: int, tag: bytes) -> None:
    """Non-zero pseudo-random data, every 4 KiB stamped with ``tag`` and its offset."""
    block = random.Random(1).randbytes(MiB)
    with open(raw, "wb") as f:
        for off in range(0, size, MiB):
            buf = bytearray(block)
            for pos in range(0, MiB, 4 * KiB):
                struct.pack_into("<8sQ", buf, pos, tag, off + pos)
            f.write(buf[: min(MiB, size - off)])


ROOT = Path(__file__).resolve().parents[1]
#: The daemons a side-by-side benchmark runs, in the order it runs them.
CONTENDERS = ("blockd", "qsd")


def monitor_path(name: str, sock: Path, index: int) -> Path:
    """Where client ``index`` connects: blockd serves every client on one socket,
    while a QSD monitor serves one client at a time, so QSD gets one each."""
    return sock if name == "blockd" or index == 0 else sock.with_name(f"{sock.name}.{index}")


def start_daemon(
    name: str, sock: Path, clients: int = 1, args: list[str] | None = None,
    stderr: Path | None = None,
) -> subprocess.Popen[bytes]:
    """blockd or qemu-storage-daemon serving QMP on ``sock`` (and for QSD, on the
    further sockets of :func:`monitor_path`), once it accepts connections;
    ``args`` are added to its command line, its log goes to ``stderr``."""
    if name == "blockd":
        # $BLOCKD runs another build, e.g. an older commit for a before/after:
        # BLOCKD="env PYTHONPATH=/tmp/old/daemon .venv/bin/python -m blockd"
        blockd = os.environ.get("BLOCKD", str(ROOT / ".venv/bin/blockd"))
        argv = [*shlex.split(blockd), "--socket", str(sock)]
    else:
        argv = ["qemu-storage-daemon"]
        for i in range(clients):
            path = monitor_path(name, sock, i)
            argv += ["--chardev", f"socket,id=m{i},path={path},server=on,wait=off",
                     "--monitor", f"chardev=m{i}"]  # fmt: skip
    argv += args or []
    err = subprocess.DEVNULL if stderr is None else stderr.open("wb")
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    finally:
        if stderr is not None:
            err.close()
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"daemon did not start: {' '.join(argv)}")
        # the socket file can exist before the daemon listens on it
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                return proc
            except OSError:
                time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU the process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmHWM for {pid}")


def image_clean(path: Path) -> bool:
    """qemu-img check finds no corruption, leak or check error."""
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    report = json.loads(proc.stdout or "{}")
    return proc.returncode == 0 and not any(
        report.get(k, 0) for k in ("corruptions", "leaks", "check-errors")
    )


def images_equal(a: Path, b: Path) -> bool:
    """qemu-img compare: the two images read the same guest-visible data."""
    proc = subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)],
                          capture_output=True, check=False)  # fmt: skip
    return proc.returncode == 0
