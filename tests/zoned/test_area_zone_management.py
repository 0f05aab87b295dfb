"""Zone Management Send (79h) and Receive (7Ah) in-process: every action and its statuses,
Select All, Reset's deallocation through the namespace door, the resource limits, and the
Report Zones bytes (header, descriptors, filters, the partial bit, the buffer from NUMD)."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from nvme_emu.spec.commands import Status
from nvme_emu.spec.zns import (
    WP_INVALID,
    ZMR_PARTIAL_REPORT,
    ZMS_ZSASO,
    ZONE_DESCRIPTOR_SIZE,
    ZONE_REPORT_HEADER_SIZE,
    ZS_SHIFT,
    ZnsOpcode,
    ZoneReceiveAction,
    ZoneReportOption,
    ZoneState,
    ZoneType,
)

from ..nvme_areas.area_helpers import BUF
from .area import GEOMETRY, LBA, ZONE_CAP_LBAS, ZONE_LBAS, ZONES, Zoned, ZoneSendAction, make_zoned

DESCRIPTOR = struct.Struct("<BBBB4xQQQ32x")  # ZT, ZS, ZA, ZAI, ZCAP, ZSLBA, WP


def report(zoned: Zoned, slba: int = 0, *, size: int = 4096, option: int = 0, partial: bool = False,
           zra: int = ZoneReceiveAction.REPORT_ZONES) -> tuple[int, int, list[tuple[int, ...]]]:
    """(status, Number of Zones, the descriptors as tuples) of a Report Zones of ``size`` bytes."""
    zoned.guest.write(BUF, b"\xa5" * max(size, 4096))
    status = zoned.status(ZnsOpcode.ZONE_MANAGEMENT_RECEIVE, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=size // 4 - 1,
                          cdw13=zra | option << 8 | (ZMR_PARTIAL_REPORT if partial else 0), **zoned.prps(size))
    if status != Status.SUCCESS:
        return status, 0, []
    data = zoned.guest.read(BUF, size)
    (count,) = struct.unpack_from("<Q", data)
    assert data[8:ZONE_REPORT_HEADER_SIZE] == bytes(ZONE_REPORT_HEADER_SIZE - 8)
    held = (size - ZONE_REPORT_HEADER_SIZE) // ZONE_DESCRIPTOR_SIZE
    descs = [DESCRIPTOR.unpack_from(data, ZONE_REPORT_HEADER_SIZE + i * ZONE_DESCRIPTOR_SIZE) for i in range(held)]
    return status, count, [d for d in descs if d != (0,) * 7]


def state_of(zoned: Zoned, index: int) -> ZoneState:
    return zoned.zones.zones[index].state


def test_open_close_finish_reset_offline(zoned: Zoned):
    z = zoned.zslba
    assert zoned.send(ZoneSendAction.OPEN, z(0)) == Status.SUCCESS
    assert state_of(zoned, 0) == ZoneState.EXPLICITLY_OPENED
    assert zoned.send(ZoneSendAction.CLOSE, z(0)) == Status.SUCCESS
    assert state_of(zoned, 0) == ZoneState.CLOSED
    assert zoned.send(ZoneSendAction.FINISH, z(0)) == Status.SUCCESS
    assert (state_of(zoned, 0), zoned.zones.zones[0].wp) == (ZoneState.FULL, ZONE_CAP_LBAS)
    assert zoned.send(ZoneSendAction.CLOSE, z(0)) == Status.INVALID_ZONE_STATE_TRANSITION
    assert zoned.send(ZoneSendAction.OPEN, z(0)) == Status.INVALID_ZONE_STATE_TRANSITION
    assert zoned.send(ZoneSendAction.RESET, z(0)) == Status.SUCCESS
    assert (state_of(zoned, 0), zoned.zones.zones[0].wp) == (ZoneState.EMPTY, 0)
    assert zoned.send(ZoneSendAction.OFFLINE, z(0)) == Status.INVALID_ZONE_STATE_TRANSITION
    zoned.zones.make_read_only(1)
    assert zoned.send(ZoneSendAction.OFFLINE, z(1)) == Status.SUCCESS
    assert state_of(zoned, 1) == ZoneState.OFFLINE
    assert zoned.send(ZoneSendAction.RESET, z(1)) == Status.INVALID_ZONE_STATE_TRANSITION


def test_send_refusals(zoned: Zoned):
    assert zoned.send(ZoneSendAction.OPEN, 1) == Status.INVALID_FIELD  # not a zone start
    assert zoned.send(ZoneSendAction.OPEN, ZONES * ZONE_LBAS) == Status.LBA_OUT_OF_RANGE
    assert zoned.send(0x0F, 0) == Status.INVALID_FIELD  # no such action
    assert zoned.send(ZoneSendAction.SET_ZONE_DESCRIPTOR_EXTENSION, 0) == Status.INVALID_FIELD  # ZDES 0
    assert zoned.send(ZoneSendAction.OPEN, 0, cdw13=ZMS_ZSASO) == Status.INVALID_FIELD  # no ZRWA
    assert state_of(zoned, 0) == ZoneState.EMPTY


def test_reset_deallocates_through_the_namespace(zoned: Zoned):
    assert zoned.write(0, 16) == Status.SUCCESS
    assert zoned.write(zoned.zslba(1), 4) == Status.SUCCESS
    assert zoned.send(ZoneSendAction.RESET, 0) == Status.SUCCESS
    assert zoned.read(0, 16) == bytes(16 * LBA)
    assert zoned.read(zoned.zslba(1), 4) != bytes(4 * LBA)  # the other zone keeps its data
    assert zoned.send(ZoneSendAction.RESET, select_all=True) == Status.SUCCESS
    assert zoned.read(zoned.zslba(1), 4) == bytes(4 * LBA)
    assert zoned.zones.counters.resets == 2


def test_select_all(zoned: Zoned):
    for i in range(3):
        assert zoned.write(zoned.zslba(i), 1) == Status.SUCCESS
    assert zoned.send(ZoneSendAction.CLOSE, 0xDEAD, select_all=True) == Status.SUCCESS  # SLBA ignored
    assert [state_of(zoned, i) for i in range(4)] == [ZoneState.CLOSED] * 3 + [ZoneState.EMPTY]
    assert zoned.send(ZoneSendAction.OPEN, select_all=True) == Status.SUCCESS
    assert [state_of(zoned, i) for i in range(3)] == [ZoneState.EXPLICITLY_OPENED] * 3
    assert zoned.send(ZoneSendAction.FINISH, select_all=True) == Status.SUCCESS
    assert [state_of(zoned, i) for i in range(4)] == [ZoneState.FULL] * 3 + [ZoneState.EMPTY]


def test_resource_limits(guest):
    limited = make_zoned(guest, dataclasses.replace(GEOMETRY, max_open=2, max_active=3))
    z = limited.zslba
    assert limited.send(ZoneSendAction.OPEN, z(0)) == Status.SUCCESS
    assert limited.send(ZoneSendAction.OPEN, z(1)) == Status.SUCCESS
    assert limited.write(z(2), 1) == Status.TOO_MANY_OPEN_ZONES  # both explicitly opened: none to close
    assert limited.send(ZoneSendAction.CLOSE, z(1)) == Status.SUCCESS
    assert limited.write(z(2), 1) == Status.SUCCESS
    assert limited.append(z(3), 1)[0] == Status.TOO_MANY_ACTIVE_ZONES  # 0 open, 1 closed, 2 open: 3 active
    assert limited.send(ZoneSendAction.OPEN, z(3)) == Status.TOO_MANY_ACTIVE_ZONES
    assert limited.send(ZoneSendAction.FINISH, z(1)) == Status.SUCCESS
    assert limited.append(z(3), 1) == (Status.SUCCESS, z(3))  # auto-closes zone 2, implicitly opened
    assert state_of(limited, 2) == ZoneState.CLOSED
    stats = limited.zones.stats()
    assert (stats["open"], stats["active"], stats["auto_closes"]) == (2, 3, 1)


def test_report_zones_bytes(zoned: Zoned):
    assert zoned.write(zoned.zslba(1), 5) == Status.SUCCESS
    zoned.zones.make_offline(2)
    status, count, descs = report(zoned)
    assert status == Status.SUCCESS and count == ZONES
    assert len(descs) == ZONES  # 4096 bytes hold 63 descriptors: every zone
    zt, zs, za, zai, zcap, zslba, wp = descs[1]
    assert (zt, zs >> ZS_SHIFT, za, zai) == (ZoneType.SEQUENTIAL_WRITE_REQUIRED, ZoneState.IMPLICITLY_OPENED, 0, 0)
    assert (zcap, zslba, wp) == (ZONE_CAP_LBAS, ZONE_LBAS, ZONE_LBAS + 5)
    assert descs[2][1] >> ZS_SHIFT == ZoneState.OFFLINE and descs[2][6] == WP_INVALID
    assert descs[0][1] >> ZS_SHIFT == ZoneState.EMPTY and descs[0][6] == 0
    assert [d[5] for d in descs] == [i * ZONE_LBAS for i in range(ZONES)]


def test_report_zones_from_an_lba_with_filters_and_partial(zoned: Zoned):
    for i in (3, 5, 9):
        assert zoned.write(zoned.zslba(i), 1) == Status.SUCCESS
    # from an LBA inside zone 4: zones 4..15
    status, count, descs = report(zoned, zoned.zslba(4) + 7)
    assert (count, descs[0][5]) == (ZONES - 4, zoned.zslba(4))
    status, count, descs = report(zoned, option=ZoneReportOption.IMPLICITLY_OPENED)
    assert count == 3 and [d[5] for d in descs] == [zoned.zslba(i) for i in (3, 5, 9)]
    # a buffer holding two descriptors: Number of Zones counts all matching, or (partial) those returned
    two = ZONE_REPORT_HEADER_SIZE + 2 * ZONE_DESCRIPTOR_SIZE
    status, count, descs = report(zoned, size=two, option=ZoneReportOption.IMPLICITLY_OPENED)
    assert (count, len(descs)) == (3, 2)
    status, count, descs = report(zoned, size=two, option=ZoneReportOption.IMPLICITLY_OPENED, partial=True)
    assert (count, len(descs)) == (2, 2)
    # the header alone: a count and no descriptors
    assert report(zoned, size=ZONE_REPORT_HEADER_SIZE, option=ZoneReportOption.EMPTY)[1:] == (ZONES - 3, [])
    assert report(zoned, option=ZoneReportOption.FULL)[1:] == (0, [])


def test_report_zones_large_buffer_through_a_prp_list(zoned: Zoned):
    status, count, descs = report(zoned, size=16384)
    assert status == Status.SUCCESS and (count, len(descs)) == (ZONES, ZONES)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(size=32), Status.INVALID_FIELD),  # smaller than the header
    (dict(zra=ZoneReceiveAction.EXTENDED_REPORT_ZONES), Status.INVALID_FIELD),  # no descriptor extensions
    (dict(zra=0x05), Status.INVALID_FIELD),
    (dict(option=0x08), Status.INVALID_FIELD),
    (dict(slba=ZONES * ZONE_LBAS), Status.LBA_OUT_OF_RANGE),
    (dict(size=(512 << 10) + 4096), Status.INVALID_FIELD),  # past MDTS
])
def test_report_zones_refusals(zoned: Zoned, kwargs: dict, expected: Status):
    assert report(zoned, **kwargs)[0] == expected
