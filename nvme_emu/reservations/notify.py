"""A controller's queue of Reservation Notification log pages (Base 2.0, "Reservation
Notification" log page 80h and the Reservation Notification Mask feature 82h).

The model (:mod:`.model`) names notices per host; the wiring sends each to every controller of
that host, through this queue, which masks, counts and hands them out one Get Log Page at a
time. Choices: the queue keeps at most 255 pages (what Number of Available Log Pages can say)
and drops the oldest beyond that; Log Page Count skips 0 when it wraps, as 0 marks the empty log.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nvme_emu.reservations.model import NotificationType
from nvme_emu.reservations.report import notification_log

#: Reservation Notification Mask (feature 82h) bit per notice type: REGPRE, RESREL, RESPRE.
MASK_BIT = {
    NotificationType.REGISTRATION_PREEMPTED: 1 << 1,
    NotificationType.RESERVATION_RELEASED: 1 << 2,
    NotificationType.RESERVATION_PREEMPTED: 1 << 3,
}
MAX_QUEUED = 255


@dataclass
class NotificationQueue:
    """One controller's pending notices, each (count, type, nsid)."""

    count: int = 0
    pending: deque[tuple[int, NotificationType, int]] = field(default_factory=lambda: deque(maxlen=MAX_QUEUED))

    def post(self, ntype: NotificationType, nsid: int, mask: int) -> bool:
        """Queue a notice for ``nsid`` unless that namespace's mask hides it; True if queued
        (the caller then raises the Reservation Log Page Available event)."""
        if mask & MASK_BIT[ntype]:
            return False
        self.count = self.count + 1 if self.count < 0xFFFF_FFFF_FFFF_FFFF else 1
        self.pending.append((self.count, ntype, nsid))
        return True

    def read(self) -> bytes:
        """The Get Log Page 80h data: the oldest notice, consumed, or the empty page."""
        if not self.pending:
            return notification_log(0, NotificationType.EMPTY, 0, 0)
        count, ntype, nsid = self.pending.popleft()
        return notification_log(count, ntype, len(self.pending), nsid)
