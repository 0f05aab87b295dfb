"""The host driver's Zoned helpers (:mod:`nvme_emu.testing.host`: Zone Append with the ALBA
from CQE DW1:DW0, Zone Management Send, Report Zones) against ``nvme-emu serve`` over a real
vfio-user socket: what the benchmark ``bench/zone_append.py`` relies on to check its work."""

from __future__ import annotations

import os

import pytest

from nvme_emu.spec.commands import Status
from nvme_emu.spec.zns import WP_INVALID, ZoneReportOption, ZoneSendAction, ZoneState
from nvme_emu.testing.host import CommandFailed

from ..nvme_ctrl.ctrl_helpers import RAM_SIZE
from ..support.host import PAGE, Host

ZONE = 2048  #: LBAs in a 1 MiB zone of 512-byte blocks
CAP = 128  #: 64 KiB writable: sixteen 4 KiB appends fill a zone


def test_zone_helpers_over_vfio_user(spawn):
    server = spawn("ram:size=8M,zoned,zone_size=1M,zone_cap=64K,max_open=2")
    h = Host(server.path, ram_size=RAM_SIZE)
    try:
        h.set_queues(1)
        h.create_pair(1, 32)
        nvme = h.host
        buf = h.alloc(PAGE)

        # sixteen appends to zone 1 fill it; each ALBA is the next 8 blocks, data lands there
        chunks = []
        for i in range(CAP // 8):
            chunk = os.urandom(PAGE)
            h.write_mem(buf, chunk)
            assert nvme.zone_append(1, 1, ZONE, 8, buf, PAGE) == ZONE + 8 * i
            chunks.append(chunk)
        assert h.read_ok(1, 1, ZONE + 8 * 5, 8) == chunks[5]
        with pytest.raises(CommandFailed) as full:
            nvme.zone_append(1, 1, ZONE, 8, buf, PAGE)
        assert full.value.status == Status.ZONE_IS_FULL

        # one more zone opened by an append, one finished by Zone Management Send
        assert nvme.zone_append(1, 1, 3 * ZONE, 8, buf, PAGE) == 3 * ZONE
        nvme.zone_management_send(1, 1, 5 * ZONE, ZoneSendAction.FINISH)

        report = nvme.report_zones(1, 1)
        assert report.nr_zones == 8 and len(report.zones) == 8
        states = [(z.state, z.zslba, z.wp, z.zcap) for z in report.zones[:4]]
        assert states == [
            (ZoneState.EMPTY, 0, 0, CAP),
            (ZoneState.FULL, ZONE, WP_INVALID, CAP),
            (ZoneState.EMPTY, 2 * ZONE, 2 * ZONE, CAP),
            (ZoneState.IMPLICITLY_OPENED, 3 * ZONE, 3 * ZONE + 8, CAP),
        ]
        # the state filter, a partial report in a buffer of one descriptor, a 4-page buffer
        full_zones = nvme.report_zones(1, 1, option=ZoneReportOption.FULL)
        assert [z.zslba for z in full_zones.zones] == [ZONE, 5 * ZONE]
        part = nvme.report_zones(1, 1, 2 * ZONE, size=128, partial=True)
        assert part.nr_zones == 1 and part.zones[0].zslba == 2 * ZONE
        assert nvme.report_zones(1, 1, 7 * ZONE, size=4 * PAGE).zones[0].zslba == 7 * ZONE

        # Reset one zone, then Select All: every zone Empty, the data gone
        nvme.zone_reset(1, 1, 3 * ZONE)
        assert nvme.report_zones(1, 1, 3 * ZONE, size=128).zones[0].state == ZoneState.EMPTY
        nvme.zone_reset(1, 1, select_all=True)
        assert {z.state for z in nvme.report_zones(1, 1).zones} == {ZoneState.EMPTY}
        assert h.read_ok(1, 1, ZONE, 8) == bytes(PAGE)
    finally:
        h.close()
