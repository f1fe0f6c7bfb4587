"""The ``blockd`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import trio

from blockd import __version__, logs
from blockd.app import Settings, StartupError, run
from blockd.config import Config, ConfigError, load_config, parse_blockdev, parse_mode
from blockd.control_socket import ControlSocketError
from blockd.qmp.schema import SchemaError
from blockd.systemd.activation import ActivationError, listen_sockets


def _mode(text: str) -> int:
    try:
        return parse_mode(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
    parser.add_argument(
        "--blockdev",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="a node to open at start-up, as blockdev-add arguments: JSON, or "
        "key=value pairs as qemu-storage-daemon takes them (driver=qcow2,"
        "node-name=disk,file.driver=file,file.filename=disk.qcow2); "
        "repeatable, opened in order after the configuration file's nodes",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config) if args.config is not None else Config()
        blockdevs = config.blockdevs + tuple(parse_blockdev(text) for text in args.blockdev)
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
        blockdevs=blockdevs,
    )
    try:
        trio.run(run, settings)
    except (ControlSocketError, SchemaError, StartupError) as err:
        logs.fatal(str(err))
        return 1
    return 0
