"""The QMP wire protocol for one connection, as a state machine with no I/O.

The server feeds received bytes to :meth:`QMPConnection.receive_data` and gets
back requests (or envelope errors), and asks the connection for the bytes of
greetings, replies and events.  Keeping sockets out of here lets the tests
drive every framing and negotiation case directly.

Output is byte-compatible with qemu-storage-daemon 7.2: one compact JSON
object per line, CRLF-terminated, pure ASCII with upper-case ``\\uXXXX``
escapes, and members in the order QEMU's dictionaries iterate.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from blockd.qjson import encode, qdict_order
from blockd.qmp.json_stream import DEFAULT_MAX_MESSAGE_SIZE, JSONStreamParser, MessageError


class _NoId:
    """The absence of an ``id`` member, which differs from ``"id": null``."""

    _instance: _NoId | None = None

    def __new__(cls) -> _NoId:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Final = _NoId()


@dataclass(frozen=True)
class Request:
    """A well-formed command envelope; its arguments are not validated yet."""

    command: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = NO_ID
    oob: bool = False


@dataclass(frozen=True)
class BadRequest:
    """Input that is not a valid command envelope, answered with GenericError."""

    desc: str
    id: Any = NO_ID


class Phase(enum.Enum):
    """Capabilities negotiation happens once, before any other command."""

    NEGOTIATING = "negotiating"
    COMMAND = "command"


class QMPConnection:
    """Per-connection protocol state: framing, negotiation and serialisation."""

    def __init__(
        self,
        version: Mapping[str, Any],
        capabilities: Sequence[str] = ("oob",),
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._version = version
        self.capabilities = tuple(capabilities)
        self.phase = Phase.NEGOTIATING
        self.oob_enabled = False
        self._parser = JSONStreamParser(max_message_size)

    def greeting(self) -> bytes:
        return _line({"QMP": {"version": self._version, "capabilities": list(self.capabilities)}})

    def enter_command_mode(self, enable: Sequence[str]) -> None:
        """Record a successful ``qmp_capabilities``; events flow from now on."""
        self.phase = Phase.COMMAND
        self.oob_enabled = "oob" in enable

    @property
    def negotiated(self) -> bool:
        return self.phase is Phase.COMMAND

    def receive_data(self, data: bytes | bytearray) -> list[Request | BadRequest]:
        out: list[Request | BadRequest] = []
        for item in self._parser.feed(data):
            if isinstance(item, MessageError):
                out.append(BadRequest(item.desc))
            else:
                out.append(self._envelope(item.value))
        return out

    def _envelope(self, message: Any) -> Request | BadRequest:
        """Check the command envelope as QEMU does, before any lookup."""
        if not isinstance(message, dict):
            return BadRequest("QMP input must be a JSON object")
        request_id = message.get("id", NO_ID)
        exec_key: str | None = None
        for key in qdict_order(message):
            value = message[key]
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if not isinstance(value, str):
                    return BadRequest(f"QMP input member '{key}' must be a string", request_id)
                if exec_key is not None:
                    return BadRequest(
                        "QMP input member 'execute' clashes with 'exec-oob'", request_id
                    )
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    return BadRequest("QMP input member 'arguments' must be an object", request_id)
            elif key != "id":
                return BadRequest(f"QMP input member '{key}' is unexpected", request_id)
        if exec_key is None:
            return BadRequest("QMP input lacks member 'execute'", request_id)
        return Request(
            command=message[exec_key],
            arguments=message.get("arguments", {}),
            id=request_id,
            oob=exec_key == "exec-oob",
        )

    def reply(self, request_id: Any, value: Any) -> bytes:
        message: dict[str, Any] = {"return": value}
        if request_id is not NO_ID:
            message["id"] = request_id
        return _line(message)

    def reply_error(self, request_id: Any, error_class: str, desc: str) -> bytes:
        message: dict[str, Any] = {}
        if request_id is not NO_ID:
            message["id"] = request_id
        message["error"] = {"class": error_class, "desc": desc}
        return _line(message)

    def event(
        self, name: str, data: Mapping[str, Any] | None, seconds: int, microseconds: int
    ) -> bytes:
        message: dict[str, Any] = {
            "timestamp": {"seconds": seconds, "microseconds": microseconds},
            "event": name,
        }
        if data is not None:
            message["data"] = data
        return _line(message)


def _line(message: Mapping[str, Any]) -> bytes:
    return encode(message).encode("ascii") + b"\r\n"
