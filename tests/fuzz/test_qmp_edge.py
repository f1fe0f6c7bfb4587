"""Hostile values at the QMP edge, each answered as qemu-storage-daemon 7.2 answers.

Regression tests for what fuzzing found: a number with more digits than
Python converts to int (4,301 nines) killed the daemon; an ``id`` nested a
thousand levels deep killed it too (the reply encoder recursed); a NUL in a
filename gave "Internal error"; a blockdev-add with inline backing nodes a
dozen levels deep blocked the event loop for minutes (argument validation was
exponential in the nesting).  Each input goes to blockd and to QSD on real
sockets, and the reply lines must be the same bytes (version masked).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fuzz.qmp_harness import Line, make_images, open_session, start
from tests.helpers import DaemonProcess

pytestmark = pytest.mark.qsd

_VERSION = re.compile(rb'\{"qemu": \{[^}]*\}, "package": "[^"]*"\}')

NINES = b"9" * 4301
DEEP_ID = b"[" * 1000 + b"{}" + b"]" * 1000

BEFORE_NEGOTIATION = [
    b'{"execute": "query-version", "id": ' + NINES + b"}",
    NINES + b" ",
    b"-" + NINES + b" ",
]

NUMBERS = [
    b'{"execute": "query-version", "id": ' + NINES + b"}",
    b'{"execute": "query-version", "id": -' + b"9" * 100000 + b"}",
    b'{"execute": "query-version", "id": [18446744073709551615, 18446744073709551616]}',
    b'{"execute": "query-version", "id": [-9223372036854775808, -9223372036854775809]}',
    b'{"execute": "query-version", "id": [1e999, -1e999, 1e-999, 1E400, 4.9e-324]}',
    b'{"execute": "query-version", "id": [1e99999999999999999999999999, 1e-99999999999]}',
    b'{"execute": "query-version", "id": [-0, -0.0, 0.0, 0e5]}',
    b'{"execute": "query-version", "id": [1' + b"0" * 308 + b", 1" + b"0" * 309 + b"]}",
    b'{"execute": "query-version", "id": 0.' + b"1" * 5000 + b"}",
    b'{"execute": "query-version", "id": ' + DEEP_ID + b"}",
    b'{"execute": "block-job-set-speed", "arguments": {"device": "x", "speed": ' + NINES + b"}}",
    b'{"execute": "block-job-set-speed", "arguments": {"device": "x", "speed": 1e999}}',
    b'{"execute": "block-job-set-speed", "arguments": {"device": "x", "speed": -0}}',
    b'{"execute": "query-named-block-nodes", "arguments": {"flat": ' + DEEP_ID + b"}}",
    NINES + b" ",
]


def _chain(depth: int) -> bytes:
    node = b'{"driver": "qcow2", "file": {"driver": "file", "filename": "nosuch.qcow2"}}'
    for _ in range(depth):
        node = (
            b'{"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}, "backing": '
            + node
            + b"}"
        )
    return node


def _add(arguments: bytes) -> bytes:
    return b'{"execute": "blockdev-add", "arguments": {' + arguments + b"}}"


_TOP = b'"file": {"driver": "file", "filename": "top.qcow2"}'
_LONG = b"a" * 5000

NAMES = [
    # NUL inside strings: QEMU keeps it (as modified UTF-8) and fails further on.
    _add(b'"driver": "file", "node-name": "f0", "filename": "x\\u0000y"'),
    _add(
        b'"driver": "qcow2", "node-name": "q0", "file": {"driver": "file", "filename": "b\\u0000"}'
    ),
    _add(b'"driver": "file", "node-name": "f\\u0000", "filename": "raw.img"'),
    _add(b'"driver": "qcow2", "node-name": "t", "file": "f\\u0000x"'),
    _add(b'"driver": "qcow2", "node-name": "t", "backing": "b\\u0000", ' + _TOP),
    _add(b'"driver": "file\\u0000", "node-name": "f1", "filename": "raw.img"'),
    b'{"execute": "blockdev-del", "arguments": {"node-name": "b\\u0000"}}',
    b'{"execute": "block-commit", "arguments": {"job-id": "j", "device": "b\\u0000"}}',
    b'{"execute": "block-job-cancel", "arguments": {"device": "j\\u0000"}}',
    b'{"execute": "job-cancel", "arguments": {"id": "j\\u0000"}}',
    b'{"execute": "block-export-del", "arguments": {"id": "e\\u0000"}}',
    b'{"execute": "query-version", "id": "a\\u0000b"}',
    b'{"execute": "no\\u0000such", "id": 1}',
    b'{"execute": "query-version", "arguments": {"a\\u0000": 1}}',
    # Over-long names and paths.
    _add(b'"driver": "file", "node-name": "' + b"n" * 32 + b'", "filename": "raw.img"'),
    _add(b'"driver": "file", "node-name": "' + b"n" * 100000 + b'", "filename": "raw.img"'),
    _add(b'"driver": "file", "node-name": "p", "filename": "' + b"a" * 256 + b'"'),
    _add(b'"driver": "file", "node-name": "p", "filename": "' + b"a/" * 3000 + b'"'),
    _add(b'"driver": "qcow2", "node-name": "p", "file": "' + _LONG + b'"'),
    b'{"execute": "blockdev-del", "arguments": {"node-name": "' + _LONG + b'"}}',
    b'{"execute": "block-commit", "arguments": {"job-id": "j", "device": "' + _LONG + b'"}}',
    b'{"execute": "block-job-cancel", "arguments": {"device": "' + _LONG + b'"}}',
    b'{"execute": "block-export-del", "arguments": {"id": "' + _LONG + b'"}}',
    b'{"execute": "' + _LONG + b'"}',
    # An inline backing chain: validated in linear time, then the open fails.
    _add(b'"node-name": "deep", "driver": "qcow2", ' + _TOP + b', "backing": ' + _chain(30)),
    b'{"execute": "query-named-block-nodes", "id": "still-here"}',
]


def _replies(daemon: DaemonProcess, before: list[bytes], after: list[bytes]) -> list[bytes]:
    try:
        return _conversation(daemon, before, after)
    finally:
        daemon.stop()


def _conversation(daemon: DaemonProcess, before: list[bytes], after: list[bytes]) -> list[bytes]:
    conn = Line.connect(daemon.socket_path)
    conn.read_line()
    seen = []
    for data in before:
        conn.send(data)
        seen.append(_VERSION.sub(b"<version>", conn.read_line()))
    conn.close()
    conn = open_session(daemon.socket_path, negotiate=True)
    for data in after:
        conn.send(data)
        seen.append(_VERSION.sub(b"<version>", conn.read_line()))
    conn.close()
    assert daemon.proc.poll() is None
    return seen


@pytest.mark.parametrize(("before", "after"), [(BEFORE_NEGOTIATION, NUMBERS), ([], NAMES)])
def test_same_replies_as_qsd(
    sock_dir: Path, tmp_path: Path, before: list[bytes], after: list[bytes]
) -> None:
    expected = _replies(start("qsd", sock_dir, make_images(tmp_path / "qsd")), before, after)
    actual = _replies(start("blockd", sock_dir, make_images(tmp_path / "blockd")), before, after)
    for data, want, got in zip(before + after, expected, actual, strict=True):
        assert got == want, data[:200]


def test_inline_chain_too_deep_to_validate(sock_dir: Path, tmp_path: Path) -> None:
    """A deliberate difference (README): past ~80 inline levels blockd refuses."""
    daemon = start("blockd", sock_dir, make_images(tmp_path))
    try:
        _too_deep(daemon)
    finally:
        daemon.stop()


def _too_deep(daemon: DaemonProcess) -> None:
    conn = open_session(daemon.socket_path, negotiate=True)
    conn.send(
        _add(
            b'"node-name": "deep", "driver": "qcow2", ' + _TOP + b', "backing": ' + _chain(300)
        ).replace(b"{", b'{"id": 1, ', 1)
    )
    reply = conn.read_line()
    assert reply.startswith(
        b'{"id": 1, "error": {"class": "GenericError", "desc": "Parameter \'backing.'
    )
    assert reply.endswith(b"' is nested too deeply\"}}")
    conn.send(b'{"execute": "query-named-block-nodes", "id": 2}')
    assert conn.read_line() == b'{"return": [], "id": 2}'
    conn.close()
