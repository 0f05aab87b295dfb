"""Reservation types and who may do what under each (Base 2.0, Figure "Command Behavior in the
Presence of a Reservation"), kept as data so the table is read, not re-derived, by the
conflict check and by its test.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from nvme_emu.spec.commands import NvmOpcode
from nvme_emu.spec.zns import ZnsOpcode


class ReservationType(IntEnum):
    """RTYPE values of Reservation Acquire/Release and the Reservation Report header."""

    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 2
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 3
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 4
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 5
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 6

    @property
    def all_registrants(self) -> bool:
        """Every registrant is a holder: the reservation lives while any registrant does."""
        return self in (ReservationType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, ReservationType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)

    @property
    def notifies_release(self) -> bool:
        """Registrants-only and all-registrants types tell the other registrants on release
        (Base 2.0 "Reservation Release"): under types 1 and 2 registrants gain nothing from it."""
        return self >= ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY


class Role(Enum):
    """The issuing host's relation to the namespace's reservation."""

    HOLDER = "holder"
    REGISTRANT = "registrant"  # registered, not a holder
    NON_REGISTRANT = "non-registrant"


class Group(Enum):
    """The table's command groups."""

    READ = "read"
    WRITE = "write"


#: Read Command Group and Write Command Group (NVM CS 1.0 and ZNS 1.1 "Reservations" sections).
#: Opcodes in neither (Reservation commands, vendor ones) are never in conflict through the table:
#: Acquire and Release check registration themselves.
COMMAND_GROUP: dict[int, Group] = {
    NvmOpcode.READ: Group.READ,
    NvmOpcode.COMPARE: Group.READ,
    NvmOpcode.VERIFY: Group.READ,
    ZnsOpcode.ZONE_MANAGEMENT_RECEIVE: Group.READ,
    NvmOpcode.WRITE: Group.WRITE,
    NvmOpcode.FLUSH: Group.WRITE,
    NvmOpcode.WRITE_UNCORRECTABLE: Group.WRITE,
    NvmOpcode.WRITE_ZEROES: Group.WRITE,
    NvmOpcode.DATASET_MANAGEMENT: Group.WRITE,
    NvmOpcode.COPY: Group.WRITE,
    ZnsOpcode.ZONE_MANAGEMENT_SEND: Group.WRITE,
    ZnsOpcode.ZONE_APPEND: Group.WRITE,
}

_T = ReservationType
#: (group, role) -> the types under which the command is allowed. The holder is always allowed
#: (the table's holder rows are all "A"), so only the two other roles are listed.
ALLOWED: dict[tuple[Group, Role], frozenset[ReservationType]] = {
    (Group.READ, Role.NON_REGISTRANT): frozenset(
        {_T.WRITE_EXCLUSIVE, _T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, _T.WRITE_EXCLUSIVE_ALL_REGISTRANTS}
    ),
    (Group.READ, Role.REGISTRANT): frozenset(set(_T) - {_T.EXCLUSIVE_ACCESS}),
    (Group.WRITE, Role.NON_REGISTRANT): frozenset(),
    (Group.WRITE, Role.REGISTRANT): frozenset(set(_T) - {_T.WRITE_EXCLUSIVE, _T.EXCLUSIVE_ACCESS}),
}


def conflicts(rtype: ReservationType | None, role: Role, opcode: int) -> bool:
    """Whether an I/O command is refused with Reservation Conflict.

    ``rtype`` None: the namespace is not reserved and nothing conflicts.
    """
    group = COMMAND_GROUP.get(opcode)
    if rtype is None or group is None or role is Role.HOLDER:
        return False
    return rtype not in ALLOWED[(group, role)]
