"""Inputs for the QMP fuzzers: valid commands, and seeded ways to break them.

Every input comes from a ``random.Random`` seeded from ``BLOCKD_FUZZ_SEED``
(or a fresh seed, which the test prints), so any failure replays exactly.
``BLOCKD_FUZZ_EXAMPLES`` turns the short default profile into a long one.
"""

from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass
from typing import Any

#: Images every fuzzed daemon finds in its working directory (see ``make_images``).
IMAGES = ("base.qcow2", "top.qcow2", "raw.img", "spare.qcow2")


def examples(default: int) -> int:
    """How many inputs to try: the short profile, or BLOCKD_FUZZ_EXAMPLES."""
    return int(os.environ.get("BLOCKD_FUZZ_EXAMPLES", default))


def seed() -> int:
    text = os.environ.get("BLOCKD_FUZZ_SEED")
    return int(text) if text else random.SystemRandom().randrange(1 << 32)


def _qcow2(name: str, image: str, **extra: Any) -> dict[str, Any]:
    return {
        "execute": "blockdev-add",
        "arguments": {
            "driver": "qcow2",
            "node-name": name,
            "file": {"driver": "file", "filename": image},
            **extra,
        },
    }


#: Valid commands (valid as JSON and envelopes; many fail on the daemon's state,
#: as intended).  No ``quit`` and no ``nbd-server-start``: the fuzzer keeps one
#: daemon up, with one NBD server started before fuzzing.
CORPUS: list[dict[str, Any]] = [
    {"execute": "qmp_capabilities"},
    {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}},
    {"execute": "query-version", "id": 1},
    {"execute": "query-commands", "id": "c"},
    {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
    {"execute": "query-block"},
    {"execute": "query-jobs", "id": [1, {"a": None}]},
    {"execute": "query-block-jobs"},
    {"execute": "query-block-exports"},
    _qcow2("base", "base.qcow2", **{"read-only": True, "backing": None}),
    _qcow2("top", "top.qcow2", backing="base"),
    _qcow2("spare", "spare.qcow2", **{"read-only": True, "force-share": True}),
    {
        "execute": "blockdev-add",
        "arguments": {
            "driver": "raw",
            "node-name": "raw0",
            "read-only": True,
            "file": {"driver": "file", "filename": "raw.img", "read-only": True},
        },
    },
    {
        "execute": "blockdev-add",
        "arguments": {
            "driver": "file",
            "node-name": "f0",
            "filename": "raw.img",
            "read-only": True,
        },
    },
    {"execute": "blockdev-del", "arguments": {"node-name": "top"}},
    {"execute": "blockdev-del", "arguments": {"node-name": "raw0"}},
    {"execute": "blockdev-del", "arguments": {"node-name": "f0"}},
    {
        "execute": "block-commit",
        "arguments": {"job-id": "j0", "device": "nosuch", "speed": 1, "on-error": "stop"},
    },
    {"execute": "block-job-set-speed", "arguments": {"device": "j0", "speed": 100}},
    {"execute": "block-job-cancel", "arguments": {"device": "j0", "force": True}},
    {"execute": "block-job-pause", "arguments": {"device": "j0"}},
    {"execute": "block-job-complete", "arguments": {"device": "j0"}},
    {"execute": "block-job-dismiss", "arguments": {"id": "j0"}},
    {"execute": "job-cancel", "arguments": {"id": "j0"}},
    {"execute": "job-finalize", "arguments": {"id": "j0"}},
    {
        "execute": "block-export-add",
        "arguments": {"type": "nbd", "id": "e0", "node-name": "raw0", "name": "x"},
    },
    {
        "execute": "block-export-add",
        "arguments": {"type": "nbd", "id": "e1", "node-name": "base", "writable": False},
    },
    {"execute": "block-export-del", "arguments": {"id": "e0", "mode": "hard"}},
    {"execute": "block-export-del", "arguments": {"id": "e1"}},
    {"execute": "no-such-command", "arguments": {}},
]


@dataclass(frozen=True)
class Raw:
    """A token written as given: numbers and strings JSON libraries cannot produce."""

    text: bytes


_INTERESTING_BYTES = [
    b"\x00",
    b"\xff",
    b"\xfe",
    b"\xc0\x80",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b'"',
    b"'",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b" ",
    b"\n",
    b"\r",
    b"\t",
    b"\x01",
    b"\x1f",
    b"\x7f",
    b"0",
    b"-",
    b"e",
    b".",
    b"true",
    b"nul",
    b"\\u0000",
    b"\\ud800",
    b"\\udc00",
    b"\\u",
    b"\\'",
]


class Mutator:
    """Seeded producer of hostile QMP input."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    # --- values ---------------------------------------------------------

    def number(self) -> Raw:
        r = self.rng
        choice = r.randrange(12)
        if choice == 0:
            return Raw(b"9" * r.choice([20, 21, 310, 4300, 4301, 5000, 20000]))
        if choice == 1:
            return Raw(b"-" + b"9" * r.randrange(1, 6000))
        if choice == 2:
            return Raw(r.choice([b"1e999", b"-1e999", b"1e-999", b"1E+308", b"2e308", b"4.9e-324"]))
        if choice == 3:
            return Raw(b"1e" + b"9" * r.randrange(1, 100))
        if choice == 4:
            return Raw(b"0." + b"1" * r.randrange(1, 5000))
        if choice == 5:
            return Raw(r.choice([b"-0", b"-0.0", b"0", b"0.0", b"-0e0"]))
        if choice == 6:
            edge = r.choice([1 << 63, 1 << 64, (1 << 63) - 1, (1 << 64) - 1, 1 << 53])
            return Raw(str(r.choice([edge, -edge, edge + 1, -edge - 1])).encode())
        if choice == 7:
            return Raw(r.choice([b"01", b"1.", b".5", b"+1", b"1e", b"1e+", b"--1", b"0x10"]))
        if choice == 8:
            return Raw(repr(r.uniform(-1e300, 1e300)).encode())
        return Raw(str(r.randrange(-1000, 1 << 40)).encode())

    def string(self) -> Raw | str:
        r = self.rng
        choice = r.randrange(10)
        if choice == 0:
            return Raw(b'"' + r.choice([b"x\\u0000y", b"\\u0000", b"a\\u0000"]) + b'"')
        if choice == 1:
            return "a" * r.choice([31, 32, 33, 255, 256, 4096, 4097, 20000])
        if choice == 2:
            return r.choice(["", " ", "1a", "a b", "a\u00e9", "\U0001f600", "-", "#block1"])
        if choice == 3:
            return Raw(
                b'"' + r.choice([b"\\ud800", b"\\udc00x", b"\\ud83d\\ude00", b"\\u00"]) + b'"'
            )
        if choice == 4:
            return Raw(b'"' + r.choice([b"\xc3(", b"\xff", b"\xc0\x80", b"\xed\xa0\x80"]) + b'"')
        if choice == 5:
            return Raw(b"'" + r.choice([b"single", b"it\\'s", b'dq"']) + b"'")
        if choice == 6:
            return r.choice(IMAGES) + r.choice(["", "/", "/..", "\u0000"])
        if choice == 7:
            return "".join(chr(r.randrange(1, 0x3000)) for _ in range(r.randrange(1, 40)))
        return r.choice(["base", "top", "raw0", "f0", "spare", "j0", "e0", "x", "file", "qcow2"])

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        choice = r.randrange(9 if depth < 3 else 6)
        if choice == 0:
            return self.number()
        if choice == 1:
            return self.string()
        if choice == 2:
            return r.choice([None, True, False])
        if choice == 3:
            return r.randrange(-5, 70000)
        if choice == 4:
            return [] if r.random() < 0.5 else {}
        if choice == 5:
            return "x"
        if choice == 6:
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        return {self._key(): self.value(depth + 1) for _ in range(r.randrange(4))}

    def _key(self) -> str:
        return self.rng.choice(
            [
                "driver",
                "node-name",
                "filename",
                "file",
                "backing",
                "read-only",
                "id",
                "device",
                "job-id",
                "speed",
                "force",
                "enable",
                "arguments",
                "execute",
                "exec-oob",
                "x",
                "",
                "a\u0000",
            ]
        )

    # --- tree mutations -------------------------------------------------

    def _containers(self, value: Any, out: list[Any]) -> list[Any]:
        if isinstance(value, dict | list):
            out.append(value)
            for child in value.values() if isinstance(value, dict) else value:
                self._containers(child, out)
        return out

    def mutate_tree(self, message: Any) -> Any:
        r = self.rng
        message = copy.deepcopy(message)
        for _ in range(r.randrange(1, 4)):
            containers = self._containers(message, [])
            target = r.choice(containers)
            op = r.randrange(6)
            if isinstance(target, dict):
                keys = list(target)
                if op <= 2 and keys:
                    target[r.choice(keys)] = self.value()
                elif op == 3 and keys:
                    del target[r.choice(keys)]
                elif op == 4 and keys:
                    key = r.choice(keys)
                    target[key] = self._nest(target[key])
                else:
                    target[self._key()] = self.value()
            elif target:
                i = r.randrange(len(target))
                target[i] = self.value() if op < 4 else self._nest(target[i])
            else:
                target.append(self.value())
        if r.random() < 0.3:
            message["id"] = self.value()
        return message

    def _nest(self, value: Any) -> Raw:
        """``value`` wrapped in brackets and braces, near QEMU's nesting limit at times."""
        depth = self.rng.choice([1, 2, 5, 50, 1022, 1023, 1024, 1030])
        opening = bytes(self.rng.choice(b"[{") for _ in range(depth))
        head = b"".join(b"[" if c == ord("[") else b'{"k":' for c in opening)
        tail = b"".join(b"]" if c == ord("[") else b"}" for c in reversed(opening))
        return Raw(head + self.dump(value) + tail)

    # --- serialisation --------------------------------------------------

    def dump(self, value: Any) -> bytes:
        """JSON text, with QEMU's extensions and odd spacing now and then."""
        parts: list[bytes] = []
        self._dump(value, parts)
        return b"".join(parts)

    def _ws(self) -> bytes:
        return self.rng.choice([b"", b"", b"", b" ", b"\n", b"\t", b"\r\n  "])

    def _dump(self, value: Any, out: list[bytes]) -> None:
        # Iterative for containers would be nicer; depth stays below ~1100 here.
        if isinstance(value, Raw):
            out.append(value.text)
        elif isinstance(value, dict):
            out.append(b"{" + self._ws())
            for i, (key, item) in enumerate(value.items()):
                if i:
                    out.append(b"," + self._ws())
                self._dump(key, out)
                out.append(self._ws() + b":" + self._ws())
                self._dump(item, out)
            out.append(self._ws() + b"}")
        elif isinstance(value, list):
            out.append(b"[")
            for i, item in enumerate(value):
                if i:
                    out.append(b"," + self._ws())
                self._dump(item, out)
            out.append(b"]")
        elif isinstance(value, str) and self.rng.random() < 0.05 and "'" not in value:
            out.append(b"'" + json.dumps(value)[1:-1].replace('\\"', '"').encode() + b"'")
        elif isinstance(value, str) and self.rng.random() < 0.3:
            out.append(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        else:
            out.append(json.dumps(value).encode())

    # --- byte mutations -------------------------------------------------

    def mutate_bytes(self, data: bytes) -> bytes:
        r = self.rng
        buf = bytearray(data)
        for _ in range(r.randrange(1, 5)):
            op = r.randrange(7)
            pos = r.randrange(len(buf) + 1)
            if op == 0 and buf:
                buf[min(pos, len(buf) - 1)] = r.randrange(256)
            elif op == 1:
                buf[pos:pos] = r.choice(_INTERESTING_BYTES)
            elif op == 2:
                del buf[pos : pos + r.randrange(1, 8)]
            elif op == 3:
                end = min(len(buf), pos + r.randrange(1, 32))
                buf[pos:pos] = buf[pos:end] * r.randrange(1, 4)
            elif op == 4:
                del buf[pos:]  # truncation
            elif op == 5:
                buf[pos:pos] = bytes(r.randrange(256) for _ in range(r.randrange(1, 16)))
            else:
                buf[pos:pos] = self.dump(r.choice(CORPUS))
        return bytes(buf)

    # --- whole inputs ---------------------------------------------------

    def message(self) -> bytes:
        """One fuzzed input (possibly several messages, or none complete)."""
        r = self.rng
        base = r.choice(CORPUS)
        kind = r.randrange(10)
        if kind <= 3:
            data = self.dump(self.mutate_tree(base))
        elif kind <= 6:
            data = self.mutate_bytes(self.dump(base))
        elif kind == 7:
            data = self.mutate_bytes(self.dump(self.mutate_tree(base)))
        elif kind == 8:
            data = self.dump(base) + self._ws() + self.dump(r.choice(CORPUS))
        else:
            data = bytes(r.randrange(256) for _ in range(r.randrange(1, 64)))
        return data

    def chunks(self, data: bytes) -> list[bytes]:
        """Split writes: the daemon must not care where reads end."""
        if len(data) < 2 or self.rng.random() < 0.6:
            return [data]
        cuts = sorted(
            self.rng.sample(range(1, len(data)), min(len(data) - 1, self.rng.randrange(1, 6)))
        )
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
