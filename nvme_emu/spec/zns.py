"""The Zoned Namespace Command Set (NVM Express Zoned Namespace Command Set Specification 1.1,
"ZNS" below): its I/O opcodes, the Zone Management Send and Receive fields, zone types, states
and attributes, the zone descriptor's and reports' sizes, and the capability fields of its
Identify data structures (CNS 05h and 06h with CSI 02h).

What ZNS adds to structures defined elsewhere lives with them, so each has one source: its
status codes (Zone Boundary Error .. Invalid Zone State Transition, SCT 1h B8h-BFh) in
:class:`nvme_emu.spec.commands.Status`, the Changed Zone List log identifier (BFh) in
:class:`nvme_emu.spec.log_pages.LogPageId`, the Zone Descriptor Changed notice (EFh) and its
enable bit in :mod:`nvme_emu.spec.events`, the CSI (02h) in :class:`nvme_emu.spec.identify.Csi`
and OAES bit 27 in :class:`nvme_emu.spec.identify.Oaes`. The byte layouts are
:mod:`nvme_emu.zoned.structures`'.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class ZnsOpcode(IntEnum):
    """I/O opcodes the Zoned Namespace Command Set adds to the NVM ones (ZNS 1.1, Figure
    "Opcodes for Zoned Namespace Commands")."""

    ZONE_MANAGEMENT_SEND = 0x79
    ZONE_MANAGEMENT_RECEIVE = 0x7A
    ZONE_APPEND = 0x7D


# ---------------------------------------------------------------------------------------------
# Zone Management Send (79h): SLBA in CDW10-11, the action in CDW13
# ---------------------------------------------------------------------------------------------


class ZoneSendAction(IntEnum):
    """Zone Send Action (ZSA), CDW13 bits 7:0."""

    CLOSE = 0x01
    FINISH = 0x02
    OPEN = 0x03
    RESET = 0x04
    OFFLINE = 0x05
    SET_ZONE_DESCRIPTOR_EXTENSION = 0x10


ZSA_MASK = 0xFF  #: CDW13 bits 7:0
ZMS_SELECT_ALL = 1 << 8  #: CDW13 bit 8: the action applies to every zone in the states it lists
ZMS_ZSASO = 1 << 9  #: CDW13 bit 9: Zone Send Action Specific Option (ZRWA allocation on Open)


# ---------------------------------------------------------------------------------------------
# Zone Management Receive (7Ah): SLBA in CDW10-11, NUMD in CDW12, the action in CDW13
# ---------------------------------------------------------------------------------------------


class ZoneReceiveAction(IntEnum):
    """Zone Receive Action (ZRA), CDW13 bits 7:0."""

    REPORT_ZONES = 0x00
    EXTENDED_REPORT_ZONES = 0x01


class ZoneReportOption(IntEnum):
    """Reporting Options, the Zone Receive Action Specific Field (ZRASF, CDW13 bits 15:8) of
    (Extended) Report Zones: which zones the report lists."""

    ALL = 0x0
    EMPTY = 0x1
    IMPLICITLY_OPENED = 0x2
    EXPLICITLY_OPENED = 0x3
    CLOSED = 0x4
    FULL = 0x5
    READ_ONLY = 0x6
    OFFLINE = 0x7


ZRA_MASK = 0xFF  #: CDW13 bits 7:0
ZRASF_SHIFT, ZRASF_MASK = 8, 0xFF  #: CDW13 bits 15:8
#: CDW13 bit 16, Partial Report: the header counts the descriptors returned, not all matching.
ZMR_PARTIAL_REPORT = 1 << 16


# ---------------------------------------------------------------------------------------------
# Zones: type, state, attributes (the Zone Descriptor, ZNS 1.1 Figure "Zone Descriptor")
# ---------------------------------------------------------------------------------------------


class ZoneType(IntEnum):
    """Zone Type (ZT), descriptor byte 0 bits 3:0."""

    SEQUENTIAL_WRITE_REQUIRED = 0x2


class ZoneState(IntEnum):
    """Zone State (ZS), descriptor byte 1 bits 7:4 (ZNS 1.1, "Zone State Machine")."""

    EMPTY = 0x1  # ZSE
    IMPLICITLY_OPENED = 0x2  # ZSIO
    EXPLICITLY_OPENED = 0x3  # ZSEO
    CLOSED = 0x4  # ZSC
    READ_ONLY = 0xD  # ZSRO
    FULL = 0xE  # ZSF
    OFFLINE = 0xF  # ZSO


ZS_SHIFT = 4  #: the state is the high nibble of descriptor byte 1

#: Open zones hold an Open Resource and an Active Resource; Closed zones only an Active one.
OPEN_STATES = frozenset({ZoneState.IMPLICITLY_OPENED, ZoneState.EXPLICITLY_OPENED})
ACTIVE_STATES = OPEN_STATES | {ZoneState.CLOSED}
#: States whose write pointer is valid; in the others the descriptor's WP field is not.
WP_VALID_STATES = ACTIVE_STATES | {ZoneState.EMPTY}

#: The Reporting Option that lists each state.
REPORT_OPTION_STATE = {
    ZoneReportOption.EMPTY: ZoneState.EMPTY,
    ZoneReportOption.IMPLICITLY_OPENED: ZoneState.IMPLICITLY_OPENED,
    ZoneReportOption.EXPLICITLY_OPENED: ZoneState.EXPLICITLY_OPENED,
    ZoneReportOption.CLOSED: ZoneState.CLOSED,
    ZoneReportOption.FULL: ZoneState.FULL,
    ZoneReportOption.READ_ONLY: ZoneState.READ_ONLY,
    ZoneReportOption.OFFLINE: ZoneState.OFFLINE,
}

#: The states Select All picks for each action (ZNS 1.1, the Zone Send Action descriptions):
#: Close the opened zones, Finish the opened and closed ones, Open the closed ones, Reset the
#: opened, closed and full ones, Offline the read only ones.
SELECT_ALL_STATES = {
    ZoneSendAction.CLOSE: OPEN_STATES,
    ZoneSendAction.FINISH: ACTIVE_STATES,
    ZoneSendAction.OPEN: frozenset({ZoneState.CLOSED}),
    ZoneSendAction.RESET: ACTIVE_STATES | {ZoneState.FULL},
    ZoneSendAction.OFFLINE: frozenset({ZoneState.READ_ONLY}),
}


class ZoneAttribute(IntFlag):
    """Zone Attributes (ZA), descriptor byte 2."""

    ZFC = 1 << 0  # Zone Finished by Controller (a zone active excursion)
    FZR = 1 << 1  # Finish Zone Recommended
    RZR = 1 << 2  # Reset Zone Recommended
    ZRWAV = 1 << 3  # Zone Random Write Area Valid (ZNS 1.2)
    ZDEV = 1 << 7  # Zone Descriptor Extension Valid


ZONE_DESCRIPTOR_SIZE = 64
ZONE_REPORT_HEADER_SIZE = 64  #: Number of Zones u64, then reserved
#: The descriptor's WP field in the states without a valid write pointer (what QEMU reports).
WP_INVALID = 0xFFFF_FFFF_FFFF_FFFF


# ---------------------------------------------------------------------------------------------
# Changed Zone List (log BFh) and the Zone Descriptor Changed notice
# ---------------------------------------------------------------------------------------------

CHANGED_ZONE_LIST_SIZE = 4096
CHANGED_ZONE_LIST_HEADER_SIZE = 8  #: Number of Zone Identifiers u16, then reserved
CHANGED_ZONE_LIST_ENTRIES = 511  #: zone identifiers (ZSLBA, u64) after the header
#: Number of Zone Identifiers when more zones changed than the list holds.
CHANGED_ZONE_LIST_OVERFLOW = 0xFFFF


# ---------------------------------------------------------------------------------------------
# Identify: ZNS Identify Namespace (CNS 05h, CSI 02h) and Identify Controller (CNS 06h, CSI 02h)
# ---------------------------------------------------------------------------------------------


class Zoc(IntFlag):
    """Zone Operation Characteristics (Identify Namespace ZNS bytes 1:0)."""

    VZCAP = 1 << 0  # Variable Zone Capacity: a zone's capacity may change on Reset
    ZAE = 1 << 1  # Zone Active Excursions: the controller may finish zones (ZFC)


class Ozcs(IntFlag):
    """Optional Zoned Command Support (Identify Namespace ZNS bytes 3:2)."""

    RAZB = 1 << 0  # Read Across Zone Boundaries
    ZRWASUP = 1 << 1  # Zone Random Write Area supported (ZNS 1.2)


#: MAR and MOR are 0's based; this value means "no limit".
RESOURCES_NO_LIMIT = 0xFFFF_FFFF
LBAFE_SIZE = 16  #: LBA Format Extension: ZSZE u64 (zone size, LBAs), ZDES u8 (64-byte units)
LBAFE_OFFSET = 2816  #: where the 64 LBA Format Extensions start in Identify Namespace ZNS
