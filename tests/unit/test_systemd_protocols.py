"""The notify and activation protocols' environment handling, without a daemon."""

from __future__ import annotations

import logging
import os

import pytest

from blockd.logs import JournalFormatter, priority
from blockd.systemd.activation import ActivationError, listen_sockets
from blockd.systemd.notify import Notifier, watchdog_interval


def test_notify_is_a_no_op_without_notify_socket() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    notifier.ready("x")  # nothing to send to, nothing raised


def test_notify_failure_is_not_fatal() -> None:
    notifier = Notifier("/nonexistent/notify")
    notifier.ready("x")
    notifier.watchdog()
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_activation_variables_for_another_process_are_ignored_and_removed() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "y"}
    assert listen_sockets(env) == []
    assert env == {"OTHER": "y"}


def test_no_activation() -> None:
    assert listen_sockets({}) == []


def test_bad_listen_fds() -> None:
    with pytest.raises(ActivationError, match="LISTEN_FDS='two' is not a number"):
        listen_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})


def test_journal_formatter_prefixes_every_line() -> None:
    record = logging.LogRecord("blockd", logging.ERROR, __file__, 1, "a\nb", None, None)
    assert JournalFormatter("%(message)s").format(record) == "<3>a\n<3>b"
    assert [priority(level) for level in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


def test_listen_fds_without_listen_pid_is_not_activation() -> None:
    assert listen_sockets({"LISTEN_FDS": "1"}) == []
