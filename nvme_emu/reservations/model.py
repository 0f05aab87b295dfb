"""Per-namespace reservation state and the Reservation Register/Acquire/Release commands
(Base 2.0, "Reservations" and the NVM Command Set's command descriptions).

Each command is a pure function: ``(state, issuing host, decoded fields) -> Outcome``. The
outcome carries the new state (the old one is left as it was, so a refused command cannot
half-apply), the notifications to queue per host, and for Preempt and Abort the controllers whose
commands to this namespace are to be aborted. Registrations belong to hosts (Host Identifier),
not controllers: two controllers with one Host Identifier are one registrant.

Choices where the specification leaves room, named so the wiring keeps them:

- A host whose Host Identifier is zero has no identity to register: Register, Acquire and
  Release are refused with Command Sequence Error (Linux sets a Host Identifier before it sends
  any reservation command, and a zero one would make every such controller the same host).
- Register with a key the host already holds succeeds without change (idempotent retry), a
  different key is a Reservation Conflict.
- Reservation Preempted goes to the registrants other than the issuer that stay registered when
  a Preempt replaces the reservation, and to every other registrant on Clear.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from nvme_emu.reservations.access import ReservationType, Role, conflicts
from nvme_emu.spec.commands import Status

HostId = bytes  # 8 or 16 bytes, as the Host Identifier feature set it
_GEN_MASK = 0xFFFF_FFFF


class RegisterAction(IntEnum):
    """Reservation Register RREGA (CDW10 bits 2:0)."""

    REGISTER = 0
    UNREGISTER = 1
    REPLACE = 2


class ChangePtpl(IntEnum):
    """Reservation Register CPTPL (CDW10 bits 31:30); 01b is reserved."""

    NO_CHANGE = 0
    CLEAR = 2
    SET = 3


class AcquireAction(IntEnum):
    """Reservation Acquire RACQA (CDW10 bits 2:0)."""

    ACQUIRE = 0
    PREEMPT = 1
    PREEMPT_AND_ABORT = 2


class ReleaseAction(IntEnum):
    """Reservation Release RRELA (CDW10 bits 2:0)."""

    RELEASE = 0
    CLEAR = 1


class NotificationType(IntEnum):
    """Reservation Notification log page, Reservation Notification Log Page Type."""

    EMPTY = 0
    REGISTRATION_PREEMPTED = 1
    RESERVATION_RELEASED = 2
    RESERVATION_PREEMPTED = 3


IEKEY = 1 << 3  #: Ignore Existing Key, CDW10 bit 3 of all three commands


@dataclass(frozen=True)
class ReservationState:
    """One namespace's reservation: what Reservation Report shows and PTPL keeps.

    ``holder`` is the host that acquired a type 1-4 reservation; under the all-registrants
    types every registrant holds it and ``holder`` is None.
    """

    registrants: dict[HostId, int] = field(default_factory=dict)  # host -> registration key
    rtype: ReservationType | None = None
    holder: HostId | None = None
    generation: int = 0
    ptpl: bool = False

    def role(self, host: HostId) -> Role:
        if host not in self.registrants:
            return Role.NON_REGISTRANT
        if self.rtype is not None and (self.rtype.all_registrants or self.holder == host):
            return Role.HOLDER
        return Role.REGISTRANT

    def io_conflict(self, host: HostId, opcode: int) -> bool:
        """Whether an I/O command from ``host`` completes with Reservation Conflict."""
        return conflicts(self.rtype, self.role(host), opcode)

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-able data: what a PTPL namespace writes to its state file."""
        return {
            "registrants": [[h.hex(), k] for h, k in self.registrants.items()],
            "rtype": None if self.rtype is None else int(self.rtype),
            "holder": None if self.holder is None else self.holder.hex(),
            "generation": self.generation,
            "ptpl": self.ptpl,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReservationState:
        return cls(
            registrants={bytes.fromhex(h): int(k) for h, k in data["registrants"]},
            rtype=None if data["rtype"] is None else ReservationType(data["rtype"]),
            holder=None if data["holder"] is None else bytes.fromhex(data["holder"]),
            generation=int(data["generation"]),
            ptpl=bool(data["ptpl"]),
        )

    def after_power_loss(self) -> ReservationState:
        """Registrations and the reservation survive a power loss only with PTPL set."""
        return self if self.ptpl else ReservationState(generation=self.generation)


@dataclass(frozen=True)
class Outcome:
    """What a reservation command did. ``state`` is the input state when ``status`` fails."""

    status: Status
    state: ReservationState
    notices: tuple[tuple[HostId, NotificationType], ...] = ()
    abort_hosts: frozenset[HostId] = frozenset()  # Preempt and Abort: hosts whose commands go


def _fail(state: ReservationState, status: Status) -> Outcome:
    return Outcome(status, state)


def _key_refused(state: ReservationState, host: HostId, crkey: int, iekey: bool) -> Status | None:
    if not any(host):
        return Status.COMMAND_SEQUENCE_ERROR
    if host not in state.registrants or (not iekey and state.registrants[host] != crkey):
        return Status.RESERVATION_CONFLICT
    return None


def register(
    state: ReservationState,
    host: HostId,
    cdw10: int,
    crkey: int,
    nrkey: int,
    *,
    ptpl_capable: bool,
) -> Outcome:
    """Reservation Register: register, unregister or replace ``host``'s key; maybe change PTPL."""
    try:
        action = RegisterAction(cdw10 & 0x7)
        cptpl = ChangePtpl(cdw10 >> 30 & 0x3)
    except ValueError:
        return _fail(state, Status.INVALID_FIELD)
    if cptpl is not ChangePtpl.NO_CHANGE and not ptpl_capable:
        return _fail(state, Status.INVALID_FIELD)
    iekey = bool(cdw10 & IEKEY)
    regs = dict(state.registrants)
    rtype, holder = state.rtype, state.holder
    notices: list[tuple[HostId, NotificationType]] = []
    if action is RegisterAction.REGISTER:
        if not any(host):
            return _fail(state, Status.COMMAND_SEQUENCE_ERROR)
        if host in regs and regs[host] != nrkey:
            return _fail(state, Status.RESERVATION_CONFLICT)
        regs[host] = nrkey
    else:
        refused = _key_refused(state, host, crkey, iekey)
        if refused is not None:
            return _fail(state, refused)
        if action is RegisterAction.REPLACE:
            regs[host] = nrkey
        else:
            del regs[host]
            if rtype is not None and (holder == host or (rtype.all_registrants and not regs)):
                if rtype.notifies_release:
                    notices = [(h, NotificationType.RESERVATION_RELEASED) for h in regs]
                rtype, holder = None, None
    ptpl = state.ptpl if cptpl is ChangePtpl.NO_CHANGE else cptpl is ChangePtpl.SET
    new = ReservationState(regs, rtype, holder, (state.generation + 1) & _GEN_MASK, ptpl)
    return Outcome(Status.SUCCESS, new, tuple(notices))


def _rtype(cdw10: int) -> ReservationType | None:
    try:
        return ReservationType(cdw10 >> 8 & 0xFF)
    except ValueError:
        return None


def acquire(state: ReservationState, host: HostId, cdw10: int, crkey: int, prkey: int) -> Outcome:
    """Reservation Acquire: acquire, preempt, or preempt and abort."""
    try:
        action = AcquireAction(cdw10 & 0x7)
    except ValueError:
        return _fail(state, Status.INVALID_FIELD)
    rtype = _rtype(cdw10)
    if rtype is None:
        return _fail(state, Status.INVALID_FIELD)
    refused = _key_refused(state, host, crkey, bool(cdw10 & IEKEY))
    if refused is not None:
        return _fail(state, refused)
    if action is AcquireAction.ACQUIRE:
        if state.rtype is None:
            holder = None if rtype.all_registrants else host
            return Outcome(Status.SUCCESS, dataclasses.replace(state, rtype=rtype, holder=holder))
        if state.role(host) is Role.HOLDER and state.rtype == rtype:
            return Outcome(Status.SUCCESS, state)
        return _fail(state, Status.RESERVATION_CONFLICT)
    return _preempt(state, host, rtype, prkey, action is AcquireAction.PREEMPT_AND_ABORT)


def _preempt(state: ReservationState, host: HostId, rtype: ReservationType, prkey: int, abort: bool) -> Outcome:
    """Preempt (Base 2.0 "Preempting a Reservation or Registration").

    The reservation is replaced when it is held and either it is an all-registrants one and
    PRKEY is zero, or PRKEY is the holder's key; otherwise only registrations with key PRKEY
    go, and there must be at least one.
    """
    old = state.rtype
    replace = old is not None and (
        (old.all_registrants and prkey == 0)
        or (not old.all_registrants and state.holder is not None and state.registrants[state.holder] == prkey)
    )
    if replace and old is not None and old.all_registrants:
        gone = {h for h in state.registrants if h != host}
    else:
        gone = {h for h, k in state.registrants.items() if k == prkey and h != host}
        if not gone and not replace:
            return _fail(state, Status.RESERVATION_CONFLICT)
    regs = {h: k for h, k in state.registrants.items() if h not in gone}
    notices = [(h, NotificationType.REGISTRATION_PREEMPTED) for h in sorted(gone)]
    new_rtype, holder = state.rtype, state.holder
    if replace:
        new_rtype, holder = rtype, (None if rtype.all_registrants else host)
        notices += [(h, NotificationType.RESERVATION_PREEMPTED) for h in regs if h != host]
    new = ReservationState(regs, new_rtype, holder, (state.generation + 1) & _GEN_MASK, state.ptpl)
    return Outcome(Status.SUCCESS, new, tuple(notices), frozenset(gone) if abort else frozenset())


def release(state: ReservationState, host: HostId, cdw10: int, crkey: int) -> Outcome:
    """Reservation Release: release the reservation, or clear it and every registration."""
    try:
        action = ReleaseAction(cdw10 & 0x7)
    except ValueError:
        return _fail(state, Status.INVALID_FIELD)
    refused = _key_refused(state, host, crkey, bool(cdw10 & IEKEY))
    if refused is not None:
        return _fail(state, refused)
    others = [h for h in state.registrants if h != host]
    if action is ReleaseAction.CLEAR:
        new = ReservationState({}, None, None, (state.generation + 1) & _GEN_MASK, state.ptpl)
        return Outcome(Status.SUCCESS, new, tuple((h, NotificationType.RESERVATION_PREEMPTED) for h in others))
    if state.rtype is None or state.role(host) is not Role.HOLDER:
        return Outcome(Status.SUCCESS, state)  # nothing of the host's to release: no effect
    if _rtype(cdw10) != state.rtype:
        return _fail(state, Status.INVALID_FIELD)
    notices: tuple[tuple[HostId, NotificationType], ...] = ()
    if state.rtype.notifies_release:
        notices = tuple((h, NotificationType.RESERVATION_RELEASED) for h in others)
    return Outcome(Status.SUCCESS, dataclasses.replace(state, rtype=None, holder=None), notices)
