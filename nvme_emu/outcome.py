"""What a command handler returns when its completion comes later.

Every handler (admin areas, the NVM command set, fault injection) returns the completion's
DW0 when the command is done, or :data:`DEFERRED` when something else will post the
completion (an Asynchronous Event Request waiting for an event, work on the I/O pool, a
Delete I/O SQ waiting for its commands). The marker lives here, apart from the controller
state, so that handlers, the dispatcher and the tests share it without importing each other.
"""

from __future__ import annotations

from enum import Enum
from typing import Final


class Deferred(Enum):
    """The type of :data:`DEFERRED` (an enum, so type checkers narrow ``is DEFERRED``)."""

    DEFERRED = "deferred"

    def __repr__(self) -> str:
        return "DEFERRED"


#: Marks a command that completes later (AER, work on the I/O pool, a Delete I/O SQ waiting).
DEFERRED: Final = Deferred.DEFERRED

__all__ = ["DEFERRED", "Deferred"]
