"""The same QMP conversation against qemu-storage-daemon 7.2 and blockd.

What a client can observe must match: replies and errors (class, text, id),
their order and count, the greeting's shape.  Only the version numbers and
package string legitimately differ and are masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, RawQMP

pytestmark = pytest.mark.qsd

# (bytes sent in one write, number of messages they produce)
BEFORE_NEGOTIATION: list[tuple[bytes, int]] = [
    (b'{"execute": "query-version", "id": "early"}', 1),
    (b'{"execute": "no-such-command", "id": 1}', 1),
    (b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 2}', 1),
    (b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}, "id": 3}', 1),
    (b'{"execute": "qmp_capabilities", "arguments": {"foo": 1}, "id": 4}', 1),
    (b'{"exec-oob": "qmp_capabilities", "id": 5}', 1),
    (b'{"execute": }\n', 1),
    (b'{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 6}', 1),
]

AFTER_NEGOTIATION: list[tuple[bytes, int]] = [
    (b'{"execute": "qmp_capabilities", "id": 7}', 1),
    (b'{"execute": "no-such-command", "id": 8}', 1),
    (b'{"execute": "query-version", "arguments": {"bogus": 1}, "id": 9}', 1),
    (b'{"execute": "query-version", "arguments": null, "id": 10}', 1),
    (b'{"execute": "query-version", "arguments": [], "id": 11}', 1),
    (b'{"execute": "query-version", "foo": 1, "id": 12}', 1),
    (b'{"id": 13}', 1),
    (b'{"execute": 14, "id": 14}', 1),
    (b'{"exec-oob": "query-version", "id": 15}', 1),
    (b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 16}', 1),
    # Malformed input: errors without ids, connection kept.
    (b'{"execute": }\n', 1),
    (b'{"execute": "query-version" "id": 17}\n', 1),
    (b"[1, 2]\n", 1),
    (b'"hello"\n', 1),
    (b"}\n", 1),
    (b'{"id": 1, "id": 2}\n', 1),
    (b'{"execute": "query-version", "id": 18} garbage\n', 2),
    (b'{"execute": "\xff"}\n', 2),
    (b'{"execute": "a\x01"}\n', 2),
    # Framing: several per write, one split over writes, no newlines at all.
    (b'{"execute": "query-version", "id": 19}{"execute": "query-version", "id": 20}', 2),
    (b'{"execute": "query-ve', 0),
    (b'rsion",\n "id": 21}', 1),
    (b"{'execute': 'query-version', 'id': 'single \\' quoted'}", 1),
    # Ids of every JSON type, echoed as QEMU re-serialises them.
    (b'{"execute": "query-version", "id": null}', 1),
    (b'{"execute": "query-version", "id": true}', 1),
    (b'{"execute": "query-version", "id": [true, false, null, {"a": []}]}', 1),
    (b'{"execute": "query-version", "id": {"nested": {"x": "y"}}}', 1),
    (b'{"execute": "query-version", "id": {"b": 1, "a": 2, "id": 3, "bar": 4, "foo": [5]}}', 1),
    (b'{"execute": "query-version", "id": 1.5e3}', 1),
    (b'{"execute": "query-version", "id": -0.5}', 1),
    (b'{"execute": "query-version", "id": 0.1}', 1),
    (b'{"execute": "query-version", "id": 12345678901234567890}', 1),
    (b'{"execute": "query-version", "id": "a\xc3\xa9\\u00e8\\ud83d\\ude00"}', 1),
    (b'{"execute": "no-such-command", "id": "\\u0001\\n"}', 1),
]

# Job commands with no jobs: argument checking, then each family's "not found".
JOB_COMMANDS: list[tuple[bytes, int]] = [
    (b'{"execute": "query-jobs", "id": "j1"}', 1),
    (b'{"execute": "query-block-jobs", "id": "j2"}', 1),
    (b'{"execute": "block-job-set-speed", "id": "j3"}', 1),
    (b'{"execute": "block-job-set-speed", "arguments": {"device": "x"}, "id": "j4"}', 1),
    (b'{"execute": "block-job-set-speed", "arguments": {"speed": 1}, "id": "j5"}', 1),
    (
        b'{"execute": "block-job-set-speed", "arguments": {"device": "x", "speed": "1"}, "id": 6}',
        1,
    ),
    (b'{"execute": "block-job-set-speed", "arguments": {"device": "x", "speed": 1.5}, "id": 7}', 1),
    (b'{"execute": "block-job-set-speed", "arguments": {"device": 5, "speed": 1}, "id": 8}', 1),
    (b'{"execute": "block-job-set-speed", "arguments": {"device": "x", "speed": -1}, "id": 9}', 1),
    (b'{"execute": "block-job-cancel", "arguments": {"device": "x", "force": "yes"}, "id": 10}', 1),
    (b'{"execute": "block-job-cancel", "arguments": {"device": "x", "bogus": 1}, "id": 11}', 1),
    (b'{"execute": "block-job-cancel", "arguments": {"device": "x", "force": true}, "id": 12}', 1),
    (b'{"execute": "block-job-pause", "arguments": {"device": "x"}, "id": 13}', 1),
    (b'{"execute": "block-job-resume", "arguments": {"device": "x"}, "id": 14}', 1),
    (b'{"execute": "block-job-complete", "arguments": {"device": "x"}, "id": 15}', 1),
    (b'{"execute": "block-job-finalize", "arguments": {"id": "x"}, "id": 16}', 1),
    (b'{"execute": "block-job-dismiss", "arguments": {"id": "x"}, "id": 17}', 1),
    (b'{"execute": "block-job-dismiss", "arguments": {"device": "x"}, "id": 18}', 1),
    (b'{"execute": "job-pause", "arguments": {"id": "x"}, "id": 19}', 1),
    (b'{"execute": "job-resume", "arguments": {"id": "x"}, "id": 20}', 1),
    (b'{"execute": "job-cancel", "arguments": {"id": "x"}, "id": 21}', 1),
    (b'{"execute": "job-complete", "arguments": {"id": "x"}, "id": 22}', 1),
    (b'{"execute": "job-finalize", "arguments": {"id": "x"}, "id": 23}', 1),
    (b'{"execute": "job-dismiss", "arguments": {"id": "x"}, "id": 24}', 1),
    (b'{"execute": "job-dismiss", "arguments": {}, "id": 25}', 1),
]

WITH_OOB: list[tuple[bytes, int]] = [
    (b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1}', 1),
    (b'{"exec-oob": "query-version", "id": 2}', 1),
    (b'{"exec-oob": "query-version", "execute": "query-version", "id": 3}', 1),
    (b'{"exec-oob": 4, "id": 4}', 1),
]


def mask(message: dict[str, Any]) -> dict[str, Any]:
    """Hide what may differ: the version triple and package name."""
    ret = message.get("return")
    if isinstance(ret, dict) and "qemu" in ret and "package" in ret:
        return {**message, "return": "<version>"}
    if "QMP" in message:
        qmp = message["QMP"]
        return {"QMP": {"version": sorted(qmp["version"]), "capabilities": qmp["capabilities"]}}
    return message


def converse(path: Path, steps: list[tuple[bytes, int]], greeting: bool = True) -> list[Any]:
    seen: list[Any] = []
    with RawQMP(path) as client:
        if greeting:
            seen.append(mask(client.read()))
        for data, count in steps:
            client.send(data)
            seen.append([data, [mask(client.read()) for _ in range(count)]])
    return seen


def full_conversation(daemon: DaemonProcess) -> list[Any]:
    path = daemon.socket_path
    transcript = converse(path, BEFORE_NEGOTIATION + AFTER_NEGOTIATION + JOB_COMMANDS)
    transcript += converse(path, WITH_OOB)
    with RawQMP(path) as client:
        client.read()
        client.execute("qmp_capabilities")
        transcript.append(client.execute("quit", id="end"))
        client.assert_closed()
    assert daemon.wait() == 0
    return transcript


def test_same_conversation_same_observations(qsd: DaemonProcess, blockd: DaemonProcess) -> None:
    expected = full_conversation(qsd)
    actual = full_conversation(blockd)
    for want, got in zip(expected, actual, strict=True):
        assert got == want


def test_raw_bytes_match_for_errors(qsd: DaemonProcess, blockd: DaemonProcess) -> None:
    """Byte-level: member order, spacing, CRLF and escapes are QEMU's exactly."""
    probe = (
        b'{"execute": "qmp_capabilities"}'
        b'{"execute": "no-such", "id": "\xc3\xa9"}'
        b'{"execute": "qmp_capabilities", "id": [1.5e3, null]}'
        b'{"execute": "no-such", "id": {"zz": 1, "b": {"y": 2, "x": 3}, "a": 0}}'
        b"[]"
    )

    def raw(path: Path) -> bytes:
        with RawQMP(path) as client:
            client.read_line()
            client.send(probe)
            return b"\r\n".join(client.read_line() for _ in range(5))

    assert raw(blockd.socket_path) == raw(qsd.socket_path)
