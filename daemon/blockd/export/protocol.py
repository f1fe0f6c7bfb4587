"""The NBD wire protocol for one server-side connection, as a state machine with no I/O.

The server feeds received bytes to :meth:`NBDConnection.receive_data`; the
connection answers the handshake itself (the option replies are in
:meth:`NBDConnection.data_to_send`) and, once an export is chosen, returns
parsed transmission requests for the server to run.  Replies to those are
framed in :mod:`blockd.export.replies`; between the two modules every byte
that leaves the server is produced without I/O and can be tested without a
socket.

Only the fixed-newstyle handshake exists (QEMU 7.2 speaks nothing else);
extended headers are newer than 7.2 and answered as an unknown option.  What
a client can observe follows qemu-storage-daemon 7.2 (README.md lists where
it deliberately does not).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

NBDMAGIC: Final = 0x4E42444D41474943
IHAVEOPT: Final = 0x49484156454F5054
REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

FLAG_FIXED_NEWSTYLE: Final = 1
FLAG_NO_ZEROES: Final = 2

#: Longest option payload we accept (QEMU: 4 KiB name + queries; be generous).
MAX_OPTION_LENGTH: Final = 64 * 1024
#: Longest name or description (NBD_MAX_STRING_SIZE).
MAX_STRING: Final = 4096
#: Largest READ/WRITE payload (QEMU's NBD_MAX_BUFFER_SIZE).
MAX_BUFFER: Final = 32 * 1024 * 1024
MIN_BLOCK: Final = 1
PREFERRED_BLOCK: Final = 4096

BASE_ALLOCATION: Final = "base:allocation"
BASE_ALLOCATION_ID: Final = 0
ALLOCATION_DEPTH: Final = "qemu:allocation-depth"
ALLOCATION_DEPTH_ID: Final = 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 0x80000001
    ERR_POLICY = 0x80000002
    ERR_INVALID = 0x80000003
    ERR_PLATFORM = 0x80000004
    ERR_TLS_REQD = 0x80000005
    ERR_UNKNOWN = 0x80000006
    ERR_SHUTDOWN = 0x80000007
    ERR_BLOCK_SIZE_REQD = 0x80000008
    ERR_TOO_BIG = 0x80000009


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class Chunk(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


CHUNK_DONE: Final = 1

# NBD error values (the wire's own errno subset).
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

_OPTION_NAMES: Final = {
    Opt.EXPORT_NAME: "export name",
    Opt.ABORT: "abort",
    Opt.LIST: "list",
    Opt.STARTTLS: "starttls",
    Opt.INFO: "info",
    Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply",
    Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context",
}

_COMMAND_NAMES: Final = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.DISC: "disconnect",
    Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim",
    Cmd.CACHE: "cache",
    Cmd.WRITE_ZEROES: "write zeroes",
    Cmd.BLOCK_STATUS: "block status",
}


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    writable: bool
    description: str | None = None
    #: Offer the ``qemu:allocation-depth`` meta context.
    allocation_depth: bool = False


def transmission_flags(export: ExportInfo, structured: bool) -> int:
    """The flags qemu-storage-daemon 7.2 advertises (0x0d6d/0x0ded, 0x050f/0x058f)."""
    flags = (
        TxFlag.HAS_FLAGS
        | TxFlag.SEND_FLUSH
        | TxFlag.SEND_FUA
        | TxFlag.CAN_MULTI_CONN
        | TxFlag.SEND_CACHE
    )
    if export.writable:
        flags |= TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO
    else:
        flags |= TxFlag.READ_ONLY
    if structured:
        flags |= TxFlag.SEND_DF
    return int(flags)


class ProtocolError(Exception):
    """The peer broke the protocol in a way that ends the connection."""


# -- events handed to the server ----------------------------------------------------


@dataclass(frozen=True)
class Negotiated:
    """The handshake ended: transmission on ``export`` begins."""

    export: ExportInfo
    structured: bool
    #: context id -> name, for BLOCK_STATUS.
    contexts: dict[int, str] = field(default_factory=dict)


@dataclass(slots=True)
class Request:
    """One transmission request; ``data`` is the payload of a WRITE.

    Not frozen: the frozen ``__init__`` costs more than the rest of parsing a
    small request.
    """

    flags: int
    type: int
    handle: int
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True)
class Closed:
    """The client ended the session (ABORT answered, DISC, or an unknown export name)."""

    reason: str


Event = Negotiated | Request | Closed


class Phase(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


ExportLookup = Callable[[str], ExportInfo | None]
ExportList = Callable[[], Sequence[ExportInfo]]

_HEADER = struct.Struct(">IHHQQI")  # request: magic, flags, type, handle, offset, length
_HEADER_SIZE = _HEADER.size
#: WRITE payloads at least this big are copied out through a memoryview.
_VIEW_COPY = 64 * 1024
_OPTION = struct.Struct(">QII")


class _BadOption(Exception):
    """An option's payload is malformed; the text is QEMU's ERR_INVALID message."""


class _OptionReader:
    """An option's payload read field by field, refusing as QEMU's reads refuse."""

    def __init__(self, payload: bytes, option_name: str) -> None:
        self._payload = payload
        self._pos = 0
        self._option = option_name

    @property
    def left(self) -> int:
        return len(self._payload) - self._pos

    def take(self, n: int, no_nul: bool = False) -> bytes:
        if n > self.left:
            raise _BadOption(f"Inconsistent lengths in option {self._option}")
        data = self._payload[self._pos : self._pos + n]
        self._pos += n
        if no_nul and b"\0" in data:
            raise _BadOption(f"Unexpected embedded NUL in option {self._option}")
        return data

    def name(self) -> bytes:
        """A u32 length, then that many bytes of name."""
        (length,) = struct.unpack(">I", self.take(4))
        if length > MAX_STRING:
            raise _BadOption(f"Invalid name length: {length}")
        return self.take(length, no_nul=True)


def _not_present(raw_name: bytes) -> str:
    """QEMU's message for an unknown export, the name cut to 80 bytes."""
    shown = raw_name if len(raw_name) < 80 else raw_name[:80] + b"..."
    return f"export '{shown.decode('utf-8', 'surrogateescape')}' not present"


class NBDConnection:
    """Per-connection protocol state: handshake answers and request framing."""

    def __init__(self, lookup: ExportLookup, listing: ExportList) -> None:
        self._lookup = lookup
        self._listing = listing
        self.phase = Phase.CLIENT_FLAGS
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        #: The meta contexts selected by SET_META_CONTEXT: (export name, {id: name}).
        self._selected: tuple[str, dict[int, str]] | None = None
        self._buffer = bytearray()
        self._out = bytearray()
        self._pending: tuple[int, int, int, int, int] | None = None
        #: the received part of a big WRITE payload, kept as it came
        self._parts: list[bytes | memoryview] | None = None
        self._parts_size = 0

    @property
    def payload_due(self) -> int:
        """The length of the WRITE whose header has come and whose payload has
        not all come yet; 0 when none."""
        return self._pending[4] if self._pending is not None else 0

    # -- output ---------------------------------------------------------------------

    def greeting(self) -> bytes:
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += struct.pack(">QII", REPLY_MAGIC, option, reply)
        self._out += struct.pack(">I", len(data)) + data

    def _error(self, option: int, reply: Rep, message: str) -> None:
        self._reply(option, reply, message.encode("utf-8", "surrogateescape"))

    # -- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Consume bytes; raises :class:`ProtocolError` when the connection must end."""
        if self.phase is Phase.CLOSED:
            return []
        events: list[Event] = []
        if self._parts is not None:
            data = self._collect(data, events)
            if self._parts is not None:
                return events  # all of it was payload
        self._buffer += data
        while self.phase is not Phase.CLOSED:
            if self.phase is Phase.CLIENT_FLAGS:
                if len(self._buffer) < 4:
                    break
                (flags,) = struct.unpack_from(">I", self._buffer)
                del self._buffer[:4]
                if flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
                    self.phase = Phase.CLOSED
                    raise ProtocolError(f"Unknown client flags 0x{flags:x} received")
                if not flags & FLAG_FIXED_NEWSTYLE:
                    # QEMU refuses plain newstyle too.
                    self.phase = Phase.CLOSED
                    raise ProtocolError("Expected fixed newstyle negotiation")
                self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
                self.phase = Phase.OPTIONS
            elif self.phase is Phase.OPTIONS:
                event = self._next_option()
                if event is None:
                    break
                if not isinstance(event, bool):
                    events.append(event)
            else:
                self._requests(events)
                break
        return events

    def _next_option(self) -> Event | bool | None:
        if len(self._buffer) < _OPTION.size:
            return None
        magic, option, length = _OPTION.unpack_from(self._buffer)
        if magic != IHAVEOPT:
            self.phase = Phase.CLOSED
            raise ProtocolError(f"Bad option magic 0x{magic:x}")
        if length > MAX_OPTION_LENGTH:
            self.phase = Phase.CLOSED
            raise ProtocolError(f"option length {length} too long")
        if len(self._buffer) < _OPTION.size + length:
            return None
        payload = bytes(self._buffer[_OPTION.size : _OPTION.size + length])
        del self._buffer[: _OPTION.size + length]
        return self._option(option, payload)

    def _option(self, option: int, payload: bytes) -> Event | bool:
        name = _OPTION_NAMES.get(option)  # type: ignore[call-overload]
        if option == Opt.EXPORT_NAME:
            export = self._lookup(payload.decode("utf-8", "replace"))
            if export is None:
                # QEMU just hangs up.
                self.phase = Phase.CLOSED
                return Closed("unknown export name")
            self._out += struct.pack(">QH", export.size, transmission_flags(export, False))
            if not self.no_zeroes:
                self._out += bytes(124)
            # EXPORT_NAME cannot say it ignored structured replies: drop them.
            self.structured = False
            return self._enter_transmission(export, {})
        if option == Opt.ABORT:
            self._reply(option, Rep.ACK)
            self.phase = Phase.CLOSED
            return Closed("client aborted")
        if option in (Opt.LIST, Opt.STRUCTURED_REPLY, Opt.STARTTLS) and payload:
            self._error(option, Rep.ERR_INVALID, f"option '{name}' has unexpected length")
            return True
        if option == Opt.LIST:
            for export in self._listing():
                encoded = export.name.encode()
                data = struct.pack(">I", len(encoded)) + encoded
                if export.description:
                    data += export.description.encode()
                self._reply(option, Rep.SERVER, data)
            self._reply(option, Rep.ACK)
            return True
        if option == Opt.STARTTLS:
            self._error(option, Rep.ERR_POLICY, "TLS not configured")
            return True
        if option == Opt.STRUCTURED_REPLY:
            if self.structured:
                self._error(option, Rep.ERR_INVALID, "structured reply already negotiated")
            else:
                self.structured = True
                self._reply(option, Rep.ACK)
            return True
        if option in (Opt.INFO, Opt.GO):
            return self._info(option, payload)
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(option, payload)
            return True
        self._error(option, Rep.ERR_UNSUP, f"Unsupported option {option} ({name or '<unknown>'})")
        return True

    def _info(self, option: int, payload: bytes) -> Event | bool:
        name = _OPTION_NAMES[Opt(option)]
        reader = _OptionReader(payload, name)
        try:
            raw_name = reader.name()
            (count,) = struct.unpack(">H", reader.take(2))
            requests = struct.unpack(f">{count}H", reader.take(2 * count))
            if reader.left:
                raise _BadOption(f"option '{name}' has unexpected length")
        except _BadOption as err:
            self._error(option, Rep.ERR_INVALID, str(err))
            return True
        export_name = raw_name.decode("utf-8", "surrogateescape")
        export = self._lookup(export_name)
        if export is None:
            self._error(option, Rep.ERR_UNKNOWN, _not_present(raw_name))
            return True
        if Info.NAME in requests:
            self._reply(option, Rep.INFO, struct.pack(">H", Info.NAME) + export.name.encode())
        if export.description:
            self._reply(
                option,
                Rep.INFO,
                struct.pack(">H", Info.DESCRIPTION) + export.description.encode(),
            )
        self._reply(
            option,
            Rep.INFO,
            struct.pack(">HIII", Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_BUFFER),
        )
        self._reply(
            option,
            Rep.INFO,
            struct.pack(
                ">HQH", Info.EXPORT, export.size, transmission_flags(export, self.structured)
            ),
        )
        self._reply(option, Rep.ACK)
        if option == Opt.INFO:
            return True
        contexts: dict[int, str] = {}
        if self._selected is not None and self._selected[0] == export.name:
            contexts = dict(self._selected[1])
        return self._enter_transmission(export, contexts)

    def _enter_transmission(self, export: ExportInfo, contexts: dict[int, str]) -> Negotiated:
        self.export = export
        self.phase = Phase.TRANSMISSION
        return Negotiated(export, self.structured, contexts)

    def _meta_context(self, option: int, payload: bytes) -> None:
        """LIST/SET_META_CONTEXT, read field by field as QEMU reads them.

        The export is looked up as soon as its name is read, so an unknown
        export is reported before anything wrong further on; a query longer
        than :data:`MAX_STRING` is skipped.  Bytes left after the last query
        are refused (QEMU 7.2 leaves them in the stream, where they end the
        connection as a bad option magic).
        """
        name = _OPTION_NAMES[Opt(option)]
        listing = option == Opt.LIST_META_CONTEXT
        if not listing and not self.structured:
            self._error(
                option,
                Rep.ERR_INVALID,
                f"request option '{name}' when structured reply is not negotiated",
            )
            return
        reader = _OptionReader(payload, name)
        try:
            raw_name = reader.name()
            export = self._lookup(raw_name.decode("utf-8", "surrogateescape"))
            if export is None:
                self._error(option, Rep.ERR_UNKNOWN, _not_present(raw_name))
                return
            (count,) = struct.unpack(">I", reader.take(4))
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack(">I", reader.take(4))
                if qlen > MAX_STRING:
                    reader.take(qlen)
                    continue
                queries.append(reader.take(qlen, no_nul=True).decode("utf-8", "surrogateescape"))
            if reader.left:
                raise _BadOption(f"option '{name}' has unexpected length")
        except _BadOption as err:
            self._error(option, Rep.ERR_INVALID, str(err))
            return
        # (id, name, namespace) of what this export offers, in QEMU's reply order
        offered = [(BASE_ALLOCATION_ID, BASE_ALLOCATION, "base:")]
        if export.allocation_depth:
            offered.append((ALLOCATION_DEPTH_ID, ALLOCATION_DEPTH, "qemu:"))
        chosen: dict[int, str] = {}
        for context_id, context, namespace in offered:
            if listing:
                wanted = not count or any(q in (namespace, context) for q in queries)
            else:
                wanted = context in queries
            if wanted:
                chosen[context_id] = context
                # LIST replies carry id 0: ids only mean something after SET (as QEMU)
                wire_id = 0 if listing else context_id
                self._reply(option, Rep.META_CONTEXT, struct.pack(">I", wire_id) + context.encode())
        if not listing:
            self._selected = (export.name, chosen)
        self._reply(option, Rep.ACK)

    def _collect(self, data: bytes | bytearray, events: list[Event]) -> bytes | bytearray:
        """Add received bytes to a big WRITE payload; returns what follows it."""
        assert self._parts is not None
        assert self._pending is not None
        flags, kind, handle, offset, length = self._pending
        need = length - self._parts_size
        if len(data) < need:
            self._parts.append(bytes(data))  # (a no-op for bytes, as received)
            self._parts_size += len(data)
            return b""
        with memoryview(data) as view:
            self._parts.append(view[:need])
            payload = b"".join(self._parts)
        self._parts = None
        self._parts_size = 0
        self._pending = None
        events.append(Request(flags, kind, handle, offset, length, payload))
        return data[need:]

    def _requests(self, events: list[Event]) -> None:
        """Parse every complete request in the buffer (transmission phase).

        Consumed bytes are cut from the buffer once at the end, and a WRITE
        payload is copied out once: with many small requests per receive
        this loop is the hottest code of the server.
        """
        buf = self._buffer
        size = len(buf)
        pos = 0
        unpack = _HEADER.unpack_from
        try:
            while True:
                if self._pending is None:
                    if size - pos < _HEADER_SIZE:
                        return
                    magic, flags, kind, handle, offset, length = unpack(buf, pos)
                    if magic != REQUEST_MAGIC:
                        raise ProtocolError(f"invalid magic (got 0x{magic:x})")
                    pos += _HEADER_SIZE
                    if kind == Cmd.DISC:
                        events.append(Closed("client disconnected"))
                        self.phase = Phase.CLOSED
                        return
                    if kind != Cmd.WRITE:
                        events.append(Request(flags, kind, handle, offset, length))
                        continue
                    if length > MAX_BUFFER:
                        # The payload cannot be buffered, and skipping it is not worth it.
                        raise ProtocolError(
                            f"len ({length}) is larger than max len ({MAX_BUFFER})"
                        )
                    self._pending = (flags, kind, handle, offset, length)
                flags, kind, handle, offset, length = self._pending
                if size - pos < length:
                    if length >= _VIEW_COPY:
                        # Growing the buffer to hold a big payload would copy
                        # it over and over: keep its pieces until complete.
                        self._parts = [bytes(buf[pos:size])]
                        self._parts_size = size - pos
                        pos = size
                    return
                if length < _VIEW_COPY:
                    data = bytes(buf[pos : pos + length])
                else:  # slicing the bytearray would copy a big payload twice
                    with memoryview(buf) as whole, whole[pos : pos + length] as payload:
                        data = bytes(payload)
                pos += length
                self._pending = None
                events.append(Request(flags, kind, handle, offset, length, data))
        finally:
            del buf[:pos]


# -- request checks -----------------------------------------------------------------


_READ: Final = int(Cmd.READ)
_WRITE: Final = int(Cmd.WRITE)


@dataclass(frozen=True)
class Refusal:
    """Why a request is answered with an error instead of being run."""

    error: int
    message: str


def check_request(
    request: Request, size: int, writable: bool, structured: bool, contexts: dict[int, str]
) -> Refusal | None:
    """QEMU's checks before a request reaches the block layer, in its order."""
    kind = request.type
    if not request.flags and request.offset + request.length <= size:
        # the common case, answered without the enum machinery below
        if kind == _READ and request.length <= MAX_BUFFER:
            return None
        if kind == _WRITE and writable:
            return None
    if kind not in _COMMAND_NAMES:
        return Refusal(EINVAL, f"invalid request type ({kind}) received")
    allowed = CmdFlag.FUA
    if kind == Cmd.READ and structured:
        allowed |= CmdFlag.DF
    if kind == Cmd.WRITE_ZEROES:
        allowed |= CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO
    if kind == Cmd.BLOCK_STATUS:
        allowed |= CmdFlag.REQ_ONE
    if request.flags & ~int(allowed):  # (~ of a flag enum keeps only its known bits)
        name = _COMMAND_NAMES[Cmd(kind)]
        return Refusal(EINVAL, f"unsupported flags for command {name} (got 0x{request.flags:x})")
    if kind in (Cmd.READ, Cmd.CACHE) and request.length > MAX_BUFFER:
        # (sic: QEMU 7.2 prints a space after the length)
        return Refusal(EINVAL, f"len ({request.length} ) is larger than max len ({MAX_BUFFER})")
    if kind in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and not writable:
        # QEMU answers every request it refuses before running it with EINVAL.
        return Refusal(EINVAL, "Export is read-only")
    # (FLUSH too: QEMU checks every request's range, though a flush ignores it)
    if request.offset + request.length > size:
        return Refusal(
            EINVAL,
            f"operation past EOF; From: {request.offset}, Len: {request.length}, Size: {size}",
        )
    if kind == Cmd.BLOCK_STATUS:
        if not structured or not contexts:
            return Refusal(EINVAL, "CMD_BLOCK_STATUS not negotiated")
        if request.length == 0:
            return Refusal(EINVAL, "need non-zero length")
    return None
