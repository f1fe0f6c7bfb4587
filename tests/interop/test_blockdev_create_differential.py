"""blockdev-create against qemu-storage-daemon 7.2: replies, job states and
events, query-jobs (its ``error`` texts), and the files made, byte for byte.

The same script runs on both daemons, each in a directory of its own (paths
in texts are written as ``D``).  Every create job is waited for until it is
concluded, read in query-jobs, dismissed; its JOB_STATUS_CHANGE statuses are
compared.  Then every file one daemon made is compared with the other's
(``cmp``), and blockd's images pass ``qemu-img check``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, RawQMP, negotiated

pytestmark = pytest.mark.qsd

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

#: qcow2 option sets, each made in a file of its own (file job, node, qcow2 job)
IMAGES: list[dict[str, Any]] = [
    {"size": GiB},
    {"size": GiB + 512},
    {"size": 0},
    {"size": TiB},
    {"size": 4 * TiB, "cluster-size": 4096},
    {"size": 10 * GiB, "cluster-size": 512, "refcount-bits": 64},
    {"size": 5 * GiB, "cluster-size": 2 * MiB, "refcount-bits": 1},
    {"size": GiB, "version": "v2"},
    {"size": GiB, "version": "v3", "lazy-refcounts": True},
    {"size": GiB, "compression-type": "zstd"},
    {"size": GiB, "backing-file": "base.qcow2", "backing-fmt": "qcow2"},
    {"size": GiB, "backing-file": "base.raw"},
    {"size": GiB, "backing-file": "", "backing-fmt": "raw"},
    {"size": GiB, "backing-file": "b" * 360, "backing-fmt": "raw", "cluster-size": 512},
    {"size": 64 * MiB + 512, "cluster-size": 4096, "preallocation": "metadata"},
    {"size": 16 * MiB, "cluster-size": 512, "refcount-bits": 8, "preallocation": "metadata"},
    {"size": 32 * MiB, "preallocation": "falloc"},
    {"size": 8 * MiB + 512, "cluster-size": 1024, "preallocation": "full", "version": "v2"},
]

#: (file-create options, qcow2 options): jobs that fail, by their error
FAILING_QCOW2: list[dict[str, Any]] = [
    {"size": 1000},
    {"size": GiB, "cluster-size": 3000},
    {"size": GiB, "cluster-size": 256},
    {"size": GiB, "cluster-size": 4 * MiB},
    {"size": GiB, "refcount-bits": 8, "version": "v2"},
    {"size": GiB, "refcount-bits": 3},
    {"size": GiB, "refcount-bits": 128},
    {"size": GiB, "lazy-refcounts": True, "version": "v2"},
    {"size": GiB, "backing-fmt": "qcow2"},
    {"size": GiB, "backing-file": "x", "preallocation": "metadata"},
    {"size": GiB, "compression-type": "zstd", "version": "v2"},
    {"size": GiB, "extended-l2": True, "version": "v2"},
    {"size": GiB, "extended-l2": True, "cluster-size": 4096},
    {"size": GiB, "data-file-raw": True},
    {"size": GiB, "data-file": "nonode"},
    {"size": GiB, "data-file": "nonode", "version": "v2"},
    {"size": 1 << 62},
    {"size": 4 * TiB, "cluster-size": 512},
    {"size": -512},
    {"size": -1000},
    {"size": GiB, "backing-file": "b" * 400, "backing-fmt": "raw", "cluster-size": 512},
    {"size": GiB, "backing-file": "b" * 1024},
]

FAILING_FILES: list[dict[str, Any]] = [
    {"filename": "D/nodir/x", "size": 0},
    {"filename": "D/m", "size": 100, "preallocation": "metadata"},
    {"filename": "D/h", "size": 100, "extent-size-hint": 1 << 32},
    {"filename": "D/neg", "size": -1},
]

FILES: list[dict[str, Any]] = [
    {"filename": f"D/f-{mode}-{size}", "size": size, "preallocation": mode}
    for mode in ("off", "falloc", "full")
    for size in (0, 100, 5000, MiB + 3)
] + [{"filename": "D/nocow", "size": 4096, "nocow": True, "extent-size-hint": 0}]

#: commands refused at once (no job)
REFUSED: list[dict[str, Any]] = [
    {"job-id": "r", "options": {"driver": "raw"}},
    {"job-id": "1bad", "options": {"driver": "blkdebug"}},
    {"job-id": "r", "options": {"driver": "iscsi"}},
    {"job-id": "r", "options": {"driver": "nosuch"}},
    {"job-id": "r"},
    {"job-id": "1bad", "options": {"driver": "file", "filename": "D/x", "size": 1}},
    {"job-id": "r", "options": {"driver": "file", "filename": "D/x", "size": 1, "bogus": 1}},
    {"job-id": "r", "options": {"driver": "file", "filename": "D/x", "size": 1.5}},
    {"job-id": "r", "options": {"driver": "file", "filename": "D/x", "size": 1 << 64}},
    {"job-id": "r", "options": {"driver": "file", "filename": "D/x", "size": 1,
                                "preallocation": "some"}},
    {"job-id": "r", "options": {"driver": "qcow2", "file": "x"}},
    {"job-id": "r", "options": {"driver": "qcow2", "file": "x", "size": 1, "version": "v4"}},
    {"job-id": "r", "options": {"driver": "qcow2", "file": "x", "size": 1,
                                "backing-fmt": "nosuch"}},
    {"job-id": "r", "options": {"driver": "qcow2", "file": "x", "size": 1,
                                "compression-type": "lz"}},
    {"job-id": "r", "options": {"driver": "qcow2", "file": "x", "size": 1,
                                "encrypt": {"format": "aes"}}},
]


class Script:
    """One daemon's run of the script: what a client saw, paths as ``D``."""

    def __init__(self, daemon: DaemonProcess, d: Path) -> None:
        self.qmp: RawQMP = negotiated(daemon)
        self.d = d
        self.seen: list[Any] = []
        self.jobs = 0

    def _in(self, value: Any) -> Any:
        return json.loads(json.dumps(value).replace('"D/', json.dumps(str(self.d) + "/")[:-1]))

    def _out(self, value: Any) -> Any:
        return json.loads(json.dumps(value).replace(str(self.d), "D"))

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        reply = self._out(self.qmp.execute(command, self._in(arguments)))
        self.seen.append((command, arguments, reply))
        return reply

    def create(self, options: dict[str, Any]) -> Any:
        """A create job, waited for, read, dismissed; its statuses and query-jobs entry."""
        self.jobs += 1
        job = f"job{self.jobs}"
        reply = self.execute("blockdev-create", {"job-id": job, "options": options})
        if "error" in reply:
            return reply
        self.qmp.wait_event("JOB_STATUS_CHANGE", id=job, status="concluded")
        entry = [j for j in self.execute("query-jobs")["return"] if j["id"] == job]
        assert self.execute("query-block-jobs") == {"return": []}
        assert self.execute("job-dismiss", {"id": job}) == {"return": {}}
        statuses = self.qmp.job_statuses(job)
        self.qmp.events.clear()
        self.seen.append((job, statuses))
        return entry


def run_script(daemon: DaemonProcess, d: Path) -> list[Any]:
    s = Script(daemon, d)
    # files
    for options in FILES + FAILING_FILES:
        s.create({"driver": "file", **options})
    # images, each in a file node of its own
    for i, options in enumerate(IMAGES):
        s.create({"driver": "file", "filename": f"D/i{i}.qcow2", "size": 0})
        s.execute("blockdev-add", {"driver": "file", "node-name": f"n{i}",
                                   "filename": f"D/i{i}.qcow2"})
        s.create({"driver": "qcow2", "file": f"n{i}", **options})
        s.execute("blockdev-del", {"node-name": f"n{i}"})
    # images made over older ones in the same node: only QEMU's writes land
    s.create({"driver": "file", "filename": "D/reuse.qcow2", "size": 0})
    s.execute("blockdev-add", {"driver": "file", "node-name": "reuse",
                               "filename": "D/reuse.qcow2"})
    for options in ({"size": 16 * MiB, "cluster-size": 4096, "preallocation": "metadata"},
                    {"size": GiB},
                    {"size": 4 * MiB, "cluster-size": 512, "preallocation": "falloc"},
                    {"size": 8 * MiB, "preallocation": "metadata", "version": "v2"}):
        s.create({"driver": "qcow2", "file": "reuse", **options})
    s.execute("blockdev-del", {"node-name": "reuse"})
    # an inline file definition: opened for the job, closed after it
    s.create({"driver": "file", "filename": "D/inline.qcow2", "size": 0})
    s.create({"driver": "qcow2", "size": GiB, "cluster-size": 4096,
              "file": {"driver": "file", "filename": "D/inline.qcow2"}})
    s.create({"driver": "qcow2", "size": GiB,
              "file": {"driver": "file", "filename": "D/missing.qcow2"}})
    s.execute("query-named-block-nodes", {"flat": True})
    # failures inside the job: the job's error
    s.create({"driver": "file", "filename": "D/fail.qcow2", "size": 0})
    s.execute("blockdev-add", {"driver": "file", "node-name": "fail",
                               "filename": "D/fail.qcow2"})
    for options in FAILING_QCOW2:
        s.create({"driver": "qcow2", "file": "fail", **options})
    s.create({"driver": "qcow2", "file": "nonode", "size": GiB})
    # a read-only node, and nodes others use
    s.create({"driver": "file", "filename": "D/ro.img", "size": 0})
    s.execute("blockdev-add", {"driver": "file", "node-name": "ro", "read-only": True,
                               "filename": "D/ro.img"})
    s.create({"driver": "qcow2", "file": "ro", "size": GiB})
    s.create({"driver": "qcow2", "file": "fail", "size": MiB})
    s.execute("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "fail"})
    s.create({"driver": "qcow2", "file": "fail", "size": GiB})
    s.execute("blockdev-del", {"node-name": "q"})
    s.execute("nbd-server-start", {"addr": {"type": "unix",
                                            "data": {"path": "D/nbd.sock"}}})
    s.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "fail",
                                   "writable": True})
    s.create({"driver": "qcow2", "file": "fail", "size": GiB})
    s.execute("block-export-del", {"id": "e"})
    s.qmp.wait_event("BLOCK_EXPORT_DELETED", id="e")
    s.qmp.events.clear()
    # commands refused before any job exists
    for arguments in REFUSED:
        s.execute("blockdev-create", arguments)
    # the verbs on a concluded create job; it is no block job
    s.execute("blockdev-create", {"job-id": "done", "options": {
        "driver": "file", "filename": "D/done", "size": 0}})
    s.qmp.wait_event("JOB_STATUS_CHANGE", id="done", status="concluded")
    s.execute("blockdev-create", {"job-id": "done", "options": {
        "driver": "file", "filename": "D/done2", "size": 0}})
    for verb in ("job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize"):
        s.execute(verb, {"id": "done"})
    for verb, key in (("block-job-cancel", "device"), ("block-job-dismiss", "id"),
                      ("block-job-pause", "device")):
        s.execute(verb, {key: "done"})
    s.execute("query-block-jobs")
    s.execute("job-dismiss", {"id": "done"})
    s.execute("job-dismiss", {"id": "done"})
    s.seen.append(("done", s.qmp.job_statuses("done")))
    s.qmp.close()
    return s.seen


def test_blockdev_create_like_qsd(qsd: DaemonProcess, blockd: DaemonProcess,
                                  tmp_path: Path) -> None:
    theirs_dir, ours_dir = tmp_path / "qsd", tmp_path / "blockd"
    theirs_dir.mkdir()
    ours_dir.mkdir()
    theirs = run_script(qsd, theirs_dir)
    ours = run_script(blockd, ours_dir)
    differ = [(a, b) for a, b in zip(theirs, ours, strict=True) if a != b]
    assert not differ, "\n".join(f"QSD:    {a}\nblockd: {b}" for a, b in differ)
    names = sorted(p.name for p in theirs_dir.iterdir() if not p.name.startswith("nbd"))
    assert names == sorted(p.name for p in ours_dir.iterdir() if not p.name.startswith("nbd"))
    for name in names:
        if name.startswith(("fail", "ro")):
            continue  # failures: QSD may leave a partial image, blockd a zeroed header
        a, b = theirs_dir / name, ours_dir / name
        proc = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
        assert proc.returncode == 0 and a.stat().st_size == b.stat().st_size, (name, proc.stdout)
        if name.startswith("i") and name.endswith(".qcow2"):
            # the backing files named in the headers do not exist
            spec = {"driver": "qcow2", "backing": None,
                    "file": {"driver": "file", "filename": str(b)}}
            check = subprocess.run(["qemu-img", "check", "-q", "json:" + json.dumps(spec)],
                                   capture_output=True, text=True)
            assert check.returncode == 0, (name, check.stdout, check.stderr)


def running_verbs(daemon: DaemonProcess, d: Path) -> list[Any]:
    """The job verbs while a create runs (256 GiB with its metadata preallocated
    takes seconds; the verbs are sent at once): pause and resume change no
    status (a create has no pause point), the rest are refused in 'running'."""
    s = Script(daemon, d)
    s.create({"driver": "file", "filename": "D/big.qcow2", "size": 0})
    s.execute("blockdev-add", {"driver": "file", "node-name": "big",
                               "filename": "D/big.qcow2"})
    s.execute("blockdev-create", {"job-id": "big", "options": {
        "driver": "qcow2", "file": "big", "size": 256 * GiB, "preallocation": "metadata"}})
    # (not blockdev-del of the node: QSD answers "Node big is in use" while its
    # job writes through the file node, "Block device big is in use" once it
    # has opened the image over it; blockd always gives the first answer)
    for verb in ("job-pause", "job-pause", "query-jobs", "job-complete", "job-finalize",
                 "job-dismiss", "job-resume", "job-resume", "query-jobs"):
        s.execute(verb, None if verb == "query-jobs" else {"id": "big"})
    s.qmp.wait_event("JOB_STATUS_CHANGE", id="big", status="concluded", timeout=120)
    s.execute("query-jobs")
    s.seen.append(("big", s.qmp.job_statuses("big")))
    s.qmp.close()
    return s.seen


def test_verbs_on_a_running_create_like_qsd(qsd: DaemonProcess, blockd: DaemonProcess,
                                            tmp_path: Path) -> None:
    (tmp_path / "qsd").mkdir()
    (tmp_path / "blockd").mkdir()
    theirs = running_verbs(qsd, tmp_path / "qsd")
    ours = running_verbs(blockd, tmp_path / "blockd")
    assert theirs == ours
