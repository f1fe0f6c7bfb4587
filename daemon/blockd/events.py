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
from typing import Any, Protocol


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
