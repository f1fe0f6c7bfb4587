"""Mutants the qcow2 metadata fuzzer found, replayed one by one.

Each case is a seed image and the few header/table writes that made the
mutant; it goes through the fuzzer's own trial (QSD and blockd read-only,
then blockd read-write and an active commit into a fresh base), which must
end in the verdict given here, with no failure.
"""

from __future__ import annotations

import struct

import pytest

from tests.fuzz.qcow2_fuzz import Runner

pytestmark = pytest.mark.qsd

#: name -> (seed, [(offset, struct format, value)], read-only verdict, commit phase)
CASES: dict[str, tuple[str, list[tuple[int, str, int]], str, str]] = {
    # QEMU refuses a table whose end would pass INT64_MAX, even an empty
    # snapshot table; blockd served the image (fuzz seed 2, mutant 871)
    "snapshot table offset near 2^64": (
        "v2-4k.qcow2", [(64, ">Q", 0xAB00000000000000)], "both-refused", "rw-refused"),
    # an extension list that starts 1 byte before the end of the header's
    # cluster: QEMU refuses it before it looks at the (end marker) bytes,
    # blockd read them as the end (fuzz seed 20261202, mutant 91)
    "extension header past the cluster": (
        "snapshot.qcow2", [(100, ">I", 0xFFF)], "both-refused", "rw-refused"),
    # a backing format extension whose name starts with NUL: QEMU reads an
    # empty name and probes; blockd, which never probes, named the NUL bytes
    # as an unknown driver, and now says that no format is recorded (fuzz
    # seed 20261202, mutant 35)
    "backing format blanked with NULs": (
        "overlay.qcow2", [(0x78, ">Q", 0x200000000000)], "blockd-refused", "committed"),
    # an unaligned refcount table entry (0x400) made the header's cluster look
    # like a refcount block: the read-write open's clearing of the bitmaps'
    # autoclear bit then failed the overlap check, uncaught (internal error;
    # fuzz seed 20261202, mutant 1117).  Now, as in QEMU, the entry is only
    # refused when used: the commit (which allocates nothing in the mutant) runs
    "unaligned refcount block over the header": (
        "bitmap.qcow2", [(0x1018, ">Q", 0x400)], "equal", "committed"),
    # the same for an unaligned L2 table offset in the L1 table (0x200)
    "unaligned L2 table over the header": (
        "bitmap.qcow2", [(0x3000, ">Q", 0x8000000000000200)], "equal", "job failed"),
    # an image with a snapshot and an unaligned refcount block: the read-write
    # open looks up the active L1 table's refcount (a snapshot must not share
    # it) and met the bad entry uncaught (internal error; final-code fuzz run,
    # seed 880001, mutant 3896).  The read-write open is refused, nothing written
    "unaligned refcount block in an image with a snapshot": (
        "snapshot.qcow2", [(0x1000, ">Q", 0x2800)], "equal", "rw-refused"),
    # the same with a refcount block far past 2^63: reading it overflowed the
    # host's offset type (internal error; seed 880003, mutant 6933)
    "refcount block past the largest offset in an image with a snapshot": (
        "snapshot.qcow2", [(0x1000, ">Q", 0xA573B038BDE25100)], "equal", "rw-refused"),
    # a dirty image with an L2 entry of all ones (a compressed cluster past the
    # end of the file, COPIED set): the rebuild counts what it can and leaves
    # the bad entry as qemu-img found it, no worse (seed 880001, mutant 1056)
    "dirty image with a compressed cluster past the end": (
        "bitmap.qcow2", [(0x6FD8, ">Q", 0xFFFFFFFFFFFFFFFF), (0x48, ">Q", 1)],
        "equal", "committed"),
    # a dirty image whose only L2 entry in the L1 table points at the L1 table
    # itself: the rebuild's write of the refcounts met the overlap check (the
    # L1 table's cluster is also an "active L2 table"), uncaught (internal
    # error; CI seed 4106792900, mutant 57)
    "dirty image with the L1 table as its own L2 table": (
        "bitmap.qcow2", [(0x3000, ">Q", 0x8000000000003000), (0x48, ">Q", 1)],
        "equal", "rw-refused"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fuzz_regression(qcow2_runner: Runner, case: str) -> None:
    runner = qcow2_runner
    seed, writes, verdict, commit = CASES[case]
    data = bytearray((runner.work / seed).read_bytes())
    for offset, fmt, value in writes:
        struct.pack_into(fmt, data, offset, value)
    trial = runner.trial(0, seed, [case], bytes(data))
    assert not trial.failures, trial
    assert "Unknown driver" not in trial.detail, trial
    assert trial.kind == verdict, trial
    assert trial.commit == commit, trial

