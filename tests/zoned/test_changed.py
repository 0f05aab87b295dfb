"""The Changed Zone List (log BFh) and the Zone Descriptor Changed notice: only the
controller's own changes, up to 511 zones, FFFFh past that."""

from __future__ import annotations

import struct

import pytest

from nvme_emu.spec.zns import ZoneSendAction, ZoneState
from nvme_emu.zoned.changed import ChangedZoneList
from nvme_emu.zoned.structures import build_changed_zone_list
from nvme_emu.zoned.zone_set import ZoneSet

from .helpers import ZONE_SIZE, zone_set


def test_controller_changes_are_listed_and_notified():
    events = []
    zs = zone_set(4, on_descriptor_changed=lambda: events.append(1))
    zs.write(0, 1)
    zs.make_read_only(1)
    zs.make_offline(2)
    zs.finish_by_controller(0)
    assert zs.changed.peek() == (3, [ZONE_SIZE, 2 * ZONE_SIZE, 0])
    assert len(events) == 3
    assert zs.zones[0].state == ZoneState.FULL


def test_repeated_changes_of_one_zone_are_listed_and_notified_once():
    events = []
    zs = zone_set(4, on_descriptor_changed=lambda: events.append(1))
    zs.make_read_only(1)
    assert zs.make_read_only(1) is False
    zs.make_offline(1)
    assert zs.make_offline(1) is False
    assert zs.changed.peek() == (1, [ZONE_SIZE])
    assert len(events) == 1


def test_host_changes_are_not_listed():
    events = []
    zs = zone_set(4, on_descriptor_changed=lambda: events.append(1))
    zs.write(0, 1)
    zs.append(ZONE_SIZE, 1)
    zs.send(ZoneSendAction.OPEN, 2 * ZONE_SIZE)
    zs.send(ZoneSendAction.FINISH, 0, select_all=True)
    zs.send(ZoneSendAction.RESET, 0, select_all=True)
    zs.make_read_only(3)
    zs.changed.take()
    zs.send(ZoneSendAction.OFFLINE, 3 * ZONE_SIZE)  # the host's own Offline Zone
    assert not zs.changed
    assert zs.changed.peek() == (0, [])
    assert len(events) == 1


def test_reading_the_log_clears_it():
    zs = zone_set(4)
    zs.make_read_only(2)
    assert zs.changed.take() == (1, [2 * ZONE_SIZE])
    assert zs.changed.take() == (0, [])
    zs.make_offline(2)  # a new change after the read is listed again
    assert zs.changed.take() == (1, [2 * ZONE_SIZE])


@pytest.mark.parametrize(("changes", "nrzid", "listed"), [(510, 510, 510), (511, 511, 511), (512, 0xFFFF, 0), (600, 0xFFFF, 0)])
def test_overflow(changes, nrzid, listed):
    events = []
    zs = ZoneSet(600, 1, on_descriptor_changed=lambda: events.append(1))
    for i in range(changes):
        zs.make_offline(i)
    count, zids = zs.changed.take()
    assert count == nrzid
    assert zids == list(range(listed))
    # one notice per listed zone, one for the overflow, none after it
    assert len(events) == min(changes, 512)
    assert not zs.changed


def test_overflow_clears_on_read():
    log = ChangedZoneList()
    for zid in range(512):
        log.add(zid)
    assert log.overflowed and log.add(999) is False
    assert log.take() == (0xFFFF, [])
    assert log.add(5) and log.peek() == (1, [5])


def test_log_bytes():
    data = build_changed_zone_list(2, [0x10, 0x2000])
    assert len(data) == 4096
    assert struct.unpack_from("<H", data, 0)[0] == 2
    assert data[2:8] == bytes(6)
    assert struct.unpack_from("<QQQ", data, 8) == (0x10, 0x2000, 0)
    overflow = build_changed_zone_list(0xFFFF, [])
    assert struct.unpack_from("<H", overflow, 0)[0] == 0xFFFF and overflow[2:] == bytes(4094)
    with pytest.raises(ValueError):
        build_changed_zone_list(512, range(512))
