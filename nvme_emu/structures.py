"""Control-plane data structures (Identify pages, log pages) as ``construct`` layouts.

Every layout spells out its reserved bytes as ``Padding`` so that it builds to exactly the size
the specification gives; tests assert both the size and a set of hand-computed field offsets.
The ``build_*`` helpers take the fields the controller cares about as keyword arguments, fill
the rest from zeros (or sensible defaults) and refuse unknown names, so a typo cannot silently
produce a zero field.
"""

from __future__ import annotations

import uuid as _uuid
from typing import Any, Iterable, Mapping

from construct import (
    Adapter,
    Array,
    Bytes,
    Container,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
)

from .spec.commands import CQES_LOG2, NSID_ALL, SQES_LOG2
from .spec.identify import (
    CONTROLLER_LIST_ENTRIES,
    IDENTIFY_DATA_SIZE,
    LBA_FORMATS_MAX,
    NSID_LIST_ENTRIES,
    NS_ID_LENGTHS,
    POWER_STATES_MAX,
    ControllerType,
    IoCommandSetVector,
    Lpa,
    NsIdType,
    Vwc,
)
from .spec.log_pages import (
    CHANGED_NS_LIST_ENTRIES,
    CHANGED_NS_LIST_SIZE,
    COMMANDS_EFFECTS_LOG_SIZE,
    ERROR_LOG_ENTRY_SIZE,
    FEATURE_IDS_EFFECTS_LOG_SIZE,
    FIRMWARE_SLOT_LOG_SIZE,
    NVME_MI_EFFECTS_LOG_SIZE,
    SMART_DATA_UNIT,
    SMART_LOG_SIZE,
    SUPPORTED_LOG_PAGES_SIZE,
    LogPageSupport,
)
from .spec.registers import NVME_VERSION

# ---------------------------------------------------------------------------------------------
# Field helpers
# ---------------------------------------------------------------------------------------------


class _UInt128(Adapter):
    """A 128-bit little-endian unsigned counter (SMART counters, TNVMCAP, NVMCAP, ...)."""

    def _decode(self, obj: bytes, context: Any, path: Any) -> int:
        return int.from_bytes(obj, "little")

    def _encode(self, obj: int, context: Any, path: Any) -> bytes:
        if obj < 0:
            raise ValueError(f"128-bit counter cannot be negative: {obj}")
        # A counter that somehow outgrows 128 bits saturates rather than wraps, as the spec
        # asks of SMART counters.
        return min(obj, (1 << 128) - 1).to_bytes(16, "little")


def UInt128ul() -> _UInt128:
    return _UInt128(Bytes(16))


class _AsciiField(Adapter):
    """An ASCII string field left-justified and padded with spaces (SN, MN, FR)."""

    def __init__(self, length: int) -> None:
        super().__init__(Bytes(length))
        self.length = length

    def _decode(self, obj: bytes, context: Any, path: Any) -> str:
        return obj.decode("ascii", "replace").rstrip(" \0")

    def _encode(self, obj: str | bytes, context: Any, path: Any) -> bytes:
        raw = obj.encode("ascii") if isinstance(obj, str) else bytes(obj)
        if len(raw) > self.length:
            raise ValueError(f"{raw!r} longer than {self.length} bytes")
        if any(c < 0x20 or c > 0x7E for c in raw):
            raise ValueError(f"{raw!r} has characters outside printable ASCII")
        return raw.ljust(self.length, b" ")


class _NulString(Adapter):
    """A UTF-8 string padded with NULs (SUBNQN)."""

    def __init__(self, length: int) -> None:
        super().__init__(Bytes(length))
        self.length = length

    def _decode(self, obj: bytes, context: Any, path: Any) -> str:
        return obj.split(b"\0", 1)[0].decode("utf-8", "replace")

    def _encode(self, obj: str, context: Any, path: Any) -> bytes:
        raw = obj.encode("utf-8")
        if len(raw) >= self.length:  # the NQN is NUL terminated within the field
            raise ValueError(f"NQN longer than {self.length - 1} bytes")
        return raw.ljust(self.length, b"\0")


def _defaults(layout: Struct) -> Container:
    """A Container of every named field of ``layout`` set to zero (parsing all-zero bytes)."""
    return layout.parse(bytes(layout.sizeof()))


def _merge(layout: Struct, base: Container, fields: Mapping[str, Any], what: str) -> Container:
    """Apply ``fields`` over ``base``, refusing names the layout does not have."""
    known = {sc.name for sc in layout.subcons if sc.name}
    unknown = set(fields) - known
    if unknown:
        raise TypeError(f"{what}: unknown field(s) {sorted(unknown)}")
    base.update(fields)
    return base


# ---------------------------------------------------------------------------------------------
# Identify Controller (CNS 01h), Base 2.0
# ---------------------------------------------------------------------------------------------

PowerStateDescriptor = Struct(
    "mp" / Int16ul,  # maximum power, centiwatts (or 0.0001 W when MXPS)
    Padding(1),
    "flags" / Int8ul,  # bit 0 MXPS (max power scale), bit 1 NOPS (non-operational)
    "enlat" / Int32ul,  # entry latency, us
    "exlat" / Int32ul,  # exit latency, us
    "rrt" / Int8ul,  # relative read throughput, bits 4:0
    "rrl" / Int8ul,  # relative read latency, bits 4:0
    "rwt" / Int8ul,  # relative write throughput, bits 4:0
    "rwl" / Int8ul,  # relative write latency, bits 4:0
    "idlp" / Int16ul,  # idle power
    "ips" / Int8ul,  # idle power scale, bits 7:6
    Padding(1),
    "actp" / Int16ul,  # active power
    "apw_aps" / Int8ul,  # active power workload bits 2:0, active power scale bits 7:6
    Padding(9),
)
POWER_STATE_DESCRIPTOR_SIZE = 32

IdentifyController = Struct(
    # Controller capabilities and features
    "vid" / Int16ul,  # 0
    "ssvid" / Int16ul,  # 2
    "sn" / _AsciiField(20),  # 4
    "mn" / _AsciiField(40),  # 24
    "fr" / _AsciiField(8),  # 64
    "rab" / Int8ul,  # 72
    "ieee" / Bytes(3),  # 73
    "cmic" / Int8ul,  # 76
    "mdts" / Int8ul,  # 77
    "cntlid" / Int16ul,  # 78
    "ver" / Int32ul,  # 80
    "rtd3r" / Int32ul,  # 84
    "rtd3e" / Int32ul,  # 88
    "oaes" / Int32ul,  # 92
    "ctratt" / Int32ul,  # 96
    "rrls" / Int16ul,  # 100
    Padding(9),  # 102
    "cntrltype" / Int8ul,  # 111
    "fguid" / Bytes(16),  # 112
    "crdt1" / Int16ul,  # 128
    "crdt2" / Int16ul,  # 130
    "crdt3" / Int16ul,  # 132
    Padding(119),  # 134..252
    "nvmsr" / Int8ul,  # 253 (NVMe-MI)
    "vwci" / Int8ul,  # 254 (NVMe-MI)
    "mec" / Int8ul,  # 255 (NVMe-MI)
    # Admin command set attributes and optional controller capabilities
    "oacs" / Int16ul,  # 256
    "acl" / Int8ul,  # 258, 0-based
    "aerl" / Int8ul,  # 259, 0-based
    "frmw" / Int8ul,  # 260
    "lpa" / Int8ul,  # 261
    "elpe" / Int8ul,  # 262, 0-based
    "npss" / Int8ul,  # 263, 0-based
    "avscc" / Int8ul,  # 264
    "apsta" / Int8ul,  # 265
    "wctemp" / Int16ul,  # 266, Kelvin
    "cctemp" / Int16ul,  # 268, Kelvin
    "mtfa" / Int16ul,  # 270
    "hmpre" / Int32ul,  # 272
    "hmmin" / Int32ul,  # 276
    "tnvmcap" / UInt128ul(),  # 280
    "unvmcap" / UInt128ul(),  # 296
    "rpmbs" / Int32ul,  # 312
    "edstt" / Int16ul,  # 316
    "dsto" / Int8ul,  # 318
    "fwug" / Int8ul,  # 319
    "kas" / Int16ul,  # 320
    "hctma" / Int16ul,  # 322
    "mntmt" / Int16ul,  # 324
    "mxtmt" / Int16ul,  # 326
    "sanicap" / Int32ul,  # 328
    "hmminds" / Int32ul,  # 332
    "hmmaxd" / Int16ul,  # 336
    "nsetidmax" / Int16ul,  # 338
    "endgidmax" / Int16ul,  # 340
    "anatt" / Int8ul,  # 342
    "anacap" / Int8ul,  # 343
    "anagrpmax" / Int32ul,  # 344
    "nanagrpid" / Int32ul,  # 348
    "pels" / Int32ul,  # 352
    "domainid" / Int16ul,  # 356
    Padding(10),  # 358
    "megcap" / UInt128ul(),  # 368
    Padding(128),  # 384
    # NVM command set attributes
    "sqes" / Int8ul,  # 512: required 3:0, maximum 7:4 (log2)
    "cqes" / Int8ul,  # 513
    "maxcmd" / Int16ul,  # 514
    "nn" / Int32ul,  # 516
    "oncs" / Int16ul,  # 520
    "fuses" / Int16ul,  # 522
    "fna" / Int8ul,  # 524
    "vwc" / Int8ul,  # 525
    "awun" / Int16ul,  # 526
    "awupf" / Int16ul,  # 528
    "icsvscc" / Int8ul,  # 530
    "nwpc" / Int8ul,  # 531
    "acwu" / Int16ul,  # 532
    "ocfs" / Int16ul,  # 534 optional copy formats supported
    "sgls" / Int32ul,  # 536
    "mnan" / Int32ul,  # 540
    "maxdna" / UInt128ul(),  # 544
    "maxcna" / Int32ul,  # 560
    Padding(204),  # 564
    "subnqn" / _NulString(256),  # 768
    Padding(768),  # 1024
    # NVMe over Fabrics
    "ioccsz" / Int32ul,  # 1792
    "iorcsz" / Int32ul,  # 1796
    "icdoff" / Int16ul,  # 1800
    "fcatt" / Int8ul,  # 1802
    "msdbd" / Int8ul,  # 1803
    "ofcs" / Int16ul,  # 1804
    Padding(242),  # 1806
    "psd" / Array(POWER_STATES_MAX, PowerStateDescriptor),  # 2048
    "vs" / Bytes(1024),  # 3072 vendor specific
)


def _default_power_state() -> dict[str, int]:
    """Power state 0: an operational state; 25 W is what real SSDs typically report."""
    return dict(mp=2500, flags=0, enlat=0, exlat=0, rrt=0, rrl=0, rwt=0, rwl=0, idlp=0, ips=0, actp=0, apw_aps=0)


def build_identify_controller(**fields: Any) -> bytes:
    """Identify Controller data; unspecified fields get values a Linux host accepts.

    ``psd`` may be a list of up to 32 dicts (missing descriptors are zero); ``npss`` should
    then be ``len(psd) - 1``.
    """
    c = _defaults(IdentifyController)
    c.update(dict(
        vid=0x1B36,  # the Red Hat/QEMU PCI vendor ID, matching the emulated PCI function
        ssvid=0x1AF4,
        sn="NVMEEMU0001",
        mn="nvme-emu",
        fr="0.1",
        rab=6,
        ieee=b"\x00\x54\x52",
        mdts=7,
        cntlid=0,
        ver=NVME_VERSION,
        cntrltype=ControllerType.IO,
        acl=3,
        aerl=3,
        frmw=0b011,  # slot 1 read-only, one slot
        lpa=Lpa.SMART_PER_NAMESPACE | Lpa.COMMANDS_EFFECTS | Lpa.EXTENDED_DATA,
        elpe=63,
        npss=0,
        wctemp=343,  # 70 C; 1.2+ controllers must report non-zero thresholds
        cctemp=373,  # 100 C
        sqes=(SQES_LOG2 << 4) | SQES_LOG2,
        cqes=(CQES_LOG2 << 4) | CQES_LOG2,
        nn=1,
        vwc=Vwc.PRESENT | Vwc.FLUSH_BROADCAST_SUPPORTED,
        subnqn="nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000",
    ))
    psd = fields.pop("psd", None)
    c = _merge(IdentifyController, c, fields, "Identify Controller")
    states = [_default_power_state()] if psd is None else [dict(_default_power_state(), **p) for p in psd]
    if len(states) > POWER_STATES_MAX:
        raise ValueError(f"at most {POWER_STATES_MAX} power states")
    zero = dict.fromkeys(_default_power_state(), 0)
    c.psd = states + [dict(zero) for _ in range(POWER_STATES_MAX - len(states))]
    return IdentifyController.build(c)


def subsystem_nqn(serial: str) -> str:
    """A stable UUID-form NQN for a subsystem with this serial number."""
    return "nqn.2014-08.org.nvmexpress:uuid:" + str(_uuid.uuid5(_uuid.NAMESPACE_OID, f"nvme-emu:{serial}"))


# ---------------------------------------------------------------------------------------------
# Identify Namespace for the NVM command set (CNS 00h), NVM CS 1.0
# ---------------------------------------------------------------------------------------------

LbaFormat = Struct(
    "ms" / Int16ul,  # metadata size, bytes
    "lbads" / Int8ul,  # log2 of the LBA data size
    "rp" / Int8ul,  # relative performance, bits 1:0
)

IdentifyNamespace = Struct(
    "nsze" / Int64ul,  # 0
    "ncap" / Int64ul,  # 8
    "nuse" / Int64ul,  # 16
    "nsfeat" / Int8ul,  # 24
    "nlbaf" / Int8ul,  # 25, 0-based
    "flbas" / Int8ul,  # 26
    "mc" / Int8ul,  # 27
    "dpc" / Int8ul,  # 28
    "dps" / Int8ul,  # 29
    "nmic" / Int8ul,  # 30
    "rescap" / Int8ul,  # 31
    "fpi" / Int8ul,  # 32
    "dlfeat" / Int8ul,  # 33
    "nawun" / Int16ul,  # 34
    "nawupf" / Int16ul,  # 36
    "nacwu" / Int16ul,  # 38
    "nabsn" / Int16ul,  # 40
    "nabo" / Int16ul,  # 42
    "nabspf" / Int16ul,  # 44
    "noiob" / Int16ul,  # 46
    "nvmcap" / UInt128ul(),  # 48, bytes
    "npwg" / Int16ul,  # 64, 0-based LBAs
    "npwa" / Int16ul,  # 66
    "npdg" / Int16ul,  # 68
    "npda" / Int16ul,  # 70
    "nows" / Int16ul,  # 72
    "mssrl" / Int16ul,  # 74 maximum single source range length (Copy)
    "mcl" / Int32ul,  # 76 maximum copy length
    "msrc" / Int8ul,  # 80 maximum source range count, 0-based
    Padding(1),  # 81
    "nulbaf" / Int8ul,  # 82
    Padding(9),  # 83
    "anagrpid" / Int32ul,  # 92
    Padding(3),  # 96
    "nsattr" / Int8ul,  # 99
    "nvmsetid" / Int16ul,  # 100
    "endgid" / Int16ul,  # 102
    "nguid" / Bytes(16),  # 104
    "eui64" / Bytes(8),  # 120
    "lbaf" / Array(LBA_FORMATS_MAX, LbaFormat),  # 128
    "vs" / Bytes(3712),  # 384 vendor specific
)


def _lbaf_list(lbafs: Iterable[Any]) -> list[dict[str, int]]:
    """Normalize LBA formats given as (ms, lbads, rp) tuples or dicts, padded to 64."""
    out = []
    for f in lbafs:
        if isinstance(f, Mapping):
            out.append(dict(ms=f.get("ms", 0), lbads=f["lbads"], rp=f.get("rp", 0)))
        else:
            ms, lbads, rp = f
            out.append(dict(ms=ms, lbads=lbads, rp=rp))
    if len(out) > LBA_FORMATS_MAX:
        raise ValueError(f"at most {LBA_FORMATS_MAX} LBA formats")
    return out + [dict(ms=0, lbads=0, rp=0) for _ in range(LBA_FORMATS_MAX - len(out))]


def build_identify_namespace(**fields: Any) -> bytes:
    """Identify Namespace (NVM); ``lbaf`` is a list of (ms, lbads, rp) or dicts.

    ``nlbaf`` defaults to ``len(lbaf) - 1``. An all-zero page (what an inactive NSID returns)
    is ``bytes(4096)``, not this function.
    """
    c = _defaults(IdentifyNamespace)
    lbaf = fields.pop("lbaf", [(0, 9, 0)])
    lbafs = list(lbaf)
    c.nlbaf = len(lbafs) - 1
    c = _merge(IdentifyNamespace, c, fields, "Identify Namespace")
    c.lbaf = _lbaf_list(lbafs)
    return IdentifyNamespace.build(c)


# ---------------------------------------------------------------------------------------------
# Namespace Identification Descriptor list (CNS 03h)
# ---------------------------------------------------------------------------------------------

NsIdDescriptorHeader = Struct(
    "nidt" / Int8ul,
    "nidl" / Int8ul,
    Padding(2),
)


def build_ns_id_descriptors(
    *, eui64: bytes | None = None, nguid: bytes | None = None, uuid: bytes | _uuid.UUID | None = None,
    csi: int | None = None,
) -> bytes:
    """The descriptor list for one namespace, zero-terminated and padded to 4096 bytes.

    Descriptors with an all-zero identifier are left out: the spec says a zero EUI64/NGUID
    means "not reported", and the host would otherwise see duplicate IDs across namespaces.
    """
    out = bytearray()
    items: list[tuple[NsIdType, bytes]] = []
    if eui64 is not None:
        items.append((NsIdType.EUI64, bytes(eui64)))
    if nguid is not None:
        items.append((NsIdType.NGUID, bytes(nguid)))
    if uuid is not None:
        items.append((NsIdType.UUID, uuid.bytes if isinstance(uuid, _uuid.UUID) else bytes(uuid)))
    if csi is not None:
        items.append((NsIdType.CSI, bytes([csi])))
    for nidt, nid in items:
        if len(nid) != NS_ID_LENGTHS[nidt]:
            raise ValueError(f"{nidt.name} must be {NS_ID_LENGTHS[nidt]} bytes, got {len(nid)}")
        if nidt != NsIdType.CSI and not any(nid):
            continue
        out += NsIdDescriptorHeader.build(dict(nidt=nidt, nidl=len(nid))) + nid
    return bytes(out.ljust(IDENTIFY_DATA_SIZE, b"\0"))


def parse_ns_id_descriptors(data: bytes) -> list[tuple[int, bytes]]:
    """(NIDT, NID) pairs up to the terminating zero-length descriptor."""
    out = []
    pos = 0
    while pos + 4 <= len(data):
        hdr = NsIdDescriptorHeader.parse(data[pos : pos + 4])
        if hdr.nidl == 0:
            break
        out.append((hdr.nidt, bytes(data[pos + 4 : pos + 4 + hdr.nidl])))
        pos += 4 + hdr.nidl
    return out


# ---------------------------------------------------------------------------------------------
# I/O Command Set Independent Identify Namespace (CNS 08h), Base 2.0
# ---------------------------------------------------------------------------------------------

IdentifyNamespaceIndependent = Struct(
    "nsfeat" / Int8ul,  # 0
    "nmic" / Int8ul,  # 1
    "rescap" / Int8ul,  # 2
    "fpi" / Int8ul,  # 3
    "anagrpid" / Int32ul,  # 4
    "nsattr" / Int8ul,  # 8
    Padding(1),  # 9
    "nvmsetid" / Int16ul,  # 10
    "endgid" / Int16ul,  # 12
    "nstat" / Int8ul,  # 14, bit 0: namespace ready
    Padding(4081),  # 15
)

NSTAT_READY = 1 << 0


def build_identify_namespace_independent(**fields: Any) -> bytes:
    """CNS 08h data; ``nstat`` defaults to ready."""
    c = _defaults(IdentifyNamespaceIndependent)
    c.nstat = NSTAT_READY
    return IdentifyNamespaceIndependent.build(_merge(IdentifyNamespaceIndependent, c, fields, "CNS 08h"))


# ---------------------------------------------------------------------------------------------
# NVM Command Set specific Identify Controller (CNS 06h, CSI 00h), NVM CS 1.0
# ---------------------------------------------------------------------------------------------

IdentifyControllerNvm = Struct(
    "vsl" / Int8ul,  # 0 verify size limit (log2 of min page size units, 0 = none)
    "wzsl" / Int8ul,  # 1 write zeroes size limit
    "wusl" / Int8ul,  # 2 write uncorrectable size limit
    "dmrl" / Int8ul,  # 3 dataset management ranges limit
    "dmrsl" / Int32ul,  # 4 dataset management range size limit, LBAs
    "dmsl" / Int64ul,  # 8 dataset management size limit, LBAs
    Padding(4080),  # 16
)


def build_identify_controller_nvm(**fields: Any) -> bytes:
    """CNS 06h / CSI 00h data (all limits 0 = "no limit reported" unless given)."""
    c = _defaults(IdentifyControllerNvm)
    return IdentifyControllerNvm.build(_merge(IdentifyControllerNvm, c, fields, "CNS 06h"))


# ---------------------------------------------------------------------------------------------
# NVM Command Set specific Identify Namespace (CNS 05h, CSI 00h), NVM CS 1.0
# ---------------------------------------------------------------------------------------------

IdentifyNamespaceNvm = Struct(
    "lbstm" / Int64ul,  # 0 logical block storage tag mask
    "pic" / Int8ul,  # 8 protection information capabilities
    Padding(3),  # 9
    "elbaf" / Array(LBA_FORMATS_MAX, Int32ul),  # 12 extended LBA formats
    Padding(3828),  # 268
)


def build_identify_namespace_nvm(**fields: Any) -> bytes:
    """CNS 05h / CSI 00h data; without protection information it is all zeros."""
    elbaf = list(fields.pop("elbaf", []))
    c = _merge(IdentifyNamespaceNvm, _defaults(IdentifyNamespaceNvm), fields, "CNS 05h")
    c.elbaf = elbaf + [0] * (LBA_FORMATS_MAX - len(elbaf))
    return IdentifyNamespaceNvm.build(c)


# ---------------------------------------------------------------------------------------------
# Identify I/O Command Set data structure (CNS 1Ch) and NSID lists (CNS 02h/07h)
# ---------------------------------------------------------------------------------------------

IO_COMMAND_SET_VECTORS = 512
IdentifyIoCommandSet = Struct("vectors" / Array(IO_COMMAND_SET_VECTORS, Int64ul))


def build_identify_io_command_set(vectors: Iterable[int] = (IoCommandSetVector.NVM,)) -> bytes:
    """CNS 1Ch: the I/O command set combinations the controller supports, by index."""
    v = [int(x) for x in vectors]
    if len(v) > IO_COMMAND_SET_VECTORS:
        raise ValueError(f"at most {IO_COMMAND_SET_VECTORS} command set combinations")
    return IdentifyIoCommandSet.build(dict(vectors=v + [0] * (IO_COMMAND_SET_VECTORS - len(v))))


NsidList = Struct("nsids" / Array(NSID_LIST_ENTRIES, Int32ul))


def build_nsid_list(nsids: Iterable[int], *, greater_than: int = 0) -> bytes:
    """An NSID list: the active NSIDs above ``greater_than``, ascending, at most 1024."""
    picked = sorted(n for n in set(nsids) if greater_than < n < NSID_ALL - 1)[: NSID_LIST_ENTRIES]
    return NsidList.build(dict(nsids=picked + [0] * (NSID_LIST_ENTRIES - len(picked))))


ControllerList = Struct("count" / Int16ul, "ids" / Array(CONTROLLER_LIST_ENTRIES, Int16ul))


def build_controller_list(cntlids: Iterable[int], *, at_least: int = 0) -> bytes:
    """A Controller List (CNS 12h/13h, Namespace Attachment): IDs from ``at_least`` up."""
    picked = sorted(c for c in set(cntlids) if c >= at_least)[: CONTROLLER_LIST_ENTRIES]
    return ControllerList.build(dict(count=len(picked), ids=picked + [0] * (CONTROLLER_LIST_ENTRIES - len(picked))))


def parse_controller_list(data: bytes) -> list[int]:
    """The controller IDs a host's Controller List names (the count bounds the entries)."""
    parsed = ControllerList.parse(data[: ControllerList.sizeof()].ljust(ControllerList.sizeof(), b"\0"))
    return list(parsed.ids[: min(parsed.count, CONTROLLER_LIST_ENTRIES)])


# ---------------------------------------------------------------------------------------------
# Log pages
# ---------------------------------------------------------------------------------------------

ErrorLogEntry = Struct(
    "error_count" / Int64ul,  # 0
    "sqid" / Int16ul,  # 8
    "cid" / Int16ul,  # 10
    "status" / Int16ul,  # 12: phase tag bit 0, Status Field bits 15:1
    "parameter_error_location" / Int16ul,  # 14: byte 7:0, bit 10:8
    "lba" / Int64ul,  # 16
    "nsid" / Int32ul,  # 24
    "vsia" / Int8ul,  # 28 vendor specific information available
    "trtype" / Int8ul,  # 29
    "csi" / Int8ul,  # 30
    "opcode" / Int8ul,  # 31
    "csi_info" / Int64ul,  # 32 command specific information
    "ttsi" / Int16ul,  # 40 transport type specific information
    Padding(21),  # 42
    "lpver" / Int8ul,  # 63 log page version
)


def build_error_log_entry(**fields: Any) -> bytes:
    """One 64-byte Error Information entry; ``status`` is the Status Field, pre-shifted."""
    c = _defaults(ErrorLogEntry)
    c.update(dict(sqid=0xFFFF, cid=0xFFFF, parameter_error_location=0xFFFF))
    return ErrorLogEntry.build(_merge(ErrorLogEntry, c, fields, "Error Information entry"))


SmartLog = Struct(
    "critical_warning" / Int8ul,  # 0
    "composite_temperature" / Int16ul,  # 1, Kelvin
    "available_spare" / Int8ul,  # 3, percent
    "available_spare_threshold" / Int8ul,  # 4
    "percentage_used" / Int8ul,  # 5
    "endurance_group_critical_warning" / Int8ul,  # 6
    Padding(25),  # 7
    "data_units_read" / UInt128ul(),  # 32
    "data_units_written" / UInt128ul(),  # 48
    "host_read_commands" / UInt128ul(),  # 64
    "host_write_commands" / UInt128ul(),  # 80
    "controller_busy_time" / UInt128ul(),  # 96, minutes
    "power_cycles" / UInt128ul(),  # 112
    "power_on_hours" / UInt128ul(),  # 128
    "unsafe_shutdowns" / UInt128ul(),  # 144
    "media_errors" / UInt128ul(),  # 160
    "num_error_log_entries" / UInt128ul(),  # 176
    "warning_temp_time" / Int32ul,  # 192, minutes
    "critical_temp_time" / Int32ul,  # 196, minutes
    "temperature_sensors" / Array(8, Int16ul),  # 200
    "tmt1_transition_count" / Int32ul,  # 216
    "tmt2_transition_count" / Int32ul,  # 220
    "tmt1_total_time" / Int32ul,  # 224
    "tmt2_total_time" / Int32ul,  # 228
    Padding(280),  # 232
)


def smart_data_units(nbytes: int) -> int:
    """Bytes -> SMART data units: thousands of 512-byte units, rounded up."""
    return -(-nbytes // SMART_DATA_UNIT)


def build_smart_log(**fields: Any) -> bytes:
    """SMART / Health Information; defaults describe a healthy drive at 35 C."""
    c = _defaults(SmartLog)
    c.update(dict(composite_temperature=308, available_spare=100, available_spare_threshold=10))
    sensors = list(fields.pop("temperature_sensors", []))
    c = _merge(SmartLog, c, fields, "SMART log")
    c.temperature_sensors = sensors + [0] * (8 - len(sensors))
    return SmartLog.build(c)


FirmwareSlotLog = Struct(
    "afi" / Int8ul,  # 0: active slot bits 2:0, next-reset slot bits 6:4
    Padding(7),  # 1
    "frs" / Array(7, _AsciiField(8)),  # 8: firmware revision per slot 1..7
    Padding(448),  # 64
)


def build_firmware_slot_log(*, afi: int = 1, frs: Iterable[str] = ("0.1",)) -> bytes:
    """Firmware Slot Information; empty slots are reported as zeros, not spaces."""
    slots = list(frs)
    if len(slots) > 7:
        raise ValueError("at most 7 firmware slots")
    data = bytearray(FirmwareSlotLog.build(dict(afi=afi, frs=slots + [""] * (7 - len(slots)))))
    for i in range(len(slots), 7):
        data[8 + 8 * i : 16 + 8 * i] = bytes(8)
    return bytes(data)


ChangedNamespaceList = Struct("nsids" / Array(CHANGED_NS_LIST_ENTRIES, Int32ul))


def build_changed_ns_list(nsids: Iterable[int]) -> bytes:
    """Changed Namespace List; more than 1024 changes is reported as FFFFFFFFh alone."""
    changed = sorted(set(nsids))
    if len(changed) > CHANGED_NS_LIST_ENTRIES:
        changed = [NSID_ALL]
    return ChangedNamespaceList.build(dict(nsids=changed + [0] * (CHANGED_NS_LIST_ENTRIES - len(changed))))


CommandsEffectsLog = Struct(
    "acs" / Array(256, Int32ul),  # 0: admin commands by opcode
    "iocs" / Array(256, Int32ul),  # 1024: I/O commands by opcode
    Padding(2048),  # 2048
)


def build_commands_effects_log(admin: Mapping[int, int], io: Mapping[int, int]) -> bytes:
    """Commands Supported and Effects from {opcode: effects bits} maps."""
    return CommandsEffectsLog.build(dict(acs=_effects_table(admin), iocs=_effects_table(io)))


FeatureIdsEffectsLog = Struct("fis" / Array(256, Int32ul))  # by Feature Identifier
NvmeMiEffectsLog = Struct("mics" / Array(256, Int32ul), Padding(NVME_MI_EFFECTS_LOG_SIZE - 1024))


def _effects_table(entries: Mapping[int, int]) -> list[int]:
    table = [0] * 256
    for index, eff in entries.items():
        table[index] = int(eff)
    return table


def build_feature_ids_effects_log(features: Mapping[int, int]) -> bytes:
    """Feature Identifiers Supported and Effects (log 12h) from {FID: effects bits}."""
    return FeatureIdsEffectsLog.build(dict(fis=_effects_table(features)))


def build_nvme_mi_effects_log(commands: Mapping[int, int]) -> bytes:
    """NVMe-MI Commands Supported and Effects (log 13h) from {MI opcode: effects bits}."""
    return NvmeMiEffectsLog.build(dict(mics=_effects_table(commands)))


SupportedLogPages = Struct("lids" / Array(256, Int32ul))


def build_supported_log_pages(pages: Mapping[int, int] | Iterable[int]) -> bytes:
    """Supported Log Pages (log 00h): LSUPP set for each page, or explicit bits per page."""
    lids = [0] * 256
    items = pages.items() if isinstance(pages, Mapping) else ((p, LogPageSupport.LSUPP) for p in pages)
    for lid, bits in items:
        lids[lid] = int(bits)
    return SupportedLogPages.build(dict(lids=lids))


#: Every layout with its required size; tests walk this to check sizes.
LAYOUT_SIZES: dict[str, tuple[Struct, int]] = {
    "PowerStateDescriptor": (PowerStateDescriptor, POWER_STATE_DESCRIPTOR_SIZE),
    "IdentifyController": (IdentifyController, IDENTIFY_DATA_SIZE),
    "IdentifyNamespace": (IdentifyNamespace, IDENTIFY_DATA_SIZE),
    "IdentifyNamespaceIndependent": (IdentifyNamespaceIndependent, IDENTIFY_DATA_SIZE),
    "IdentifyControllerNvm": (IdentifyControllerNvm, IDENTIFY_DATA_SIZE),
    "IdentifyNamespaceNvm": (IdentifyNamespaceNvm, IDENTIFY_DATA_SIZE),
    "IdentifyIoCommandSet": (IdentifyIoCommandSet, IDENTIFY_DATA_SIZE),
    "NsidList": (NsidList, IDENTIFY_DATA_SIZE),
    "ErrorLogEntry": (ErrorLogEntry, ERROR_LOG_ENTRY_SIZE),
    "SmartLog": (SmartLog, SMART_LOG_SIZE),
    "FirmwareSlotLog": (FirmwareSlotLog, FIRMWARE_SLOT_LOG_SIZE),
    "ChangedNamespaceList": (ChangedNamespaceList, CHANGED_NS_LIST_SIZE),
    "CommandsEffectsLog": (CommandsEffectsLog, COMMANDS_EFFECTS_LOG_SIZE),
    "SupportedLogPages": (SupportedLogPages, SUPPORTED_LOG_PAGES_SIZE),
    "FeatureIdsEffectsLog": (FeatureIdsEffectsLog, FEATURE_IDS_EFFECTS_LOG_SIZE),
    "NvmeMiEffectsLog": (NvmeMiEffectsLog, NVME_MI_EFFECTS_LOG_SIZE),
}
