"""blockctl, the command line for people, run as a person runs it.

Every sub-command runs as a separate process against a real blockd on a real
socket, over chains made by qemu-img; qemu-img then judges the images and a
raw QMP connection checks what the daemon did.  Through pipes the output must
be plain lines (no escape codes); under a pseudo-terminal (pexpect) the live
progress bar is read as a person sees it.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.conftest import in_ci, missing, require_tool
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd
from tests.images import (
    backing_of,
    check,
    check_consistent,
    create,
    digest,
    guest_view,
    qemu_io,
    same_data,
)

BLOCKCTL = [sys.executable, "-m", "blockd.ctl"]
ESCAPE = "\x1b"
#: Slow enough that a person (and the test) sees the bar move for a few seconds.
CRAWL = "4M"


@dataclass
class Chain:
    """base <- mid <- top, opened in a blockd; ``qmp`` is a raw client for checks."""

    daemon: DaemonProcess
    qmp: RawQMP
    d: Path
    before: Path

    @property
    def sock(self) -> str:
        return str(self.daemon.socket_path)

    def image(self, name: str) -> Path:
        return self.d / f"{name}.qcow2"

    def stop(self) -> None:
        """Stop blockd, so qemu-img may open the images it held for writing."""
        self.qmp.close()
        self.daemon.stop()
        assert self.daemon.proc.returncode == 0, self.daemon.stderr()[-2000:]

    def jobs(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.qmp.execute("query-block-jobs")["return"]
        return jobs


def make_chain(d: Path, *, mid_data: str = "16M") -> Path:
    base = create(d / "base.qcow2", size="64M")
    qemu_io(base, "write -P 0x11 0 32M")
    mid = create(d / "mid.qcow2", size="64M", backing="base.qcow2")
    qemu_io(mid, f"write -P 0x22 0 {mid_data}")
    top = create(d / "top.qcow2", size="64M", backing="mid.qcow2")
    qemu_io(top, "write -P 0x33 1M 1M")
    return guest_view(top, d / "before.raw")


def open_chain(qmp: RawQMP, d: Path, base_file: dict[str, Any] | None = None) -> None:
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        file: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
        if name == "base" and base_file is not None:
            file = base_file
        args = {"driver": "qcow2", "node-name": name, "read-only": name != "top",
                "backing": backing, "file": file}  # fmt: skip
        assert qmp.execute("blockdev-add", args) == {"return": {}}


@pytest.fixture
def chain(sock_dir: Path, tmp_path: Path) -> Iterator[Chain]:
    before = make_chain(tmp_path)
    daemon = start_blockd(sock_dir / "qmp.sock")
    qmp = RawQMP(daemon.socket_path)
    try:
        qmp.negotiate()
        open_chain(qmp, tmp_path)
        yield Chain(daemon, qmp, tmp_path, before)
    finally:
        qmp.close()
        daemon.stop()


def blockctl(
    sock: str | None, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """blockctl with stdout and stderr on pipes (plain mode)."""
    argv = [*BLOCKCTL, *(["--socket", sock] if sock is not None else []), *args]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    assert ESCAPE not in result.stdout + result.stderr, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def rows(text: str) -> dict[str, list[str]]:
    """A plain table by its first column (columns are two or more spaces apart)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines[1:])}


def one_error_line(result: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockctl: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- listing -----------------------------------------------------------------


def test_nodes_table(chain: Chain) -> None:
    nbd = chain.d / "nbd.sock"
    addr = {"type": "unix", "data": {"path": str(nbd)}}
    assert chain.qmp.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
    export = {"type": "nbd", "id": "e0", "node-name": "top", "writable": True}
    assert chain.qmp.execute("block-export-add", export) == {"return": {}}

    result = blockctl(chain.sock, "nodes")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["node", "driver", "file", "backing", "size", "allocated", "read-only",
                      "users"]  # fmt: skip
    table = rows(result.stdout)
    infos = {n["node-name"]: n for n in chain.qmp.execute("query-named-block-nodes")["return"]}
    assert set(table) == set(infos)  # the protocol (file) nodes too
    top, mid, base = table["top"], table["mid"], table["base"]
    assert top[1:5] == ["qcow2", str(chain.image("top")), "mid", "64.0 MiB"]
    assert mid[1:5] == ["qcow2", str(chain.image("mid")), "base", "64.0 MiB"]
    assert base[1:5] == ["qcow2", str(chain.image("base")), "-", "64.0 MiB"]
    assert [top[6], mid[6], base[6]] == ["no", "yes", "yes"]
    assert top[7] == "export e0"
    assert mid[7] == "backing of top"
    assert base[7] == "backing of mid"
    # allocated: what the image file takes on the host (mid holds 16 MiB of data)
    assert mid[5].endswith("MiB") and 16 <= float(mid[5].split()[0]) < 17
    files = [row for row in table.values() if row[1] == "file"]
    assert sorted(row[7] for row in files) == ["file of base", "file of mid", "file of top"]


def test_chain_tree(chain: Chain) -> None:
    result = blockctl(chain.sock, "chain", "top")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.lstrip("└─│ ").split()[0] for line in lines] == ["top", "mid", "base"]
    assert lines[1].startswith("└── ") and lines[2].startswith("    └── ")
    assert "read-write" in lines[0] and "read-only" in lines[2]
    assert str(chain.image("mid")) in lines[1]
    assert blockctl(chain.sock, "chain", "mid").stdout.count("\n") == 2


def test_exports(chain: Chain) -> None:
    assert blockctl(chain.sock, "exports").stdout == "no exports\n"
    addr = {"type": "unix", "data": {"path": str(chain.d / "nbd.sock")}}
    chain.qmp.execute("nbd-server-start", {"addr": addr})
    export = {"type": "nbd", "id": "e1", "node-name": "mid"}
    assert chain.qmp.execute("block-export-add", export) == {"return": {}}
    table = rows(blockctl(chain.sock, "exports").stdout)
    assert table == {"e1": ["e1", "nbd", "mid", "serving"]}
    # and an NBD client finds it there (libnbd's nbdinfo; the name defaults to the node's)
    listing = subprocess.run(
        [require_tool("nbdinfo"), "--list", "--json", f"nbd+unix:///?socket={chain.d}/nbd.sock"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    [served] = json.loads(listing.stdout)["exports"]
    assert served["export-name"] == "mid" and served["is_read_only"] is True
    assert served["export-size"] == 64 << 20


def test_job_verbs(chain: Chain) -> None:
    """jobs, set-speed, pause, resume, cancel on a throttled commit; the daemon's
    own answers (query-block-jobs on a second connection) are the judge."""
    assert blockctl(chain.sock, "jobs").stdout == "no jobs\n"
    started = blockctl(chain.sock, "commit", "top", "--top", "mid", "--speed", "64K")
    assert started.returncode == 0, started.stderr
    first = started.stdout.splitlines()[0]
    assert first == "commit-top: committing mid into base at up to 64.0 KiB/s"
    [job] = chain.jobs()
    assert job["device"] == "commit-top" and job["speed"] == 64 * 1024

    table = rows(blockctl(chain.sock, "jobs").stdout)
    assert table["commit-top"][1:3] == ["commit", "running"]
    assert table["commit-top"][5] == "64.0 KiB/s"

    assert blockctl(chain.sock, "set-speed", "commit-top", "1M").returncode == 0
    assert chain.jobs()[0]["speed"] == 1 << 20
    assert blockctl(chain.sock, "pause", "commit-top").returncode == 0
    chain.qmp.wait_event("JOB_STATUS_CHANGE", id="commit-top", status="paused")
    assert chain.jobs()[0]["paused"] is True
    assert rows(blockctl(chain.sock, "jobs").stdout)["commit-top"][2] == "paused (by request)"
    # as in QEMU, a paused job is cancelled only with --force
    refused = blockctl(chain.sock, "cancel", "commit-top")
    one_error_line(refused, 1, "block-job-cancel", "paused")
    assert blockctl(chain.sock, "resume", "commit-top").returncode == 0
    assert chain.jobs()[0]["paused"] is False
    assert blockctl(chain.sock, "cancel", "commit-top").returncode == 0
    chain.qmp.wait_event("BLOCK_JOB_CANCELLED", device="commit-top")
    chain.qmp.wait_event("JOB_STATUS_CHANGE", id="commit-top", status="null")
    assert chain.jobs() == []
    assert backing_of(chain.image("top")) == "mid.qcow2"


def test_second_commit_gets_its_own_job_id(chain: Chain) -> None:
    first = blockctl(chain.sock, "commit", "top", "--top", "mid", "--speed", "4K")
    second = blockctl(chain.sock, "commit", "top", "--speed", "4K", "--job-id", "mine")
    assert first.returncode == 0
    # the daemon refuses the overlapping commit, in its words, as one line
    one_error_line(second, 1, "block-commit")
    assert [j["device"] for j in chain.jobs()] == ["commit-top"]
    blockctl(chain.sock, "cancel", "commit-top")
    chain.qmp.wait_event("JOB_STATUS_CHANGE", id="commit-top", status="null")


# --- commit --wait through pipes ---------------------------------------------------


def test_commit_wait_plain(chain: Chain) -> None:
    result = blockctl(chain.sock, "commit", "top", "--top", "mid", "--base", "base",
                      "--speed", "8M", "--wait")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "commit-top: committing mid into base at up to 8.0 MiB/s"
    progress = [line for line in lines[1:-1] if re.search(r"\d+\.\d%", line)]
    assert progress, lines
    percents = [float(re.search(r"(\d+\.\d)%", line).group(1)) for line in progress]  # type: ignore[union-attr]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert re.fullmatch(r"commit-top: done in \d+:\d\d:\d\d", lines[-1]), lines[-1]
    assert len(lines) < 40  # plain mode writes a line per tenth, not per poll
    assert chain.jobs() == []
    assert backing_of(chain.image("top")) == str(chain.image("base"))
    chain.stop()
    assert same_data(chain.before, chain.image("top"))
    check(chain.image("base"))


def test_active_commit_waits_at_ready_without_pivot(chain: Chain) -> None:
    """As virsh blockcommit --active --wait: return at READY, the job left in sync."""
    result = blockctl(chain.sock, "commit", "top", "--wait")
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    assert last.startswith("commit-top: ready: base is in sync") and "blockctl complete" in last
    [job] = chain.jobs()
    assert job["ready"] is True and job["status"] == "ready"

    # `wait --pivot` on the ready job completes it
    result = blockctl(chain.sock, "wait", "commit-top", "--pivot")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"commit-top: done in \d+:\d\d:\d\d; its users moved onto base",
                        result.stdout.splitlines()[-1])
    assert chain.jobs() == []
    chain.stop()
    assert same_data(chain.before, chain.image("base"))
    check(chain.image("base"))


def test_close_a_merged_snapshot(chain: Chain) -> None:
    in_use = blockctl(chain.sock, "close", "mid")
    one_error_line(in_use, 1, "blockdev-del", "mid")
    assert blockctl(chain.sock, "commit", "top", "--top", "mid", "--wait").returncode == 0
    assert blockctl(chain.sock, "close", "mid").returncode == 0
    names = {n["node-name"] for n in chain.qmp.execute("query-named-block-nodes")["return"]}
    assert "mid" not in names and {"top", "base"} <= names
    assert "mid" not in rows(blockctl(chain.sock, "nodes").stdout)


def test_pivot_moves_the_export_onto_base(chain: Chain) -> None:
    addr = {"type": "unix", "data": {"path": str(chain.d / "nbd.sock")}}
    chain.qmp.execute("nbd-server-start", {"addr": addr})
    export = {"type": "nbd", "id": "e0", "node-name": "top", "writable": True}
    assert chain.qmp.execute("block-export-add", export) == {"return": {}}
    result = blockctl(chain.sock, "commit", "top", "--pivot")
    assert result.returncode == 0, result.stderr
    assert "commit-top: ready, pivoting onto base" in result.stdout.splitlines()
    [served] = chain.qmp.execute("query-block-exports")["return"]
    assert served["node-name"] == "base"
    assert "export e0" in rows(blockctl(chain.sock, "nodes").stdout)["base"][7]


def test_wait_on_a_job_that_concluded_earlier(chain: Chain) -> None:
    """auto-dismiss off: the job ended before blockctl listened; query-jobs tells."""
    args = {"job-id": "j0", "device": "top", "top-node": "mid", "auto-dismiss": False}
    assert chain.qmp.execute("block-commit", args) == {"return": {}}
    chain.qmp.wait_event("JOB_STATUS_CHANGE", id="j0", status="concluded")
    result = blockctl(chain.sock, "wait", "j0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "j0: concluded (waiting to be dismissed)"
    assert chain.qmp.execute("job-dismiss", {"id": "j0"}) == {"return": {}}


def test_pivot_is_for_an_active_commit(chain: Chain) -> None:
    result = blockctl(chain.sock, "commit", "top", "--top", "mid", "--pivot")
    one_error_line(result, 2, "--pivot")
    assert chain.jobs() == []


def test_failed_commit_exits_1(sock_dir: Path, tmp_path: Path) -> None:
    before = make_chain(tmp_path)
    daemon = start_blockd(sock_dir / "qmp.sock")
    try:
        with RawQMP(daemon.socket_path) as qmp:
            qmp.negotiate()
            file = {"driver": "file", "filename": str(tmp_path / "base.qcow2")}
            rule = {"event": "write_aio", "errno": 5, "once": True}
            open_chain(qmp, tmp_path, {"driver": "blkdebug", "image": file,
                                       "inject-error": [rule]})  # fmt: skip
            result = blockctl(str(daemon.socket_path), "commit", "top", "--top", "mid", "--wait")
            assert result.returncode == 1, (result.stdout, result.stderr)
            assert result.stdout.splitlines()[-1] == "commit-top: failed: Input/output error"
    finally:
        daemon.stop()
    assert backing_of(tmp_path / "top.qcow2") == "mid.qcow2"
    assert same_data(before, tmp_path / "top.qcow2")


@pytest.mark.qsd
def test_same_commands_against_qemu_storage_daemon(sock_dir: Path, tmp_path: Path) -> None:
    """blockctl is a plain QMP client: qemu-storage-daemon 7.2 serves it as well."""
    require_tool("qemu-storage-daemon")
    make_chain(tmp_path)
    qsd = start_qsd(sock_dir / "qsd.sock")
    sock = str(qsd.socket_path)
    try:
        # QSD's monitor serves one client at a time: this one leaves before blockctl comes
        with RawQMP(qsd.socket_path) as qmp:
            qmp.negotiate()
            open_chain(qmp, tmp_path)
        table = rows(blockctl(sock, "nodes").stdout)
        assert table["top"][3] == "mid" and table["mid"][7] == "backing of top"
        tree = blockctl(sock, "chain", "top").stdout.splitlines()
        assert [line.lstrip("└─│ ").split()[0] for line in tree] == ["top", "mid", "base"]
        # QSD computes no plan: --dry-run says so; a commit goes ahead unchecked
        dry = blockctl(sock, "commit", "top", "--top", "mid", "--dry-run")
        one_error_line(dry, 1, "computes no commit plan", "__org.blockd_commit-plan")
        result = blockctl(sock, "commit", "top", "--top", "mid", "--wait")
        assert result.returncode == 0, result.stderr
        last = result.stdout.splitlines()[-1]
        assert re.fullmatch(r"commit-top: done in \d+:\d\d:\d\d", last), last
        result = blockctl(sock, "commit", "top", "--pivot")
        assert result.returncode == 0, result.stderr
        assert blockctl(sock, "jobs").stdout == "no jobs\n"
    finally:
        qsd.stop()
    assert backing_of(tmp_path / "top.qcow2") == str(tmp_path / "base.qcow2")


# --- events ------------------------------------------------------------------------


def _default_sigint() -> None:
    """Ctrl-C as a terminal gives it: a suite started in the background (``&``
    in a script) ignores SIGINT, and a child would inherit that and never end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_events_follow_json_and_plain(chain: Chain) -> None:
    argv = [*BLOCKCTL, "--socket", chain.sock, "events", "--follow"]
    plain = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    machine = subprocess.Popen([*argv, "--json"], stdout=subprocess.PIPE, text=True)
    single = subprocess.Popen(argv[:-1], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # all three connected and listening
        assert blockctl(chain.sock, "commit", "top", "--top", "mid", "--wait").returncode == 0
        seen = []
        assert machine.stdout is not None
        while not seen or seen[-1] != ("JOB_STATUS_CHANGE", "null"):
            event = json.loads(machine.stdout.readline())
            seen.append((event["event"], event["data"].get("status")))
        assert ("BLOCK_JOB_COMPLETED", None) in seen
        assert seen[0] == ("JOB_STATUS_CHANGE", "created")
        # without --follow: the next event, then exit 0
        out, _ = single.communicate(timeout=20)
        assert single.returncode == 0
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "
            r"JOB_STATUS_CHANGE status=created id=commit-top\n",
            out,
        ), out
        # Ctrl-C ends --follow, status 0
        plain.send_signal(signal.SIGINT)
        out, err = plain.communicate(timeout=20)
        assert plain.returncode == 0, err
        assert ESCAPE not in out and err == ""
        names = [line.split()[2] for line in out.splitlines()]
        assert names == [name for name, _ in seen]
    finally:
        for proc in (plain, machine, single):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_events_ends_when_blockd_quits(chain: Chain) -> None:
    argv = [*BLOCKCTL, "--socket", chain.sock, "events", "--follow"]
    follower = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    chain.daemon.stop()
    _, err = follower.communicate(timeout=20)
    assert follower.returncode == 1
    assert err == "blockctl: blockd closed the connection\n"


# --- error paths ---------------------------------------------------------------------


def test_no_daemon(tmp_path: Path) -> None:
    result = blockctl(str(tmp_path / "nothing.sock"), "nodes")
    one_error_line(result, 1, "no socket at", "nothing.sock")
    regular = tmp_path / "file"
    regular.write_text("")
    one_error_line(blockctl(str(regular), "jobs"), 1, "not a socket")


def test_stale_socket(sock_dir: Path) -> None:
    """A socket file nobody listens on any more (a daemon that died)."""
    path = sock_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    one_error_line(blockctl(str(path), "nodes"), 1, "nobody is listening")


def test_wrong_socket(chain: Chain) -> None:
    """blockd's NBD socket is a socket, but not a QMP one: NBD's greeting is no
    line of JSON, so blockctl gives up after its greeting timeout."""
    nbd = chain.d / "nbd.sock"
    chain.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}})
    chain.qmp.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "top"})
    one_error_line(blockctl(str(nbd), "nodes"), 1, "no QMP greeting", "not a QMP socket?")


def test_socket_from_the_environment(chain: Chain) -> None:
    env = {**os.environ, "BLOCKD_SOCKET": chain.sock}
    result = blockctl(None, "chain", "top", env=env)
    assert result.returncode == 0 and result.stdout.startswith("top qcow2"), result.stderr
    env["BLOCKD_SOCKET"] = str(chain.d / "elsewhere.sock")
    one_error_line(blockctl(None, "nodes", env=env), 1, "elsewhere.sock")
    # --socket wins over the environment
    assert blockctl(chain.sock, "nodes", env=env).returncode == 0


def test_unknown_names_and_qmp_errors(chain: Chain) -> None:
    one_error_line(blockctl(chain.sock, "chain", "nosuch"), 1, "no node named 'nosuch'")
    one_error_line(blockctl(chain.sock, "commit", "nosuch"), 1, "block-commit", "nosuch")
    one_error_line(blockctl(chain.sock, "commit", "top", "--base", "nosuch"), 1, "nosuch")
    one_error_line(blockctl(chain.sock, "pause", "nojob"), 1, "block-job-pause", "nojob")
    one_error_line(blockctl(chain.sock, "complete", "nojob"), 1, "nojob")
    one_error_line(blockctl(chain.sock, "wait", "nojob"), 1, "no job named 'nojob'")
    assert chain.jobs() == []


def test_usage_errors_exit_2(chain: Chain) -> None:
    result = blockctl(chain.sock, "commit", "top", "--speed", "fast")
    assert result.returncode == 2
    assert "not a rate: 'fast'" in result.stderr
    assert blockctl(chain.sock, "frobnicate").returncode == 2
    assert blockctl(chain.sock).returncode == 2
    assert chain.jobs() == []


def test_help_says_what_is_not_there_yet() -> None:
    result = blockctl(None, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Not yet available: stream" in text and "dry-run" in text
    assert "refuses when base's file system lacks room" in text
    assert "130 left running after a second Ctrl-C" in text
    commit = " ".join(blockctl(None, "commit", "--help").stdout.split())
    assert "--dry-run print the commit plan" in commit and "--force commit even" in commit


# --- the commit plan: --dry-run, the free-space check, --force --------------------


def plan_of(chain: Chain, **selection: str) -> dict[str, Any]:
    reply = chain.qmp.execute("__org.blockd_commit-plan", {"device": "top", **selection})
    plan: dict[str, Any] = reply["return"]
    return plan


def test_dry_run_prints_the_plan(chain: Chain) -> None:
    """mid's 16 MiB lie over base's 32 MiB (in place: base does not grow); an
    active commit of top also brings top's 1 MiB, in place as well."""
    files = {p: digest(p) for p in chain.d.glob("*.qcow2")}
    result = blockctl(chain.sock, "commit", "top", "--top", "mid", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    plan = plan_of(chain, **{"top-node": "mid"})
    assert re.fullmatch(
        rf"commit mid into base \({re.escape(str(chain.image('base')))}\): grows by about "
        r"0 B, [\d.]+ [KMGT]iB free: fits", lines[0]), lines[0]  # fmt: skip
    assert lines[1].split() == ["layer", "file", "data", "zeros", "runs"]
    assert lines[2].split() == ["mid", str(chain.image("mid")), "16.0", "MiB", "0", "B", "1"]
    items = {cells[0]: cells for cells in (line.split() for line in lines[4:])}
    assert lines[3].split() == ["base", "bytes", "size"]
    assert items["growth"][1] == str(plan["growth"]["total"]) == "0"
    assert items["data"][1] == "0" and items["free"][1].isdigit()
    assert items["margin"][1] == str(plan["margin"])
    assert chain.jobs() == []  # nothing started

    # mid into base with top too: top's own MiB at 1M lies over base's data
    active = blockctl(chain.sock, "commit", "top", "--dry-run")
    assert active.returncode == 0, active.stderr
    layers = rows("\n".join(active.stdout.splitlines()[1:4]))
    assert layers["top"][2:] == ["1.0 MiB", "0 B", "1"]
    assert layers["mid"][2:] == ["15.0 MiB", "0 B", "2"]  # less what top hides
    assert chain.jobs() == []
    chain.stop()
    assert {p: digest(p) for p in chain.d.glob("*.qcow2")} == files


def test_dry_run_on_a_terminal(chain: Chain) -> None:
    child = spawn_tty(chain, "commit", "top", "--top", "mid", "--dry-run")
    screen = io.StringIO()
    child.logfile_read = screen
    child.expect("fits")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    shown = screen.getvalue()
    assert ESCAPE in shown and "─" in shown  # colour, and the tables' rules
    assert "refcount-blocks" in shown and "16.0 MiB" in shown
    assert chain.jobs() == []


def test_dry_run_of_a_refused_selection(sock_dir: Path) -> None:
    """The selection refused: the daemon's words, once."""
    daemon = start_blockd(sock_dir / "qmp.sock")
    try:
        result = blockctl(str(daemon.socket_path), "commit", "nosuch", "--dry-run")
        one_error_line(result, 1, "commit: ", "nosuch")
    finally:
        daemon.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs: a base whose file system cannot take the commit."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12M,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {done.stderr.strip()}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_no_room_refused_then_forced(small_fs: Path, sock_dir: Path, tmp_path: Path) -> None:
    base = create(small_fs / "base.qcow2", size="64M")
    qemu_io(base, "write -P 0x11 0 1M")
    mid = create(tmp_path / "mid.qcow2", size="64M", backing=str(base))
    qemu_io(mid, "write -P 0x22 0 24M")
    top = create(tmp_path / "top.qcow2", size="64M", backing="mid.qcow2")
    before = guest_view(top, tmp_path / "before.raw")
    base_digest = digest(base)
    daemon = start_blockd(sock_dir / "qmp.sock")
    sock = str(daemon.socket_path)
    try:
        with RawQMP(daemon.socket_path) as qmp:
            qmp.negotiate()
            for name, backing, path in (("base", None, base), ("mid", "base", mid),
                                        ("top", "mid", top)):  # fmt: skip
                args = {"driver": "qcow2", "node-name": name, "read-only": name != "top",
                        "backing": backing, "file": {"driver": "file", "filename": str(path)}}
                assert qmp.execute("blockdev-add", args) == {"return": {}}
            plan = qmp.execute("__org.blockd_commit-plan",
                               {"device": "top", "top-node": "mid"})["return"]  # fmt: skip
            assert plan["fits"] is False and plan["free"] < 12 << 20
            assert plan["growth"]["total"] >= 23 << 20

            refused = blockctl(sock, "commit", "top", "--top", "mid", "--wait")
            line = one_error_line(refused, 1, "not enough room to commit mid into base",
                                  str(base), "--force commits anyway")  # fmt: skip
            assert re.search(r"grow by about 2[34]\.\d MiB .* has \d+\.\d MiB free", line), line
            assert refused.stdout == ""
            assert qmp.execute("query-block-jobs") == {"return": []}

            dry = blockctl(sock, "commit", "top", "--top", "mid", "--dry-run")
            assert dry.returncode == 1 and dry.stderr == ""
            assert dry.stdout.splitlines()[0].endswith("free: does NOT fit")

            # --force: the job runs, and the file system fills up under it
            forced = blockctl(sock, "commit", "top", "--top", "mid", "--force", "--wait")
            assert forced.returncode == 1, (forced.stdout, forced.stderr)
            assert forced.stderr.startswith("blockctl: warning: not enough room")
            assert "committing anyway (--force)" in forced.stderr
            assert forced.stdout.splitlines()[-1] == "commit-top: failed: No space left on device"
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0
    assert digest(base) != base_digest  # the forced commit did write
    check_consistent(base)
    assert backing_of(top) == "mid.qcow2"
    assert same_data(before, top)


def test_console_script_is_installed() -> None:
    """`blockctl` itself, as the bootstrap installs it next to the venv's python."""
    script = Path(sys.executable).parent / "blockctl"
    if not script.exists():
        missing(f"{script} (run the tests from the bootstrap's virtualenv)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("blockctl ")


# --- a real terminal -----------------------------------------------------------------


def spawn_tty(chain: Chain, *args: str) -> Any:
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "30"}
    env.pop("NO_COLOR", None)
    return pexpect.spawn(
        BLOCKCTL[0], [*BLOCKCTL[1:], "--socket", chain.sock, *args],
        env=env, dimensions=(30, 120), encoding="utf-8", timeout=60,
    )  # fmt: skip


def test_commit_wait_on_a_terminal(chain: Chain) -> None:
    """What a person sees: a bar whose percentage climbs, rate and ETA, then the outcome."""
    child = spawn_tty(chain, "commit", "top", "--top", "mid", "--speed", CRAWL, "--wait")
    screen = io.StringIO()
    child.logfile_read = screen
    percents: list[float] = []
    while True:
        index = child.expect([r"(\d+\.\d)%  [\d.]+ [KMG]?i?B / 64\.0 MiB  (\S+ \S+|-)  ETA ",
                              r"commit-top: done in (\d+:\d\d:\d\d)\r?\n"])
        if index == 1:
            break
        percents.append(float(child.match.group(1)))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    rising = sorted(set(percents))
    assert len(rising) >= 3 and 0 < rising[1] < 100, percents  # it moved, visibly
    assert percents == sorted(percents)
    shown = screen.getvalue()
    assert ESCAPE in shown  # a live bar redraws in place
    assert "━" in shown and re.search(r"\d+\.\d MiB/s  ETA 0:00:\d\d  running", shown), shown
    assert chain.jobs() == []
    assert backing_of(chain.image("top")) == str(chain.image("base"))
    chain.stop()
    check(chain.image("base"))


def test_ctrl_c_cancels_the_job(chain: Chain) -> None:
    child = spawn_tty(chain, "commit", "top", "--top", "mid", "--speed", CRAWL, "--wait")
    child.expect(r"[1-9]\d?\.\d%")  # running, past the start
    child.sendintr()
    child.expect("cancelling commit-top")
    child.expect("commit-top: cancelled; the chain is as it was")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3
    assert chain.jobs() == []
    assert backing_of(chain.image("top")) == "mid.qcow2"
    chain.stop()
    assert same_data(chain.before, chain.image("top"))
    check(chain.image("base"))


def test_second_ctrl_c_exits_while_blockd_does_not_answer(chain: Chain) -> None:
    """The second Ctrl-C gives up waiting at once, even with the daemon stopped."""
    child = spawn_tty(chain, "commit", "top", "--top", "mid", "--speed", CRAWL, "--wait")
    child.expect(r"[1-9]\d?\.\d%")
    chain.daemon.signal(signal.SIGSTOP)
    try:
        child.sendintr()
        time.sleep(1)
        child.sendintr()
        child.expect(["left commit-top running", "stopped waiting for commit-top"], timeout=10)
        child.expect(pexpect.EOF, timeout=10)
        child.close()
        assert child.exitstatus == 130
    finally:
        chain.daemon.signal(signal.SIGCONT)
