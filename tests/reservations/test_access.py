"""The type x role x command table (Base 2.0, Figure "Command Behavior in the Presence of a
Reservation"), typed here from the specification as letters per reservation type 1..6
(A: allowed, C: Reservation Conflict), checked for every opcode the emulator knows."""

from __future__ import annotations

import pytest

from nvme_emu.reservations.access import ReservationType, Role, conflicts
from nvme_emu.reservations.model import ReservationState
from nvme_emu.spec.commands import NvmOpcode
from nvme_emu.spec.zns import ZnsOpcode

#     types:          WE EA WERO EARO WEAR EAAR
SPEC = {
    ("read", Role.HOLDER): "AAAAAA",
    ("write", Role.HOLDER): "AAAAAA",
    ("read", Role.REGISTRANT): "ACAAAA",
    ("write", Role.REGISTRANT): "CCAAAA",
    ("read", Role.NON_REGISTRANT): "ACACAC",
    ("write", Role.NON_REGISTRANT): "CCCCCC",
}
READ_GROUP = {0x02, 0x05, 0x0C, 0x7A}  # Read, Compare, Verify, Zone Management Receive
WRITE_GROUP = {0x01, 0x00, 0x04, 0x08, 0x09, 0x19, 0x79, 0x7D}  # Write, Flush, Write Unc., WZ, DSM, Copy, ZMS, Append

OPCODES = sorted({int(o) for o in NvmOpcode} | {int(o) for o in ZnsOpcode})


def _expected(rtype: ReservationType, role: Role, opcode: int) -> bool:
    group = "read" if opcode in READ_GROUP else "write" if opcode in WRITE_GROUP else None
    return group is not None and SPEC[(group, role)][rtype - 1] == "C"


@pytest.mark.parametrize("opcode", OPCODES)
@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("rtype", list(ReservationType))
def test_table(rtype: ReservationType, role: Role, opcode: int) -> None:
    assert conflicts(rtype, role, opcode) is _expected(rtype, role, opcode)


@pytest.mark.parametrize("opcode", OPCODES)
def test_unreserved_namespace_never_conflicts(opcode: int) -> None:
    assert not ReservationState().io_conflict(b"\x01" * 8, opcode)


A, B, C = b"A" * 8, b"B" * 8, b"C" * 8


@pytest.mark.parametrize("rtype", list(ReservationType))
def test_state_roles_follow_the_table(rtype: ReservationType) -> None:
    """A holds (or, all-registrants, every registrant holds), B is registered, C is not."""
    holder = None if rtype.all_registrants else A
    state = ReservationState({A: 1, B: 2}, rtype, holder)
    assert state.role(A) is Role.HOLDER
    assert state.role(B) is (Role.HOLDER if rtype.all_registrants else Role.REGISTRANT)
    assert state.role(C) is Role.NON_REGISTRANT
    for host in (A, B, C):
        for opcode in (NvmOpcode.READ, NvmOpcode.WRITE):
            assert state.io_conflict(host, opcode) is _expected(rtype, state.role(host), opcode)


def test_forbidden_case_is_refused() -> None:
    """Exclusive Access: a registrant that does not hold the reservation may not even read."""
    state = ReservationState({A: 1, B: 2}, ReservationType.EXCLUSIVE_ACCESS, A)
    assert state.io_conflict(B, NvmOpcode.READ)
    assert state.io_conflict(C, NvmOpcode.WRITE)
    assert not state.io_conflict(A, NvmOpcode.WRITE)
