"""What a command handler returns when its completion comes later.

Every handler (admin areas, the NVM command set, fault injection) returns the completion's
DW0 when the command is done, or :data:`DEFERRED` when something else will post the
completion (an Asynchronous Event Request waiting for an event, work on the I/O pool, a
Delete I/O SQ waiting for its commands). The marker lives here, apart from the controller
state, so that handlers, the dispatcher and the tests share it without importing each other.

:class:`Work` is the blocking part of an I/O command that the namespace (the one door to
storage, :mod:`nvme_emu.namespace`) hands back instead of doing it: the NVM command set
(:mod:`nvme_emu.nvm`) runs it on the I/O pool, or inline when its budget admits it. A Work
with ``start`` is a call that completes by callback (an asynchronous backend: rbd, nbd): the NVM
command set starts it on the loop thread and finishes it there, with no worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Final, Sequence

from .aio import Callback
from .inline_budget import InlineBudget


class Deferred(Enum):
    """The type of :data:`DEFERRED` (an enum, so type checkers narrow ``is DEFERRED``)."""

    DEFERRED = "deferred"

    def __repr__(self) -> str:
        return "DEFERRED"


#: Marks a command that completes later (AER, work on the I/O pool, a Delete I/O SQ waiting).
DEFERRED: Final = Deferred.DEFERRED



@dataclass(slots=True)
class Work:
    """The blocking part of a command: ``run()`` on a worker thread, then on the loop thread
    the views are released and ``done(result)`` runs (counters; it may raise NvmeError)."""

    run: Callable[[], Any]
    views: Sequence[memoryview] = ()
    done: Callable[[Any], None] | None = None
    #: set: ``run()`` may run on the loop thread when nothing else waits (:meth:`NvmCommands.
    #: _start <nvme_emu.nvm.NvmCommands._start>`), as long as this budget admits it; None:
    #: always a worker (FUA, Flush, ...)
    inline: InlineBudget | None = None
    #: The completion's command result once the work succeeded: DW0, or a 64-bit value whose
    #: upper half goes into DW1 (Zone Append's LBA, known before the data moves).
    result: int = 0
    #: Set: the call completes by callback (:meth:`IoPool.start <nvme_emu.aio.IoPool.start>`):
    #: ``start(complete)`` on the loop thread, ``complete(result, error)`` from any thread, and
    #: then, on the loop thread, ``done(result)`` *before* the views are released (a read's
    #: ``done`` copies the backend's buffer into them). ``run`` is then its blocking form
    #: (:func:`nvme_emu.aio.wait_for`), for callers with no loop (:func:`finish_here`).
    start: Callable[[Callback], None] | None = None


def finish_here(work: Work | None) -> None:
    """Run a namespace's :class:`Work` (if it handed one back) on this thread and finish it;
    its views stay the caller's. For callers with no I/O pool: tests, tools."""
    if work is not None:
        result = work.run()
        if work.done is not None:
            work.done(result)


__all__ = ["DEFERRED", "Deferred", "Work", "finish_here"]
