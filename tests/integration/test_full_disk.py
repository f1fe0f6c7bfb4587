"""blockd on a disk that fills up, through its real interfaces: NBD clients and commit jobs.

The images live on a small tmpfs (``tests/diskfull.py``) that a filler file
has filled.  Small clusters (512 bytes, 64-bit refcounts) make almost every
write allocate metadata: an L2 table per 32 KiB of guest, a refcount block
per 32 KiB of file, a bigger refcount table at 2 MiB.  Each time the disk
refuses a write, a few pages are freed and the same work is tried again, so
the failures land all along the way of the allocations the driver makes.
Judged by qemu-img (check, convert) against a model of what succeeded;
the NBD client must see ENOSPC (never EIO), and the daemon must go on
serving and, once space is back, writing.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import require_system_module, require_tool
from tests.diskfull import PAGE, SmallFs
from tests.helpers import DaemonProcess, RawQMP, start_blockd
from tests.images import (
    backing_of,
    check,
    create,
    guest_view,
    nbd_io,
    qemu_img,
    qemu_io,
    same_data,
)

MiB = 1 << 20
KiB = 1 << 10
SMALL_CLUSTERS = "cluster_size=512,refcount_bits=64"


def check_open(image: Path) -> None:
    """qemu-img check of an image blockd has open (after a flush): no corruption, no leak."""
    result = subprocess.run(
        [require_tool("qemu-img"), "check", "-U", "--output=json", str(image)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[DaemonProcess, RawQMP, Path]]:
    """One blockd for the module (a start costs 1-3 s on a loaded machine), its QMP
    connection and its NBD server's socket; each test closes what it opened."""
    with tempfile.TemporaryDirectory(prefix="bd-") as name:  # short: sockets live in it
        sock_dir = Path(name)
        process = start_blockd(sock_dir / "qmp.sock")
        try:
            with RawQMP(process.socket_path) as qmp:
                qmp.negotiate()
                addr = {"addr": {"type": "unix", "data": {"path": str(sock_dir / "nbd.sock")}}}
                assert qmp.execute("nbd-server-start", addr) == {"return": {}}
                yield process, qmp, sock_dir / "nbd.sock"
        finally:
            process.stop()
        # a blockd started here is not watched by the per-test check (conftest)
        assert not process.internal_errors()


@contextmanager
def served(qmp: RawQMP, image: Path) -> Iterator[None]:
    """``image`` as node d, exported writable as "d"; closed again after the block."""
    node = {"driver": "qcow2", "node-name": "d", "discard": "unmap",
            "file": {"driver": "file", "filename": str(image)}}  # fmt: skip
    assert qmp.execute("blockdev-add", node) == {"return": {}}
    try:
        export = {"type": "nbd", "id": "e", "node-name": "d", "writable": True}
        assert qmp.execute("block-export-add", export) == {"return": {}}
        try:
            yield
        finally:
            # hard: the client may have gone without blockd having seen it go yet
            assert qmp.execute("block-export-del", {"id": "e", "mode": "hard"}) == {"return": {}}
            qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
    finally:
        assert qmp.execute("blockdev-del", {"node-name": "d"}) == {"return": {}}
        qmp.events.clear()


#: Random writes, zero writes and trims through libnbd, each retried until it
#: goes through: on ENOSPC the client frees one page of the filler (argv[2],
#: argv[3] bytes) itself and tries again.  Prints the errors seen, then
#: writes its model of the disk to argv[4].
SWEEP = """
import json, nbd, os, random, sys
uri, filler, filler_size, model_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
model = bytearray(size)
rng = random.Random(7)
errors = {}
for i in range(90):
    op = rng.choice(["write"] * 5 + ["zero", "trim"])
    off = rng.randrange(size // 512) * 512
    n = min(size - off, rng.choice([512, 4096, 2048, 64 * 1024]))
    data = bytes([rng.randrange(1, 256)]) * n
    while True:
        try:
            if op == "write":
                h.pwrite(data, off)
            elif op == "zero":
                h.zero(n, off)
            else:
                h.trim(n, off)
            break
        except nbd.Error as e:
            errors[e.errno] = errors.get(e.errno, 0) + 1
            if e.errno != "ENOSPC" or filler_size == 0:
                raise
            filler_size -= os.sysconf("SC_PAGESIZE")
            os.truncate(filler, filler_size)
    if op == "write":
        model[off:off + n] = data
    elif op == "zero":
        model[off:off + n] = bytes(n)
    else:
        lo, hi = -(-off // 512) * 512, (off + n) // 512 * 512
        model[lo:hi] = bytes(max(0, hi - lo))
    if i % 30 == 29:
        h.flush()
        assert h.pread(size, 0) == model
h.flush()
open(model_path, "wb").write(model)
print(json.dumps(errors))
"""


def test_nbd_client_writing_onto_a_full_disk_gets_enospc_at_every_allocation(
    small_fs: SmallFs, daemon: tuple[DaemonProcess, RawQMP, Path], tmp_path: Path
) -> None:
    image = create(small_fs.path / "disk.qcow2", "4M", options=SMALL_CLUSTERS)
    small_fs.leave(0)
    filler = small_fs.path / ".filler"
    _process, qmp, nbd_sock = daemon
    with served(qmp, image):
        result = subprocess.run(
            [require_system_module("nbd"), "-c", textwrap.dedent(SWEEP),
             f"nbd+unix:///d?socket={nbd_sock}", str(filler),
             str(small_fs.filler_size()), str(tmp_path / "model.raw")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        errors = json.loads(result.stdout)  # errno name -> count
        assert set(errors) == {"ENOSPC"} and errors["ENOSPC"] > 100, errors
        check_open(image)
        [export] = qmp.execute("query-block-exports")["return"]
        assert export["node-name"] == "d"
    check(image)
    assert same_data(tmp_path / "model.raw", image)


#: Writes into clusters that are allocated but whose pages the file does not
#: hold yet (preallocation=metadata): blockd writes them in place, on the
#: export's fast path, so the file system refuses the data write itself.
IN_PLACE = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"\\x77" * 4096, 1024 * 1024)
except nbd.Error as e:
    print(e.errno)
print(h.pread(4096, 1024 * 1024) == bytes(4096), flush=True)
sys.stdin.readline()
h.pwrite(b"\\x77" * 4096, 1024 * 1024)
h.flush()
print(h.pread(4096, 1024 * 1024) == b"\\x77" * 4096)
"""


def test_in_place_write_into_a_hole_on_a_full_disk(
    small_fs: SmallFs, daemon: tuple[DaemonProcess, RawQMP, Path]
) -> None:
    image = create(small_fs.path / "disk.qcow2", "2M", options="preallocation=metadata")
    [extent] = json.loads(qemu_img("map", "--output=json", str(image)))
    assert extent["data"] and extent["zero"]  # allocated, and a hole in the file
    small_fs.leave(0)
    _process, qmp, nbd_sock = daemon
    with served(qmp, image):
        client = subprocess.Popen(
            [require_system_module("nbd"), "-c", textwrap.dedent(IN_PLACE),
             f"nbd+unix:///d?socket={nbd_sock}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdout is not None
        assert [client.stdout.readline().strip() for _ in range(2)] == ["ENOSPC", "True"]
        small_fs.give_all()
        out, err = client.communicate("go\n", timeout=60)
        assert client.returncode == 0, err
        assert out.split() == ["True"]
    check(image)


@pytest.mark.parametrize("active", [False, True], ids=["intermediate", "active"])
def test_commit_into_a_full_base_pauses_until_space_is_freed(
    small_fs: SmallFs, daemon: tuple[DaemonProcess, RawQMP, Path], tmp_path: Path, active: bool
) -> None:
    """on-error enospc: every refusal pauses the job with io-status nospace, base
    stays sound (checked while open), and freeing a few pages and resuming takes
    it on; it completes with the guest view intact.  In the active commit the
    guest writes through the export while the job is paused."""
    base = create(small_fs.path / "base.qcow2", "4M", options=SMALL_CLUSTERS)
    mid = create(tmp_path / "mid.qcow2", "4M", backing=str(base))
    top = create(tmp_path / "top.qcow2", "4M", backing="mid.qcow2")
    qemu_io(top if active else mid, *(f"write -P {i + 1} {i * 192}k 64k" for i in range(20)))
    model = guest_view(top, tmp_path / "model.raw")
    small_fs.leave(0)
    _process, qmp, nbd_sock = daemon
    try:
        for name, backing, img in (("base", None, base), ("mid", "base", mid), ("top", "mid", top)):
            file = {"driver": "file", "filename": str(img)}
            args = {"driver": "qcow2", "node-name": name, "read-only": name != "top",
                    "backing": backing, "file": file}  # fmt: skip
            assert qmp.execute("blockdev-add", args) == {"return": {}}
        job = {"job-id": "j", "device": "top", "on-error": "enospc"}
        if active:
            export = {"type": "nbd", "id": "e", "node-name": "top", "writable": True}
            assert qmp.execute("block-export-add", export) == {"return": {}}
        else:
            job["top-node"] = "mid"
        assert qmp.execute("block-commit", job) == {"return": {}}
        pauses = 0
        while (event := next_job_event(qmp)) == "BLOCK_JOB_ERROR":
            pauses += 1
            qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="paused")
            [info] = qmp.execute("query-block-jobs")["return"]
            assert (info["status"], info["io-status"]) == ("paused", "nospace"), info
            if pauses % 8 == 1:
                check_open(base)
                if active:  # the guest goes on writing to top meanwhile
                    write = f"write -P {0x80 + pauses} {pauses * 40}k 12k"
                    assert nbd_io(nbd_sock, "top", write).returncode == 0
                    qemu_io(model, write, fmt="raw")
            assert small_fs.filler_size(), "still no space with the filler gone"
            small_fs.give(7 * PAGE)  # 7: the failures fall at varying points
            assert qmp.execute("block-job-resume", {"device": "j"}) == {"return": {}}
        if event == "BLOCK_JOB_READY":
            assert qmp.execute("block-job-complete", {"device": "j"}) == {"return": {}}
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
        assert "error" not in done["data"]
        qmp.wait_event("JOB_STATUS_CHANGE", id="j", status="null")
    finally:
        if qmp.execute("query-block-exports")["return"]:
            qmp.execute("block-export-del", {"id": "e", "mode": "hard"})
            qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
        for name in ("top", "mid", "base"):
            qmp.execute("blockdev-del", {"node-name": name})
        qmp.events.clear()
    assert pauses > 10
    check(base)
    if active:
        assert same_data(model, base)  # base serves the disk now
    else:
        assert backing_of(top) == str(base)
        assert same_data(model, top)


def next_job_event(qmp: RawQMP) -> str:
    """Forget the events so far and wait for job j's next error, readiness or end."""
    qmp.events.clear()
    while True:
        event = qmp.read()
        qmp.events.append(event)
        name: str = event["event"]
        if name in ("BLOCK_JOB_ERROR", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"):
            assert event["data"]["device"] == "j"
            if name == "BLOCK_JOB_ERROR":
                assert event["data"] == {"device": "j", "operation": "write", "action": "stop"}
            return name
