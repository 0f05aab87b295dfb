"""Interrupt coalescing (Feature 08h, with per-vector opt-out, Feature 09h): whether a CQ's
interrupt may go now, and a timer per CQ that delivers it within TIME when it may not.

The feature values are in :attr:`ControllerState.features`; the timers are the
controller's (they die with it, and with their CQ, since a new CQ may reuse the QID).
"""

from __future__ import annotations

from typing import Callable

from .queue import CompletionQueue
from .state import ControllerState
from .timer import FineTimer, FineTimers

#: TIME's unit: 100 microseconds.
TIME_UNIT_S = 100e-6


class Coalescing:
    """The pending coalescing timers of one controller."""

    def __init__(self, state: ControllerState, flush: Callable[[CompletionQueue], None]) -> None:
        self.state = state
        #: Delivers a CQ's pending interrupt when its time runs out.
        self.flush = flush
        self._timers: dict[int, FineTimer] = {}

    def allows(self, cq: CompletionQueue, timers: FineTimers | None) -> bool:
        """Whether an interrupt may go now; if not, a timer delivers it within TIME.

        THR is 0-based (THR + 1 completions), TIME is in 100 us units and 0 means no delay.
        """
        features = self.state.features
        if not features.coalescing & 0xFF00 and not self._timers:
            return True  # TIME 0: no delay, nothing pending (the common case, once per batch)
        thr = features.coalescing & 0xFF
        tim = (features.coalescing >> 8) & 0xFF
        if tim == 0 or timers is None or features.vector_config.get(cq.vector, False) or cq.unsignalled >= thr + 1:
            self.cancel(cq.qid)
            return True
        if cq.qid not in self._timers:
            self._timers[cq.qid] = timers.call_later(tim * TIME_UNIT_S, lambda: self._expired(cq))
        return False

    def _expired(self, cq: CompletionQueue) -> None:
        self._timers.pop(cq.qid, None)
        if self.state.cqs.get(cq.qid) is cq:
            self.flush(cq)

    def cancel(self, qid: int) -> None:
        """Forget the CQ's timer (its interrupt went, or the CQ was deleted)."""
        timer = self._timers.pop(qid, None)
        if timer is not None:
            timer.cancel()

    def cancel_all(self) -> None:
        """Controller Reset: no CQ is left to deliver to."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
