"""The write pointer rules of Write and Zone Append, reads across zones, and what Reset gives
back to deallocate."""

from __future__ import annotations

import pytest

from nvme_emu.spec.commands import NvmeError, Status
from nvme_emu.spec.zns import ZoneSendAction, ZoneState

from .helpers import ZONE_CAP, ZONE_SIZE, check_invariants, put_in_state, zone_set


def refused(status, fn, *args):
    with pytest.raises(NvmeError) as e:
        fn(*args)
    assert e.value.status == status


@pytest.mark.parametrize(
    ("slba", "nlb", "status"),
    [
        (5, 1, Status.ZONE_INVALID_WRITE),  # ahead of the write pointer (4)
        (3, 1, Status.ZONE_INVALID_WRITE),  # behind it
        (0, 1, Status.ZONE_INVALID_WRITE),  # at the zone start
        (4, ZONE_CAP - 3, Status.ZONE_BOUNDARY_ERROR),  # one past the capacity
        (4, ZONE_SIZE, Status.ZONE_BOUNDARY_ERROR),  # into the next zone
        (4, 0, Status.LBA_OUT_OF_RANGE),
        (4 * ZONE_SIZE, 1, Status.LBA_OUT_OF_RANGE),
        (4 * ZONE_SIZE - 1, 2, Status.LBA_OUT_OF_RANGE),
    ],
)
def test_write_rules(slba, nlb, status):
    zs = zone_set(4)
    zs.write(0, 4)
    before = (zs.zones[0].state, zs.zones[0].wp, zs.zones[1].state)
    refused(status, zs.write, slba, nlb)
    assert (zs.zones[0].state, zs.zones[0].wp, zs.zones[1].state) == before


def test_write_checks_state_before_write_pointer():
    """A Full zone refuses a write at any LBA with Zone Is Full, not Zone Invalid Write."""
    zs = zone_set(2)
    put_in_state(zs, 0, ZoneState.FULL)
    refused(Status.ZONE_IS_FULL, zs.write, 0, 1)
    refused(Status.ZONE_IS_FULL, zs.write, ZONE_SIZE - 1, 1)  # past the capacity, still Full


def test_write_to_the_capacity_end_fills_the_zone():
    zs = zone_set(2)
    assert zs.write(0, ZONE_CAP) == 0
    assert zs.zones[0].state == ZoneState.FULL
    assert zs.zones[0].reported_wp == 0xFFFF_FFFF_FFFF_FFFF
    assert zs.counters.writes == 1


def test_zone_capacity_equal_to_size_writes_up_to_the_next_zone():
    zs = zone_set(2, zone_capacity=ZONE_SIZE)
    zs.write(0, ZONE_SIZE - 1)
    refused(Status.ZONE_BOUNDARY_ERROR, zs.write, ZONE_SIZE - 1, 2)
    zs.write(ZONE_SIZE - 1, 1)
    assert zs.zones[0].state == ZoneState.FULL
    assert zs.zones[1].state == ZoneState.EMPTY


def test_append_returns_where_it_wrote():
    zs = zone_set(2)
    assert zs.append(ZONE_SIZE, 3) == ZONE_SIZE
    assert zs.append(ZONE_SIZE, 2) == ZONE_SIZE + 3
    zs.write(ZONE_SIZE + 5, 1)  # a Write continues where the appends left the pointer
    assert zs.append(ZONE_SIZE, 6) == ZONE_SIZE + 6
    assert zs.zones[1].state == ZoneState.FULL
    assert zs.counters.appends == 3
    check_invariants(zs)


@pytest.mark.parametrize(
    ("zslba", "nlb", "status"),
    [
        (1, 1, Status.INVALID_FIELD),  # not a zone start
        (ZONE_SIZE + 3, 1, Status.INVALID_FIELD),
        (0, ZONE_CAP - 1, Status.ZONE_BOUNDARY_ERROR),  # 2 written + 11 > 12
        (4 * ZONE_SIZE, 1, Status.LBA_OUT_OF_RANGE),
    ],
)
def test_append_rules(zslba, nlb, status):
    zs = zone_set(4)
    zs.append(0, 2)
    refused(status, zs.append, zslba, nlb)
    assert zs.zones[0].wp == 2
    assert zs.counters.appends == 1


@pytest.mark.parametrize(
    ("state", "status"),
    [(ZoneState.FULL, Status.ZONE_IS_FULL), (ZoneState.READ_ONLY, Status.ZONE_IS_READ_ONLY), (ZoneState.OFFLINE, Status.ZONE_IS_OFFLINE)],
)
def test_append_to_an_unwritable_zone(state, status):
    zs = zone_set(2)
    put_in_state(zs, 0, state)
    refused(status, zs.append, 0, 1)


def test_reads_inside_a_zone_and_above_the_write_pointer_are_allowed():
    zs = zone_set(2)
    zs.write(0, 2)
    zs.check_read(0, ZONE_SIZE)  # past the write pointer and the capacity: zeros, no error
    put_in_state(zs, 1, ZoneState.READ_ONLY)
    zs.check_read(ZONE_SIZE, 4)


@pytest.mark.parametrize(("cross", "status"), [(False, Status.ZONE_BOUNDARY_ERROR), (True, None)])
def test_read_across_zone_boundaries(cross, status):
    zs = zone_set(3, cross_zone_read=cross)
    if status is None:
        zs.check_read(ZONE_SIZE - 1, ZONE_SIZE + 2)
    else:
        refused(status, zs.check_read, ZONE_SIZE - 1, 2)


@pytest.mark.parametrize(("cross", "slba", "nlb"), [(False, ZONE_SIZE, 1), (True, ZONE_SIZE - 2, 4), (True, 0, 3 * ZONE_SIZE)])
def test_read_from_an_offline_zone(cross, slba, nlb):
    zs = zone_set(3, cross_zone_read=cross)
    zs.make_offline(1)
    refused(Status.ZONE_IS_OFFLINE, zs.check_read, slba, nlb)


def test_read_past_the_namespace():
    refused(Status.LBA_OUT_OF_RANGE, zone_set(2).check_read, 2 * ZONE_SIZE - 1, 2)


def test_reset_returns_the_written_lbas_to_deallocate():
    zs = zone_set(4)
    zs.write(0, 5)
    zs.append(ZONE_SIZE, 2)
    zs.send(ZoneSendAction.CLOSE, ZONE_SIZE)
    zs.send(ZoneSendAction.FINISH, 2 * ZONE_SIZE)
    assert zs.send(ZoneSendAction.RESET, 0) == [(0, 5)]
    assert zs.send(ZoneSendAction.RESET, 0) == []  # Empty: nothing written
    assert zs.send(ZoneSendAction.RESET, 0, select_all=True) == [(ZONE_SIZE, 2), (2 * ZONE_SIZE, ZONE_CAP)]
    assert [z.state for z in zs.zones] == [ZoneState.EMPTY] * 4
    assert all(z.wp == z.zslba for z in zs.zones)
    assert zs.counters.resets == 4
    check_invariants(zs)


def test_reset_clears_the_controller_set_attributes():
    zs = zone_set(2)
    zs.write(0, 1)
    zs.finish_by_controller(0)
    assert zs.zones[0].attrs == 1  # ZFC
    zs.send(ZoneSendAction.RESET, 0)
    assert zs.zones[0].attrs == 0


def test_stats():
    zs = zone_set(4, max_open=2, max_active=3)
    zs.write(0, 1)
    zs.append(ZONE_SIZE, 1)
    zs.send(ZoneSendAction.FINISH, 2 * ZONE_SIZE)
    zs.make_read_only(3)
    zs.send(ZoneSendAction.RESET, 2 * ZONE_SIZE)
    s = zs.stats()
    assert s["zones_implicitly_opened"] == 2
    assert s["zones_read_only"] == 1
    assert s["zones_empty"] == 1
    assert s["zones_full"] == 0
    assert (s["open"], s["active"], s["max_open"], s["max_active"]) == (2, 2, 2, 3)
    assert (s["writes"], s["appends"], s["resets"], s["finishes"]) == (1, 1, 1, 1)
    assert sum(v for k, v in s.items() if k.startswith("zones_")) == s["zones"] == 4
