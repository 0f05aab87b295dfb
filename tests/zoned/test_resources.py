"""Max Open and Max Active Resources: Too Many Open / Active Zones, and the auto-transition
that closes the oldest implicitly opened zone when a zone must open (QEMU's default)."""

from __future__ import annotations

import pytest

from nvme_emu.spec.commands import NvmeError, Status
from nvme_emu.spec.zns import ZoneSendAction, ZoneState

from .helpers import ZONE_SIZE, check_invariants, zone_set

E = ZoneState.EMPTY
IO = ZoneState.IMPLICITLY_OPENED
EO = ZoneState.EXPLICITLY_OPENED
C = ZoneState.CLOSED


def states(zs):
    return [z.state for z in zs.zones]


def write(zs, index, nlb=1):
    zone = zs.zones[index]
    return zs.write(zone.wp, nlb)


def refused(status, fn, *args, **kw):
    with pytest.raises(NvmeError) as e:
        fn(*args, **kw)
    assert e.value.status == status


def test_auto_transition_closes_the_oldest_implicitly_opened_zone():
    zs = zone_set(4, max_open=2)
    write(zs, 0)
    write(zs, 1)
    write(zs, 0)  # writing an open zone does not make it younger: the order is opening order
    write(zs, 2)
    assert states(zs) == [C, IO, IO, E]
    assert (zs.open_count, zs.active_count, zs.counters.auto_closes) == (2, 3, 1)
    write(zs, 3)
    assert states(zs) == [C, C, IO, IO]
    write(zs, 0)  # a Closed zone reopens the same way, closing zone 2 now
    assert states(zs) == [IO, C, C, IO]
    check_invariants(zs)


def test_without_auto_transition_the_write_fails_too_many_open():
    zs = zone_set(4, max_open=2, auto_transition=False)
    write(zs, 0)
    write(zs, 1)
    refused(Status.TOO_MANY_OPEN_ZONES, write, zs, 2)
    assert states(zs) == [IO, IO, E, E]
    check_invariants(zs)


def test_explicitly_opened_zones_are_never_auto_closed():
    zs = zone_set(4, max_open=2)
    zs.send(ZoneSendAction.OPEN, 0)
    zs.send(ZoneSendAction.OPEN, ZONE_SIZE)
    refused(Status.TOO_MANY_OPEN_ZONES, write, zs, 2)
    refused(Status.TOO_MANY_OPEN_ZONES, zs.send, ZoneSendAction.OPEN, 2 * ZONE_SIZE)
    assert states(zs) == [EO, EO, E, E]


def test_explicit_open_also_auto_closes_an_implicitly_opened_zone():
    """As QEMU: the Open Zone action takes an Open Resource the same way a write does."""
    zs = zone_set(4, max_open=2)
    write(zs, 0)
    zs.send(ZoneSendAction.OPEN, ZONE_SIZE)
    zs.send(ZoneSendAction.OPEN, 2 * ZONE_SIZE)
    assert states(zs) == [C, EO, EO, E]
    check_invariants(zs)


def test_max_active_counts_closed_zones():
    zs = zone_set(4, max_active=2)
    write(zs, 0)
    write(zs, 1)
    zs.send(ZoneSendAction.CLOSE, 0, select_all=True)
    assert states(zs) == [C, C, E, E]
    refused(Status.TOO_MANY_ACTIVE_ZONES, write, zs, 2)
    refused(Status.TOO_MANY_ACTIVE_ZONES, zs.send, ZoneSendAction.OPEN, 2 * ZONE_SIZE)
    write(zs, 0)  # a Closed zone holds its Active Resource already
    zs.send(ZoneSendAction.OPEN, ZONE_SIZE)
    assert states(zs) == [IO, EO, E, E]
    check_invariants(zs)


def test_too_many_active_is_checked_first_and_changes_nothing():
    """QEMU auto-closes before checking Active Resources; a refused write here changes no zone."""
    zs = zone_set(4, max_open=1, max_active=2)
    write(zs, 0)
    write(zs, 1)  # auto-closes zone 0
    assert states(zs) == [C, IO, E, E]
    refused(Status.TOO_MANY_ACTIVE_ZONES, write, zs, 2)
    assert states(zs) == [C, IO, E, E]
    assert zs.counters.auto_closes == 1


@pytest.mark.parametrize("action", [ZoneSendAction.FINISH, ZoneSendAction.RESET])
def test_finish_and_reset_free_the_resources(action):
    zs = zone_set(3, max_open=1, max_active=1, auto_transition=False)
    write(zs, 0)
    refused(Status.TOO_MANY_ACTIVE_ZONES, write, zs, 1)
    zs.send(action, 0)
    write(zs, 1)
    assert (zs.open_count, zs.active_count) == (1, 1)


def test_close_frees_an_open_resource_but_not_an_active_one():
    zs = zone_set(3, max_open=1, max_active=2, auto_transition=False)
    write(zs, 0)
    refused(Status.TOO_MANY_OPEN_ZONES, write, zs, 1)
    zs.send(ZoneSendAction.CLOSE, 0)
    write(zs, 1)
    assert (zs.open_count, zs.active_count) == (1, 2)


def test_open_all_fails_whole_when_the_closed_zones_do_not_fit():
    zs = zone_set(4, max_open=2)
    write(zs, 0)
    write(zs, 1)
    zs.send(ZoneSendAction.CLOSE, 0, select_all=True)
    write(zs, 2)
    assert states(zs) == [C, C, IO, E]
    refused(Status.TOO_MANY_OPEN_ZONES, zs.send, ZoneSendAction.OPEN, 0, select_all=True)
    assert states(zs) == [C, C, IO, E]
    zs.send(ZoneSendAction.RESET, 2 * ZONE_SIZE)
    zs.send(ZoneSendAction.OPEN, 0, select_all=True)
    assert states(zs) == [EO, EO, E, E]
    check_invariants(zs)


def test_read_only_and_offline_give_back_their_resources():
    zs = zone_set(3, max_open=1, max_active=1, auto_transition=False)
    write(zs, 0)
    zs.make_read_only(0)
    write(zs, 1)
    zs.make_offline(1)
    assert (zs.open_count, zs.active_count) == (0, 0)
    write(zs, 2)
    check_invariants(zs)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(zone_capacity=17), "capacity"),
        (dict(zone_capacity=0), "capacity"),
        (dict(max_open=3, max_active=2), "max_open"),
        (dict(max_open=-1), "counts"),
    ],
)
def test_configuration_is_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        zone_set(4, **kw)


def test_the_namespace_holds_whole_zones_only():
    from nvme_emu.zoned.zone_set import ZoneSet

    zs = ZoneSet(100, 16)
    assert (zs.num_zones, zs.nlbas, zs.zone_capacity) == (6, 96, 16)
    with pytest.raises(ValueError):
        ZoneSet(15, 16)
