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


TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.UNDEFINED: frozenset({JobStatus.CREATED}),
    JobStatus.CREATED: frozenset({JobStatus.RUNNING, JobStatus.ABORTING, JobStatus.NULL}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.PAUSED, JobStatus.READY, JobStatus.WAITING, JobStatus.ABORTING}
    ),
    JobStatus.PAUSED: frozenset({JobStatus.RUNNING}),
    JobStatus.READY: frozenset({JobStatus.STANDBY, JobStatus.WAITING, JobStatus.ABORTING}),
    JobStatus.STANDBY: frozenset({JobStatus.READY}),
    JobStatus.WAITING: frozenset({JobStatus.PENDING, JobStatus.ABORTING}),
    JobStatus.PENDING: frozenset({JobStatus.ABORTING, JobStatus.CONCLUDED}),
    JobStatus.ABORTING: frozenset({JobStatus.ABORTING, JobStatus.CONCLUDED}),
    JobStatus.CONCLUDED: frozenset({JobStatus.NULL}),
    JobStatus.NULL: frozenset(),
}


class Verb(enum.StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


_LIVE = frozenset(
    {JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.READY, JobStatus.STANDBY}
)

VERBS: dict[Verb, frozenset[JobStatus]] = {
    Verb.CANCEL: _LIVE | {JobStatus.WAITING, JobStatus.PENDING},
    Verb.PAUSE: _LIVE,
    Verb.RESUME: _LIVE,
    Verb.SET_SPEED: _LIVE,
    # QEMU 7.2 accepts complete in standby too: it takes effect on resume.
    Verb.COMPLETE: frozenset({JobStatus.READY, JobStatus.STANDBY}),
    Verb.FINALIZE: frozenset({JobStatus.PENDING}),
    Verb.DISMISS: frozenset({JobStatus.CONCLUDED}),
}


class InvalidTransition(Exception):
    """A job tried a state change QEMU's table forbids: a bug in blockd."""


def check_transition(old: JobStatus, new: JobStatus) -> None:
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"job state {old} cannot become {new}")


def check_verb(job_id: str, status: JobStatus, verb: Verb) -> None:
    if status not in VERBS[verb]:
        raise BlockdError(f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'")
