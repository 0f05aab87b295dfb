"""The Zoned Namespace Command Set's data structures as ``construct`` layouts (ZNS 1.1): the
zone descriptor and the Report Zones header, the Changed Zone List log page (BFh), and the
I/O Command Set specific Identify Namespace (CNS 05h) and Identify Controller (CNS 06h) for
CSI 02h. As in :mod:`nvme_emu.structures`, reserved bytes are spelled out as ``Padding`` so
each layout builds to the size the specification gives, and the ``build_*`` helpers refuse
unknown field names.
"""

from __future__ import annotations

from typing import Any, Iterable

from construct import Array, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from ..spec.identify import IDENTIFY_DATA_SIZE, LBA_FORMATS_MAX
from ..spec.zns import (
    CHANGED_ZONE_LIST_ENTRIES,
    CHANGED_ZONE_LIST_HEADER_SIZE,
    CHANGED_ZONE_LIST_SIZE,
    LBAFE_OFFSET,
    LBAFE_SIZE,
    RESOURCES_NO_LIMIT,
    ZONE_DESCRIPTOR_SIZE,
    ZONE_REPORT_HEADER_SIZE,
    ZS_SHIFT,
    ZoneType,
)
from ..structures import _defaults, _merge
from .zone_set import Zone, ZoneReport

# ---------------------------------------------------------------------------------------------
# Zone descriptor and Report Zones (Zone Management Receive, ZRA 0h)
# ---------------------------------------------------------------------------------------------

ZoneDescriptor = Struct(
    "zt" / Int8ul,  # 0 zone type, bits 3:0
    "zs" / Int8ul,  # 1 zone state, bits 7:4
    "za" / Int8ul,  # 2 zone attributes
    "zai" / Int8ul,  # 3 zone attributes information
    Padding(4),  # 4
    "zcap" / Int64ul,  # 8 zone capacity, LBAs
    "zslba" / Int64ul,  # 16 zone start LBA
    "wp" / Int64ul,  # 24 write pointer
    Padding(32),  # 32
)

ZoneReportHeader = Struct(
    "nr_zones" / Int64ul,  # 0 Number of Zones
    Padding(56),  # 8
)


def build_zone_descriptor(zone: Zone) -> bytes:
    """The 64-byte descriptor of ``zone``; the write pointer is all ones where not valid."""
    return ZoneDescriptor.build(
        dict(
            zt=ZoneType.SEQUENTIAL_WRITE_REQUIRED, zs=zone.state << ZS_SHIFT, za=int(zone.attrs), zai=0,
            zcap=zone.zcap, zslba=zone.zslba, wp=zone.reported_wp,
        )
    )


def report_zones_capacity(buffer_size: int) -> int:
    """How many descriptors a Report Zones buffer of ``buffer_size`` bytes holds."""
    return max(buffer_size - ZONE_REPORT_HEADER_SIZE, 0) // ZONE_DESCRIPTOR_SIZE


def build_report_zones(report: ZoneReport, buffer_size: int) -> bytes:
    """The Report Zones data for a host buffer of ``buffer_size`` bytes: the header, the
    descriptors that fit, zeros after them."""
    out = bytearray(ZoneReportHeader.build(dict(nr_zones=report.number_of_zones)))
    for zone in report.zones[: report_zones_capacity(buffer_size)]:
        out += build_zone_descriptor(zone)
    return bytes(out[:buffer_size].ljust(buffer_size, b"\0"))


# ---------------------------------------------------------------------------------------------
# Changed Zone List (log page BFh)
# ---------------------------------------------------------------------------------------------

ChangedZoneListLog = Struct(
    "nrzid" / Int16ul,  # 0 Number of Zone Identifiers (FFFFh: more than the list holds)
    Padding(CHANGED_ZONE_LIST_HEADER_SIZE - 2),  # 2
    "zid" / Array(CHANGED_ZONE_LIST_ENTRIES, Int64ul),  # 8 zone start LBAs
)


def build_changed_zone_list(nrzid: int, zids: Iterable[int]) -> bytes:
    """The log page from :meth:`nvme_emu.zoned.changed.ChangedZoneList.take`'s result."""
    ids = list(zids)
    if len(ids) > CHANGED_ZONE_LIST_ENTRIES:
        raise ValueError(f"at most {CHANGED_ZONE_LIST_ENTRIES} zone identifiers")
    return ChangedZoneListLog.build(dict(nrzid=nrzid, zid=ids + [0] * (CHANGED_ZONE_LIST_ENTRIES - len(ids))))


# ---------------------------------------------------------------------------------------------
# Identify Namespace for the Zoned Namespace Command Set (CNS 05h, CSI 02h)
# ---------------------------------------------------------------------------------------------

ZnsLbaFormatExtension = Struct(
    "zsze" / Int64ul,  # zone size, LBAs
    "zdes" / Int8ul,  # zone descriptor extension size, 64-byte units
    Padding(7),
)

IdentifyNamespaceZns = Struct(
    "zoc" / Int16ul,  # 0 zone operation characteristics
    "ozcs" / Int16ul,  # 2 optional zoned command support
    "mar" / Int32ul,  # 4 maximum active resources, 0's based (FFFFFFFFh: no limit)
    "mor" / Int32ul,  # 8 maximum open resources, 0's based
    "rrl" / Int32ul,  # 12 reset recommended limit, seconds
    "frl" / Int32ul,  # 16 finish recommended limit
    "rrl1" / Int32ul,  # 20
    "rrl2" / Int32ul,  # 24
    "rrl3" / Int32ul,  # 28
    "frl1" / Int32ul,  # 32
    "frl2" / Int32ul,  # 36
    "frl3" / Int32ul,  # 40
    "numzrwa" / Int32ul,  # 44 ZRWA resources (ZNS 1.2)
    "zrwafg" / Int16ul,  # 48
    "zrwasz" / Int16ul,  # 50
    "zrwacap" / Int8ul,  # 52
    Padding(LBAFE_OFFSET - 53),  # 53
    "lbafe" / Array(LBA_FORMATS_MAX, ZnsLbaFormatExtension),  # 2816
    Padding(IDENTIFY_DATA_SIZE - LBAFE_OFFSET - LBA_FORMATS_MAX * LBAFE_SIZE),  # 3840 vendor specific
)


def resources_field(limit: int) -> int:
    """MAR / MOR for a resource limit (0 = no limit): 0's based, FFFFFFFFh for none."""
    return RESOURCES_NO_LIMIT if limit == 0 else limit - 1


def build_identify_namespace_zns(*, zone_size: int, zdes: int = 0, lbaf_count: int = 1, **fields: Any) -> bytes:
    """CNS 05h / CSI 02h data: ``zone_size`` (LBAs) for each of the namespace's
    ``lbaf_count`` LBA formats (zone size is in LBAs, so one value serves every format);
    ``mar`` and ``mor`` are the 0's based fields (see :func:`resources_field`)."""
    c = _defaults(IdentifyNamespaceZns)
    c.mar = c.mor = RESOURCES_NO_LIMIT
    c = _merge(IdentifyNamespaceZns, c, fields, "CNS 05h / CSI 02h")
    if not 1 <= lbaf_count <= LBA_FORMATS_MAX:
        raise ValueError(f"1..{LBA_FORMATS_MAX} LBA formats")
    used = [dict(zsze=zone_size, zdes=zdes)] * lbaf_count
    c.lbafe = used + [dict(zsze=0, zdes=0)] * (LBA_FORMATS_MAX - lbaf_count)
    return IdentifyNamespaceZns.build(c)


# ---------------------------------------------------------------------------------------------
# Identify Controller for the Zoned Namespace Command Set (CNS 06h, CSI 02h)
# ---------------------------------------------------------------------------------------------

IdentifyControllerZns = Struct(
    "zasl" / Int8ul,  # 0 zone append size limit: log2 of minimum memory pages, 0 = MDTS
    Padding(IDENTIFY_DATA_SIZE - 1),  # 1
)


def build_identify_controller_zns(**fields: Any) -> bytes:
    """CNS 06h / CSI 02h data (ZASL 0: Zone Append is limited by MDTS alone)."""
    c = _merge(IdentifyControllerZns, _defaults(IdentifyControllerZns), fields, "CNS 06h / CSI 02h")
    return IdentifyControllerZns.build(c)


#: Every layout with its required size; the tests walk this.
LAYOUT_SIZES: dict[str, tuple[Struct, int]] = {
    "ZoneDescriptor": (ZoneDescriptor, ZONE_DESCRIPTOR_SIZE),
    "ZoneReportHeader": (ZoneReportHeader, ZONE_REPORT_HEADER_SIZE),
    "ZnsLbaFormatExtension": (ZnsLbaFormatExtension, LBAFE_SIZE),
    "ChangedZoneListLog": (ChangedZoneListLog, CHANGED_ZONE_LIST_SIZE),
    "IdentifyNamespaceZns": (IdentifyNamespaceZns, IDENTIFY_DATA_SIZE),
    "IdentifyControllerZns": (IdentifyControllerZns, IDENTIFY_DATA_SIZE),
}
