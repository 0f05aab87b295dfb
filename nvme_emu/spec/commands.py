"""What travels on the queues: queue entries (Base 2.0, "Submission Queue Entry", "Completion
Queue Entry") with their command dword 0 fields and data pointers (PRP, SGL), the admin and
NVM opcodes, the NVM commands' fields and our limits for them (NVM Command Set 1.0, "I/O
Commands"), and the status codes a completion carries (Base 2.0, "Status Field Definition"),
with :class:`NvmeError`, how a handler fails a command with one.

The SQE's layout itself is :mod:`nvme_emu.sqe`'s, the CQE's :data:`nvme_emu.queue.CQE`.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


# ---------------------------------------------------------------------------------------------
# Queue entries
# ---------------------------------------------------------------------------------------------

SQE_SIZE = 64  #: bytes in a Submission Queue Entry
CQE_SIZE = 16  #: bytes in a Completion Queue Entry
SQES_LOG2 = 6  #: log2(SQE_SIZE), the value for CC.IOSQES and the SQES fields
CQES_LOG2 = 4  #: log2(CQE_SIZE), the value for CC.IOCQES and the CQES fields
CQE_PHASE = 1  #: phase tag bit in the CQE status word

#: Command Dword 0: FUSE bits 9:8, PSDT bits 15:14, CID bits 31:16 (nvme_emu.sqe decodes them).
CDW0_FUSE_SHIFT, CDW0_FUSE_MASK = 8, 0x3
CDW0_PSDT_SHIFT, CDW0_PSDT_MASK = 14, 0x3
CDW0_CID_SHIFT = 16

NSID_ALL = 0xFFFF_FFFF  #: the broadcast namespace identifier


class Psdt(IntEnum):
    """PRP or SGL for Data Transfer, CDW0 bits 15:14."""

    PRP = 0b00
    SGL_MPTR_CONTIGUOUS = 0b01  # SGL for data; MPTR is a metadata buffer address
    SGL_MPTR_SGL = 0b10  # SGL for data; MPTR points at a metadata SGL segment


class Fuse(IntEnum):
    """Fused Operation, CDW0 bits 9:8."""

    NORMAL = 0b00
    FIRST = 0b01
    SECOND = 0b10


# ---------------------------------------------------------------------------------------------
# Data pointers: PRP and SGL
# ---------------------------------------------------------------------------------------------


class SglType(IntEnum):
    """SGL descriptor type, high nibble of descriptor byte 15."""

    DATA_BLOCK = 0x0
    BIT_BUCKET = 0x1
    SEGMENT = 0x2
    LAST_SEGMENT = 0x3
    KEYED_DATA_BLOCK = 0x4
    TRANSPORT_DATA_BLOCK = 0x5
    VENDOR_SPECIFIC = 0xF


class SglSubtype(IntEnum):
    """SGL descriptor sub type, low nibble of descriptor byte 15."""

    ADDRESS = 0x0
    OFFSET = 0x1
    TRANSPORT_SPECIFIC = 0xA


SGL_DESCRIPTOR_SIZE = 16
PRP_ENTRY_SIZE = 8


# ---------------------------------------------------------------------------------------------
# Opcodes
# ---------------------------------------------------------------------------------------------


class AdminOpcode(IntEnum):
    """Admin Command Set opcodes (Base 2.0, Figure "Opcodes for Admin Commands")."""

    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    NAMESPACE_MANAGEMENT = 0x0D
    FIRMWARE_COMMIT = 0x10
    FIRMWARE_IMAGE_DOWNLOAD = 0x11
    DEVICE_SELF_TEST = 0x14
    NAMESPACE_ATTACHMENT = 0x15
    KEEP_ALIVE = 0x18
    DIRECTIVE_SEND = 0x19
    DIRECTIVE_RECEIVE = 0x1A
    VIRTUALIZATION_MANAGEMENT = 0x1C
    NVME_MI_SEND = 0x1D
    NVME_MI_RECEIVE = 0x1E
    CAPACITY_MANAGEMENT = 0x20
    LOCKDOWN = 0x24
    DOORBELL_BUFFER_CONFIG = 0x7C
    FABRICS = 0x7F
    FORMAT_NVM = 0x80
    SECURITY_SEND = 0x81
    SECURITY_RECEIVE = 0x82
    SANITIZE = 0x84
    GET_LBA_STATUS = 0x86


class NvmOpcode(IntEnum):
    """NVM Command Set I/O opcodes (NVM CS 1.0, Figure "Opcodes for NVM Commands")."""

    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09
    VERIFY = 0x0C
    RESERVATION_REGISTER = 0x0D
    RESERVATION_REPORT = 0x0E
    RESERVATION_ACQUIRE = 0x11
    RESERVATION_RELEASE = 0x15
    COPY = 0x19


# ---------------------------------------------------------------------------------------------
# NVM command fields
# ---------------------------------------------------------------------------------------------


class RwCdw12:
    """Read/Write/Compare/Write Zeroes/Verify CDW12 fields."""

    NLB_MASK = 0xFFFF  # 0-based number of logical blocks
    DTYPE_SHIFT, DTYPE_MASK = 20, 0xF
    STC = 1 << 24  # storage tag check
    DEAC = 1 << 25  # Write Zeroes: deallocate
    PRINFO_SHIFT, PRINFO_MASK = 26, 0xF
    FUA = 1 << 30
    LR = 1 << 31


class DsmAttr(IntFlag):
    """Dataset Management CDW11 attributes."""

    IDR = 1 << 0  # integral dataset for read
    IDW = 1 << 1  # integral dataset for write
    AD = 1 << 2  # deallocate


#: NVM commands that change logical block contents: LBCC in the effects log, and refused
#: with Namespace is Write Protected on a write-protected namespace.
LBA_CHANGING_OPCODES = frozenset(
    {NvmOpcode.WRITE, NvmOpcode.WRITE_UNCORRECTABLE, NvmOpcode.WRITE_ZEROES, NvmOpcode.DATASET_MANAGEMENT, NvmOpcode.COPY}
)

DSM_RANGE_SIZE = 16  #: context attributes u32, length in LBAs u32 (1-based), SLBA u64
DSM_MAX_RANGES = 256
COPY_DESCRIPTOR_FORMAT0_SIZE = 32  #: SLBA at byte 8, NLB (0-based) u16 at byte 16
#: Source Range Entries Descriptor Format 1h (namespaces with 32b/64b Guard PI): as format 0h
#: but the expected tags move up: ELBST/EILBRT in bytes 35:26, ELBAT 37:36, ELBATM 39:38.
COPY_DESCRIPTOR_FORMAT1_SIZE = 40


class CopyCdw12:
    """Copy CDW12 fields (NVM Command Set, "Copy command"): the number of ranges, the
    descriptor format, and one PRINFO for reading the sources, one for writing the destination."""

    NR_MASK = 0xFF  # 0-based number of source ranges
    DESFMT_SHIFT, DESFMT_MASK = 8, 0xF
    PRINFOR_SHIFT = 12  # Protection Information Field Read, bits 15:12 (mask: RwCdw12.PRINFO_MASK)
    PRINFOW_SHIFT = 26  # Protection Information Field Write, bits 29:26 (where Read/Write have PRINFO)
#: Our Copy limits, enforced by the Copy command and advertised in Identify Namespace:
#: MSSRL (blocks in one source range; the field is 16 bits), MCL (blocks in one command)
#: and MSRC + 1 (source ranges in one command).
COPY_MAX_RANGE_LBAS = 0xFFFF
COPY_MAX_LBAS = 1 << 16
COPY_MAX_RANGES = 128


# ---------------------------------------------------------------------------------------------
# Status codes
# ---------------------------------------------------------------------------------------------


class StatusCodeType(IntEnum):
    """SCT, bits 10:8 of our 11-bit status values (Base 2.0, "Status Code Type Values")."""

    GENERIC = 0x0
    COMMAND_SPECIFIC = 0x1
    MEDIA_DATA_INTEGRITY = 0x2
    PATH_RELATED = 0x3
    VENDOR_SPECIFIC = 0x7


class Status(IntEnum):
    """Every status we may report, as one 11-bit value ``(SCT << 8) | SC``.

    One enum instead of one per SCT so a status travels as a single number; :attr:`sct` and
    :attr:`sc` split it again for the completion queue entry.
    """

    # Generic Command Status (SCT 0), Base 2.0 Figure "Generic Command Status Values".
    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    COMMAND_ID_CONFLICT = 0x003
    DATA_TRANSFER_ERROR = 0x004
    ABORTED_POWER_LOSS = 0x005
    INTERNAL_ERROR = 0x006
    ABORT_REQUESTED = 0x007
    ABORTED_SQ_DELETION = 0x008
    ABORTED_FAILED_FUSED = 0x009
    ABORTED_MISSING_FUSED = 0x00A
    INVALID_NAMESPACE_OR_FORMAT = 0x00B
    COMMAND_SEQUENCE_ERROR = 0x00C
    INVALID_SGL_SEGMENT_DESCRIPTOR = 0x00D
    INVALID_NUMBER_OF_SGL_DESCRIPTORS = 0x00E
    DATA_SGL_LENGTH_INVALID = 0x00F
    METADATA_SGL_LENGTH_INVALID = 0x010
    SGL_DESCRIPTOR_TYPE_INVALID = 0x011
    INVALID_USE_OF_CMB = 0x012
    PRP_OFFSET_INVALID = 0x013
    ATOMIC_WRITE_UNIT_EXCEEDED = 0x014
    OPERATION_DENIED = 0x015
    SGL_OFFSET_INVALID = 0x016
    HOST_ID_INCONSISTENT_FORMAT = 0x018
    KEEP_ALIVE_TIMER_EXPIRED = 0x019
    KEEP_ALIVE_TIMEOUT_INVALID = 0x01A
    ABORTED_PREEMPT_AND_ABORT = 0x01B
    SANITIZE_FAILED = 0x01C
    SANITIZE_IN_PROGRESS = 0x01D
    SGL_DATA_BLOCK_GRANULARITY_INVALID = 0x01E
    COMMAND_NOT_SUPPORTED_FOR_CMB_QUEUE = 0x01F
    NAMESPACE_WRITE_PROTECTED = 0x020
    COMMAND_INTERRUPTED = 0x021
    TRANSIENT_TRANSPORT_ERROR = 0x022
    PROHIBITED_BY_LOCKDOWN = 0x023
    ADMIN_COMMAND_MEDIA_NOT_READY = 0x024
    # Generic, I/O command set range (80h-BFh).
    LBA_OUT_OF_RANGE = 0x080
    CAPACITY_EXCEEDED = 0x081
    NAMESPACE_NOT_READY = 0x082
    RESERVATION_CONFLICT = 0x083
    FORMAT_IN_PROGRESS = 0x084

    # Command Specific Status (SCT 1), Base 2.0 Figure "Command Specific Status Values".
    COMPLETION_QUEUE_INVALID = 0x100
    INVALID_QUEUE_IDENTIFIER = 0x101
    INVALID_QUEUE_SIZE = 0x102
    ABORT_COMMAND_LIMIT_EXCEEDED = 0x103
    ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED = 0x105
    INVALID_FIRMWARE_SLOT = 0x106
    INVALID_FIRMWARE_IMAGE = 0x107
    INVALID_INTERRUPT_VECTOR = 0x108
    INVALID_LOG_PAGE = 0x109
    INVALID_FORMAT = 0x10A
    FIRMWARE_ACTIVATION_REQUIRES_CONVENTIONAL_RESET = 0x10B
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_ID_NOT_SAVEABLE = 0x10D
    FEATURE_NOT_CHANGEABLE = 0x10E
    FEATURE_NOT_NAMESPACE_SPECIFIC = 0x10F
    FIRMWARE_ACTIVATION_REQUIRES_NSSR = 0x110
    FIRMWARE_ACTIVATION_REQUIRES_RESET = 0x111
    FIRMWARE_ACTIVATION_REQUIRES_MAX_TIME_VIOLATION = 0x112
    FIRMWARE_ACTIVATION_PROHIBITED = 0x113
    OVERLAPPING_RANGE = 0x114
    NAMESPACE_INSUFFICIENT_CAPACITY = 0x115
    NAMESPACE_ID_UNAVAILABLE = 0x116
    NAMESPACE_ALREADY_ATTACHED = 0x118
    NAMESPACE_IS_PRIVATE = 0x119
    NAMESPACE_NOT_ATTACHED = 0x11A
    THIN_PROVISIONING_NOT_SUPPORTED = 0x11B
    CONTROLLER_LIST_INVALID = 0x11C
    DEVICE_SELF_TEST_IN_PROGRESS = 0x11D
    BOOT_PARTITION_WRITE_PROHIBITED = 0x11E
    INVALID_CONTROLLER_IDENTIFIER = 0x11F
    INVALID_SECONDARY_CONTROLLER_STATE = 0x120
    INVALID_NUMBER_OF_CONTROLLER_RESOURCES = 0x121
    INVALID_RESOURCE_IDENTIFIER = 0x122
    SANITIZE_PROHIBITED_WHILE_PMR_ENABLED = 0x123
    ANA_GROUP_IDENTIFIER_INVALID = 0x124
    ANA_ATTACH_FAILED = 0x125
    INSUFFICIENT_CAPACITY = 0x126
    NAMESPACE_ATTACHMENT_LIMIT_EXCEEDED = 0x127
    PROHIBITION_OF_COMMAND_EXECUTION_NOT_SUPPORTED = 0x128
    IO_COMMAND_SET_NOT_SUPPORTED = 0x129
    IO_COMMAND_SET_NOT_ENABLED = 0x12A
    IO_COMMAND_SET_COMBINATION_REJECTED = 0x12B
    INVALID_IO_COMMAND_SET = 0x12C
    IDENTIFIER_UNAVAILABLE = 0x12D
    # Command specific, NVM Command Set (NVM CS 1.0).
    CONFLICTING_ATTRIBUTES = 0x180
    INVALID_PROTECTION_INFORMATION = 0x181
    ATTEMPTED_WRITE_TO_READ_ONLY_RANGE = 0x182
    COMMAND_SIZE_LIMIT_EXCEEDED = 0x183
    # Command specific, Zoned Namespace Command Set (ZNS 1.1, Figure "Status Code - Command
    # Specific Status Values"); :mod:`nvme_emu.spec.zns` has the rest of that specification.
    ZONE_BOUNDARY_ERROR = 0x1B8
    ZONE_IS_FULL = 0x1B9
    ZONE_IS_READ_ONLY = 0x1BA
    ZONE_IS_OFFLINE = 0x1BB
    ZONE_INVALID_WRITE = 0x1BC
    TOO_MANY_ACTIVE_ZONES = 0x1BD
    TOO_MANY_OPEN_ZONES = 0x1BE
    INVALID_ZONE_STATE_TRANSITION = 0x1BF

    # Media and Data Integrity Errors (SCT 2).
    WRITE_FAULT = 0x280
    UNRECOVERED_READ_ERROR = 0x281
    END_TO_END_GUARD_CHECK_ERROR = 0x282
    END_TO_END_APPLICATION_TAG_CHECK_ERROR = 0x283
    END_TO_END_REFERENCE_TAG_CHECK_ERROR = 0x284
    COMPARE_FAILURE = 0x285
    ACCESS_DENIED = 0x286
    DEALLOCATED_OR_UNWRITTEN_LOGICAL_BLOCK = 0x287
    END_TO_END_STORAGE_TAG_CHECK_ERROR = 0x288

    # Path Related Status (SCT 3).
    INTERNAL_PATH_ERROR = 0x300
    ASYMMETRIC_ACCESS_PERSISTENT_LOSS = 0x301
    ASYMMETRIC_ACCESS_INACCESSIBLE = 0x302
    ASYMMETRIC_ACCESS_TRANSITION = 0x303
    CONTROLLER_PATHING_ERROR = 0x360
    HOST_PATHING_ERROR = 0x370
    COMMAND_ABORTED_BY_HOST = 0x371

    # The spec calls 0x13 "PRP Offset Invalid"; some texts say "Invalid PRP Offset".
    INVALID_PRP_OFFSET = 0x013

    @property
    def sct(self) -> int:
        return (self >> 8) & 0x7

    @property
    def sc(self) -> int:
        return self & 0xFF


# Bit positions inside the 15-bit Status Field (CQE DW3 bits 31:17, i.e. status word bits 15:1).
STATUS_SC_SHIFT = 0
STATUS_SCT_SHIFT = 8
STATUS_CRD_SHIFT = 11
STATUS_MORE = 1 << 13
STATUS_DNR = 1 << 14


def status_field(status: int, *, dnr: bool = False, more: bool = False, crd: int = 0) -> int:
    """The 15-bit Status Field for a CQE; shift left by one and OR the phase tag to store it."""
    return (status & 0x7FF) | ((crd & 0x3) << STATUS_CRD_SHIFT) | (STATUS_MORE if more else 0) | (
        STATUS_DNR if dnr else 0
    )


class NvmeError(Exception):
    """A command fails with ``status``; raised anywhere below the command dispatcher.

    ``dnr`` defaults to True because almost every failure we detect (bad fields, bad pointers,
    out-of-range LBAs) would fail identically on retry.

    ``crd``: the Command Retry Delay a transient failure asks the host to wait before its
    retry (1-3: Identify Controller CRDT1-3; 0: none), reported only to a host that enabled
    Advanced Command Retry (:meth:`status_for`).
    """

    def __init__(self, status: int, message: str = "", *, dnr: bool = True, more: bool = False, crd: int = 0) -> None:
        self.status = Status(status)
        self.dnr = dnr
        self.more = more
        self.crd = crd
        super().__init__(message or self.status.name)

    @property
    def status_field(self) -> int:
        """The Status Field without a retry delay (the host did not ask for one)."""
        return status_field(self.status, dnr=self.dnr, more=self.more)

    def status_for(self, *, acre: bool) -> int:
        """The Status Field for a host with Advanced Command Retry enabled (``acre``, Host
        Behavior Support) or not: CRD is set only where the host enabled it; the spec has
        the controller clear it otherwise."""
        return status_field(self.status, dnr=self.dnr, more=self.more, crd=self.crd if acre else 0)

    def __repr__(self) -> str:
        return f"NvmeError({self.status.name}, dnr={self.dnr}, more={self.more}, {str(self)!r})"
