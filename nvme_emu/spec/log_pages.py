"""Get Log Page (Base 2.0, "Get Log Page command"): log page identifiers and sizes, the entries
of the Supported Log Pages and Supported and Effects logs, SMART / Health's units and
critical warnings, and the LBA Status Information log (NVM Command Set 1.0) with Get LBA
Status, whose descriptors it shares.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


# ---------------------------------------------------------------------------------------------
# Log pages
# ---------------------------------------------------------------------------------------------


class LogPageId(IntEnum):
    """Log Page Identifiers (Base 2.0, Figure "Log Page Identifiers")."""

    SUPPORTED_LOG_PAGES = 0x00
    ERROR_INFORMATION = 0x01
    SMART_HEALTH = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACE_LIST = 0x04
    COMMANDS_SUPPORTED_EFFECTS = 0x05
    DEVICE_SELF_TEST = 0x06
    TELEMETRY_HOST = 0x07
    TELEMETRY_CONTROLLER = 0x08
    ENDURANCE_GROUP = 0x09
    PREDICTABLE_LATENCY_PER_SET = 0x0A
    PREDICTABLE_LATENCY_AGGREGATE = 0x0B
    ASYMMETRIC_NAMESPACE_ACCESS = 0x0C
    PERSISTENT_EVENT = 0x0D
    LBA_STATUS_INFORMATION = 0x0E
    ENDURANCE_GROUP_EVENT_AGGREGATE = 0x0F
    MEDIA_UNIT_STATUS = 0x10
    SUPPORTED_CAPACITY_CONFIGURATION = 0x11
    FEATURE_IDS_EFFECTS = 0x12
    NVME_MI_COMMANDS_EFFECTS = 0x13
    COMMAND_FEATURE_LOCKDOWN = 0x14
    BOOT_PARTITION = 0x15
    ROTATIONAL_MEDIA = 0x16
    DISCOVERY = 0x70
    RESERVATION_NOTIFICATION = 0x80
    SANITIZE_STATUS = 0x81
    CHANGED_ZONE_LIST = 0xBF  # ZNS 1.1, I/O Command Set specific (CSI 02h)


ERROR_LOG_ENTRY_SIZE = 64
#: Error Information SQID/CID when the error belongs to no queue or no command (a doorbell).
ERROR_LOG_NOT_SPECIFIC = 0xFFFF
SMART_LOG_SIZE = 512
FIRMWARE_SLOT_LOG_SIZE = 512
CHANGED_NS_LIST_SIZE = 4096
CHANGED_NS_LIST_ENTRIES = 1024
COMMANDS_EFFECTS_LOG_SIZE = 4096
FEATURE_IDS_EFFECTS_LOG_SIZE = 1024  #: log 12h: one dword per Feature Identifier
NVME_MI_EFFECTS_LOG_SIZE = 4096  #: log 13h: 256 dwords for NVMe-MI commands, then reserved
SUPPORTED_LOG_PAGES_SIZE = 1024


# ---------------------------------------------------------------------------------------------
# Log entries
# ---------------------------------------------------------------------------------------------


class LogPageSupport(IntFlag):
    """Supported Log Pages entry bits (log 00h)."""

    LSUPP = 1 << 0
    IOS = 1 << 1  # index offset supported


class CommandEffects(IntFlag):
    """Commands Supported and Effects entry bits (log 05h)."""

    CSUPP = 1 << 0  # command supported
    LBCC = 1 << 1  # logical block content change
    NCC = 1 << 2  # namespace capability change
    NIC = 1 << 3  # namespace inventory change
    CCC = 1 << 4  # controller capability change
    USS = 1 << 19  # UUID selection supported


CSE_SHIFT = 16  #: Command Submission and Execution, bits 18:16 of an effects entry


class EffectsScope(IntFlag):
    """Scope, bits 31:20 of an entry in the Commands (05h), Feature Identifiers (12h) and
    NVMe-MI Commands (13h) Supported and Effects logs: what the command or feature acts on.
    Bits 4:0 of those entries mean the same in all three (CSUPP/FSUPP, LBCC/UDCC, NCC, NIC,
    CCC), so :class:`CommandEffects` serves them all."""

    NAMESPACE = 1 << 20
    CONTROLLER = 1 << 21
    NVM_SET = 1 << 22
    ENDURANCE_GROUP = 1 << 23
    DOMAIN = 1 << 24
    NVM_SUBSYSTEM = 1 << 25


# ---------------------------------------------------------------------------------------------
# SMART / Health Information
# ---------------------------------------------------------------------------------------------

SMART_DATA_UNIT = 512 * 1000  #: bytes per SMART "data unit" (thousands of 512-byte units)


class CriticalWarning(IntFlag):
    """SMART / Health log byte 0."""

    SPARE_BELOW_THRESHOLD = 1 << 0
    TEMPERATURE = 1 << 1
    RELIABILITY_DEGRADED = 1 << 2
    READ_ONLY = 1 << 3
    VOLATILE_BACKUP_FAILED = 1 << 4
    PMR_READ_ONLY = 1 << 5


# ---------------------------------------------------------------------------------------------
# LBA Status Information, Get LBA Status
# ---------------------------------------------------------------------------------------------


class LbaStatusAction(IntEnum):
    """Get LBA Status Action Type (ATYPE, CDW13 bits 31:24)."""

    TRACKED_ALLOCATED = 0x02  # needs allocated-LBA tracking (Track Send): not supported
    SCAN_UNTRACKED_AND_TRACKED = 0x10
    TRACKED = 0x11


class LbaStatusCompletion(IntEnum):
    """Completion Condition (CMPC) of the LBA Status Descriptor List."""

    NO_INDICATION = 0
    MNDW_REACHED = 1  # more descriptors than MNDW dwords hold
    RANGE_DONE = 2  # every LBA of the range (SLBA, RL) was looked at


LBA_STATUS_LIST_HEADER_SIZE = 8  #: NLSD u32, CMPC u8, reserved
LBA_STATUS_DESCRIPTOR_SIZE = 16  #: DSLBA u64, NLB u32, reserved, Status u8, reserved
LBA_STATUS_LOG_HEADER_SIZE = 16  #: LSLPLEN, NLSLNE, ESTULB u32, reserved, LSGC u16
LBA_STATUS_LOG_ELEMENT_SIZE = 16  #: NEID, NLRD u32, RATYPE u8, reserved; then its ranges
LBA_STATUS_LOG_RANGE_SIZE = 16  #: RSLBA u64, RNLB u32, reserved


# ---------------------------------------------------------------------------------------------
# Asymmetric Namespace Access (log 0Ch)
# ---------------------------------------------------------------------------------------------


class AnaState(IntEnum):
    """ANA State (Base 2.0, Asymmetric Namespace Access log's ANA Group Descriptor byte 16,
    bits 3:0): how a controller reaches the namespaces of one ANA group."""

    OPTIMIZED = 0x1
    NON_OPTIMIZED = 0x2
    INACCESSIBLE = 0x3
    PERSISTENT_LOSS = 0x4
    CHANGE = 0xF


ANA_LOG_HEADER_SIZE = 16  #: Change Count u64, Number of ANA Group Descriptors u16, reserved
ANA_GROUP_DESCRIPTOR_SIZE = 32  #: ANAGRPID, NNSID u32, Change Count u64, ANA State u8, reserved; then NSIDs
ANA_LSP_RGO = 1 << 0  #: Get Log Page LSP bit 0 for log 0Ch: Return Groups Only (no NSID lists)
