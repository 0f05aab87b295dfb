"""Per-controller ANA group states and timed transitions, with a fake clock (plain floats)."""

from __future__ import annotations

import pytest

from nvme_emu.ana.states import ALL_STATES, AnaStates
from nvme_emu.spec.identify import Anacap
from nvme_emu.spec.log_pages import AnaState

OPT, NOP, INA, PL, CHG = AnaState.OPTIMIZED, AnaState.NON_OPTIMIZED, AnaState.INACCESSIBLE, AnaState.PERSISTENT_LOSS, AnaState.CHANGE


def states(anacap: Anacap = ALL_STATES, anatt: int = 2) -> AnaStates:
    s = AnaStates(anagrpmax=3, anacap=anacap, anatt=anatt)
    s.add_controller(1)
    s.add_controller(2)
    return s


def test_groups_start_optimized_and_are_per_controller() -> None:
    s = states()
    s.set(1, 2, INA, now=0.0)
    assert [s.state(1, g) for g in (1, 2, 3)] == [OPT, INA, OPT]
    assert [s.state(2, g) for g in (1, 2, 3)] == [OPT, OPT, OPT]
    assert s.pending(1, 2) is None and s.next_due() is None


def test_timed_transition_goes_through_change_until_due() -> None:
    s = states()
    s.set(1, 1, NOP, now=100.0, change_ms=500)
    assert s.state(1, 1) == CHG
    assert s.pending(1, 1) == (NOP, 100.5)
    assert s.next_due() == 100.5
    assert s.advance(100.499) == []
    assert s.state(1, 1) == CHG
    assert s.advance(100.5) == [(1, 1)]
    assert s.state(1, 1) == NOP
    assert s.pending(1, 1) is None and s.next_due() is None
    assert s.advance(200.0) == []


def test_next_due_is_the_earliest_and_advance_ends_only_those_due() -> None:
    s = states()
    s.set(1, 1, INA, now=0.0, change_ms=1000)
    s.set(2, 3, NOP, now=0.0, change_ms=300)
    assert s.next_due() == 0.3
    assert s.advance(0.5) == [(2, 3)]
    assert (s.state(1, 1), s.state(2, 3)) == (CHG, NOP)
    assert s.next_due() == 1.0
    assert s.advance(1.0) == [(1, 1)]
    assert s.state(1, 1) == INA


def test_a_new_request_replaces_a_transition_under_way() -> None:
    s = states()
    s.set(1, 1, INA, now=0.0, change_ms=1000)
    s.set(1, 1, OPT, now=0.2)
    assert s.state(1, 1) == OPT and s.next_due() is None
    assert s.advance(5.0) == [] and s.state(1, 1) == OPT


def test_a_transition_of_exactly_anatt_is_accepted() -> None:
    s = states(anatt=2)
    s.set(1, 1, INA, now=0.0, change_ms=2000)
    assert s.pending(1, 1) == (INA, 2.0)


@pytest.mark.parametrize(
    ("anacap", "ask", "error"),
    [
        (ALL_STATES, dict(target=INA, change_ms=2001), ValueError),  # longer than ANATT (2 s)
        (ALL_STATES, dict(target=CHG, change_ms=100), ValueError),  # a timed transition ends elsewhere
        (ALL_STATES, dict(target=INA, change_ms=-1), ValueError),
        (ALL_STATES & ~Anacap.PERSISTENT_LOSS, dict(target=PL, change_ms=0), ValueError),  # not in ANACAP
        (ALL_STATES & ~Anacap.CHANGE, dict(target=INA, change_ms=100), ValueError),  # passes through Change
        (ALL_STATES & ~Anacap.CHANGE, dict(target=CHG, change_ms=0), ValueError),
    ],
)
def test_requests_the_capabilities_forbid_are_refused_and_change_nothing(anacap: Anacap, ask: dict, error: type) -> None:
    s = states(anacap=anacap)
    with pytest.raises(error):
        s.set(1, 1, ask["target"], now=0.0, change_ms=ask["change_ms"])
    assert s.state(1, 1) == OPT and s.next_due() is None


def test_without_change_capability_an_immediate_set_still_works() -> None:
    s = states(anacap=ALL_STATES & ~Anacap.CHANGE)
    s.set(1, 1, INA, now=0.0)
    assert s.state(1, 1) == INA


def test_unknown_pairs_and_a_missing_optimized_capability_are_refused() -> None:
    s = states()
    with pytest.raises(KeyError):
        s.set(3, 1, INA, now=0.0)
    with pytest.raises(KeyError):
        s.set(1, 4, INA, now=0.0)
    with pytest.raises(ValueError):
        AnaStates(anagrpmax=1, anacap=Anacap.NON_OPTIMIZED, anatt=1)
    with pytest.raises(ValueError):
        AnaStates(anagrpmax=0, anacap=ALL_STATES, anatt=1)
