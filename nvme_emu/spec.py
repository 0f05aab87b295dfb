"""NVMe constants: the one place where numbers from the specifications live.

Sources: NVM Express Base Specification 2.0 (opcodes, status codes, registers, log pages,
features, Identify CNS values, asynchronous events) and NVM Command Set Specification 1.0
(I/O opcodes, NVM-specific status codes). Every other module imports its numbers from here,
so a wrong value has to be fixed once.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# ---------------------------------------------------------------------------------------------
# Versions and sizes
# ---------------------------------------------------------------------------------------------

#: VS register / Identify Controller VER: major in 31:16, minor in 15:8, tertiary in 7:0.
NVME_VERSION = 0x0002_0000


def version(major: int, minor: int, tertiary: int = 0) -> int:
    """Encode a version the way VS and VER do."""
    return (major << 16) | (minor << 8) | tertiary


SQE_SIZE = 64  #: bytes in a Submission Queue Entry
CQE_SIZE = 16  #: bytes in a Completion Queue Entry
SQES_LOG2 = 6  #: log2(SQE_SIZE), the value for CC.IOSQES and the SQES fields
CQES_LOG2 = 4  #: log2(CQE_SIZE), the value for CC.IOCQES and the CQES fields

IDENTIFY_DATA_SIZE = 4096  #: every Identify data structure is 4 KiB
NSID_ALL = 0xFFFF_FFFF  #: the broadcast namespace identifier
NSID_LIST_ENTRIES = 1024  #: entries in an Active/Allocated Namespace ID list (CNS 02h/07h)
CONTROLLER_LIST_ENTRIES = 2047  #: identifiers in a Controller List (after its 16-bit count)
LBA_FORMATS_MAX = 64  #: LBA format descriptors in Identify Namespace (NVM CS 1.0)
POWER_STATES_MAX = 32  #: power state descriptors in Identify Controller
SMART_DATA_UNIT = 512 * 1000  #: bytes per SMART "data unit" (thousands of 512-byte units)
MEMORY_PAGE_SHIFT_MIN = 12  #: CC.MPS = 0 means a 4 KiB memory page


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
    """

    def __init__(self, status: int, message: str = "", *, dnr: bool = True, more: bool = False) -> None:
        self.status = Status(status)
        self.dnr = dnr
        self.more = more
        super().__init__(message or self.status.name)

    @property
    def status_field(self) -> int:
        return status_field(self.status, dnr=self.dnr, more=self.more)

    def __repr__(self) -> str:
        return f"NvmeError({self.status.name}, dnr={self.dnr}, more={self.more}, {str(self)!r})"


# ---------------------------------------------------------------------------------------------
# Identify
# ---------------------------------------------------------------------------------------------


class Cns(IntEnum):
    """Identify CNS values (Base 2.0, Figure "CNS Values")."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NSID_LIST = 0x02
    NS_ID_DESCRIPTOR_LIST = 0x03
    NVM_SET_LIST = 0x04
    IOCS_NAMESPACE = 0x05
    IOCS_CONTROLLER = 0x06
    IOCS_ACTIVE_NSID_LIST = 0x07
    IOCS_INDEPENDENT_NAMESPACE = 0x08
    ALLOCATED_NSID_LIST = 0x10
    ALLOCATED_NAMESPACE = 0x11
    NS_ATTACHED_CONTROLLER_LIST = 0x12
    CONTROLLER_LIST = 0x13
    PRIMARY_CONTROLLER_CAPABILITIES = 0x14
    SECONDARY_CONTROLLER_LIST = 0x15
    NAMESPACE_GRANULARITY_LIST = 0x16
    UUID_LIST = 0x17
    DOMAIN_LIST = 0x18
    ENDURANCE_GROUP_LIST = 0x19
    IOCS_ALLOCATED_NSID_LIST = 0x1A
    IOCS_ALLOCATED_NAMESPACE = 0x1B
    IO_COMMAND_SET = 0x1C


class Csi(IntEnum):
    """Command Set Identifier (Base 2.0, Figure "Command Set Identifiers")."""

    NVM = 0x00
    KEY_VALUE = 0x01
    ZONED = 0x02


class NsIdType(IntEnum):
    """Namespace Identification Descriptor types (NIDT) and their fixed lengths below."""

    EUI64 = 0x1
    NGUID = 0x2
    UUID = 0x3
    CSI = 0x4


NS_ID_LENGTHS = {NsIdType.EUI64: 8, NsIdType.NGUID: 16, NsIdType.UUID: 16, NsIdType.CSI: 1}


class IoCommandSetVector(IntFlag):
    """Bits of an I/O Command Set Combination (Identify CNS 1Ch, Set Features 19h)."""

    NVM = 1 << 0
    KEY_VALUE = 1 << 1
    ZONED = 1 << 2


class ControllerType(IntEnum):
    """CNTRLTYPE in Identify Controller."""

    NOT_REPORTED = 0
    IO = 1
    DISCOVERY = 2
    ADMINISTRATIVE = 3


class Oacs(IntFlag):
    """Optional Admin Command Support (Identify Controller bytes 257:256)."""

    SECURITY = 1 << 0
    FORMAT_NVM = 1 << 1
    FIRMWARE = 1 << 2
    NAMESPACE_MANAGEMENT = 1 << 3
    DEVICE_SELF_TEST = 1 << 4
    DIRECTIVES = 1 << 5
    NVME_MI = 1 << 6
    VIRTUALIZATION_MANAGEMENT = 1 << 7
    DOORBELL_BUFFER_CONFIG = 1 << 8
    GET_LBA_STATUS = 1 << 9
    LOCKDOWN = 1 << 10


class Oncs(IntFlag):
    """Optional NVM Command Support (Identify Controller bytes 521:520)."""

    COMPARE = 1 << 0
    WRITE_UNCORRECTABLE = 1 << 1
    DATASET_MANAGEMENT = 1 << 2
    WRITE_ZEROES = 1 << 3
    SAVE_SELECT = 1 << 4
    RESERVATIONS = 1 << 5
    TIMESTAMP = 1 << 6
    VERIFY = 1 << 7
    COPY = 1 << 8


class Lpa(IntFlag):
    """Log Page Attributes (Identify Controller byte 261)."""

    SMART_PER_NAMESPACE = 1 << 0
    COMMANDS_EFFECTS = 1 << 1
    EXTENDED_DATA = 1 << 2  # NUMDU, LPOL/LPOU in Get Log Page
    TELEMETRY = 1 << 3
    PERSISTENT_EVENT = 1 << 4
    MISC_LOG_PAGES = 1 << 5  # Supported Log Pages, FID effects, NVMe-MI effects, ...
    TELEMETRY_DA4 = 1 << 6


class Oaes(IntFlag):
    """Optional Asynchronous Events Supported (Identify Controller bytes 95:92)."""

    NAMESPACE_ATTRIBUTE = 1 << 8
    FIRMWARE_ACTIVATION = 1 << 9
    ASYMMETRIC_NAMESPACE_ACCESS = 1 << 11
    PREDICTABLE_LATENCY = 1 << 12
    LBA_STATUS = 1 << 13
    ENDURANCE_GROUP_EVENT = 1 << 14
    NORMAL_SUBSYSTEM_SHUTDOWN = 1 << 15
    ZONE_DESCRIPTOR_CHANGED = 1 << 27
    DISCOVERY_LOG_CHANGE = 1 << 31


class Ctratt(IntFlag):
    """Controller Attributes (Identify Controller bytes 99:96)."""

    HOST_ID_128BIT = 1 << 0
    NON_OPERATIONAL_POWER_STATE_PERMISSIVE = 1 << 1
    NVM_SETS = 1 << 2
    READ_RECOVERY_LEVELS = 1 << 3
    ENDURANCE_GROUPS = 1 << 4
    PREDICTABLE_LATENCY_MODE = 1 << 5
    TRAFFIC_BASED_KEEP_ALIVE = 1 << 6
    NAMESPACE_GRANULARITY = 1 << 7
    SQ_ASSOCIATIONS = 1 << 8
    UUID_LIST = 1 << 9
    MULTI_DOMAIN_SUBSYSTEM = 1 << 10
    FIXED_CAPACITY_MANAGEMENT = 1 << 11
    VARIABLE_CAPACITY_MANAGEMENT = 1 << 12
    DELETE_ENDURANCE_GROUP = 1 << 13
    DELETE_NVM_SET = 1 << 14
    EXTENDED_LBA_FORMATS = 1 << 15


class Sgls(IntFlag):
    """SGL Support (Identify Controller bytes 539:536)."""

    SUPPORTED_NO_ALIGNMENT = 0b01  # bits 1:0 = 01b
    SUPPORTED_DWORD_ALIGNMENT = 0b10  # bits 1:0 = 10b
    KEYED_DATA_BLOCK = 1 << 2
    BIT_BUCKET = 1 << 16
    BYTE_ALIGNED_METADATA = 1 << 17
    EXCESS_LENGTH = 1 << 18  # SGL may describe more than the command transfers
    MPTR_SGL = 1 << 19
    ADDRESS_OFFSET = 1 << 20
    TRANSPORT_DATA_BLOCK = 1 << 21


class Vwc(IntFlag):
    """Volatile Write Cache (Identify Controller byte 525)."""

    PRESENT = 1 << 0
    FLUSH_BROADCAST_NOT_SUPPORTED = 0b10 << 1  # bits 2:1 = 10b
    FLUSH_BROADCAST_SUPPORTED = 0b11 << 1  # bits 2:1 = 11b


class Nsfeat(IntFlag):
    """Namespace Features (Identify Namespace byte 24)."""

    THIN_PROVISIONING = 1 << 0
    NAMESPACE_ATOMICS = 1 << 1
    DEALLOCATED_ERROR = 1 << 2
    UID_REUSE = 1 << 3
    OPTIMAL_PERFORMANCE = 1 << 4


#: DLFEAT bits 2:0 = 001b: a deallocated logical block reads as all zeroes.
DLFEAT_READ_ZEROES = 0b001
#: DLFEAT bit 3: Write Zeroes honours its DEAC bit.
DLFEAT_WRITE_ZEROES_DEAC = 1 << 3
#: FLBAS: bits 3:0 are the low bits of the format index, bits 6:5 the high bits, bit 4 extended LBA.
FLBAS_EXTENDED_METADATA = 1 << 4


def flbas_encode(index: int) -> int:
    """FLBAS for an LBA format index 0..63 (no extended metadata)."""
    return (index & 0xF) | ((index >> 4) & 0x3) << 5


def flbas_decode(flbas: int) -> int:
    """The LBA format index an FLBAS value selects."""
    return (flbas & 0xF) | ((flbas >> 5) & 0x3) << 4


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


class LogPageSupport(IntFlag):
    """Supported Log Pages entry bits (log 00h)."""

    LSUPP = 1 << 0
    IOS = 1 << 1  # index offset supported


# ---------------------------------------------------------------------------------------------
# Log pages and features
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


class FeatureId(IntEnum):
    """Feature Identifiers (Base 2.0, Figure "Feature Identifiers")."""

    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    LBA_RANGE_TYPE = 0x03
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIGURATION = 0x09
    WRITE_ATOMICITY_NORMAL = 0x0A
    ASYNC_EVENT_CONFIGURATION = 0x0B
    AUTONOMOUS_POWER_STATE_TRANSITION = 0x0C
    HOST_MEMORY_BUFFER = 0x0D
    TIMESTAMP = 0x0E
    KEEP_ALIVE_TIMER = 0x0F
    HOST_CONTROLLED_THERMAL_MANAGEMENT = 0x10
    NON_OPERATIONAL_POWER_STATE_CONFIG = 0x11
    READ_RECOVERY_LEVEL_CONFIG = 0x12
    PREDICTABLE_LATENCY_MODE_CONFIG = 0x13
    PREDICTABLE_LATENCY_MODE_WINDOW = 0x14
    LBA_STATUS_INFORMATION_ATTRIBUTES = 0x15
    HOST_BEHAVIOR_SUPPORT = 0x16
    SANITIZE_CONFIG = 0x17
    ENDURANCE_GROUP_EVENT_CONFIGURATION = 0x18
    IO_COMMAND_SET_PROFILE = 0x19
    SPINUP_CONTROL = 0x1A
    ENHANCED_CONTROLLER_METADATA = 0x7D
    CONTROLLER_METADATA = 0x7E
    NAMESPACE_METADATA = 0x7F
    SOFTWARE_PROGRESS_MARKER = 0x80
    HOST_IDENTIFIER = 0x81
    RESERVATION_NOTIFICATION_MASK = 0x82
    RESERVATION_PERSISTENCE = 0x83
    NAMESPACE_WRITE_PROTECTION_CONFIG = 0x84


class FeatureSelect(IntEnum):
    """Get Features SEL field (CDW10 bits 10:8)."""

    CURRENT = 0
    DEFAULT = 1
    SAVED = 2
    SUPPORTED_CAPABILITIES = 3


#: Temperature Threshold feature (FID 04h), THSEL: the over- and under-temperature threshold.
TEMP_OVER, TEMP_UNDER = 0, 1
#: Its TMPSEL: 0 is the Composite Temperature, 1..8 Temperature Sensor 1..8, Fh every one of them.
TEMP_COMPOSITE, TEMP_ALL_SENSORS = 0, 0xF
#: Host Behavior Support feature (FID 16h): the size of its data structure.
HOST_BEHAVIOR_SIZE = 512


# ---------------------------------------------------------------------------------------------
# Asynchronous events
# ---------------------------------------------------------------------------------------------


class AsyncEventType(IntEnum):
    """Asynchronous Event Type, completion DW0 bits 2:0."""

    ERROR = 0
    SMART_HEALTH = 1
    NOTICE = 2
    IMMEDIATE = 3
    ONE_SHOT = 4
    IO_COMMAND_SET = 6
    VENDOR_SPECIFIC = 7


class AsyncEventError(IntEnum):
    """Asynchronous Event Information for type Error."""

    INVALID_DOORBELL_REGISTER = 0x00
    INVALID_DOORBELL_WRITE_VALUE = 0x01
    DIAGNOSTIC_FAILURE = 0x02
    PERSISTENT_INTERNAL_ERROR = 0x03
    TRANSIENT_INTERNAL_ERROR = 0x04
    FIRMWARE_IMAGE_LOAD_ERROR = 0x05


class AsyncEventSmart(IntEnum):
    """Asynchronous Event Information for type SMART / Health Status."""

    SUBSYSTEM_RELIABILITY = 0x00
    TEMPERATURE_THRESHOLD = 0x01
    SPARE_BELOW_THRESHOLD = 0x02


class AsyncEventNotice(IntEnum):
    """Asynchronous Event Information for type Notice."""

    NAMESPACE_ATTRIBUTE_CHANGED = 0x00
    FIRMWARE_ACTIVATION_STARTING = 0x01
    TELEMETRY_LOG_CHANGED = 0x02
    ASYMMETRIC_NAMESPACE_ACCESS_CHANGE = 0x03
    PREDICTABLE_LATENCY_EVENT_AGGREGATE_CHANGE = 0x04
    LBA_STATUS_INFORMATION_ALERT = 0x05
    ENDURANCE_GROUP_EVENT_AGGREGATE_CHANGE = 0x06
    NORMAL_SUBSYSTEM_SHUTDOWN = 0x07
    DISCOVERY_LOG_PAGE_CHANGE = 0xF0


class AsyncEventNvm(IntEnum):
    """Asynchronous Event Information for type I/O Command Set specific (NVM)."""

    RESERVATION_LOG_PAGE_AVAILABLE = 0x00
    SANITIZE_OPERATION_COMPLETED = 0x01
    SANITIZE_COMPLETED_WITH_UNEXPECTED_DEALLOCATION = 0x02


def async_event_dw0(event_type: int, info: int, log_page: int) -> int:
    """Completion DW0 of an Asynchronous Event Request: type 2:0, info 15:8, log page 23:16."""
    return (event_type & 0x7) | ((info & 0xFF) << 8) | ((log_page & 0xFF) << 16)


class AsyncEventConfig(IntFlag):
    """Asynchronous Event Configuration feature (FID 0Bh) bits."""

    SMART_CRITICAL_WARNINGS = 0xFF  # bits 7:0 mirror the SMART critical warning bits
    NAMESPACE_ATTRIBUTE = 1 << 8
    FIRMWARE_ACTIVATION = 1 << 9
    TELEMETRY_LOG = 1 << 10
    ASYMMETRIC_NAMESPACE_ACCESS = 1 << 11
    PREDICTABLE_LATENCY = 1 << 12
    LBA_STATUS = 1 << 13
    ENDURANCE_GROUP_EVENT = 1 << 14
    NORMAL_SUBSYSTEM_SHUTDOWN = 1 << 15


class CriticalWarning(IntFlag):
    """SMART / Health log byte 0."""

    SPARE_BELOW_THRESHOLD = 1 << 0
    TEMPERATURE = 1 << 1
    RELIABILITY_DEGRADED = 1 << 2
    READ_ONLY = 1 << 3
    VOLATILE_BACKUP_FAILED = 1 << 4
    PMR_READ_ONLY = 1 << 5


# ---------------------------------------------------------------------------------------------
# Controller registers (BAR0)
# ---------------------------------------------------------------------------------------------


class Reg(IntEnum):
    """Controller register offsets in BAR0 (Base 2.0, "Controller Registers")."""

    CAP = 0x00  # 8 bytes
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28  # 8 bytes
    ACQ = 0x30  # 8 bytes
    CMBLOC = 0x38
    CMBSZ = 0x3C
    BPINFO = 0x40
    BPRSEL = 0x44
    BPMBL = 0x48  # 8 bytes
    CMBMSC = 0x50  # 8 bytes
    CMBSTS = 0x58
    CMBEBS = 0x5C
    CMBSWTP = 0x60
    NSSD = 0x64
    CRTO = 0x68
    PMRCAP = 0xE00
    PMRCTL = 0xE04
    PMRSTS = 0xE08
    PMREBS = 0xE0C
    PMRSWTP = 0xE10
    PMRMSCL = 0xE14
    PMRMSCU = 0xE18
    DOORBELLS = 0x1000


REG_SIZES = {Reg.CAP: 8, Reg.ASQ: 8, Reg.ACQ: 8, Reg.BPMBL: 8, Reg.CMBMSC: 8}
NSSR_RESET_VALUE = 0x4E564D65  #: "NVMe": writing it to NSSR starts an NVM Subsystem Reset


def sq_tail_doorbell(qid: int, dstrd: int = 0) -> int:
    """BAR0 offset of SQ ``qid``'s Tail Doorbell for CAP.DSTRD ``dstrd``."""
    return Reg.DOORBELLS + (2 * qid) * (4 << dstrd)


def cq_head_doorbell(qid: int, dstrd: int = 0) -> int:
    """BAR0 offset of CQ ``qid``'s Head Doorbell for CAP.DSTRD ``dstrd``."""
    return Reg.DOORBELLS + (2 * qid + 1) * (4 << dstrd)


class Cap:
    """CAP field shifts and masks (64-bit register)."""

    MQES_SHIFT, MQES_MASK = 0, 0xFFFF  # maximum queue entries, 0-based
    CQR = 1 << 16  # contiguous queues required
    AMS_SHIFT, AMS_MASK = 17, 0x3  # bit 17: weighted round robin, bit 18: vendor specific
    TO_SHIFT, TO_MASK = 24, 0xFF  # timeout, 500 ms units
    DSTRD_SHIFT, DSTRD_MASK = 32, 0xF
    NSSRS = 1 << 36  # NVM subsystem reset supported
    CSS_SHIFT, CSS_MASK = 37, 0xFF
    BPS = 1 << 45
    CPS_SHIFT, CPS_MASK = 46, 0x3
    MPSMIN_SHIFT, MPSMIN_MASK = 48, 0xF
    MPSMAX_SHIFT, MPSMAX_MASK = 52, 0xF
    PMRS = 1 << 56
    CMBS = 1 << 57
    NSSS = 1 << 58
    CRWMS = 1 << 59
    CRIMS = 1 << 60


class CapCss(IntFlag):
    """CAP.CSS bits (Command Sets Supported)."""

    NVM = 1 << 0
    IO_COMMAND_SETS = 1 << 6  # one or more I/O command sets, selected by CC.CSS = 110b
    ADMIN_ONLY = 1 << 7


class Cc:
    """CC (Controller Configuration) fields."""

    EN = 1 << 0
    CSS_SHIFT, CSS_MASK = 4, 0x7
    MPS_SHIFT, MPS_MASK = 7, 0xF
    AMS_SHIFT, AMS_MASK = 11, 0x7
    SHN_SHIFT, SHN_MASK = 14, 0x3
    IOSQES_SHIFT, IOSQES_MASK = 16, 0xF
    IOCQES_SHIFT, IOCQES_MASK = 20, 0xF
    CRIME = 1 << 24


class CcCss(IntEnum):
    """CC.CSS values."""

    NVM = 0b000
    ALL_IO_COMMAND_SETS = 0b110
    ADMIN_ONLY = 0b111


class Shn(IntEnum):
    """CC.SHN shutdown notification."""

    NONE = 0b00
    NORMAL = 0b01
    ABRUPT = 0b10


class Csts:
    """CSTS (Controller Status) fields."""

    RDY = 1 << 0
    CFS = 1 << 1
    SHST_SHIFT, SHST_MASK = 2, 0x3
    NSSRO = 1 << 4
    PP = 1 << 5
    ST = 1 << 6


class Shst(IntEnum):
    """CSTS.SHST shutdown status."""

    NORMAL = 0b00
    OCCURRING = 0b01
    COMPLETE = 0b10


class Aqa:
    """AQA (Admin Queue Attributes) fields, both sizes 0-based."""

    ASQS_SHIFT, ASQS_MASK = 0, 0xFFF
    ACQS_SHIFT, ACQS_MASK = 16, 0xFFF


# ---------------------------------------------------------------------------------------------
# Queue entries (their layouts: nvme_emu.sqe.SQE, nvme_emu.queue.CQE)
# ---------------------------------------------------------------------------------------------

#: Command Dword 0: FUSE bits 9:8, PSDT bits 15:14, CID bits 31:16 (nvme_emu.sqe decodes them).
CDW0_FUSE_SHIFT, CDW0_FUSE_MASK = 8, 0x3
CDW0_PSDT_SHIFT, CDW0_PSDT_MASK = 14, 0x3
CDW0_CID_SHIFT = 16

CQE_PHASE = 1  #: phase tag bit in the CQE status word


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
#: NSATTR (Identify Namespace byte 99, I/O Command Set Independent byte 8) bit 0.
NSATTR_WRITE_PROTECTED = 1 << 0

DSM_RANGE_SIZE = 16  #: context attributes u32, length in LBAs u32 (1-based), SLBA u64
DSM_MAX_RANGES = 256
COPY_DESCRIPTOR_FORMAT0_SIZE = 32  #: SLBA at byte 8, NLB (0-based) u16 at byte 16
#: OCFS (Identify Controller bytes 535:534) bit 0: Copy source range descriptor format 0h.
OCFS_FORMAT0 = 1 << 0
#: Our Copy limits, enforced by the Copy command and advertised in Identify Namespace:
#: MSSRL (blocks in one source range; the field is 16 bits), MCL (blocks in one command)
#: and MSRC + 1 (source ranges in one command).
COPY_MAX_RANGE_LBAS = 0xFFFF
COPY_MAX_LBAS = 1 << 16
COPY_MAX_RANGES = 128
