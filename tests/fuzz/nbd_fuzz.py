"""Seeded NBD trials: hostile byte streams for one daemon, lockstep conversations for two.

*Chaos* trials (on an export of their own, "chaos") send a stream built for
the stage they attack (greeting, client flags, options, requests), with
mutations: wrong magic, lengths that lie, payloads cut short, unknown codes,
overflowing ranges, and an abrupt disconnect at a random byte.  Only the
daemon's survival is judged there.

*Lockstep* trials are well framed, one message at a time, so two daemons
(blockd and qemu-storage-daemon) can be asked the same and their answers
compared once each reply is reduced to what it means (reply types and
error codes, data digests, block status payloads).

Every trial is a function of its seed: a failure names the seed, and
``trial(seed)`` gives the same bytes again.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import struct
from pathlib import Path
from typing import Any

from tests.fuzz.nbd_clients import IHAVEOPT, connect, option, request

SIZE = 4 << 20
MAX_BUFFER = 32 << 20
NAMES = [b"disk", b"ro", b"nope", b"", b"disk\x00", b"x" * 300]
CONTEXTS = [b"base:allocation", b"base:", b"qemu:allocation-depth", b"qemu:", b"nope:x", b""]

# -- building blocks ----------------------------------------------------------------------


def _name_payload(rng: random.Random, with_infos: bool) -> bytes:
    name = rng.choice(NAMES)
    out = struct.pack(">I", len(name)) + name
    if with_infos:
        items = [rng.choice([0, 1, 2, 3, 4, 0xFFFF]) for _ in range(rng.randrange(0, 4))]
        out += struct.pack(">H", len(items)) + b"".join(struct.pack(">H", i) for i in items)
    return out


def _meta_payload(rng: random.Random) -> bytes:
    name = rng.choice(NAMES[:3])
    queries = [rng.choice(CONTEXTS) for _ in range(rng.randrange(0, 3))]
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def well_formed_option(rng: random.Random) -> tuple[int, bytes]:
    """An option whose length is right; its content may still be wrong."""
    code = rng.choice([3, 3, 5, 6, 6, 8, 8, 9, 10, 10, 11, 0, 4, 0x7FFFFFFF])
    if code == 6:
        data = _name_payload(rng, True)
    elif code in (9, 10):
        data = _meta_payload(rng)
    else:
        data = b""
    if rng.random() < 0.2 and code not in (9, 10):
        # junk inside the stated length (not after meta-context queries: QEMU 7.2
        # leaves it in the stream, where it ends the connection as a bad magic)
        data += rng.randbytes(rng.randrange(1, 8))
    elif data and rng.random() < 0.1:
        data = data[: rng.randrange(len(data))]  # content shorter than its fields say
    return code, data


def _interesting_offset(rng: random.Random) -> int:
    edges = [0, 512, 4096, SIZE - 512, SIZE - 1, SIZE, SIZE + 512, 2**63, 2**64 - 1, 2**64 - 512]
    return rng.choice([*edges, rng.randrange(0, SIZE)])


def _interesting_length(rng: random.Random, small: bool) -> int:
    choices = [0, 1, 512, 4096, 65536, rng.randrange(1, 200_000)]
    if not small:
        choices += [MAX_BUFFER, MAX_BUFFER + 1, 2**32 - 1]
    return rng.choice(choices)


def random_request(rng: random.Random, handle: int, small: bool) -> tuple[bytes, int, int]:
    """A request (with its WRITE payload in full); returns (bytes, type, length)."""
    kind = rng.choice([0, 0, 1, 1, 3, 4, 5, 6, 7, 7, 8, 99, 0xFFFF])
    flags = rng.choice([0, 0, 0, 1, 2, 4, 8, 0x10, 0x12, rng.randrange(0, 0x10000)])
    offset = _interesting_offset(rng)
    length = _interesting_length(rng, small)
    if kind == 1 and length > 1 << 20:
        length = rng.randrange(0, 1 << 20)  # keep payloads cheap
    data = request(kind, offset, length, flags, handle)
    if kind == 1:
        data += bytes([rng.randrange(256)]) * length
    return data, kind, length


def negotiation(rng: random.Random, name: bytes, structured: bool) -> bytes:
    out = struct.pack(">I", 3)
    if structured:
        out += option(8)
        contexts = rng.sample([b"base:allocation", b"qemu:allocation-depth"], rng.randrange(0, 3))
        meta = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
        out += option(10, meta + b"".join(struct.pack(">I", len(c)) + c for c in contexts))
    return out + option(7, struct.pack(">I", len(name)) + name + b"\x00\x00")


# -- chaos --------------------------------------------------------------------------------

STAGES = ("greeting", "flags", "options", "requests")


def chaos_stream(seed: int) -> tuple[str, bytes, int | None, bool]:
    """(stage, bytes to send, cut after this many bytes or None, read replies?)."""
    rng = random.Random(seed)
    stage = rng.choice(STAGES)
    if stage == "greeting":
        data = rng.choice([b"", rng.randbytes(rng.randrange(1, 40))])
    elif stage == "flags":
        data = rng.choice(
            [struct.pack(">I", rng.randrange(0, 2**32)), struct.pack(">I", 3)[: rng.randrange(4)]]
        ) + rng.randbytes(rng.randrange(0, 30))
    elif stage == "options":
        data = struct.pack(">I", rng.choice([3, 3, 1, 0, 2]))
        for _ in range(rng.randrange(1, 8)):
            code, payload = well_formed_option(rng)
            magic = IHAVEOPT if rng.random() > 0.05 else rng.randrange(0, 2**64)
            length = len(payload)
            if rng.random() < 0.15:
                length = rng.choice([length + rng.randrange(1, 100), 2**32 - 1, 65536, 4097])
            data += struct.pack(">QII", magic, code, length) + payload
            if rng.random() < 0.1:
                data += option(1, rng.choice([b"chaos", *NAMES[1:]]))  # EXPORT_NAME
                break
            if rng.random() < 0.05:
                data += option(2)  # ABORT
                break
    else:
        name = rng.choice([b"chaos", b"chaos", b"ro", b"nope"])
        data = negotiation(rng, name, rng.random() < 0.5)
        for handle in range(rng.randrange(1, 12)):
            piece, kind, length = random_request(rng, handle, small=False)
            if rng.random() < 0.05:
                piece = struct.pack(">I", rng.randrange(2**32)) + piece[4:]  # bad magic
            if kind == 1 and rng.random() < 0.15:
                piece = piece[: 28 + rng.randrange(0, length + 1)]  # payload cut short
                data += piece
                break
            data += piece
        if rng.random() < 0.5:
            data += request(2)  # DISC
    cut = rng.randrange(0, len(data) + 1) if data and rng.random() < 0.4 else None
    return stage, data, cut, rng.random() < 0.7


def run_chaos(path: Path, seed: int) -> str:
    """Play one chaos trial against the NBD socket at ``path``; returns its stage."""
    stage, data, cut, read = chaos_stream(seed)
    rng = random.Random(seed ^ 0x5EED)
    sock = connect(path, timeout=2)
    try:
        if stage != "greeting" or rng.random() < 0.5:
            with contextlib.suppress(OSError):
                sock.recv(18)
        if cut is not None:
            data = data[:cut]
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 7, 28, 512, 65536, len(data)])
            with contextlib.suppress(OSError):
                sock.sendall(data[pos : pos + step])
            pos += step
        if read:
            sock.settimeout(0.02)
            with contextlib.suppress(OSError):
                while sock.recv(1 << 20):
                    pass
    finally:
        if rng.random() < 0.5:
            # abrupt: an RST rather than an orderly close
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return stage


# -- lockstep -----------------------------------------------------------------------------


class Conversation:
    """One client speaking to one daemon, a message at a time."""

    def __init__(self, path: Path) -> None:
        self.sock = connect(path, timeout=5)
        self.buf = b""
        self.structured = False

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            part = self.sock.recv(1 << 20)
            if not part:
                raise EOFError
            self.buf += part
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def option(self, code: int, data: bytes) -> list[Any]:
        self.sock.sendall(option(code, data))
        out: list[Any] = []
        while True:
            try:
                _magic, opt, rep, length = struct.unpack(">QIII", self.take(20))
                payload = self.take(length)
            except (EOFError, OSError):
                return [*out, "EOF"]
            out.append((opt, rep, payload if not rep & 0x80000000 else len(payload) > 0))
            if rep == 1 or rep & 0x80000000:
                return out

    def request(self, message: bytes, kind: int, length: int) -> Any:
        try:
            self.sock.sendall(message)
            return self._reply(kind, length)
        except (EOFError, OSError):
            return "EOF"

    def _reply(self, kind: int, length: int) -> Any:
        magic = struct.unpack(">I", self.take(4))[0]
        if magic == 0x67446698:
            error = struct.unpack(">I", self.take(12)[:4])[0]
            data = self.take(length) if kind == 0 and not error else b""
            return ("simple", error, hashlib.sha1(data).hexdigest())
        chunks: list[Any] = []
        data = bytearray()
        while True:
            if magic != 0x668E33EF:
                return ("bad magic", magic)
            flags, ctype, _handle, size = struct.unpack(">HHQI", self.take(16))
            payload = self.take(size)
            if ctype == 1:
                data += payload[8:]
            elif ctype == 2:
                data += bytes(struct.unpack(">I", payload[8:12])[0])
            elif ctype in (0x8001, 0x8002):
                chunks.append(("error", struct.unpack(">I", payload[:4])[0]))
            elif ctype == 5:
                chunks.append(("status", payload))
            else:
                chunks.append((ctype,))
            if flags & 1:
                return ("structured", chunks, hashlib.sha1(bytes(data)).hexdigest())
            magic = struct.unpack(">I", self.take(4))[0]

    def close(self) -> None:
        self.sock.close()


def run_lockstep(path: Path, seed: int) -> list[Any]:
    """One well-framed conversation; what the daemon answered, message by message."""
    rng = random.Random(seed)
    c = Conversation(path)
    log: list[Any] = []
    try:
        log.append(c.take(18))
        c.sock.sendall(struct.pack(">I", rng.choice([3, 3, 1])))
        for _ in range(rng.randrange(0, 6)):
            code, data = well_formed_option(rng)
            log.append((code, data, c.option(code, data)))
            if log[-1][2] and log[-1][2][-1] == "EOF":
                return log
        name = rng.choice([b"disk", b"disk", b"ro"])
        if rng.random() < 0.5:
            log.append(c.option(8, b""))
        log.append(c.option(7, struct.pack(">I", len(name)) + name + b"\x00\x00"))
        if not log[-1] or log[-1][-1] == "EOF" or log[-1][-1][1] != 1:
            return log
        for handle in range(rng.randrange(1, 10)):
            message, kind, length = random_request(rng, handle, small=True)
            (flags,) = struct.unpack_from(">H", message, 4)
            (offset,) = struct.unpack_from(">Q", message, 16)
            if kind == 6 and flags & 0x10 and (offset | length) % 65536:
                # FAST_ZERO on part of a cluster: QEMU's qcow2 driver refuses it
                # unless the rest of the cluster reads as zeros, blockd's does not
                # check (a known difference, in README): keep it to whole clusters
                message = message[:4] + struct.pack(">H", flags & ~0x10) + message[6:]
            log.append((message[:28], c.request(message, kind, length)))
            if log[-1][1] == "EOF":
                return log
        c.sock.sendall(request(2))
        try:
            log.append(("after DISC", c.take(1)))
        except (EOFError, OSError):
            log.append(("after DISC", "closed"))
    finally:
        c.close()
    return log
