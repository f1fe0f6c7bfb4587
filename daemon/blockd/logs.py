"""Logging for operators: one line per event worth attention, on stderr.

When stderr is connected to the journal (``$JOURNAL_STREAM`` names the device
and inode of fd 2, as systemd sets it), lines carry no timestamp (the journal
adds its own) and start with a ``<N>`` syslog priority so ``journalctl -p``
works.  Otherwise each line is timestamped.

Layers log through the ``blockd`` logger tree as usual; the functions at the
end are the wording of the events an operator reads, so every layer reports
the same thing the same way.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error")

#: syslog priorities (sd-daemon.h), by logging level.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7

log = logging.getLogger("blockd")


def priority(levelno: int) -> int:
    for level, prio in _PRIORITIES:
        if levelno >= level:
            return prio
    return _DEBUG_PRIORITY


def stderr_is_journal(
    environ: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> bool:
    """Whether ``$JOURNAL_STREAM`` says the journal is at the other end of stderr."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


class JournalFormatter(logging.Formatter):
    """``<N>message``, every line of it (a traceback keeps its priority)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def _handler(stream: TextIO, journal: bool) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    if journal:
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s blockd[%(process)d] %(levelname)s %(message)s")
        )
    return handler


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every ``blockd`` message at ``level`` or above to stderr."""
    out = stream or sys.stderr
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_handler(out, stderr_is_journal(stream=out)))
    root.setLevel(level.upper())


def fatal(message: str, stream: TextIO | None = None) -> None:
    """Why the daemon cannot start, as the last line it writes."""
    out = stream or sys.stderr
    prefix = "<3>" if stderr_is_journal(stream=out) else ""
    print(f"{prefix}blockd: {message}", file=out, flush=True)


# The events an operator wants to read, in one wording for every layer.


def started(version: str, sockets: list[str]) -> None:
    log.info("blockd %s started; QMP on %s", version, ", ".join(sockets))


def stopping(reason: str) -> None:
    log.info("stopping (%s)", reason)


def stopped() -> None:
    log.info("stopped")


def node_opened(node_name: str, driver: str, filename: str | None, read_only: bool) -> None:
    mode = "read-only" if read_only else "read-write"
    where = f" {filename}" if filename else ""
    log.info("opened node %s (%s%s, %s)", node_name, driver, where, mode)


def node_closed(node_name: str) -> None:
    log.info("closed node %s", node_name)


def node_close_failed(node_name: str, error: str) -> None:
    log.error("closing node %s failed: %s", node_name, error)


def job_started(job_id: str, job_type: str, device: str) -> None:
    log.info("job %s (%s on %s) started", job_id, job_type, device)


def job_finished(job_id: str, job_type: str, copied: int, total: int, seconds: float) -> None:
    mib = copied / (1 << 20)
    rate = mib / seconds if seconds > 0 else 0.0
    log.info(
        "job %s (%s) finished: %.1f MiB of %d bytes copied in %.1f s (%.1f MiB/s)",
        job_id,
        job_type,
        mib,
        total,
        seconds,
        rate,
    )


def job_failed(job_id: str, job_type: str, error: str, copied: int, total: int) -> None:
    log.error("job %s (%s) failed after %d of %d bytes: %s", job_id, job_type, copied, total, error)


def job_cancelled(job_id: str, job_type: str, copied: int, total: int) -> None:
    log.warning("job %s (%s) cancelled after %d of %d bytes", job_id, job_type, copied, total)
