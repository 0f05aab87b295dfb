"""The Changed Zone List (ZNS 1.1, log page BFh): the zones whose descriptors the controller
changed on its own, which the host learns of by a Zone Descriptor Changed notice and reads
(and so clears) in this log.

Only controller-initiated changes belong here (a zone made Read Only or Offline, a zone
finished by the controller): the host knows what its own Zone Management Send did.
"""

from __future__ import annotations

from ..spec.zns import CHANGED_ZONE_LIST_ENTRIES, CHANGED_ZONE_LIST_OVERFLOW


class ChangedZoneList:
    """Zone identifiers (zone start LBAs) changed since the host last read the log, in the
    order they changed. Past :data:`CHANGED_ZONE_LIST_ENTRIES` the list overflows: the log
    then reports FFFFh zones and no identifiers, and the host has to report all zones."""

    __slots__ = ("_zids", "_overflow")

    def __init__(self) -> None:
        self._zids: dict[int, None] = {}  # insertion-ordered set
        self._overflow = False

    def __len__(self) -> int:
        return len(self._zids)

    def __bool__(self) -> bool:
        return self._overflow or bool(self._zids)

    @property
    def overflowed(self) -> bool:
        return self._overflow

    def add(self, zslba: int) -> bool:
        """Record a change of the zone starting at ``zslba``; True if the log changed (a zone
        not listed yet, or the change that overflows it)."""
        if self._overflow or zslba in self._zids:
            return False
        if len(self._zids) == CHANGED_ZONE_LIST_ENTRIES:
            self._zids.clear()
            self._overflow = True
            return True
        self._zids[zslba] = None
        return True

    def peek(self) -> tuple[int, list[int]]:
        """(Number of Zone Identifiers, the identifiers) as the log reports them now."""
        if self._overflow:
            return CHANGED_ZONE_LIST_OVERFLOW, []
        return len(self._zids), list(self._zids)

    def take(self) -> tuple[int, list[int]]:
        """:meth:`peek`, then clear: reading the log page clears it."""
        out = self.peek()
        self._zids.clear()
        self._overflow = False
        return out
