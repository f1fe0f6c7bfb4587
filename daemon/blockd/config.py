"""Start-up configuration: a TOML file and the command line's ``--blockdev``.

The file names what a restart must bring back: the control socket, its mode,
the log level and the block nodes to open at start-up, each one the arguments
of a ``blockdev-add`` command::

    socket = "/run/blockd/qmp.sock"   # relative paths: from the file's directory
    socket-mode = "0660"              # octal, as a string
    log-level = "info"                # debug, info, warning or error

    [[blockdev]]
    driver = "qcow2"
    node-name = "disk0"
    file = { driver = "file", filename = "/var/lib/blockd/disk0.qcow2" }

Everything is checked here, before anything is opened or created, and a
mistake is reported with its line (TOML syntax) or its key (everything else).
The nodes themselves are checked by the ``blockdev-add`` command, exactly as
for a QMP client.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockd import keyval
from blockd.logs import LEVELS
from blockd.qmp.schema import CommandSchema, load_command_schemas

KEYS = ("socket", "socket-mode", "log-level", "blockdev", "nbd-server", "export")


class ConfigError(Exception):
    """The configuration is unusable; the daemon does not start."""


@dataclass(frozen=True)
class Config:
    """What the file sets; ``None`` (or no nodes) where it is silent."""

    socket: Path | None = None
    socket_mode: int | None = None
    log_level: str | None = None
    blockdevs: tuple[dict[str, Any], ...] = ()
    #: ``nbd-server-start`` arguments (the file names the address flat, as QSD's option)
    nbd_server: dict[str, Any] | None = None
    #: ``block-export-add`` arguments, in order
    exports: tuple[dict[str, Any], ...] = ()

    def startup(self) -> list[StartupCommand]:
        """The file's start-up commands: its nodes, then the NBD server, then the exports."""
        steps = [node_step(number, node) for number, node in enumerate(self.blockdevs, 1)]
        if self.nbd_server is not None:
            origin = "the configuration file's [nbd-server]"
            steps.append(StartupCommand("nbd-server-start", self.nbd_server, origin))
        steps += [
            StartupCommand("block-export-add", export, f"the configuration file's export[{index}]")
            for index, export in enumerate(self.exports)
        ]
        return steps


def parse_mode(text: str) -> int:
    """An octal file mode such as ``0600``; ValueError says what is wrong."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"not an octal file mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"file mode out of range: {text!r}")
    return mode


@dataclass(frozen=True)
class StartupCommand:
    """A QMP command run at start-up, and where it came from (for its error)."""

    command: str
    arguments: dict[str, Any]
    origin: str


def node_step(number: int, arguments: dict[str, Any]) -> StartupCommand:
    """The ``blockdev-add`` of the ``number``-th start-up node (file's first)."""
    name = arguments.get("node-name")
    origin = f"start-up node {number}" + (f" ({name})" if isinstance(name, str) else "")
    return StartupCommand("blockdev-add", arguments, origin)


#: Command-line option -> (QMP command it runs, the key a first bare value sets)
OPTION_COMMANDS = {
    "--blockdev": ("blockdev-add", "driver"),
    "--nbd-server": ("nbd-server-start", None),
    "--export": ("block-export-add", "type"),
}


def parse_option(option: str, text: str) -> dict[str, Any]:
    """The QMP arguments of ``--blockdev``, ``--nbd-server`` or ``--export``,
    from a JSON object or from QEMU's ``key=value`` form, as QSD takes them."""
    command, implied = OPTION_COMMANDS[option]
    is_json = text.lstrip().startswith("{")
    value: dict[str, Any]
    try:
        if is_json:
            parsed = json.loads(text)
            if not isinstance(parsed, dict):
                raise ConfigError(f"{option} {text!r}: must be a JSON object")
            value = parsed
        else:
            value = keyval.parse(text, implied_key=implied)
        if command == "nbd-server-start":
            value = _legacy_address(value)
        return value if is_json else keyval.typed(_command_schema(command), value)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option} {text!r}: not valid JSON: {err}") from None
    except keyval.KeyvalError as err:
        raise ConfigError(f"{option} {text!r}: {err}") from None


def _legacy_address(options: dict[str, Any]) -> dict[str, Any]:
    """QSD's ``--nbd-server`` names the address flat (``addr.type``,
    ``addr.path``); ``nbd-server-start`` nests it (``addr.data.path``)."""
    addr = options.get("addr")
    if isinstance(addr, dict) and "type" in addr and "data" not in addr:
        data = {k: v for k, v in addr.items() if k != "type"}
        options = {**options, "addr": {"type": addr["type"], "data": data}}
    return options


def _command_schema(command: str) -> CommandSchema:
    return _command_schemas()[command]


@functools.cache
def _command_schemas() -> dict[str, CommandSchema]:
    return load_command_schemas()


def load_config(path: Path) -> Config:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None
    return _Checker(path, text).check(data)


class _Checker:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def _where(self, key: str) -> str:
        """``line N: key 'k'``, finding a top-level key before the first table."""
        pattern = re.compile(rf"""^\s*(["']?){re.escape(key)}\1\s*=""")
        for number, line in enumerate(self.lines, 1):
            if line.lstrip().startswith("["):
                break
            if pattern.match(line):
                return f"line {number}: key '{key}'"
        return f"key '{key}'"

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self._where(key)}: {reason}")

    def check(self, data: Mapping[str, Any]) -> Config:
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise self.fail(unknown[0], f"unknown key (known keys: {', '.join(KEYS)})")
        return Config(
            socket=self._socket(data.get("socket")),
            socket_mode=self._mode(data.get("socket-mode")),
            log_level=self._level(data.get("log-level")),
            blockdevs=self._tables("blockdev", data.get("blockdev"), "blockdev-add"),
            nbd_server=self._nbd_server(data.get("nbd-server")),
            exports=self._tables("export", data.get("export"), "block-export-add"),
        )

    def _string(self, key: str, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected {what}, got {_type_name(value)}")
        return value

    def _socket(self, value: Any) -> Path | None:
        if value is None:
            return None
        text = self._string("socket", value, "a string (the socket's path)")
        if not text:
            raise self.fail("socket", "must not be empty")
        return self.path.parent.absolute() / text

    def _mode(self, value: Any) -> int | None:
        if value is None:
            return None
        text = self._string("socket-mode", value, 'a string with an octal mode such as "0600"')
        try:
            return parse_mode(text)
        except ValueError as err:
            raise self.fail("socket-mode", str(err)) from None

    def _level(self, value: Any) -> str | None:
        if value is None:
            return None
        text = self._string("log-level", value, "a string")
        if text not in LEVELS:
            raise self.fail("log-level", f"{text!r} is not one of {', '.join(LEVELS)}")
        return text

    def _tables(self, key: str, value: Any, command: str) -> tuple[dict[str, Any], ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(
                key, f"expected an array of tables ([[{key}]]), got {_type_name(value)}"
            )
        tables = []
        for index, table in enumerate(value):
            where = f"{key}[{index}]"
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{self.path}: key '{where}': expected a table of {command} arguments, "
                    f"got {_type_name(table)}"
                )
            problem = _not_json(table, where)
            if problem is not None:
                raise ConfigError(f"{self.path}: {problem}")
            tables.append(table)
        return tuple(tables)

    def _nbd_server(self, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(
                "nbd-server", f"expected a table ([nbd-server]), got {_type_name(value)}"
            )
        problem = _not_json(value, "nbd-server")
        if problem is not None:
            raise ConfigError(f"{self.path}: {problem}")
        return _legacy_address(value)


def _not_json(value: Any, key: str) -> str | None:
    """Why ``value`` cannot be a QMP argument (TOML has dates; JSON has none)."""
    if isinstance(value, dict):
        for k, v in value.items():
            problem = _not_json(v, f"{key}.{k}")
            if problem is not None:
                return problem
    elif isinstance(value, list):
        for i, v in enumerate(value):
            problem = _not_json(v, f"{key}[{i}]")
            if problem is not None:
                return problem
    elif isinstance(value, datetime.date | datetime.time):
        return f"key '{key}': {_type_name(value)} has no JSON form"
    elif isinstance(value, float) and not math.isfinite(value):
        return f"key '{key}': {value} has no JSON form"
    return None


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return type(value).__name__
