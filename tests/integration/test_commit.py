"""Intermediate block-commit on a real daemon, judged by qemu-img and qemu-io."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.helpers import DaemonProcess, RawQMP
from tests.images import (
    MiB,
    backing_of,
    check,
    check_consistent,
    create,
    digest,
    guest_view,
    qemu_img,
    qemu_io,
    same_data,
)


def chain(d: Path) -> tuple[Path, Path, Path]:
    """base (data at 0-1M, 8-9M) <- mid (1-3M, 32-36M, zeros at 8M) <- top (2-3M)."""
    return images.chain(
        d,
        base=("write -P 0x11 0 1M", "write -P 0x12 8M 1M"),
        mid=("write -P 0x21 1M 2M", "write -P 0x22 32M 4M", "write -z 8M 512k"),
        top=("write -P 0x31 2M 1M",),
    )


def add_explicit_chain(client: RawQMP, d: Path, *, read_only_base: bool = True) -> None:
    for name, backing, ro in (
        ("base", None, read_only_base),
        ("mid", "base", True),
        ("top", "mid", False),
    ):
        args: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": name,
            "read-only": ro,
            "file": {
                "driver": "file",
                "filename": str(d / f"{name}.qcow2"),
                "node-name": f"f-{name}",
            },
            "backing": backing,
        }
        assert client.execute("blockdev-add", args) == {"return": {}}


def commit(client: RawQMP, **args: Any) -> dict[str, Any]:
    return client.execute("block-commit", {"job-id": "job0", "device": "top", **args})


def finish(client: RawQMP, daemon: DaemonProcess) -> None:
    """Stop the daemon so the images are closed (and unlocked) for the judges."""
    assert client.execute("quit") == {"return": {}}
    assert daemon.wait() == 0


def node(client: RawQMP, name: str) -> dict[str, Any]:
    nodes = client.execute("query-named-block-nodes", {"flat": True})["return"]
    return next(n for n in nodes if n["node-name"] == name)


def test_commit_merges_mid_and_stitches_the_chain(blockd: DaemonProcess, tmp_path: Path) -> None:
    base, mid, top = chain(tmp_path)
    before = guest_view(top, tmp_path / "before.raw")
    mid_digest = digest(mid)
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        assert commit(client, **{"top-node": "mid", "base-node": "base"}) == {"return": {}}
        assert client.job_statuses("job0") == ["created", "running"]
        done = client.wait_event("BLOCK_JOB_COMPLETED", device="job0")
        assert done["data"] == {
            "device": "job0",
            "len": 64 * MiB,
            "offset": 64 * MiB,
            "speed": 0,
            "type": "commit",
        }
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        assert client.job_statuses("job0") == [
            "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
        ]  # fmt: skip
        assert client.execute("query-block-jobs") == {"return": []}
        # Base is read-only again; mid (added by the client) stays until deleted.
        assert node(client, "base")["ro"] is True
        assert node(client, "top")["backing_file"] == str(base)
        assert client.execute("blockdev-del", {"node-name": "mid"}) == {"return": {}}
        # Its inline file node went with it, as in QEMU.
        assert client.execute("blockdev-del", {"node-name": "f-mid"})["error"]["desc"] == (
            "Failed to find node with node-name='f-mid'"
        )
        for name in ("top", "base"):
            assert client.execute("blockdev-del", {"node-name": name}) == {"return": {}}
        assert client.execute("query-named-block-nodes") == {"return": []}
    assert backing_of(top) == str(base)
    assert same_data(before, top)
    assert digest(mid) == mid_digest
    check(base)
    check(top)
    # Zeros in mid over base data stay zeros: nothing of base resurfaces.
    assert "read 524288/524288" in qemu_io(base, "read -P 0 8M 512k")


def test_commit_of_a_header_opened_chain(blockd: DaemonProcess, tmp_path: Path) -> None:
    base, mid, top = chain(tmp_path)
    before = guest_view(top, tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        client.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "top",
                "file": {"driver": "file", "filename": str(top)},
            },
        )
        nodes = client.execute("query-named-block-nodes")["return"]
        mid_name = next(
            n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["file"] == str(mid)
        )
        assert commit(client, **{"top-node": mid_name, "backing-file": "base.qcow2"}) == {
            "return": {}
        }
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        names = {n["node-name"]: n for n in client.execute("query-named-block-nodes")["return"]}
        # The implicitly opened mid is gone; base now sits under top.
        assert mid_name not in names
        assert names["top"]["backing_file"] == str(base)
        assert names["top"]["backing_file_depth"] == 1
        assert client.execute("blockdev-del", {"node-name": "top"}) == {"return": {}}
        assert client.execute("query-named-block-nodes") == {"return": []}
    assert backing_of(top) == "base.qcow2"
    assert same_data(before, top)
    check(top)
    check(base)


def test_cancel_leaves_the_chain_as_it_was(blockd: DaemonProcess, tmp_path: Path) -> None:
    base, mid, top = chain(tmp_path)
    before = guest_view(top, tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        assert commit(client, **{"top-node": "mid", "speed": MiB, "auto-dismiss": False}) == {
            "return": {}
        }
        # Rate-limited: progress is visible while the job runs.
        [info] = client.execute("query-block-jobs")["return"]
        assert info["status"] == "running" and info["speed"] == MiB and info["len"] == 64 * MiB
        assert client.execute("block-job-cancel", {"device": "job0"}) == {"return": {}}
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="concluded")
        assert client.job_statuses("job0")[2:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
        [job] = client.execute("query-jobs")["return"]
        assert job["status"] == "concluded" and job["error"] == "Operation canceled"
        assert node(client, "base")["ro"] is True
        assert node(client, "top")["backing_file"].startswith("json:")  # still mid
        assert client.execute("job-dismiss", {"id": "job0"}) == {"return": {}}
        assert client.execute("query-jobs") == {"return": []}
        assert client.execute("blockdev-del", {"node-name": "mid"})["error"]["desc"] == (
            "Node 'mid' is busy: node is used as backing hd of 'top'"
        )
        finish(client, blockd)
    assert backing_of(top) == "mid.qcow2"
    assert same_data(before, top)
    for image in (base, mid, top):
        check(image)


def test_manual_finalize_applies_the_result_only_then(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    base, _, top = chain(tmp_path)
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        assert (
            commit(client, **{"top-node": "mid", "auto-finalize": False, "auto-dismiss": False})[
                "return"
            ]
            == {}
        )
        client.wait_event("BLOCK_JOB_PENDING", id="job0")
        assert backing_of(top) == "mid.qcow2"
        assert client.execute("block-job-dismiss", {"id": "job0"})["error"]["desc"] == (
            "Job 'job0' in state 'pending' cannot accept command verb 'dismiss'"
        )
        assert client.execute("job-finalize", {"id": "job0"}) == {"return": {}}
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="concluded")
        assert backing_of(top) == str(base)
        assert client.execute("block-job-dismiss", {"id": "job0"}) == {"return": {}}
        assert client.job_statuses("job0")[-5:] == [
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ]


def test_short_mid_keeps_hiding_what_base_holds_past_its_end(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    """base 32M with data at 20M <- mid 16M <- top 48M.

    Through top, 20M reads zeros (mid ends at 16M).  Once mid is committed
    top backs onto base directly, so base must read zeros there too (QEMU 7.2
    copies only mid's 16M and lets base's old data show through).
    """
    base = create(tmp_path / "base.qcow2", "32M")
    qemu_io(base, "write -P 0x77 20M 1M")
    mid = create(tmp_path / "mid.qcow2", "16M", backing="base.qcow2")
    qemu_io(mid, "write -P 0x21 1M 1M")
    top = create(tmp_path / "top.qcow2", "48M", backing="mid.qcow2")
    qemu_io(top, "write -P 0x31 40M 1M")
    before = guest_view(top, tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path, read_only_base=False)
        assert commit(client, **{"top-node": "mid"})["return"] == {}
        done = client.wait_event("BLOCK_JOB_COMPLETED", device="job0")
        assert "error" not in done["data"]
        finish(client, blockd)
    assert same_data(before, top)
    check(base)


@pytest.mark.parametrize("policy", ["ignore", "stop"])
def test_a_failed_write_hiding_base_past_mid_s_end_is_tried_again(
    blockd: DaemonProcess, tmp_path: Path, policy: str
) -> None:
    """As above with nothing in mid, and base's first table update (the
    zeroing at 20M) failing once: the job reports it and, as on-error lets it
    go on, writes those zeros again and then hides the rest; top reads as
    before."""
    base = create(tmp_path / "base.qcow2", "32M")
    qemu_io(base, "write -P 0x77 20M 1M", "write -P 0x78 28M 1M")
    create(tmp_path / "mid.qcow2", "16M", backing="base.qcow2")
    top = create(tmp_path / "top.qcow2", "48M", backing="mid.qcow2")
    qemu_io(top, "write -P 0x31 40M 1M")
    before = guest_view(top, tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_chain_with_blkdebug(client, tmp_path, "base", {"event": "l2_update", "once": True})
        assert commit(client, **{"top-node": "mid", "on-error": policy})["return"] == {}
        error = client.wait_event("BLOCK_JOB_ERROR", device="job0")
        assert error["data"] == {"device": "job0", "operation": "write", "action": policy}
        if policy == "stop":
            client.wait_event("JOB_STATUS_CHANGE", id="job0", status="paused")
            assert client.execute("block-job-resume", {"device": "job0"}) == {"return": {}}
        done = client.wait_event("BLOCK_JOB_COMPLETED", device="job0")
        assert "error" not in done["data"]
        finish(client, blockd)
    assert same_data(before, top)
    check(base)


def test_small_base_is_grown(blockd: DaemonProcess, tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "16M")
    mid = create(tmp_path / "mid.qcow2", "48M", backing="base.qcow2")
    qemu_io(mid, "write -P 0x21 40M 1M")
    top = create(tmp_path / "top.qcow2", "48M", backing="mid.qcow2")
    before = guest_view(top, tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        assert commit(client, **{"top-node": "mid"})["return"] == {}
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        assert node(client, "base")["image"]["virtual-size"] == 48 * MiB
        finish(client, blockd)
    assert same_data(before, top)
    check(base)


def test_sigkill_mid_commit_leaves_valid_images(blockd: DaemonProcess, tmp_path: Path) -> None:
    base, mid, top = chain(tmp_path)
    qemu_io(mid, "write -P 0x23 40M 16M")
    before = guest_view(top, tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        assert commit(client, **{"top-node": "mid", "speed": 4 * MiB})["return"] == {}
        time.sleep(1.5)
        [info] = client.execute("query-block-jobs")["return"]
        assert 0 < info["offset"] < info["len"]
        blockd.signal(signal.SIGKILL)
        blockd.wait()
    # A kill may leave leaked clusters (allocated, not yet referenced), never
    # corruption.
    for image in (base, mid, top):
        check_consistent(image)
    assert backing_of(top) == "mid.qcow2"
    assert same_data(before, top)


def test_commit_into_a_shared_base_is_refused(blockd: DaemonProcess, tmp_path: Path) -> None:
    base, _, _ = chain(tmp_path)
    other = create(tmp_path / "other.qcow2", backing="base.qcow2")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        client.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "other",
                "backing": "base",
                "file": {"driver": "file", "filename": str(other)},
            },
        )
        reply = commit(client, **{"top-node": "mid"})
        assert reply["error"]["class"] == "GenericError"
        assert "would change what 'other' reads" in reply["error"]["desc"]
        assert client.job_statuses("job0") == []
        assert node(client, "base")["ro"] is True
        finish(client, blockd)
    check(base)


def test_too_long_backing_string_is_refused_before_anything(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    base, _, top = chain(tmp_path)
    base_digest = digest(base)
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        reply = commit(client, **{"top-node": "mid", "backing-file": "x" * 1100})
        assert reply["error"]["desc"].startswith("Backing file name too long")
        assert client.execute("query-jobs") == {"return": []}
    assert digest(base) == base_digest
    assert backing_of(top) == "mid.qcow2"


@pytest.mark.parametrize(
    ("args", "desc"),
    [
        (
            {"top-node": "mid", "backing-file": "base\0.qcow2"},
            "Backing file name must not contain a NUL character",
        ),
        ({"top": "mid\0.qcow2"}, "Top image file mid\0.qcow2 not found"),
        (
            {"top-node": "mid", "base": "base\0.qcow2"},
            "Can't find 'base\0.qcow2' in the backing chain",
        ),
    ],
)
def test_names_with_nul_are_refused_before_anything(
    blockd: DaemonProcess, tmp_path: Path, args: dict[str, str], desc: str
) -> None:
    """A NUL ends a name in the image header and on the host: such a name
    could only ever mean another file (QSD writes C0 80 into the header)."""
    base, _, top = chain(tmp_path)
    base_digest = digest(base)
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        reply = commit(client, **args)
        assert reply["error"] == {"class": "GenericError", "desc": desc}
        assert client.execute("query-jobs") == {"return": []}
    assert digest(base) == base_digest
    assert backing_of(top) == "mid.qcow2"


def test_base_that_cannot_be_written_fails_cleanly(blockd: DaemonProcess, tmp_path: Path) -> None:
    """A base marked corrupt opens read-only but cannot be reopened read-write."""
    base, _, top = chain(tmp_path)
    qemu_img("amend", "-f", "qcow2", "-o", "compat=1.1", str(base))
    with open(base, "r+b") as f:  # set the corrupt bit (incompatible feature bit 1)
        f.seek(72)
        flags = int.from_bytes(f.read(8), "big") | 2
        f.seek(72)
        f.write(flags.to_bytes(8, "big"))
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        reply = commit(client, **{"top-node": "mid"})
        assert reply["error"]["class"] == "GenericError"
        assert "corrupt" in reply["error"]["desc"]
        assert client.job_statuses("job0") == ["created", "null"]
        assert node(client, "base")["ro"] is True
        # Nothing is held: the chain can be taken apart again.
        for name in ("top", "mid", "base"):
            assert client.execute("blockdev-del", {"node-name": name}) == {"return": {}}
    assert backing_of(top) == "mid.qcow2"


@pytest.mark.parametrize("verb", ["block-job-pause", "block-job-resume", "block-job-complete"])
def test_verbs_on_a_running_commit(blockd: DaemonProcess, tmp_path: Path, verb: str) -> None:
    chain(tmp_path)
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        commit(client, **{"top-node": "mid", "speed": 1})
        reply = client.execute(verb, {"device": "job0"})
        if verb == "block-job-pause":
            assert reply == {"return": {}}
            # Paused at once if idle, else at the end of the chunk in flight.
            client.wait_event("JOB_STATUS_CHANGE", id="job0", status="paused")
            assert client.execute("query-block-jobs")["return"][0]["status"] == "paused"
            assert client.execute("block-job-cancel", {"device": "job0"})["error"]["desc"] == (
                "The block job for device 'job0' is currently paused"
            )
        elif verb == "block-job-resume":
            assert reply["error"]["desc"] == "Can't resume a job that was not paused"
        else:
            assert (
                reply["error"]["desc"]
                == "Job 'job0' in state 'running' cannot accept command verb 'complete'"
            )
        assert client.execute("block-job-cancel", {"device": "job0", "force": True}) == {
            "return": {}
        }
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")


def add_chain_with_blkdebug(client: RawQMP, d: Path, where: str, rule: dict[str, Any]) -> None:
    """The explicit chain, with a blkdebug filter between ``where`` and its file."""
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        file: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
        if name == where:
            file = {"driver": "blkdebug", "image": file, "inject-error": [rule]}
        args = {"driver": "qcow2", "node-name": name, "read-only": name != "top",
                "file": file, "backing": backing}  # fmt: skip
        assert client.execute("blockdev-add", args) == {"return": {}}


def first_data_sector(image: Path) -> int:
    import json

    extents = json.loads(qemu_img("map", "--output=json", str(image)))
    return next(e["offset"] for e in extents if e.get("data") and e["depth"] == 0) // 512


@pytest.mark.parametrize(
    ("policy", "errno", "action", "io_status"),
    [
        ("report", 28, "report", None),
        ("ignore", 28, "ignore", None),
        ("stop", 5, "stop", "failed"),
        ("stop", 28, "stop", "nospace"),
        ("enospc", 28, "stop", "nospace"),
        ("enospc", 5, "report", None),
        ("auto", 28, "stop", "nospace"),
    ],
)
def test_write_errors_on_base(
    blockd: DaemonProcess,
    tmp_path: Path,
    policy: str,
    errno: int,
    action: str,
    io_status: str | None,
) -> None:
    base, mid, top = chain(tmp_path)
    before = guest_view(top, tmp_path / "before.raw")
    rule = {"event": "write_aio", "errno": errno, "once": True}
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_chain_with_blkdebug(client, tmp_path, "base", rule)
        assert commit(client, **{"top-node": "mid", "on-error": policy})["return"] == {}
        error = client.wait_event("BLOCK_JOB_ERROR", device="job0")
        assert error["data"] == {"device": "job0", "operation": "write", "action": action}
        if action == "stop":
            client.wait_event("JOB_STATUS_CHANGE", id="job0", status="paused")
            [info] = client.execute("query-block-jobs")["return"]
            assert info["io-status"] == io_status and info["paused"] is True
            assert client.execute("block-job-resume", {"device": "job0"}) == {"return": {}}
        done = client.wait_event("BLOCK_JOB_COMPLETED", device="job0")
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        if action == "report":
            strerror = "No space left on device" if errno == 28 else "Input/output error"
            assert done["data"]["error"] == strerror
            assert client.job_statuses("job0")[2:] == [
                "BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null",
            ]  # fmt: skip
        else:
            assert "error" not in done["data"]
        assert node(client, "base")["ro"] is True
        finish(client, blockd)
    assert backing_of(top) == ("mid.qcow2" if action == "report" else str(base))
    assert same_data(before, top)
    for image in (base, mid, top):
        check(image)


def test_read_error_on_mid_is_a_read_operation(blockd: DaemonProcess, tmp_path: Path) -> None:
    base, mid, top = chain(tmp_path)
    rule = {"event": "read_aio", "errno": 5, "sector": first_data_sector(mid), "once": True}
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_chain_with_blkdebug(client, tmp_path, "mid", rule)
        assert commit(client, **{"top-node": "mid", "on-error": "stop"})["return"] == {}
        error = client.wait_event("BLOCK_JOB_ERROR", device="job0")
        assert error["data"] == {"device": "job0", "operation": "read", "action": "stop"}
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="paused")
        assert client.execute("query-block-jobs")["return"][0]["io-status"] == "failed"
        client.execute("block-job-resume", {"device": "job0"})
        done = client.wait_event("BLOCK_JOB_COMPLETED", device="job0")
        assert "error" not in done["data"]
        finish(client, blockd)
    assert backing_of(top) == str(base)
    check(base)


def test_two_commits_at_once_and_a_busy_chain(blockd: DaemonProcess, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    views = []
    for d in (first, second):
        chain(d)
        views.append(guest_view(d / "top.qcow2", d / "before.raw"))
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        for prefix, d in (("a", first), ("b", second)):
            for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
                file = {"driver": "file", "filename": str(d / f"{name}.qcow2")}
                args = {"driver": "qcow2", "node-name": f"{prefix}{name}", "file": file}
                args["backing"] = None if backing is None else f"{prefix}{backing}"
                assert client.execute("blockdev-add", args) == {"return": {}}
        for prefix in "ab":
            job = {"job-id": f"job-{prefix}", "device": f"{prefix}top", "top-node": f"{prefix}mid"}
            reply = client.execute("block-commit", {**job, "speed": 8 * MiB})
            assert reply == {"return": {}}
        # Both run; the chain of the first is busy for another commit.
        busy = client.execute(
            "block-commit", {"job-id": "job-c", "device": "atop", "top-node": "amid"}
        )
        assert busy["error"]["desc"] == "Need a root block node"
        assert {j["device"] for j in client.execute("query-block-jobs")["return"]} == {
            "job-a",
            "job-b",
        }
        for prefix in "ab":
            client.wait_event("JOB_STATUS_CHANGE", id=f"job-{prefix}", status="null")
        finish(client, blockd)
    for d, view in zip((first, second), views, strict=True):
        assert same_data(view, d / "top.qcow2")
        assert backing_of(d / "top.qcow2") == str(d / "base.qcow2")


LAYOUTS = {
    # name: (layers bottom-up as (file, qemu-img -o options), commit top index, base index)
    "4 images, mid two": ([("base", ""), ("s1", ""), ("s2", ""), ("top", "")], 2, 0),
    "4 images, shallow": ([("base", ""), ("s1", ""), ("s2", ""), ("top", "")], 2, 1),
    "mixed cluster sizes": (
        [("base", "cluster_size=512"), ("mid", "cluster_size=2M"), ("top", "cluster_size=4096")],
        1,
        0,
    ),
    "v2 base, v3 above": (
        [("base", "compat=0.10"), ("mid", ""), ("top", "refcount_bits=64")],
        1,
        0,
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_commit_layouts(blockd: DaemonProcess, tmp_path: Path, layout: str) -> None:
    layers, top_index, base_index = LAYOUTS[layout]
    paths: list[Path] = []
    for i, (name, options) in enumerate(layers):
        backing = None if i == 0 else f"{layers[i - 1][0]}.qcow2"
        paths.append(create(tmp_path / f"{name}.qcow2", backing=backing, options=options))
        # Every layer writes a pattern of its own, partly over the ones below,
        # and zeroes a range that hides data below.
        qemu_io(paths[-1], f"write -P {0x40 + i} {i * 3}M 4M", f"write -z {i * 3 + 1}M 256k")
    before = guest_view(paths[-1], tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        for i, (name, _) in enumerate(layers):
            args = {"driver": "qcow2", "node-name": name, "read-only": i < len(layers) - 1,
                    "backing": None if i == 0 else layers[i - 1][0],
                    "file": {"driver": "file", "filename": str(paths[i])}}  # fmt: skip
            assert client.execute("blockdev-add", args) == {"return": {}}
        top_name, base_name = layers[top_index][0], layers[base_index][0]
        reply = commit(client, **{"top-node": top_name, "base-node": base_name,
                                  "backing-file": f"{base_name}.qcow2"})  # fmt: skip
        assert reply == {"return": {}}
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        finish(client, blockd)
    overlay = paths[top_index + 1]
    assert backing_of(overlay) == f"{base_name}.qcow2"
    assert same_data(before, paths[-1])
    for path in paths:
        check(path)


def test_commit_into_a_raw_base(blockd: DaemonProcess, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", str(base), "64M")
    qemu_io(base, "write -P 0x11 0 8M", fmt="raw")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid))
    qemu_io(mid, "write -P 0x21 1M 2M", "write -z 4M 1M")
    top = create(tmp_path / "top.qcow2", backing="mid.qcow2")
    before = guest_view(top, tmp_path / "before.raw")
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        for args in (
            {"driver": "raw", "node-name": "base", "read-only": True, "file": str(base)},
            {"driver": "qcow2", "node-name": "mid", "read-only": True, "backing": "base",
             "file": str(mid)},
            {"driver": "qcow2", "node-name": "top", "backing": "mid", "file": str(top)},
        ):  # fmt: skip
            args["file"] = {"driver": "file", "filename": args["file"]}
            assert client.execute("blockdev-add", args) == {"return": {}}
        assert commit(client, **{"top-node": "mid"}) == {"return": {}}
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        finish(client, blockd)
    info = json.loads(qemu_img("info", "--output=json", str(top)))
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"
    assert same_data(before, top)
    check(top)


def second_overlay(d: Path, options: str = "") -> Path:
    """top2.qcow2, also backed by mid.qcow2, with data of its own."""
    top2 = create(d / "top2.qcow2", backing="mid.qcow2", options=options)
    qemu_io(top2, "write -P 0x41 1M 64k")
    return top2


def add_second_overlay(client: RawQMP, top2: Path, *, read_only: bool = False) -> None:
    """Open top2 onto the client's mid node."""
    args = {
        "driver": "qcow2",
        "node-name": "top2",
        "read-only": read_only,
        "backing": "mid",
        "file": {"driver": "file", "filename": str(top2)},
    }
    assert client.execute("blockdev-add", args) == {"return": {}}


def test_every_overlay_of_top_is_moved_onto_base(blockd: DaemonProcess, tmp_path: Path) -> None:
    """Issue 11 defect 2: not only the device's overlay; a read-only one stays read-only."""
    base, mid, top = chain(tmp_path)
    top2 = second_overlay(tmp_path)
    views = {i: guest_view(i, tmp_path / f"{i.stem}.raw") for i in (top, top2)}
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        add_second_overlay(client, top2, read_only=True)
        assert commit(client, **{"top-node": "mid", "backing-file": "base.qcow2"}) == {"return": {}}
        assert "error" not in client.wait_event("BLOCK_JOB_COMPLETED", device="job0")["data"]
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        assert node(client, "top2")["backing_file"] == str(base)
        assert node(client, "top2")["ro"] is True
        # Nothing reads through mid any more: the client may close it.
        assert client.execute("blockdev-del", {"node-name": "mid"}) == {"return": {}}
        finish(client, blockd)
    mid.unlink()
    for image, view in views.items():
        assert backing_of(image) == "base.qcow2"
        assert same_data(view, image)
        check(image)
    check(base)


def test_an_overlay_whose_header_cannot_take_the_name_stops_the_commit_first(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    """All headers are checked before any is written: top's would fit, top2's not."""
    base, mid, top = chain(tmp_path)
    top2 = second_overlay(tmp_path, options="cluster_size=512")
    digests = {i: digest(i) for i in (base, mid, top, top2)}
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        add_second_overlay(client, top2)
        reply = commit(client, **{"top-node": "mid", "backing-file": "b" * 600})
        assert reply["error"]["desc"] == (
            "Backing file name too long for the header of 'top2' "
            "(it must fit in one 512-byte cluster)"
        )
        assert client.execute("query-jobs") == {"return": []}
        finish(client, blockd)
    assert {i: digest(i) for i in (base, mid, top, top2)} == digests


def test_commit_of_a_writably_exported_intermediate_is_refused(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    """QEMU switches to an active commit here; blockd refuses rather than lose writes."""
    base, mid, top = chain(tmp_path)
    digests = {i: digest(i) for i in (base, mid, top)}
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
            args = {
                "driver": "qcow2",
                "node-name": name,
                "backing": backing,
                "file": {"driver": "file", "filename": str(tmp_path / f"{name}.qcow2")},
            }
            assert client.execute("blockdev-add", args) == {"return": {}}
        addr = {"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}}
        assert client.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
        export = {"type": "nbd", "id": "e0", "node-name": "mid", "writable": True}
        assert client.execute("block-export-add", export) == {"return": {}}
        reply = commit(client, **{"top-node": "mid"})
        assert reply["error"] == {
            "class": "GenericError",
            "desc": "Cannot commit 'mid' while it is exported writable: "
            "writes to it during the commit would be lost",
        }
        # refused once the job has taken its nodes, where QEMU checks their
        # permissions (and fails a commit of an exported node below top): a
        # client sees it created and gone, as then, and nothing changed
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        assert client.job_statuses("job0") == ["created", "null"]
        assert client.execute("query-jobs") == {"return": []}
        client.events.clear()
        # A read-only export of it is fine, and follows mid onto base.
        assert client.execute("block-export-del", {"id": "e0"}) == {"return": {}}
        client.wait_event("BLOCK_EXPORT_DELETED", id="e0")
        export = {"type": "nbd", "id": "e1", "node-name": "mid"}
        assert client.execute("block-export-add", export) == {"return": {}}
        assert commit(client, **{"top-node": "mid"}) == {"return": {}}
        client.wait_event("JOB_STATUS_CHANGE", id="job0", status="null")
        exports = client.execute("query-block-exports")["return"]
        assert [(e["id"], e["node-name"]) for e in exports] == [("e1", "base")]
        finish(client, blockd)
    assert digests[top] != digest(top)  # re-pointed by the second commit
    assert backing_of(top) == str(base)
    check(base)


def test_commit_of_an_image_another_node_uses_as_file_is_refused(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    """QSD re-points such a node's file onto base; blockd refuses (README lists it)."""
    base, mid, top = chain(tmp_path)
    digests = {i: digest(i) for i in (base, mid, top)}
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        add_explicit_chain(client, tmp_path)
        raw = {"driver": "raw", "node-name": "r", "read-only": True, "file": "mid"}
        assert client.execute("blockdev-add", raw) == {"return": {}}
        reply = commit(client, **{"top-node": "mid"})
        assert reply["error"] == {
            "class": "GenericError",
            "desc": "Cannot commit 'mid': node 'r' uses it as 'file', "
            "and blockd re-points only overlays and exports onto the base",
        }
        assert client.execute("query-jobs") == {"return": []}
        assert node(client, "base")["ro"] is True
        finish(client, blockd)
    assert {i: digest(i) for i in (base, mid, top)} == digests


def test_commit_refused_up_front_when_an_overlay_cannot_take_base(
    blockd: DaemonProcess, tmp_path: Path
) -> None:
    """The overlay above top gets base's name in its header when the commit
    completes, so a read-only overlay that cannot be reopened read-write (it
    is marked corrupt) is refused before anything is copied, not after the
    whole copy: no job, base untouched and read-only."""
    base, _, top = chain(tmp_path)
    with open(top, "r+b") as f:  # set the corrupt bit (incompatible feature bit 1)
        f.seek(72)
        flags = int.from_bytes(f.read(8), "big") | 2
        f.seek(72)
        f.write(flags.to_bytes(8, "big"))
    before = digest(base)
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
            file = {"driver": "file", "filename": str(tmp_path / f"{name}.qcow2")}
            args = {"driver": "qcow2", "node-name": name, "read-only": True,
                    "backing": backing, "file": file}  # fmt: skip
            assert client.execute("blockdev-add", args) == {"return": {}}
        reply = commit(client, **{"top-node": "mid"})
        assert reply["error"] == {
            "class": "GenericError",
            "desc": "qcow2: Image is corrupt; cannot be opened read/write",
        }
        assert client.execute("query-jobs") == {"return": []}
        assert node(client, "base")["ro"] is True
        finish(client, blockd)
    assert digest(base) == before
    assert backing_of(top) == "mid.qcow2"
