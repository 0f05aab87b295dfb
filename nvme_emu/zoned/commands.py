"""The Zoned Namespace Command Set's I/O commands (ZNS 1.1): the NVM commands with the zone rules,
Zone Management Send (79h) and Receive (7Ah), and Zone Append (7Dh); and its Identify pages.

:class:`ZonedCommands` is bound to one controller's :class:`~nvme_emu.nvm.NvmCommands`, the
request machinery every command set shares (:mod:`nvme_emu.command_set`): the data pointers
(``views``), the namespace door, blocking work on the I/O pool. A handler here asks the zones
(:class:`~nvme_emu.zoned.zone_set.ZoneSet`, sans-IO) what a command may do and where its data
goes, then moves the data through the namespace as the NVM handler would. Nothing here runs
for a namespace of another set: the dispatcher reaches these handlers through the zoned set's
table only, so the NVM path pays nothing for zones.

Order of checks in a write: the LBA range (LBA Out of Range), the data pointer (MDTS, PRP and
SGL errors), then the zone rules, which move the write pointer, then the data. So a command
refused for its buffer leaves the zone alone; a write whose data transfer fails after the
zone accepted it leaves the write pointer past it (as a device's write fault would).

Where ZNS leaves a choice, QEMU's hw/nvme makes it, said where it is made:

- with CC.CSS 000b (NVM Command Set only) a zoned namespace is not usable: QEMU attaches it
  only when CC.CSS selects every I/O command set (110b), so it is inactive, and I/O to an
  inactive namespace gets Invalid Namespace or Format; that is what every command to it
  gets here (its Identify data stays visible: a departure, harmless for hosts, which all
  select 110b when CAP.CSS offers it, as Linux does);
- Zone Append is limited by ZASL 0, "the MDTS", and a larger one is Invalid Field;
- Dataset Management (deallocate) leaves zone states and write pointers alone (it only
  deallocates, as QEMU's); Write Zeroes is a write at the write pointer; a Copy's
  destination is a write at the write pointer of one zone, its sources reads under the
  read rules;
- Verify is a read under the read rules too (QEMU's Verify skips them: a departure, since
  ZNS makes an Offline zone unreadable for every command that reads);
- Write Uncorrectable is not part of the set (Invalid Opcode), as in QEMU's zoned table;
- Report Zones needs a buffer of at least the 64-byte header (Invalid Field), Extended
  Report Zones is Invalid Field (no zone descriptor extensions: ZDES 0), and so is a Zone
  Send Action Specific Option (no Zone Random Write Area).
"""

from __future__ import annotations

from functools import partial

from .. import prp
from ..namespace import LBA_FORMATS, Namespace
from ..nvm import Handler, NvmCommands
from ..outcome import Work
from ..spec.commands import NvmeError, NvmOpcode, RwCdw12, Status
from ..spec.registers import Cc, CcCss
from ..spec.zns import (
    ZMR_PARTIAL_REPORT,
    ZMS_SELECT_ALL,
    ZMS_ZSASO,
    ZONE_REPORT_HEADER_SIZE,
    ZRA_MASK,
    ZRASF_MASK,
    ZRASF_SHIFT,
    ZSA_MASK,
    Ozcs,
    ZnsOpcode,
    ZoneReceiveAction,
)
from ..sqe import CDW12, CDW13, lba_range, starting_lba
from ..state import ControllerState
from .structures import (
    build_identify_controller_zns,
    build_identify_namespace_zns,
    build_report_zones,
    report_zones_capacity,
    resources_field,
)
from .zone_set import ZoneSet

#: Zone Append Size Limit (Identify Controller ZNS byte 0): 0, "the MDTS", QEMU's default.
ZASL = 0
#: CAP.MPSMIN in bytes: the unit of MDTS and ZASL.
_MPSMIN = 4096

#: The opcodes of the set: what its table dispatches (Flush is the dispatcher's) ...
ZONED_OPCODES = (
    NvmOpcode.FLUSH,
    NvmOpcode.WRITE,
    NvmOpcode.READ,
    NvmOpcode.COMPARE,
    NvmOpcode.WRITE_ZEROES,
    NvmOpcode.DATASET_MANAGEMENT,
    NvmOpcode.VERIFY,
    NvmOpcode.COPY,
    ZnsOpcode.ZONE_MANAGEMENT_SEND,
    ZnsOpcode.ZONE_MANAGEMENT_RECEIVE,
    ZnsOpcode.ZONE_APPEND,
)
#: ... and those that change logical blocks (LBCC; a write-protected namespace refuses them):
#: Zone Management Send too, since a Reset deallocates (QEMU marks it LBCC as well).
ZONED_LBA_CHANGING = (
    NvmOpcode.WRITE,
    NvmOpcode.WRITE_ZEROES,
    NvmOpcode.DATASET_MANAGEMENT,
    NvmOpcode.COPY,
    ZnsOpcode.ZONE_MANAGEMENT_SEND,
    ZnsOpcode.ZONE_APPEND,
)


def zones_of(ns: Namespace) -> ZoneSet:
    """The zones of a namespace of the zoned set (the table is only reached for those)."""
    zones = ns.zones
    if zones is None:  # a namespace built by hand with the zoned CSI and no zones
        raise NvmeError(Status.INTERNAL_ERROR, f"namespace {ns.nsid} has no zones")
    return zones


def zone_append_limit(state: ControllerState) -> int:
    """The largest Zone Append in bytes: ZASL, or MDTS when ZASL is 0."""
    return state.config.max_transfer if ZASL == 0 else _MPSMIN << ZASL


class ZonedCommands:
    """The zoned set's handlers for one controller, over its NVM commands (module docstring)."""

    def __init__(self, nvm: NvmCommands) -> None:
        self.nvm = nvm
        self.state = nvm.state
        self.handlers: dict[int, Handler] = {
            NvmOpcode.READ: self.read,
            NvmOpcode.WRITE: self.write,
            NvmOpcode.COMPARE: self.compare,
            NvmOpcode.VERIFY: self.verify,
            NvmOpcode.WRITE_ZEROES: self.write_zeroes,
            NvmOpcode.DATASET_MANAGEMENT: self.dataset_management,
            NvmOpcode.COPY: self.copy,
            ZnsOpcode.ZONE_MANAGEMENT_SEND: self.zone_management_send,
            ZnsOpcode.ZONE_MANAGEMENT_RECEIVE: self.zone_management_receive,
            ZnsOpcode.ZONE_APPEND: self.zone_append,
        }

    def _zones(self, ns: Namespace) -> ZoneSet:
        """The namespace's zones, while the host's CC.CSS enables the set (module docstring)."""
        if (self.state.cc >> Cc.CSS_SHIFT) & Cc.CSS_MASK != CcCss.ALL_IO_COMMAND_SETS:
            raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {ns.nsid} is zoned and CC.CSS enables the NVM Command Set only")
        return zones_of(ns)

    # -- reads ---------------------------------------------------------------------------------

    def read(self, ns: Namespace, e: tuple) -> int | Work:
        self._zones(ns).check_read(*lba_range(e))
        return self.nvm.read(ns, e)

    def compare(self, ns: Namespace, e: tuple) -> int | Work:
        self._zones(ns).check_read(*lba_range(e))
        return self.nvm.compare(ns, e)

    def verify(self, ns: Namespace, e: tuple) -> int | Work:
        self._zones(ns).check_read(*lba_range(e))
        return self.nvm.verify(ns, e)

    # -- writes --------------------------------------------------------------------------------

    def _write_views(self, ns: Namespace, e: tuple, slba: int, nlb: int, views: list[memoryview]) -> int | Work:
        """The data of a write the zones accepted, at ``slba``, through the namespace door
        (FUA as NVM's Write has it); the views are released here or owned by the Work."""
        fua = bool(e[CDW12] & RwCdw12.FUA) or not self.state.features.write_cache
        return NvmCommands.done_or_work(partial(ns.write, fua=fua), slba, nlb, views)

    def write(self, ns: Namespace, e: tuple) -> int | Work:
        zones = self._zones(ns)
        slba, nlb = lba_range(e)
        ns.check_range(slba, nlb)  # LBA Out of Range before any walk of the data pointer
        views = self.nvm.views(e, nlb << ns.lba_shift, to_host=False)
        try:
            zones.write(slba, nlb)
        except BaseException:
            prp.release_views(views)
            raise
        return self._write_views(ns, e, slba, nlb, views)

    def zone_append(self, ns: Namespace, e: tuple) -> int | Work:
        """Zone Append: the data goes at the zone's write pointer, and the completion's DW0
        and DW1 carry that LBA (ZNS 1.1, "Zone Append command": ALBA, a 64-bit result; the
        CQE writer puts a result's upper half in DW1)."""
        zones = self._zones(ns)
        zslba, nlb = lba_range(e)
        length = nlb << ns.lba_shift
        if length > zone_append_limit(self.state):
            raise NvmeError(Status.INVALID_FIELD, f"Zone Append of {length} bytes exceeds ZASL")
        ns.check_range(zslba, nlb)
        views = self.nvm.views(e, length, to_host=False)
        try:
            slba = zones.append(zslba, nlb)
        except BaseException:
            prp.release_views(views)
            raise
        result = self._write_views(ns, e, slba, nlb, views)
        if isinstance(result, Work):
            result.result = slba
            return result
        return slba

    def write_zeroes(self, ns: Namespace, e: tuple) -> int | Work:
        """A write of zeroes at the write pointer (QEMU's nvme_do_write with wrz)."""
        zones = self._zones(ns)
        slba, nlb = lba_range(e)
        ns.check_range(slba, nlb)
        zones.write(slba, nlb)
        return self.nvm.write_zeroes(ns, e)

    def dataset_management(self, ns: Namespace, e: tuple) -> int | Work:
        """Deallocate as on NVM: zone states and write pointers stay (QEMU's, module docstring)."""
        self._zones(ns)
        return self.nvm.dataset_management(ns, e)

    def copy(self, ns: Namespace, e: tuple) -> int | Work:
        """Copy: every source range readable under the read rules, the destination a write of
        all the blocks at one zone's write pointer."""
        zones = self._zones(ns)
        sdlba, ranges, total = self.nvm.copy_ranges(ns, e)
        for slba, nlb in ranges:
            zones.check_read(slba, nlb)
        zones.write(sdlba, total)
        return ns.copy(ranges, sdlba, fua=bool(e[CDW12] & RwCdw12.FUA)) or 0

    # -- Zone Management -----------------------------------------------------------------------

    def zone_management_send(self, ns: Namespace, e: tuple) -> int | Work:
        """Open, Close, Finish, Reset, Offline, one zone or with Select All; the LBAs a Reset
        frees are deallocated through the namespace door (so they read as zeros again)."""
        zones = self._zones(ns)
        cdw13 = e[CDW13]
        if cdw13 & ZMS_ZSASO:
            raise NvmeError(Status.INVALID_FIELD, "Zone Send Action Specific Option: no Zone Random Write Area")
        freed = zones.send(cdw13 & ZSA_MASK, starting_lba(e), select_all=bool(cdw13 & ZMS_SELECT_ALL))
        if not freed:
            return 0
        return ns.deallocate(freed) or 0

    def zone_management_receive(self, ns: Namespace, e: tuple) -> int:
        """Report Zones into a buffer of NUMD + 1 dwords: the header, then as many descriptors
        as fit, from the zone holding SLBA, filtered by the Reporting Options."""
        zones = self._zones(ns)
        slba = starting_lba(e)
        zones.zone_at(slba)  # LBA Out of Range first, as QEMU checks it
        cdw13 = e[CDW13]
        zra = cdw13 & ZRA_MASK
        if zra == ZoneReceiveAction.EXTENDED_REPORT_ZONES:
            raise NvmeError(Status.INVALID_FIELD, "Extended Report Zones: no zone descriptor extensions (ZDES 0)")
        if zra != ZoneReceiveAction.REPORT_ZONES:
            raise NvmeError(Status.INVALID_FIELD, f"Zone Receive Action {zra:#x}")
        size = (e[CDW12] + 1) * 4
        if size < ZONE_REPORT_HEADER_SIZE:
            raise NvmeError(Status.INVALID_FIELD, f"Report Zones buffer of {size} bytes holds no header")
        views = self.nvm.views(e, size, to_host=True)  # MDTS (Invalid Field) before the report is built
        try:
            report = zones.report(slba, (cdw13 >> ZRASF_SHIFT) & ZRASF_MASK, partial=bool(cdw13 & ZMR_PARTIAL_REPORT),
                                  max_zones=report_zones_capacity(size))
            prp.scatter(views, build_report_zones(report, size))
        finally:
            prp.release_views(views)
        return 0


# -------------------------------------------------------------------------------------------------
# Identify pages of the set
# -------------------------------------------------------------------------------------------------


def identify_namespace_zns(ns: Namespace) -> bytes:
    """CNS 05h / CSI 02h: no zone operation characteristics (ZOC 0: fixed zone capacity, no
    active excursions), RAZB when reads may cross zones, MAR and MOR 0's based (FFFFFFFFh:
    no limit), and the zone size for each LBA format (in LBAs of the current one, as QEMU
    fills every LBAFE: Format NVM is refused on a zoned namespace)."""
    zones = zones_of(ns)
    return build_identify_namespace_zns(
        zone_size=zones.zone_size,
        lbaf_count=len(LBA_FORMATS),
        zoc=0,
        ozcs=Ozcs.RAZB if zones.cross_zone_read else 0,
        mar=resources_field(zones.max_active),
        mor=resources_field(zones.max_open),
    )


def identify_controller_zns(state: ControllerState) -> bytes:
    """CNS 06h / CSI 02h: the Zone Append Size Limit."""
    return build_identify_controller_zns(zasl=ZASL)
