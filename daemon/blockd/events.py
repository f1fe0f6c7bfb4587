"""The event sink: how any layer tells every QMP client that something happened.

Jobs and block nodes must not know about sockets, and one slow client must not
stall the daemon, so emitting is a plain synchronous call that stamps the event
and hands it to listeners that only enqueue (the QMP server bounds each
client's queue and drops a client that falls too far behind).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol


class Event(Protocol):
    """What an event type provides: its QMP name and its ``data`` member."""

    @property
    def name(self) -> str: ...

    def data(self) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class EmittedEvent:
    """An event with the wall-clock time it was emitted at, as QMP reports it."""

    name: str
    data: Mapping[str, Any] | None
    seconds: int
    microseconds: int


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


Listener = Callable[[EmittedEvent], None]


class EventBus:
    """Fans each emitted event out to every subscribed listener, in order.

    The time is taken at emission, not at delivery, so a client that reads late
    still sees when things happened.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns the function that removes it again."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, event: Event) -> None:
        now = self._clock()
        seconds = int(now)
        stamped = EmittedEvent(
            name=event.name,
            data=event.data(),
            seconds=seconds,
            microseconds=int((now - seconds) * 1_000_000),
        )
        for listener in list(self._listeners):
            listener(stamped)


@dataclass(frozen=True)
class JobStatusChange:
    """Every job state change (``schema/events/JOB_STATUS_CHANGE.json``)."""

    id: str
    status: str
    name: ClassVar[str] = "JOB_STATUS_CHANGE"

    def data(self) -> Mapping[str, Any]:
        return {"id": self.id, "status": self.status}


@dataclass(frozen=True)
class _BlockJobProgress:
    """Shared shape of the block-job events that report progress."""

    type: str
    device: str
    len: int
    offset: int
    speed: int

    def data(self) -> Mapping[str, Any]:
        return {
            "type": self.type,
            "device": self.device,
            "len": self.len,
            "offset": self.offset,
            "speed": self.speed,
        }


@dataclass(frozen=True)
class BlockJobCompleted(_BlockJobProgress):
    """A job ended without being cancelled; ``error`` says whether it failed."""

    error: str | None = None
    name: ClassVar[str] = "BLOCK_JOB_COMPLETED"

    def data(self) -> Mapping[str, Any]:
        data = dict(super().data())
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass(frozen=True)
class BlockJobCancelled(_BlockJobProgress):
    name: ClassVar[str] = "BLOCK_JOB_CANCELLED"


@dataclass(frozen=True)
class BlockJobReady(_BlockJobProgress):
    name: ClassVar[str] = "BLOCK_JOB_READY"


@dataclass(frozen=True)
class BlockJobError:
    """An I/O error met by a job, and what its ``on-error`` policy did about it."""

    device: str
    operation: str
    action: str
    name: ClassVar[str] = "BLOCK_JOB_ERROR"

    def data(self) -> Mapping[str, Any]:
        return {"device": self.device, "operation": self.operation, "action": self.action}


@dataclass(frozen=True)
class BlockJobPending:
    """A job waits for ``job-finalize`` (only sent when auto-finalize is off)."""

    type: str
    id: str
    name: ClassVar[str] = "BLOCK_JOB_PENDING"

    def data(self) -> Mapping[str, Any]:
        return {"type": self.type, "id": self.id}


@dataclass(frozen=True)
class BlockExportDeleted:
    """An export is gone: deleted, or its NBD server stopped (``BLOCK_EXPORT_DELETED``)."""

    id: str
    name: ClassVar[str] = "BLOCK_EXPORT_DELETED"

    def data(self) -> Mapping[str, Any]:
        return {"id": self.id}


@dataclass(frozen=True)
class BlockImageCorrupted:
    """A format driver found its image's metadata corrupt (``BLOCK_IMAGE_CORRUPTED``).

    ``device`` is always empty: a storage daemon's nodes have no guest device.
    ``offset``/``size`` locate the offending access when the driver knows it;
    ``fatal`` says whether the image was marked corrupt and takes no more I/O
    that writes (a read-only node only reports).
    """

    node_name: str
    msg: str
    fatal: bool
    offset: int | None = None
    size: int | None = None
    name: ClassVar[str] = "BLOCK_IMAGE_CORRUPTED"

    def data(self) -> Mapping[str, Any]:
        data: dict[str, Any] = {"device": "", "node-name": self.node_name, "msg": self.msg}
        if self.offset is not None:
            data["offset"] = self.offset
        if self.size is not None:
            data["size"] = self.size
        data["fatal"] = self.fatal
        return data


class NoEvents:
    """A sink for nodes nobody listens to (opened outside a daemon, in tools and tests)."""

    def emit(self, event: Event) -> None:
        pass
