"""What a doorbell path may use of the controller: the doorbell port.

A doorbell path (:mod:`nvme_emu.doorbell`) turns the host's doorbell writes into values for
the controller. It needs little of it: somewhere to deliver a value, the controller's queues
and shadow doorbell buffer to look at, bus mastering, the latency recorder to stamp arrivals
in, the queue events, and a way to offer its doorbell page for lazy CQ heads. This module
names exactly that, as a :class:`typing.Protocol` the controller implements, so the paths
hold no :class:`~nvme_emu.controller.Controller` (and reach into none of its state) and run
against anything that offers the port: a test's fake as well as the controller.

It imports only the types the port speaks in, so :mod:`nvme_emu.doorbell` does not import
:mod:`nvme_emu.controller`, and the controller (which calls back into a path through
:class:`CqHeadSource`) does not import :mod:`nvme_emu.doorbell`.

The hot paths bind what they use of the port once, not per doorbell: a read through one of
the controller's properties costs tens of nanoseconds a wake-up. So the port promises when
what it shows may change: the queue mappings and the shadow doorbell buffer are replaced only
just before a queue event, and a path binds them again at each (the mappings' *contents*
change with every queue created or deleted; a path looks queues up in them when it needs one).
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

from .latency import LatencyRecorder
from .queue import CompletionQueue, DoorbellBuffer, QueueEvent, SubmissionQueue

#: What a queue event listener is called with: the event and the queue's QID (0 for RESET and DBBUF).
QueueListener = Callable[[QueueEvent, int], None]


class CqHeadSource(Protocol):
    """A doorbell path whose CQ head values sit in memory we can read at any time.

    CQ head doorbells need no wake-up of their own: the head matters only when a CQ looks
    full (or for INTx's level). Such a path lets the controller *peek* at the newest value
    then, and *arm* a wake-up for the rare CQ that is really full.
    """

    def peek_cq_head(self, qid: int) -> int | None: ...

    def arm_cq_head(self, qid: int) -> None: ...


class DoorbellPort(Protocol):
    """The controller as a doorbell path sees it; see the module docstring."""

    # -- deliver -------------------------------------------------------------------------

    def doorbell(self, qid: int, is_cq: bool, value: int) -> None:
        """A doorbell value arrived (under shadow doorbell buffers, a kick: the value is read
        from the buffer); the controller validates it and does the work."""
        ...

    def sq_tail_doorbell(self, sq: SubmissionQueue, value: int) -> None:
        """A new tail for an SQ the path looked up itself (a spin hit), on a path without
        shadow doorbell buffers: :meth:`doorbell` minus the lookups."""
        ...

    def set_fatal(self, reason: str) -> None:
        """The path failed internally (a bug): CSTS.CFS, so the host resets the controller."""
        ...

    # -- look --------------------------------------------------------------------------

    @property
    def max_io_queues(self) -> int:
        """I/O queues the controller supports: the doorbell page has a slot pair per queue
        and one for the admin queue."""
        ...

    @property
    def latency(self) -> LatencyRecorder:
        """The latency anatomy's recorder, where SQ doorbell arrivals are stamped; it lives as
        long as the controller, so a path binds it once."""
        ...

    @property
    def sqs(self) -> Mapping[int, SubmissionQueue]:
        """Submission queues by QID (read only: queues are created by admin commands). The
        mapping itself is replaced only before :attr:`QueueEvent.RESET`."""
        ...

    @property
    def cqs(self) -> Mapping[int, CompletionQueue]:
        """Completion queues by QID; replaced only before :attr:`QueueEvent.RESET`."""
        ...

    @property
    def dbbuf(self) -> DoorbellBuffer | None:
        """The shadow doorbell buffer, once the host configured one; it changes only before
        :attr:`QueueEvent.DBBUF` (a new buffer) and :attr:`QueueEvent.RESET` (none)."""
        ...

    @property
    def bus_master(self) -> bool:
        """PCI COMMAND.BME: while it is clear, host memory (the shadow buffer) is not read."""
        ...

    # -- subscribe ---------------------------------------------------------------------

    def add_queue_listener(self, listener: QueueListener) -> None:
        """Call ``listener`` on every queue event (queue created or deleted, dbbuf, reset)."""
        ...

    def register_cq_head_source(self, source: CqHeadSource) -> None:
        """Offer the path's CQ head values for the controller to peek at (one source at a time)."""
        ...

    def unregister_cq_head_source(self, source: CqHeadSource) -> None:
        """Withdraw ``source`` (if it still is the registered one)."""
        ...
