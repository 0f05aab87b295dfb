"""ANA group states per controller, and timed transitions through ANA Change.

An ANA group's state is a property of a (controller, group) pair: the same namespaces can be
Optimized through one controller and Inaccessible through another, which is what a host's
multipath chooses between. A timed transition puts the pair in ANA Change at once and in its
target ``change_ms`` later, as an array's failover does; the model owns no timer: the caller
passes the clock to every call, asks :meth:`AnaStates.next_due` when to come back, and calls
:meth:`AnaStates.advance` then. Time is in seconds of one monotonic clock (the event loop's).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec.identify import Anacap
from ..spec.log_pages import AnaState

#: The ANACAP bit that says a state may be reported.
STATE_CAPABILITY: dict[AnaState, Anacap] = {
    AnaState.OPTIMIZED: Anacap.OPTIMIZED,
    AnaState.NON_OPTIMIZED: Anacap.NON_OPTIMIZED,
    AnaState.INACCESSIBLE: Anacap.INACCESSIBLE,
    AnaState.PERSISTENT_LOSS: Anacap.PERSISTENT_LOSS,
    AnaState.CHANGE: Anacap.CHANGE,
}

#: Every state may be reported.
ALL_STATES = Anacap.OPTIMIZED | Anacap.NON_OPTIMIZED | Anacap.INACCESSIBLE | Anacap.PERSISTENT_LOSS | Anacap.CHANGE


@dataclass
class _GroupState:
    state: AnaState
    target: AnaState | None = None  # where a timed transition ends
    due: float | None = None  # when it ends


class AnaStates:
    """The ANA state of every (controller, group) pair; groups 1..``anagrpmax``.

    ``anatt`` is ANATT in seconds: Linux resets a controller whose group stays in ANA Change
    longer than that, so a longer timed transition is refused rather than accepted and
    turned into a reset."""

    def __init__(self, anagrpmax: int, anacap: Anacap, anatt: int, initial: AnaState = AnaState.OPTIMIZED) -> None:
        if anagrpmax < 1:
            raise ValueError("an ANA subsystem has at least one group")
        if not anacap & Anacap.OPTIMIZED:
            raise ValueError("ANACAP must report the Optimized state (its bit 0 is required)")
        self.anagrpmax = anagrpmax
        self.anacap = anacap
        self.anatt = anatt
        self.initial = initial
        self._check_state(initial)
        self._states: dict[tuple[int, int], _GroupState] = {}

    def add_controller(self, cntlid: int) -> None:
        """Every group starts in ``initial`` on a new controller."""
        for grpid in range(1, self.anagrpmax + 1):
            self._states[cntlid, grpid] = _GroupState(self.initial)

    def remove_controller(self, cntlid: int) -> None:
        for grpid in range(1, self.anagrpmax + 1):
            del self._states[cntlid, grpid]

    def state(self, cntlid: int, grpid: int) -> AnaState:
        return self._entry(cntlid, grpid).state

    def pending(self, cntlid: int, grpid: int) -> tuple[AnaState, float] | None:
        """The target and end time of a transition under way, if any."""
        e = self._entry(cntlid, grpid)
        return None if e.target is None or e.due is None else (e.target, e.due)

    def set(self, cntlid: int, grpid: int, target: AnaState, now: float, change_ms: int = 0) -> None:
        """Set the pair's state: at once, or through ANA Change for ``change_ms``. A new
        request replaces a transition under way (the operator's last word wins)."""
        e = self._entry(cntlid, grpid)
        self._check_state(target)
        if change_ms < 0:
            raise ValueError(f"transition time {change_ms} ms")
        if change_ms:
            if target == AnaState.CHANGE:
                raise ValueError("a timed transition ends in a state other than ANA Change")
            self._check_state(AnaState.CHANGE)
            if change_ms > self.anatt * 1000:
                raise ValueError(f"transition of {change_ms} ms exceeds ANATT ({self.anatt} s)")
            e.state, e.target, e.due = AnaState.CHANGE, target, now + change_ms / 1000
        else:
            e.state, e.target, e.due = target, None, None

    def advance(self, now: float) -> list[tuple[int, int]]:
        """End every transition due by ``now``; the (controller, group) pairs that changed."""
        ended = []
        for key, e in self._states.items():
            if e.target is not None and e.due is not None and e.due <= now:
                e.state, e.target, e.due = e.target, None, None
                ended.append(key)
        return ended

    def next_due(self) -> float | None:
        """When :meth:`advance` next has something to do (None: nothing pending)."""
        dues = [e.due for e in self._states.values() if e.due is not None]
        return min(dues, default=None)

    def _entry(self, cntlid: int, grpid: int) -> _GroupState:
        e = self._states.get((cntlid, grpid))
        if e is None:
            raise KeyError(f"controller {cntlid} group {grpid}")
        return e

    def _check_state(self, state: AnaState) -> None:
        if not self.anacap & STATE_CAPABILITY[AnaState(state)]:
            raise ValueError(f"ANACAP does not report {AnaState(state).name}")
