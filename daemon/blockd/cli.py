"""The ``blockd`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from blockd import __version__
from blockd.app import Settings, run
from blockd.control_socket import ControlSocketError
from blockd.qmp.schema import SchemaError


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"file mode out of range: {text!r}")
    return mode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockd",
        description="Storage daemon: serves QMP (as qemu-storage-daemon 7.2 does) "
        "on a Unix socket and commits qcow2 snapshot chains live.",
    )
    parser.add_argument("--version", action="version", version=f"blockd {__version__}")
    parser.add_argument(
        "--socket", required=True, type=Path, metavar="PATH", help="QMP control socket to create"
    )
    parser.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o600,
        metavar="MODE",
        help="permissions of the control socket, in octal (default: 0600)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="least severe message to log on stderr (default: info)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s blockd[%(process)d] %(levelname)s %(message)s",
    )
    settings = Settings(socket_path=args.socket, socket_mode=args.socket_mode)
    try:
        trio.run(run, settings)
    except (ControlSocketError, SchemaError) as err:
        print(f"blockd: {err}", file=sys.stderr)
        return 1
    return 0
