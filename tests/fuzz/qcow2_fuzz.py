"""One mutant at a time through blockd and qemu-storage-daemon (the reference).

Both daemons run for the whole session (restarted if one dies; for blockd
a death is a failure) and are driven over QMP sockets; data is read over
their NBD exports with a raw client, so a read goes through each daemon's
own qcow2 code.  The trial of one mutant:

1. QSD: ``blockdev-add`` read-only (backing from the header), export, read
   the whole disk (at most :data:`READ_LIMIT` bytes) in chunks, delete.
2. blockd: the same, on its own copy of the mutant.
3. blockd: a fresh qcow2 base (a copy of an empty qemu-img image), the
   mutant opened read-write over it (``backing`` names the base node), an
   active ``block-commit`` into the base, ``job-complete``, ``blockdev-del``.

QSD stands in for qemu-img (the same QEMU 7.2 block layer, without a
process per mutant); every :data:`QEMU_IMG_EVERY` th mutant ``qemu-img
convert`` reads it too, and any difference from QSD is listed.

Verdicts (:class:`Trial.kind`): both refused, both served equal data, or a
disagreement (one refused what the other served, read errors differ, QSD
died); failures are blockd dying, hanging, logging an internal error,
leaving a node behind, serving different bytes where both served, writing
to the mutant other than the header's feature bits (the corrupt bit QEMU
sets when a read-write node meets corruption, the autoclear bits a
read-write open clears; a refused open may change nothing; a dirty mutant
gets its refcounts rebuilt, which may write anywhere but must not leave
``qemu-img check`` finding more corruptions or errors than before), or a base that
``qemu-img check`` finds corrupt after the commit, or that differs from the
mutant's data.
"""

from __future__ import annotations

import collections
import contextlib
import json
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import require_tool
from tests.fuzz.nbd_clients import connect, go_option, receive_exactly, request, rss_bytes
from tests.fuzz.qcow2_corpus import backing_pointer, header_size
from tests.helpers import DaemonProcess, RawQMP, start_blockd, start_qsd

KiB = 1 << 10
MiB = 1 << 20
#: the most of a mutant's guest that is read (mutated sizes can be petabytes)
READ_LIMIT = 8 * MiB
CHUNK = 64 * KiB
#: a commit of a bigger guest is skipped (it would take time, not find bugs)
COMMIT_LIMIT = 64 * MiB
#: QMP replies and NBD reads slower than this count as a hang
TIMEOUT = 60.0
#: every this many mutants QSD's reading is checked against ``qemu-img convert``'s
QEMU_IMG_EVERY = 25
#: what the RW phase may change in the mutant: incompatible bits (corrupt) and autoclear bits
ALLOWED_WRITES = [(72, 80), (88, 96)]


class Hang(Exception):
    """A daemon did not answer in :data:`TIMEOUT` seconds."""


class InternalError(Exception):
    """blockd answered a command with an uncaught exception."""


class Died(Exception):
    """A daemon's process ended (or closed its monitor)."""


@dataclass
class View:
    """What a daemon served: export size and each chunk's bytes, or its NBD error."""

    size: int
    chunks: list[bytes | int]


@dataclass
class Daemon:
    kind: str  # "blockd" or "qsd"
    dir: Path
    process: DaemonProcess | None = None
    qmp: RawQMP | None = None
    starts: int = 0

    @property
    def nbd(self) -> Path:
        return self.dir / f"{self.kind}-nbd.sock"

    def start(self) -> None:
        sock = self.dir / f"{self.kind}-{self.starts}.sock"
        self.starts += 1
        self.process = start_blockd(sock) if self.kind == "blockd" else start_qsd(sock)
        self.qmp = RawQMP(sock, timeout=TIMEOUT)
        self.qmp.negotiate()
        with contextlib.suppress(FileNotFoundError):
            self.nbd.unlink()
        addr = {"type": "unix", "data": {"path": str(self.nbd)}}
        assert self.execute("nbd-server-start", addr=addr) == {"return": {}}

    def stop(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.process is not None:
            self.process.stop()
        self.qmp = self.process = None

    def kill(self) -> None:
        """After a hang: our own process, by its id."""
        if self.process is not None and self.process.proc.poll() is None:
            self.process.proc.send_signal(signal.SIGKILL)
            self.process.proc.wait()
        self.stop()

    def alive(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def execute(self, command: str, **arguments: Any) -> dict[str, Any]:
        assert self.qmp is not None
        try:
            reply = self.qmp.execute(command, arguments)
        except TimeoutError as exc:
            raise Hang(f"{self.kind}: no reply to {command} in {TIMEOUT} s") from exc
        except (EOFError, OSError) as exc:
            raise Died(f"{self.kind}: monitor gone during {command}: {exc}") from exc
        assert isinstance(reply, dict)
        if self.kind == "blockd" and "Internal error" in str(reply.get("error", "")):
            raise InternalError(f"{command}: {reply['error']['desc']}")
        return reply

    def wait_event(self, name: str, **data: Any) -> dict[str, Any]:
        assert self.qmp is not None
        try:
            return self.qmp.wait_event(name, timeout=TIMEOUT, **data)
        except TimeoutError as exc:
            raise Hang(f"{self.kind}: no {name} {data} in {TIMEOUT} s") from exc
        except (EOFError, OSError) as exc:
            raise Died(f"{self.kind}: monitor gone waiting for {name}: {exc}") from exc

    def rss(self) -> int:
        assert self.process is not None
        return rss_bytes(self.process.proc.pid)

    def nodes(self) -> list[str]:
        return [n["node-name"] for n in self.execute("query-named-block-nodes")["return"]]

    def view(self, node: str, options: dict[str, Any]) -> View | str:
        """Open ``options`` as ``node``, read it over NBD, close it; or the refusal."""
        assert self.qmp is not None
        self.qmp.events.clear()
        reply = self.execute("blockdev-add", **options)
        if "error" in reply:
            return str(reply["error"]["desc"])
        try:
            assert self.execute("block-export-add", type="nbd", id=node, **{"node-name": node}) \
                == {"return": {}}
            return read_export(self.nbd, node.encode())
        finally:
            self.execute("block-export-del", id=node, mode="hard")
            self.wait_event("BLOCK_EXPORT_DELETED", id=node)
            reply = self.execute("blockdev-del", **{"node-name": node})
            assert reply == {"return": {}}, reply


def read_export(path: Path, name: bytes) -> View:
    """The export's size and contents (up to READ_LIMIT), chunk by chunk, pipelined."""
    try:
        sock = connect(path, timeout=TIMEOUT)
    except OSError as exc:
        raise Died(f"cannot connect to the NBD server: {exc}") from exc
    try:
        assert receive_exactly(sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
        sock.sendall(struct.pack(">I", 3) + go_option(name))
        size = -1
        while True:
            _magic, _opt, kind, length = struct.unpack(">QIII", receive_exactly(sock, 20))
            payload = receive_exactly(sock, length)
            if kind == 3 and struct.unpack_from(">H", payload)[0] == 0:
                size = struct.unpack_from(">Q", payload, 2)[0]
            if kind == 1:
                break
            if kind & 0x80000000:
                raise ConnectionError(f"NBD GO refused: {kind:#x} {payload!r}")
        n = min(size, READ_LIMIT)
        wants = {i + 1: (off, min(CHUNK, n - off)) for i, off in enumerate(range(0, n, CHUNK))}
        sock.sendall(b"".join(request(0, off, ln, handle=h) for h, (off, ln) in wants.items()))
        chunks: dict[int, bytes | int] = {}
        while len(chunks) < len(wants):
            magic, error, handle = struct.unpack(">IIQ", receive_exactly(sock, 16))
            assert magic == 0x67446698 and handle in wants, (magic, handle)
            chunks[handle] = error if error else receive_exactly(sock, wants[handle][1])
        sock.sendall(request(2))
        return View(size, [chunks[h] for h in sorted(chunks)])
    except TimeoutError as exc:
        raise Hang(f"NBD read of {name!r} took over {TIMEOUT} s") from exc
    except (EOFError, OSError) as exc:  # the connection dropped, or GO refused
        raise Died(f"NBD read of {name!r} failed: {exc}") from exc
    finally:
        sock.close()


def qcow2_options(node: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": str(path)}, **extra}


def data_of(view: View) -> bytes | None:
    """The whole view's bytes, if every chunk was served."""
    if any(isinstance(c, int) for c in view.chunks):
        return None
    return b"".join(c for c in view.chunks if isinstance(c, bytes))


def is_dirty(data: bytes) -> bool:
    """Whether a version 3 header has the dirty bit (incompatible bit 0) set."""
    return struct.unpack_from(">I", data, 4)[0] >= 3 and bool(data[79] & 1)


def check_problems(image: Path) -> dict[str, int]:
    """What ``qemu-img check`` counts against the image, leaks aside (empty: sound)."""
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                          capture_output=True, text=True)  # fmt: skip
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"unreadable": proc.returncode}
    return {k: report[k] for k in ("corruptions", "check-errors") if report.get(k)}


def changed_outside_allowed(before: bytes, after: bytes) -> list[int]:
    """Offsets where the mutant changed outside :data:`ALLOWED_WRITES` (first few)."""
    if len(before) != len(after):
        return [min(len(before), len(after))]
    if before == after:
        return []
    out = []
    for i in range(len(before)):
        if before[i] != after[i] and not any(lo <= i < hi for lo, hi in ALLOWED_WRITES):
            out.append(i)
            if len(out) >= 8:
                break
    return out


@dataclass
class Trial:
    index: int
    seed: str
    notes: list[str]
    kind: str = ""
    failures: list[str] = field(default_factory=list)
    detail: str = ""
    commit: str = ""


def compare(q: View | str, b: View | str) -> tuple[str, str, list[str]]:
    """(kind, detail, failures) of the two read-only views."""
    if isinstance(q, str) and isinstance(b, str):
        return "both-refused", "", []
    if isinstance(b, str):
        return "blockd-refused", f"blockd: {b}", []
    if isinstance(q, str):
        return "qsd-refused", f"qsd: {q}", []
    if q.size != b.size:
        return "size-differs", f"qsd {q.size}, blockd {b.size}", [
            f"export size {b.size}, QSD's {q.size}"]
    wrong, q_err, b_err = [], [], []
    for i, (qc, bc) in enumerate(zip(q.chunks, b.chunks, strict=True)):
        if isinstance(qc, bytes) and isinstance(bc, bytes):
            if qc != bc:
                wrong.append(i * CHUNK)
        elif isinstance(qc, int) and isinstance(bc, bytes):
            q_err.append(i * CHUNK)
        elif isinstance(bc, int) and isinstance(qc, bytes):
            b_err.append(i * CHUNK)
    if wrong:
        return "wrong-data", f"at {wrong[:4]}", [f"served different bytes at {wrong[:4]}"]
    if b_err and q_err:
        return "read-errors-differ", f"blockd EIO at {b_err[:4]}, qsd at {q_err[:4]}", []
    if b_err:
        return "blockd-read-error", f"blockd EIO at {b_err[:4]}", []
    if q_err:
        return "qsd-read-error", f"qsd EIO at {q_err[:4]}", []
    return "equal", "", []


class Runner:
    """The two daemons and a working directory next to the seeds (backing names are relative)."""

    def __init__(self, work: Path, sock_dir: Path, base_template: Path) -> None:
        self.work = work
        self.base_template = base_template
        self.blockd = Daemon("blockd", sock_dir)
        self.qsd = Daemon("qsd", sock_dir)
        self.blockd.start()
        self.qsd.start()
        self.rss: list[tuple[int, int]] = []
        #: QSD against qemu-img on sampled mutants: verdict -> count, and the mismatches
        self.qemu_img: collections.Counter[str] = collections.Counter()
        self.qemu_img_mismatches: list[tuple[int, str]] = []

    def close(self) -> None:
        self.blockd.stop()
        self.qsd.stop()

    def trial(self, index: int, seed_name: str, notes: list[str], data: bytes) -> Trial:
        t = Trial(index, seed_name, notes)
        mine, theirs = self.work / "m.qcow2", self.work / "q.qcow2"
        mine.write_bytes(data)
        theirs.write_bytes(data)
        q = self._qsd_view(t, "q", qcow2_options("q", theirs, **{"read-only": True}))
        if index % QEMU_IMG_EVERY == 0 and header_size(data) <= READ_LIMIT:
            self._against_qemu_img(index, theirs, q)
        try:
            b = self.blockd.view("m", qcow2_options("m", mine, **{"read-only": True}))
            after = mine.read_bytes()
            if after != data:
                t.failures.append(f"read-only open changed the file at "
                                  f"{changed_outside_allowed(data, after) or 'feature bits'}")
            t.kind, t.detail, fails = compare(q, b)
            t.failures += fails
            self._commit(t, data, q, b)
            left = self.blockd.nodes()
            if left:
                t.failures.append(f"nodes left behind: {left}")
                for node in left:
                    self.blockd.execute("blockdev-del", **{"node-name": node})
        except Hang as exc:
            t.failures.append(f"hang: {exc}")
            self.blockd.kill()
            self.blockd.start()
        except InternalError as exc:
            t.failures.append(f"internal error: {exc}")
            for node in self.blockd.nodes():
                self.blockd.execute("blockdev-del", **{"node-name": node})
        except Died as exc:
            code = self.blockd.process.proc.poll() if self.blockd.process else None
            log = self.blockd.process.stderr()[-2000:] if self.blockd.process else ""
            t.failures.append(f"blockd died (exit {code}): {exc}\n{log}")
            self.blockd.kill()
            self.blockd.start()
        if index % 50 == 0 and self.blockd.alive():
            self.rss.append((index, self.blockd.rss()))
        return t

    def _against_qemu_img(self, index: int, image: Path, q: View | str) -> None:
        """QSD is the reference because it is qemu-img's block layer without a
        process per mutant; this checks that the two really read alike."""
        raw = self.work / "q.raw"
        try:
            done = subprocess.run(
                [require_tool("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", str(image),
                 str(raw)], capture_output=True, text=True, errors="replace", timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.qemu_img["qemu-img hung"] += 1
            self.qemu_img_mismatches.append((index, "qemu-img convert hung"))
            return
        if done.returncode != 0:
            verdict = "both failed" if isinstance(q, str) or data_of(q) is None else "differ"
            detail = done.stderr.strip()
        elif isinstance(q, str):
            verdict, detail = "differ", f"QSD refused: {q}"
        else:
            want, have = data_of(q), raw.read_bytes()
            same = want is not None and want == have[: len(want)] \
                and -(-len(have) // 512) * 512 == q.size
            verdict, detail = ("same data" if same else "differ"), "bytes or size"
        self.qemu_img[verdict] += 1
        if verdict == "differ":
            self.qemu_img_mismatches.append((index, detail))

    def _qsd_view(self, t: Trial, node: str, options: dict[str, Any]) -> View | str:
        try:
            return self.qsd.view(node, options)
        except (Hang, Died, AssertionError) as exc:
            t.notes.append(f"QSD failed: {exc}")
            self.qsd.kill()
            self.qsd.start()
            return f"(QSD died or hung: {exc})"

    def _commit(self, t: Trial, data: bytes, q: View | str, b: View | str) -> None:
        """Mutant read-write over a fresh base, active commit into it, both closed."""
        if header_size(data) > COMMIT_LIMIT:
            t.commit = "skipped (size)"
            return
        mine = self.work / "m.qcow2"
        base = self.work / "base.qcow2"
        shutil.copyfile(self.base_template, base)
        d = self.blockd
        assert d.qmp is not None
        d.qmp.events.clear()
        reply = d.execute("blockdev-add", **qcow2_options("base", base, backing=None))
        assert reply == {"return": {}}, reply
        reply = d.execute("blockdev-add", **qcow2_options("m", mine, backing="base"))
        if "error" in reply:
            t.commit = "rw-refused"
            self._del("base")
            after = mine.read_bytes()
            if after != data:
                t.failures.append("a refused read-write open changed the file at "
                                  f"{changed_outside_allowed(data, after) or 'feature bits'}")
            return
        reply = d.execute("block-commit", **{"job-id": "c", "device": "m"})
        if "error" in reply:
            t.commit = f"commit refused: {reply['error']['desc']}"
        else:
            ended = self._job_end()
            t.commit = "committed" if ended is None else "job failed"
            t.detail += f" (commit: {ended})" if ended else ""
        self._del("m")
        self._del("base")
        moved = changed_outside_allowed(data, mine.read_bytes())
        if moved and is_dirty(data):
            # a dirty image gets its refcounts rebuilt at a read-write open: that
            # may write anywhere, but must not leave qemu-img finding more wrong
            # with the image than before (a mutant's bad entries stay bad)
            original = self.work / "orig.qcow2"
            original.write_bytes(data)
            was, now = check_problems(original), check_problems(mine)
            if any(n > was.get(k, 0) for k, n in now.items()):
                t.failures.append(f"the refcount rebuild made it worse: {was} -> {now}")
            else:
                t.detail += " (dirty: refcounts rebuilt)"
        elif moved:
            t.failures.append(f"the read-write phase wrote to the mutant at {moved}")
        if t.commit in ("committed", "job failed"):
            self._judge_base(t, base, data, q, b)

    def _job_end(self) -> str | None:
        """Drive the commit job to its end; None if it completed, else its error."""
        d = self.blockd
        assert d.qmp is not None
        deadline = time.monotonic() + TIMEOUT
        seen = 0
        while True:
            for event in d.qmp.events[seen:]:
                seen += 1
                if event["event"] == "BLOCK_JOB_COMPLETED":
                    error = event["data"].get("error")
                    return str(error) if error else None
                if event["event"] == "BLOCK_JOB_READY":
                    reply = d.execute("job-complete", id="c")
                    if "error" in reply:
                        return f"job-complete refused: {reply['error']['desc']}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang("blockd: the commit job did not end")
            d.qmp.sock.settimeout(left)
            try:
                d.qmp.events.append(d.qmp.read())
            except TimeoutError as exc:
                raise Hang("blockd: the commit job did not end") from exc
            except (EOFError, OSError) as exc:
                raise Died(f"blockd: monitor gone during the commit: {exc}") from exc
            finally:
                d.qmp.sock.settimeout(TIMEOUT)

    def _del(self, node: str) -> None:
        reply = self.blockd.execute("blockdev-del", **{"node-name": node})
        assert reply == {"return": {}}, (node, reply)

    def _judge_base(self, t: Trial, base: Path, data: bytes, q: View | str,
                    b: View | str) -> None:
        check = subprocess.run(
            [require_tool("qemu-img"), "check", "-q", str(base)],
            capture_output=True, text=True, errors="replace",
        )
        if check.returncode not in (0, 3):  # 3: leaks only
            t.failures.append(f"base after commit: qemu-img check {check.returncode}: "
                              f"{check.stdout}{check.stderr}")
            return
        if t.commit != "committed":
            return
        # what the mutant shows over an empty base: its own view without a backing file
        want: View | str = q
        if backing_pointer(data):
            want = self._qsd_view(t, "qn", qcow2_options("qn", self.work / "q.qcow2",
                                                         **{"read-only": True, "backing": None}))
        if isinstance(want, str):
            if backing_pointer(data) or isinstance(b, str):
                return  # nothing independent to compare with
            want = b
        expected = data_of(want)
        if expected is None:
            t.failures.append("commit completed over a mutant QSD could not read whole")
            return
        got = self._qsd_view(t, "qb", qcow2_options("qb", base, **{"read-only": True}))
        if isinstance(got, str):
            t.failures.append(f"QSD cannot open the committed base: {got}")
            return
        have = data_of(got)
        if have is None or have[: len(expected)] != expected:
            t.failures.append("the committed base differs from the mutant's data")


def base_template(d: Path) -> Path:
    path = d / "fresh-base.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), "1M"],
                   check=True)
    return path
