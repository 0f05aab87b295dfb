"""Identify (Base 2.0, "Identify command"; NVM Command Set 1.0, its I/O Command Set specific
data structures): the CNS values, command set identifiers, the data structures' sizes, and
the capability fields of Identify Controller and Identify Namespace.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


IDENTIFY_DATA_SIZE = 4096  #: every Identify data structure is 4 KiB
NSID_LIST_ENTRIES = 1024  #: entries in an Active/Allocated Namespace ID list (CNS 02h/07h)
CONTROLLER_LIST_ENTRIES = 2047  #: identifiers in a Controller List (after its 16-bit count)
LBA_FORMATS_MAX = 64  #: LBA format descriptors in Identify Namespace (NVM CS 1.0)
POWER_STATES_MAX = 32  #: power state descriptors in Identify Controller


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


class Cmic(IntFlag):
    """Controller Multi-Path I/O and Namespace Sharing Capabilities (Identify Controller
    byte 76). Linux builds one multipath head over several controllers only when the
    subsystem reports more than one controller, and reads the ANA log only with ANARS."""

    MULTI_PORT = 1 << 0  # MPORTS: the subsystem may have two or more ports
    MULTI_CONTROLLER = 1 << 1  # MCTRS: two or more controllers
    SRIOV = 1 << 2  # FT: this controller is an SR-IOV virtual function
    ANA_REPORTING = 1 << 3  # ANARS: Asymmetric Namespace Access Reporting


class Anacap(IntFlag):
    """Asymmetric Namespace Access Capabilities (Identify Controller byte 343): which ANA
    states may be reported, and how ANAGRPID behaves."""

    OPTIMIZED = 1 << 0
    NON_OPTIMIZED = 1 << 1
    INACCESSIBLE = 1 << 2
    PERSISTENT_LOSS = 1 << 3
    CHANGE = 1 << 4
    GRPID_STATIC = 1 << 6  # ANAGRPID does not change while the namespace is attached
    GRPID_IN_NS_MANAGEMENT = 1 << 7  # a non-zero ANAGRPID is supported in Namespace Management


class Nmic(IntFlag):
    """Namespace Multi-path I/O and Namespace Sharing Capabilities (Identify Namespace byte
    30, I/O Command Set Independent byte 1)."""

    SHARED = 1 << 0  # may be attached to two or more controllers at once


#: CNTLID FFF0h..FFFFh are reserved (FFFFh: the dynamic controller model over Fabrics), so a
#: subsystem's controllers are numbered below.
CNTLID_MAX = 0xFFEF


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


#: DLFEAT bits 2:0, the read behaviour of a deallocated logical block: 000b not reported,
#: 001b all bytes 0h, 010b all bytes FFh (data and metadata but the PI, see DLFEAT_GUARD_CRC).
DLFEAT_READ_BEHAVIOUR_MASK = 0b111
#: DLFEAT bits 2:0 = 001b: a deallocated logical block reads as all zeroes.
DLFEAT_READ_ZEROES = 0b001
#: DLFEAT bits 2:0 = 010b: a deallocated logical block reads as all bytes FFh.
DLFEAT_READ_ONES = 0b010
#: DLFEAT bit 4: a deallocated block's PI Guard is the CRC of what it reads as (data and the
#: metadata the guard covers); clear: the Guard has every bit set.
DLFEAT_GUARD_CRC = 1 << 4
#: DLFEAT bit 3: Write Zeroes honours its DEAC bit.
DLFEAT_WRITE_ZEROES_DEAC = 1 << 3
#: FLBAS: bits 3:0 are the low bits of the format index, bits 6:5 the high bits, bit 4 extended LBA.
FLBAS_EXTENDED_METADATA = 1 << 4


class Mc(IntFlag):
    """Metadata Capabilities (Identify Namespace byte 27): how metadata may be transferred."""

    EXTENDED = 1 << 0  # as part of an extended data LBA (FLBAS bit 4 set)
    SEPARATE = 1 << 1  # in a separate buffer (MPTR)


class Dpc(IntFlag):
    """End-to-end Data Protection Capabilities (Identify Namespace byte 28)."""

    TYPE1 = 1 << 0
    TYPE2 = 1 << 1
    TYPE3 = 1 << 2
    FIRST = 1 << 3  # PI in the first bytes of the metadata
    LAST = 1 << 4  # PI in the last bytes of the metadata
    ALL = TYPE1 | TYPE2 | TYPE3 | FIRST | LAST


#: ELBAF (NVM Command Set Identify Namespace, one dword per LBA format) bits 6:0: Storage Tag
#: Size (STS), bits 8:7: Protection Information Format (PIF, :class:`nvme_emu.pi.format.GuardKind`).
ELBAF_STS_MASK = 0x7F
ELBAF_PIF_SHIFT = 7
ELBAF_PIF_MASK = 0b11


def flbas_encode(index: int) -> int:
    """FLBAS for an LBA format index 0..63 (no extended metadata)."""
    return (index & 0xF) | ((index >> 4) & 0x3) << 5


def flbas_decode(flbas: int) -> int:
    """The LBA format index an FLBAS value selects."""
    return (flbas & 0xF) | ((flbas >> 5) & 0x3) << 4


#: NSATTR (Identify Namespace byte 99, I/O Command Set Independent byte 8) bit 0.
NSATTR_WRITE_PROTECTED = 1 << 0
#: OCFS (Identify Controller bytes 535:534) bit 0: Copy source range descriptor format 0h.
OCFS_FORMAT0 = 1 << 0
