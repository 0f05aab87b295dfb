"""Reservation Register/Acquire/Release: state transitions, statuses and notifications, each
case written from the command descriptions in Base 2.0 "Reservations"."""

from __future__ import annotations

import pytest

from nvme_emu.reservations.access import ReservationType as T
from nvme_emu.reservations.model import (
    IEKEY,
    NotificationType as N,
    ReservationState,
    acquire,
    register,
    release,
)
from nvme_emu.spec.commands import Status

A, B, C = b"A" * 8, b"B" * 8, b"C" * 8
ZERO = bytes(8)
REG, UNREG, REPLACE = 0, 1, 2
ACQ, PRE, PRE_ABORT = 0, 1, 2
SET_PTPL, CLEAR_PTPL = 3 << 30, 2 << 30


def _reg(state: ReservationState, host: bytes, cdw10: int, crkey: int = 0, nrkey: int = 0, ptpl: bool = True):
    return register(state, host, cdw10, crkey, nrkey, ptpl_capable=ptpl)


def _held(rtype: T, holder: bytes | None = A) -> ReservationState:
    return ReservationState({A: 1, B: 2, C: 3}, rtype, None if rtype.all_registrants else holder, generation=7)


# ---- Register ---------------------------------------------------------------------------------


def test_register_then_report_generation() -> None:
    out = _reg(ReservationState(), A, REG, nrkey=0xAA)
    assert out.status is Status.SUCCESS
    assert out.state.registrants == {A: 0xAA} and out.state.generation == 1


@pytest.mark.parametrize(
    ("cdw10", "crkey", "nrkey", "status", "keys"),
    [
        (REG, 0, 1, Status.SUCCESS, {A: 1}),  # same key again: a retry, no change
        (REG, 0, 9, Status.RESERVATION_CONFLICT, {A: 1}),  # already registered with another key
        (REPLACE, 1, 9, Status.SUCCESS, {A: 9}),
        (REPLACE, 5, 9, Status.RESERVATION_CONFLICT, {A: 1}),  # CRKEY mismatch
        (REPLACE | IEKEY, 5, 9, Status.SUCCESS, {A: 9}),  # IEKEY: CRKEY not checked
        (UNREG, 1, 0, Status.SUCCESS, {}),
        (UNREG, 2, 0, Status.RESERVATION_CONFLICT, {A: 1}),
        (UNREG | IEKEY, 2, 0, Status.SUCCESS, {}),
        (3, 1, 0, Status.INVALID_FIELD, {A: 1}),  # RREGA 3h reserved
        (REG | 1 << 30, 0, 1, Status.INVALID_FIELD, {A: 1}),  # CPTPL 01b reserved
    ],
)
def test_register_actions(cdw10: int, crkey: int, nrkey: int, status: Status, keys: dict[bytes, int]) -> None:
    state = ReservationState({A: 1}, generation=4)
    out = _reg(state, A, cdw10, crkey, nrkey)
    assert out.status is status
    assert out.state.registrants == keys
    assert out.state.generation == (5 if status is Status.SUCCESS else 4)


@pytest.mark.parametrize("cdw10", [UNREG, REPLACE])
def test_non_registrant_may_not_unregister_or_replace(cdw10: int) -> None:
    out = _reg(ReservationState({A: 1}), B, cdw10 | IEKEY, 0, 5)
    assert out.status is Status.RESERVATION_CONFLICT and out.state.registrants == {A: 1}


def test_zero_host_identifier_is_a_sequence_error() -> None:
    assert _reg(ReservationState(), ZERO, REG, nrkey=1).status is Status.COMMAND_SEQUENCE_ERROR


@pytest.mark.parametrize(("cdw10", "ptpl"), [(SET_PTPL, True), (CLEAR_PTPL, False)])
def test_register_changes_ptpl(cdw10: int, ptpl: bool) -> None:
    out = _reg(ReservationState(ptpl=not ptpl), A, REG | cdw10, nrkey=1)
    assert out.status is Status.SUCCESS and out.state.ptpl is ptpl


def test_ptpl_change_needs_capability() -> None:
    out = _reg(ReservationState(), A, REG | SET_PTPL, nrkey=1, ptpl=False)
    assert out.status is Status.INVALID_FIELD and out.state.registrants == {}


@pytest.mark.parametrize("rtype", list(T))
def test_holder_unregistering_releases(rtype: T) -> None:
    out = _reg(_held(rtype), A, UNREG, crkey=1)
    assert out.status is Status.SUCCESS
    if rtype.all_registrants:  # others still hold it
        assert out.state.rtype is rtype and out.notices == ()
    else:
        assert out.state.rtype is None and out.state.holder is None
        expected = ((B, N.RESERVATION_RELEASED), (C, N.RESERVATION_RELEASED)) if rtype.notifies_release else ()
        assert out.notices == expected


def test_last_all_registrants_holder_unregistering_releases() -> None:
    state = ReservationState({A: 1}, T.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    out = _reg(state, A, UNREG, crkey=1)
    assert out.state.rtype is None and out.state.registrants == {}


# ---- Acquire ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rtype", list(T))
def test_acquire_unreserved(rtype: T) -> None:
    out = acquire(ReservationState({A: 1, B: 2}), A, ACQ | rtype << 8, 1, 0)
    assert out.status is Status.SUCCESS and out.state.rtype is rtype
    assert out.state.holder == (None if rtype.all_registrants else A)
    assert out.state.generation == 0  # acquiring changes no registration


@pytest.mark.parametrize(
    ("host", "crkey", "rtype", "status"),
    [
        (A, 1, T.WRITE_EXCLUSIVE, Status.SUCCESS),  # holder, same type: no change
        (A, 1, T.EXCLUSIVE_ACCESS, Status.RESERVATION_CONFLICT),  # holder, other type
        (B, 2, T.WRITE_EXCLUSIVE, Status.RESERVATION_CONFLICT),  # another host holds it
        (B, 9, T.WRITE_EXCLUSIVE, Status.RESERVATION_CONFLICT),  # wrong key
        (b"D" * 8, 0, T.WRITE_EXCLUSIVE, Status.RESERVATION_CONFLICT),  # not registered
        (A, 1, 0, Status.INVALID_FIELD),  # RTYPE 0 reserved
        (A, 1, 7, Status.INVALID_FIELD),
    ],
)
def test_acquire_held(host: bytes, crkey: int, rtype: int, status: Status) -> None:
    state = _held(T.WRITE_EXCLUSIVE)
    out = acquire(state, host, ACQ | rtype << 8, crkey, 0)
    assert out.status is status and out.state == state


def test_acquire_reserved_action() -> None:
    assert acquire(_held(T.WRITE_EXCLUSIVE), A, 3 | 1 << 8, 1, 0).status is Status.INVALID_FIELD


def test_preempt_holder_replaces_reservation() -> None:
    out = acquire(_held(T.WRITE_EXCLUSIVE), B, PRE | T.EXCLUSIVE_ACCESS << 8, 2, 1)
    assert out.status is Status.SUCCESS
    assert out.state.rtype is T.EXCLUSIVE_ACCESS and out.state.holder == B
    assert out.state.registrants == {B: 2, C: 3} and out.state.generation == 8
    assert out.notices == ((A, N.REGISTRATION_PREEMPTED), (C, N.RESERVATION_PREEMPTED))
    assert out.abort_hosts == frozenset()


def test_preempt_and_abort_names_the_preempted_hosts() -> None:
    out = acquire(_held(T.WRITE_EXCLUSIVE), B, PRE_ABORT | T.WRITE_EXCLUSIVE << 8, 2, 1)
    assert out.abort_hosts == {A}


def test_preempt_non_holder_key_only_unregisters() -> None:
    out = acquire(_held(T.WRITE_EXCLUSIVE), B, PRE | T.WRITE_EXCLUSIVE << 8, 2, 3)
    assert out.state.rtype is T.WRITE_EXCLUSIVE and out.state.holder == A
    assert out.state.registrants == {A: 1, B: 2}
    assert out.notices == ((C, N.REGISTRATION_PREEMPTED),)


def test_preempt_unknown_key_conflicts() -> None:
    state = _held(T.WRITE_EXCLUSIVE)
    out = acquire(state, B, PRE | T.WRITE_EXCLUSIVE << 8, 2, 99)
    assert out.status is Status.RESERVATION_CONFLICT and out.state == state


def test_holder_preempts_itself_to_change_type() -> None:
    out = acquire(_held(T.WRITE_EXCLUSIVE), A, PRE | T.EXCLUSIVE_ACCESS << 8, 1, 1)
    assert out.status is Status.SUCCESS and out.state.rtype is T.EXCLUSIVE_ACCESS
    assert out.state.holder == A and A in out.state.registrants


def test_preempt_all_registrants_with_zero_key() -> None:
    out = acquire(_held(T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS), B, PRE_ABORT | T.WRITE_EXCLUSIVE << 8, 2, 0)
    assert out.state.registrants == {B: 2}
    assert out.state.rtype is T.WRITE_EXCLUSIVE and out.state.holder == B
    assert out.abort_hosts == {A, C}


def test_preempt_all_registrants_with_key_keeps_reservation() -> None:
    out = acquire(_held(T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS), B, PRE | T.WRITE_EXCLUSIVE << 8, 2, 3)
    assert out.state.rtype is T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    assert out.state.registrants == {A: 1, B: 2}


def test_preempt_unreserved_unregisters_matching() -> None:
    out = acquire(ReservationState({A: 1, B: 2}), A, PRE | T.WRITE_EXCLUSIVE << 8, 1, 2)
    assert out.state.registrants == {A: 1} and out.state.rtype is None


# ---- Release ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rtype", list(T))
def test_release_by_holder(rtype: T) -> None:
    out = release(_held(rtype), A, 0 | rtype << 8, 1)
    assert out.status is Status.SUCCESS and out.state.rtype is None
    assert out.state.registrants == {A: 1, B: 2, C: 3} and out.state.generation == 7
    expected = ((B, N.RESERVATION_RELEASED), (C, N.RESERVATION_RELEASED)) if rtype.notifies_release else ()
    assert out.notices == expected


def test_release_with_other_type_is_invalid_field() -> None:
    state = _held(T.WRITE_EXCLUSIVE)
    out = release(state, A, T.EXCLUSIVE_ACCESS << 8, 1)
    assert out.status is Status.INVALID_FIELD and out.state == state


def test_release_by_non_holder_has_no_effect() -> None:
    state = _held(T.WRITE_EXCLUSIVE)
    out = release(state, B, T.WRITE_EXCLUSIVE << 8, 2)
    assert out.status is Status.SUCCESS and out.state == state


@pytest.mark.parametrize(("host", "crkey"), [(B, 9), (b"D" * 8, 0)])
def test_release_needs_registration_and_key(host: bytes, crkey: int) -> None:
    assert release(_held(T.WRITE_EXCLUSIVE), host, T.WRITE_EXCLUSIVE << 8, crkey).status is Status.RESERVATION_CONFLICT


def test_clear() -> None:
    out = release(_held(T.WRITE_EXCLUSIVE), B, 1, 2)
    assert out.status is Status.SUCCESS
    assert out.state.registrants == {} and out.state.rtype is None and out.state.generation == 8
    assert out.notices == ((A, N.RESERVATION_PREEMPTED), (C, N.RESERVATION_PREEMPTED))


# ---- Persistence ------------------------------------------------------------------------------


def test_round_trip_and_power_loss() -> None:
    state = ReservationState({A: 1, bytes(range(16)): 2}, T.WRITE_EXCLUSIVE, A, 0xFFFF_FFFF, True)
    assert ReservationState.from_dict(state.to_dict()) == state
    assert state.after_power_loss() == state
    lost = ReservationState({A: 1}, T.WRITE_EXCLUSIVE, A, 5, False).after_power_loss()
    assert lost.registrants == {} and lost.rtype is None and lost.generation == 5


def test_generation_wraps() -> None:
    out = _reg(ReservationState(generation=0xFFFF_FFFF), A, REG, nrkey=1)
    assert out.state.generation == 0
