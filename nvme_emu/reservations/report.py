"""Reservation Report data (Base 2.0, Figures "Reservation Status Data Structure" and
"Reservation Status Extended Data Structure") and the Reservation Notification log page (80h),
as ``construct`` layouts.
"""

from __future__ import annotations

from collections.abc import Mapping

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct, this

from nvme_emu.reservations.model import HostId, NotificationType, ReservationState, Role
from nvme_emu.spec.commands import Status

_HEADER = Struct(
    "gen" / Int32ul,
    "rtype" / Int8ul,
    "regctl" / Int16ul,
    Padding(2),
    "ptpls" / Int8ul,
    Padding(14),
)  # 24 bytes
REGISTERED_CONTROLLER = Struct(
    "cntlid" / Int16ul, "rcsts" / Int8ul, Padding(5), "hostid" / Bytes(8), "rkey" / Int64ul
)  # 24 bytes
REGISTERED_CONTROLLER_EXTENDED = Struct(
    "cntlid" / Int16ul, "rcsts" / Int8ul, Padding(5), "rkey" / Int64ul, "hostid" / Bytes(16), Padding(32)
)  # 64 bytes
RESERVATION_STATUS = Struct("header" / _HEADER, "controllers" / Array(this.header.regctl, REGISTERED_CONTROLLER))
RESERVATION_STATUS_EXTENDED = Struct(
    "header" / _HEADER, Padding(40), "controllers" / Array(this.header.regctl, REGISTERED_CONTROLLER_EXTENDED)
)
RESERVATION_NOTIFICATION_LOG = Struct(
    "count" / Int64ul, "type" / Int8ul, "available" / Int8ul, Padding(2), "nsid" / Int32ul, Padding(48)
)  # 64 bytes
RCSTS_HOLDS = 0x01  #: Reservation Status: the controller's host holds the reservation
EDS = 0x01  #: Reservation Report CDW11 bit 0, Extended Data Structure


def report(
    state: ReservationState, controllers: Mapping[int, HostId], cdw11: int, *, host_id_128: bool
) -> tuple[Status, bytes]:
    """The Reservation Report data, whole (the caller truncates to NUMD).

    ``controllers``: CNTLID -> Host Identifier of every controller that may reach the namespace;
    one entry per controller of a registered host, as the structure counts controllers.
    ``host_id_128``: the subsystem's hosts use 128-bit identifiers, which the 24-byte entry
    cannot carry: EDS cleared is then Host Identifier Inconsistent Format (Linux retries with
    EDS set on that status). 64-bit identifiers in the extended entry are zero-extended.
    """
    extended = bool(cdw11 & EDS)
    if host_id_128 and not extended:
        return Status.HOST_ID_INCONSISTENT_FORMAT, b""
    width = 16 if extended else 8
    entries = [
        {
            "cntlid": cntlid,
            "rcsts": RCSTS_HOLDS if state.role(host) is Role.HOLDER else 0,
            "hostid": host[:width].ljust(width, b"\0"),
            "rkey": state.registrants[host],
        }
        for cntlid, host in sorted(controllers.items())
        if host in state.registrants
    ]
    header = {
        "gen": state.generation,
        "rtype": 0 if state.rtype is None else int(state.rtype),
        "regctl": len(entries),
        "ptpls": int(state.ptpl),
    }
    layout = RESERVATION_STATUS_EXTENDED if extended else RESERVATION_STATUS
    return Status.SUCCESS, layout.build({"header": header, "controllers": entries})


def notification_log(count: int, ntype: NotificationType, available: int, nsid: int) -> bytes:
    """One Reservation Notification log page: the oldest queued notice and how many remain."""
    return RESERVATION_NOTIFICATION_LOG.build({"count": count, "type": ntype, "available": available, "nsid": nsid})


REGISTER_DATA = Struct("crkey" / Int64ul, "nrkey" / Int64ul)  #: Reservation Register data, 16 bytes
ACQUIRE_DATA = Struct("crkey" / Int64ul, "prkey" / Int64ul)  #: Reservation Acquire data, 16 bytes
RELEASE_DATA = Struct("crkey" / Int64ul)  #: Reservation Release data, 8 bytes

#: Identify Namespace RESCAP (byte 31) for a namespace supporting every type, PTPL and the
#: IEKEY semantics of NVMe 1.3+ (bit 7, Ignore Existing Key): what Linux reads before pr_ops.
RESCAP_ALL = 0xFF
RESCAP_OFFSET = 31
