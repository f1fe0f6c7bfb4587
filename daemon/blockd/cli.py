"""The ``blockd`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from blockd import __version__, logs
from blockd.app import Settings, StartupError, run
from blockd.config import (
    OPTION_COMMANDS,
    Config,
    ConfigError,
    StartupCommand,
    load_config,
    node_step,
    parse_mode,
    parse_option,
)
from blockd.control_socket import ControlSocketError
from blockd.qmp.schema import SchemaError
from blockd.systemd.activation import ActivationError, listen_sockets


def _mode(text: str) -> int:
    try:
        return parse_mode(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class _InOrder(argparse.Action):
    """Collects ``--blockdev``, ``--nbd-server`` and ``--export`` in one list, in
    the order given: an export needs its node and the server before it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, "startup", None) is None:
            namespace.startup = []
        namespace.startup.append((option_string, values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockd",
        description="Storage daemon: serves QMP (as qemu-storage-daemon 7.2 does) "
        "on a Unix socket and commits qcow2 snapshot chains live.",
        epilog="Options given here override the configuration file. Under socket "
        "activation (LISTEN_FDS) blockd serves the sockets systemd passes and "
        "creates none.",
    )
    parser.add_argument("--version", action="version", version=f"blockd {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file with the socket, its mode, the log level and start-up nodes",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="QMP control socket to create (required unless set in --config or socket-activated)",
    )
    parser.add_argument(
        "--socket-mode",
        type=_mode,
        metavar="MODE",
        help="permissions of the control socket, in octal (default: 0600)",
    )
    parser.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        help="least severe message to log on stderr (default: info)",
    )
    startup = parser.add_argument_group(
        "start-up commands",
        "Run in the order given, after the configuration file's nodes, each as "
        "a JSON object or as key=value pairs, as qemu-storage-daemon takes them",
    )
    startup.add_argument(
        "--blockdev",
        action=_InOrder,
        metavar="OPTIONS",
        help="a node to open, as blockdev-add arguments "
        "(driver=qcow2,node-name=disk,file.driver=file,file.filename=disk.qcow2)",
    )
    startup.add_argument(
        "--nbd-server",
        action=_InOrder,
        metavar="OPTIONS",
        help="start the NBD server (addr.type=unix,addr.path=nbd.sock)",
    )
    startup.add_argument(
        "--export",
        action=_InOrder,
        metavar="OPTIONS",
        help="export a node, as block-export-add arguments "
        "(type=nbd,id=exp0,node-name=disk,writable=on)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config) if args.config is not None else Config()
        given = getattr(args, "startup", None) or []
        startup = config.startup()
        for option, text in given:
            arguments = parse_option(option, text)
            if option == "--blockdev":
                number = 1 + sum(step.command == "blockdev-add" for step in startup)
                startup.append(node_step(number, arguments))
            else:
                command = OPTION_COMMANDS[option][0]
                startup.append(StartupCommand(command, arguments, f"{option} {text!r}"))
    except ConfigError as err:
        logs.fatal(str(err))
        return 1
    logs.setup(args.log_level or config.log_level or "info")
    try:
        inherited = tuple(listen_sockets())
    except ActivationError as err:
        logs.fatal(str(err))
        return 1
    socket_path = args.socket or config.socket
    if not inherited and socket_path is None:
        parser.error("--socket is required (or a socket in --config, or socket activation)")
    mode = args.socket_mode if args.socket_mode is not None else config.socket_mode
    settings = Settings(
        socket_path=socket_path,
        socket_mode=mode if mode is not None else 0o600,
        inherited=inherited,
        startup=tuple(startup),
    )
    try:
        trio.run(run, settings)
    except (ControlSocketError, SchemaError, StartupError) as err:
        logs.fatal(str(err))
        return 1
    return 0
