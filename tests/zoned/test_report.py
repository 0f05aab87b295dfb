"""Report Zones: every Reporting Option, the Partial Report bit, the start LBA and the host's
buffer size; and the bytes the host gets."""

from __future__ import annotations

import struct

import pytest

from nvme_emu.spec.commands import NvmeError, Status
from nvme_emu.spec.zns import ZoneReportOption, ZoneState
from nvme_emu.zoned.structures import build_report_zones, report_zones_capacity

from .helpers import ZONE_CAP, ZONE_SIZE, put_in_state, zone_set

#: Zone i is in LAYOUT[i]; two of each of the states a host sees most, one of the others.
LAYOUT = [
    ZoneState.EMPTY, ZoneState.IMPLICITLY_OPENED, ZoneState.EXPLICITLY_OPENED, ZoneState.CLOSED,
    ZoneState.FULL, ZoneState.READ_ONLY, ZoneState.OFFLINE, ZoneState.EMPTY,
    ZoneState.IMPLICITLY_OPENED, ZoneState.FULL,
]


@pytest.fixture
def zs():
    zs = zone_set(len(LAYOUT))
    for i, state in enumerate(LAYOUT):
        put_in_state(zs, i, state)
    return zs


EXPECTED = {
    ZoneReportOption.ALL: list(range(10)),
    ZoneReportOption.EMPTY: [0, 7],
    ZoneReportOption.IMPLICITLY_OPENED: [1, 8],
    ZoneReportOption.EXPLICITLY_OPENED: [2],
    ZoneReportOption.CLOSED: [3],
    ZoneReportOption.FULL: [4, 9],
    ZoneReportOption.READ_ONLY: [5],
    ZoneReportOption.OFFLINE: [6],
}


@pytest.mark.parametrize("option", list(ZoneReportOption))
@pytest.mark.parametrize("partial", [False, True])
def test_every_option_lists_its_zones(zs, option, partial):
    report = zs.report(0, option, partial=partial, max_zones=100)
    assert [z.index for z in report.zones] == EXPECTED[option]
    assert report.number_of_zones == len(EXPECTED[option])


@pytest.mark.parametrize("option", list(ZoneReportOption))
def test_the_report_starts_at_the_zone_holding_slba(zs, option):
    slba = 4 * ZONE_SIZE + 7  # inside zone 4
    report = zs.report(slba, option, max_zones=100)
    want = [i for i in EXPECTED[option] if i >= 4]
    assert [z.index for z in report.zones] == want
    assert report.number_of_zones == len(want)


@pytest.mark.parametrize(
    ("option", "max_zones", "partial", "returned", "count"),
    [
        (ZoneReportOption.ALL, 3, False, [0, 1, 2], 10),  # count: every matching zone
        (ZoneReportOption.ALL, 3, True, [0, 1, 2], 3),  # count: the zones returned
        (ZoneReportOption.FULL, 1, False, [4], 2),
        (ZoneReportOption.FULL, 1, True, [4], 1),
        (ZoneReportOption.ALL, 0, False, [], 10),  # a header-only buffer still counts
        (ZoneReportOption.ALL, 0, True, [], 0),
        (ZoneReportOption.CLOSED, 5, True, [3], 1),  # fewer than fit
    ],
)
def test_partial_report(zs, option, max_zones, partial, returned, count):
    report = zs.report(0, option, partial=partial, max_zones=max_zones)
    assert [z.index for z in report.zones] == returned
    assert report.number_of_zones == count


@pytest.mark.parametrize(
    ("slba", "option", "status"),
    [(10 * ZONE_SIZE, 0, Status.LBA_OUT_OF_RANGE), (0, 8, Status.INVALID_FIELD), (0, 0xFF, Status.INVALID_FIELD)],
)
def test_report_refusals(zs, slba, option, status):
    with pytest.raises(NvmeError) as e:
        zs.report(slba, option, max_zones=10)
    assert e.value.status == status


@pytest.mark.parametrize(("size", "fits"), [(64, 0), (127, 0), (128, 1), (4096, 63), (0, 0)])
def test_report_capacity(size, fits):
    assert report_zones_capacity(size) == fits


def test_report_bytes(zs):
    report = zs.report(ZONE_SIZE, ZoneReportOption.ALL, max_zones=report_zones_capacity(64 + 3 * 64 + 10))
    data = build_report_zones(report, 64 + 3 * 64 + 10)
    assert len(data) == 64 + 3 * 64 + 10
    assert struct.unpack_from("<Q", data, 0)[0] == 9  # zones 1..9
    assert data[8:64] == bytes(56)
    described = [(ZoneState.IMPLICITLY_OPENED, ZONE_SIZE + 1), (ZoneState.EXPLICITLY_OPENED, 2 * ZONE_SIZE), (ZoneState.CLOSED, 3 * ZONE_SIZE + 1)]
    for n, (state, wp) in enumerate(described):
        d = data[64 + 64 * n : 128 + 64 * n]
        assert d[0] == 0x2  # Sequential Write Required
        assert d[1] == state << 4
        assert d[2] == 0
        assert struct.unpack_from("<QQQ", d, 8) == (ZONE_CAP, (n + 1) * ZONE_SIZE, wp)
        assert d[32:] == bytes(32)
    assert data[64 + 3 * 64 :] == bytes(10)


def test_report_bytes_invalid_write_pointer(zs):
    report = zs.report(4 * ZONE_SIZE, ZoneReportOption.ALL, max_zones=3)
    data = build_report_zones(report, 64 + 3 * 64)
    for n in range(3):  # Full, Read Only, Offline
        assert struct.unpack_from("<Q", data, 64 + 64 * n + 24)[0] == 0xFFFF_FFFF_FFFF_FFFF


def test_report_bytes_truncated_to_a_small_buffer(zs):
    report = zs.report(0, ZoneReportOption.ALL, max_zones=10)
    assert build_report_zones(report, 100)[:8] == struct.pack("<Q", 10)
    assert len(build_report_zones(report, 100)) == 100
