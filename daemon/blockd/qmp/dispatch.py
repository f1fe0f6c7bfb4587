"""The command table, argument validation, and the one place errors become replies.

A request goes through the same gates, in the same order, as in QEMU's
``qmp_dispatch``: negotiation phase, command lookup, OOB, argument validation
against the command's schema, then the handler.  Whatever a handler raises is
turned into a QMP error here; an unexpected exception is reported to the
client as a GenericError and logged, and never takes the daemon down.

Commands run one at a time daemon-wide, as on QEMU's main loop: a command that
validates and then mutates cannot interleave with another client's command.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from blockd.commands import CommandContext, Handler
from blockd.errors import BlockdError, CommandNotFound, ErrorClass, InvalidArgument
from blockd.qmp.introspect import build_schema
from blockd.qmp.protocol import QMPConnection, Request
from blockd.qmp.schema import CommandSchema, SchemaError

log = logging.getLogger(__name__)

_Runner = Callable[[QMPConnection, Mapping[str, Any]], Awaitable[Any]]


class Dispatcher:
    def __init__(
        self,
        schemas: Mapping[str, CommandSchema],
        handlers: Mapping[str, Handler],
        context: CommandContext,
    ) -> None:
        # The protocol's own commands need the connection, not the daemon state.
        runners: dict[str, _Runner] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-commands": self._query_commands,
            "query-qmp-schema": self._query_qmp_schema,
        }
        for name, handler in handlers.items():
            runners[name] = _bind(handler, context)
        without_schema = sorted(set(runners) - set(schemas))
        without_handler = sorted(set(schemas) - set(runners))
        if without_schema or without_handler:
            raise SchemaError(
                f"command table and schema/ disagree: no schema for {without_schema}, "
                f"no handler for {without_handler}"
            )
        self._schemas = schemas
        self._runners = runners
        self._introspection = build_schema(schemas)
        self._lock = trio.Lock()

    @property
    def command_names(self) -> list[str]:
        return sorted(self._runners)

    async def execute(self, conn: QMPConnection, request: Request) -> bytes:
        """Run one request to completion and return the reply's bytes."""
        try:
            value = await self._run(conn, request)
        except BlockdError as err:
            return conn.reply_error(request.id, err.error_class, err.desc)
        except Exception as err:
            log.exception("command %s failed unexpectedly", request.command)
            return conn.reply_error(
                request.id, ErrorClass.GENERIC, f"Internal error in {request.command}: {err}"
            )
        return conn.reply(request.id, value)

    async def _run(self, conn: QMPConnection, request: Request) -> Any:
        name = request.command
        if not conn.negotiated and name != "qmp_capabilities":
            raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
        runner = self._runners.get(name)
        if runner is None:
            raise CommandNotFound(f"The command {name} has not been found")
        if request.oob:
            raise BlockdError(f"The command {name} does not support OOB")
        problem = self._schemas[name].check_arguments(request.arguments)
        if problem is not None:
            raise InvalidArgument(problem)
        async with self._lock:
            return await runner(conn, request.arguments)

    async def _qmp_capabilities(self, conn: QMPConnection, args: Mapping[str, Any]) -> Any:
        if conn.negotiated:
            raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
        conn.enter_command_mode(args.get("enable", []))
        return {}

    async def _query_commands(self, conn: QMPConnection, args: Mapping[str, Any]) -> Any:
        return [{"name": name} for name in self.command_names]

    async def _query_qmp_schema(self, conn: QMPConnection, args: Mapping[str, Any]) -> Any:
        return self._introspection


def _bind(handler: Handler, context: CommandContext) -> _Runner:
    async def run(conn: QMPConnection, args: Mapping[str, Any]) -> Any:
        return await handler(context, args)

    return run
