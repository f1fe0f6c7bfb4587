"""Running a group of actions all or none (QMP ``transaction``).

Every single-action command that QEMU implements as a one-action
transaction (``blockdev-snapshot``, ``blockdev-snapshot-sync``) runs through
here too, so it behaves exactly as the same action inside a ``transaction``.

As in QEMU: each action is prepared in order, each seeing what those before
it changed; the first failure aborts the prepared ones, newest first, and the
command fails with that error; once all are prepared, all commit (committing
cannot fail).  Between the two, blockd adds one step: each action records
its change in the images (``record``: a snapshot's header write), so that a
transaction refused by any check has written nothing at all; a failed write
there aborts every action like a failed prepare.

Every export stays held (new requests wait, those in flight are finished
first) from before the first prepare until after the last commit or abort,
so no client ever sees a graph that is half changed, and no client is
disconnected.  Before that, each action may warm up (a snapshot flushes its
node once while the guest still writes, so that the flush QEMU's steps make
with the exports held has little left to do: the guest waits for a few
milliseconds instead of a whole flush).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import trio

from blockd.commands.context import CommandContext
from blockd.errors import BlockdError

log = logging.getLogger(__name__)


class Action(Protocol):
    """One action of a transaction."""

    async def warm_up(self) -> None:
        """Before the exports are held: work that shortens what is done while
        they are (a flush, making a new image), which a client cannot tell
        from nothing; what fails is reported by :meth:`prepare`, where QEMU
        would meet it."""

    async def prepare(self) -> None:
        """Check, and change the graph; undone by :meth:`abort`."""

    async def record(self) -> None:
        """Write what the images must say, once every action is prepared;
        may fail (I/O), and is then undone by :meth:`abort` too."""

    async def commit(self) -> None:
        """Finish off once every action is prepared; must not fail."""

    async def abort(self) -> None:
        """Undo :meth:`warm_up` and :meth:`prepare`, as far as each got (also
        for an action whose turn never came)."""

    async def clean(self) -> None:
        """Drop what the action held, whatever the outcome."""


async def run_actions(ctx: CommandContext, actions: Sequence[Action]) -> None:
    try:
        for action in actions:
            await action.warm_up()
        async with ctx.exports.quiesced():
            try:
                for action in actions:
                    await action.prepare()
                for action in actions:
                    await action.record()
            except BaseException:
                # undone while the exports are still held: no client sees
                # a half-undone graph
                await _abort_all(actions)
                raise
            with trio.CancelScope(shield=True):
                for action in actions:
                    await action.commit()
    except BaseException:
        await _abort_all(actions)  # a second time changes nothing
        raise
    finally:
        with trio.CancelScope(shield=True):
            for action in actions:
                await action.clean()


async def _abort_all(actions: Sequence[Action]) -> None:
    with trio.CancelScope(shield=True):
        for action in reversed(actions):
            await _abort(action)


async def _abort(action: Action) -> None:
    """Abort one action; a failure is logged, so the others are still undone."""
    try:
        await action.abort()
    except BlockdError as err:
        log.error("transaction: undoing %r failed: %s", action, err)
