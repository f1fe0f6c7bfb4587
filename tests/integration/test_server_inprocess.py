"""The trio server in-process, where a test can emit events and plant handlers.

Clients are real Unix-socket connections; only the command table is the test's
own, so that slow, failing and event-emitting commands can be exercised.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from blockd.block.graph import BlockGraph
from blockd.commands import HANDLERS, CommandContext, Handler
from blockd.events import EventBus
from blockd.export.exports import ExportRegistry
from blockd.jobs.registry import JobRegistry
from blockd.qmp.dispatch import Dispatcher
from blockd.qmp.schema import SchemaError, load_command_schemas, schema_root
from blockd.qmp.server import QMPServer
from blockd.version import version_info

NO_ARGS = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {},
    "additionalProperties": False,
    "$defs": {"returns": {}},
}


@dataclass(frozen=True)
class Ping:
    seq: int
    name: str = "TEST_PING"

    def data(self) -> Mapping[str, Any]:
        return {"seq": self.seq}


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.bus = EventBus()
        self.release = trio.Event()
        self.finished = trio.Event()
        root = tmp / "schema"
        shutil.copytree(Path(str(schema_root())), root)
        for name in ("slow", "boom", "emit"):
            (root / "commands" / f"{name}.json").write_text(json.dumps({**NO_ARGS, "title": name}))
        handlers: dict[str, Handler] = {"slow": self.slow, "boom": self.boom, "emit": self.emit}
        from blockd.commands import HANDLERS

        handlers.update(HANDLERS)
        graph = BlockGraph()
        context = CommandContext(
            events=self.bus,
            graph=graph,
            jobs=JobRegistry(),
            request_shutdown=lambda: None,
            exports=ExportRegistry(self.bus, graph),
        )
        self.dispatcher = Dispatcher(load_command_schemas(root), handlers, context)
        self.path = tmp / "s.sock"

    async def slow(self, ctx: CommandContext, args: Mapping[str, Any]) -> Any:
        await self.release.wait()
        self.finished.set()
        return {}

    async def boom(self, ctx: CommandContext, args: Mapping[str, Any]) -> Any:
        raise ZeroDivisionError("planted failure")

    async def emit(self, ctx: CommandContext, args: Mapping[str, Any]) -> Any:
        ctx.events.emit(Ping(1))
        return {}


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def read(self) -> dict[str, Any]:
        with trio.fail_after(5):
            while b"\r\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(json.dumps(message).encode())

    async def negotiate(self) -> None:
        assert "QMP" in await self.read()
        await self.send({"execute": "qmp_capabilities"})
        assert await self.read() == {"return": {}}


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(h.path))
    sock.listen(16)
    server = QMPServer(
        h.dispatcher, h.bus, version_info(), outbox_bytes=2048, outbox_max_bytes=4096
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [trio.SocketListener(sock)])
        yield h
        server.close()


async def connect(h: Harness) -> Client:
    return Client(await trio.open_unix_socket(str(h.path)))


async def test_events_reach_only_negotiated_clients(harness: Harness) -> None:
    negotiated, waiting = await connect(harness), await connect(harness)
    await negotiated.negotiate()
    assert "QMP" in await waiting.read()
    harness.bus.emit(Ping(7))
    event = await negotiated.read()
    assert event["event"] == "TEST_PING" and event["data"] == {"seq": 7}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    # Not queued for later either: after negotiating, the old event is not there.
    await waiting.send({"execute": "qmp_capabilities", "id": 1})
    assert await waiting.read() == {"return": {}, "id": 1}
    harness.bus.emit(Ping(8))
    assert (await waiting.read())["data"] == {"seq": 8}


async def test_event_emitted_by_a_command_precedes_its_reply(harness: Harness) -> None:
    client = await connect(harness)
    await client.negotiate()
    await client.send({"execute": "emit", "id": "e"})
    assert (await client.read())["event"] == "TEST_PING"
    assert await client.read() == {"return": {}, "id": "e"}


async def test_slow_reader_is_dropped_without_stalling_others(harness: Harness) -> None:
    stalled, healthy = await connect(harness), await connect(harness)
    await stalled.negotiate()
    await healthy.negotiate()
    # The stalled client never reads; the emitter must never block on it.
    for seq in range(5000):
        harness.bus.emit(Ping(seq))
        if seq % 16 == 0:
            for _ in range(16 if seq else 1):
                await healthy.read()
    # The stalled client was cut off: after its buffered data, EOF.
    with trio.fail_after(5):
        while True:
            chunk = await stalled.stream.receive_some(1 << 20)
            if not chunk:
                break
    await healthy.send({"execute": "query-version", "id": 2})
    while (message := await healthy.read()).get("id") != 2:
        assert message["event"] == "TEST_PING"
    assert message["return"]["qemu"]["major"] == 7


async def test_unexpected_handler_failure_is_a_generic_error(harness: Harness) -> None:
    client = await connect(harness)
    await client.negotiate()
    await client.send({"execute": "boom", "id": 1})
    reply = await client.read()
    assert reply["id"] == 1 and reply["error"]["class"] == "GenericError"
    assert "planted failure" in reply["error"]["desc"]
    await client.send({"execute": "query-version", "id": 2})
    assert (await client.read())["id"] == 2


async def test_command_finishes_when_its_client_disconnects(harness: Harness) -> None:
    leaver, other = await connect(harness), await connect(harness)
    await leaver.negotiate()
    await other.negotiate()
    await leaver.send({"execute": "slow", "id": 1})
    await trio.sleep(0.05)
    await leaver.stream.aclose()
    await trio.sleep(0.05)
    harness.release.set()
    with trio.fail_after(5):
        await harness.finished.wait()
    await other.send({"execute": "query-version", "id": 3})
    assert (await other.read())["id"] == 3


def bare_context() -> CommandContext:
    graph = BlockGraph()
    return CommandContext(
        events=EventBus(),
        graph=graph,
        jobs=JobRegistry(),
        request_shutdown=lambda: None,
        exports=ExportRegistry(EventBus(), graph),
    )


async def test_dispatcher_refuses_handler_without_schema() -> None:
    async def extra(ctx: CommandContext, args: Mapping[str, Any]) -> Any:
        return {}

    with pytest.raises(SchemaError) as refused:
        Dispatcher(load_command_schemas(), {**HANDLERS, "extra": extra}, bare_context())
    assert str(refused.value) == (
        "command table and schema/ disagree: no schema for ['extra'], no handler for []"
    )


async def test_dispatcher_refuses_schema_without_handler() -> None:
    """One side alone disagreeing is enough: a command in schema/ that no
    handler runs would be listed by query-commands and fail when called."""
    handlers = {name: h for name, h in HANDLERS.items() if name != "query-version"}
    with pytest.raises(SchemaError) as refused:
        Dispatcher(load_command_schemas(), handlers, bare_context())
    assert str(refused.value) == (
        "command table and schema/ disagree: no schema for [], no handler for ['query-version']"
    )
