"""QEMU's job states, the transitions between them, and which verb each allows.

Clients (libvirt above all) drive jobs by these states, so the tables are
QEMU's (``job.c``), not a simplification of them.
"""

from __future__ import annotations

import enum

from blockd.errors import BlockdError


class JobStatus(enum.StrEnum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = JobStatus

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}


class Verb(enum.StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


_LIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})

VERBS: dict[Verb, frozenset[JobStatus]] = {
    Verb.CANCEL: _LIVE | {S.WAITING, S.PENDING},
    Verb.PAUSE: _LIVE,
    Verb.RESUME: _LIVE,
    Verb.SET_SPEED: _LIVE,
    # QEMU 7.2 accepts complete in standby too: it takes effect on resume.
    Verb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    Verb.FINALIZE: frozenset({S.PENDING}),
    Verb.DISMISS: frozenset({S.CONCLUDED}),
}


class InvalidTransition(Exception):
    """A job tried a state change QEMU's table forbids: a bug in blockd."""


def check_transition(old: JobStatus, new: JobStatus) -> None:
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"job state {old} cannot become {new}")


def check_verb(job_id: str, status: JobStatus, verb: Verb) -> None:
    if status not in VERBS[verb]:
        raise BlockdError(f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'")
