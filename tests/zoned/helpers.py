"""Zone sets in a chosen state, and the invariants every zone set keeps."""

from __future__ import annotations

from nvme_emu.spec.zns import ACTIVE_STATES, OPEN_STATES, ZoneSendAction, ZoneState
from nvme_emu.zoned.zone_set import ZoneSet

ZONE_SIZE = 16
ZONE_CAP = 12  # smaller than the zone: LBAs 12..15 of each zone are not writable


def zone_set(zones: int = 4, **kw) -> ZoneSet:
    kw.setdefault("zone_capacity", ZONE_CAP)
    return ZoneSet(zones * ZONE_SIZE, ZONE_SIZE, **kw)


def put_in_state(zs: ZoneSet, index: int, state: ZoneState) -> None:
    """Drive zone ``index`` to ``state`` the way a host and the control plane would."""
    zslba = zs.zones[index].zslba
    if state == ZoneState.IMPLICITLY_OPENED:
        zs.write(zslba, 1)
    elif state == ZoneState.EXPLICITLY_OPENED:
        zs.send(ZoneSendAction.OPEN, zslba)
    elif state == ZoneState.CLOSED:
        zs.write(zslba, 1)
        zs.send(ZoneSendAction.CLOSE, zslba)
    elif state == ZoneState.FULL:
        zs.write(zslba, 3)
        zs.send(ZoneSendAction.FINISH, zslba)
    elif state == ZoneState.READ_ONLY:
        zs.write(zslba, 2)
        zs.make_read_only(index)
    elif state == ZoneState.OFFLINE:
        zs.make_read_only(index)
        zs.send(ZoneSendAction.OFFLINE, zslba)
    assert zs.zones[index].state == state
    check_invariants(zs)


def check_invariants(zs: ZoneSet) -> None:
    """The counters agree with the zones, and the limits hold."""
    opened = [z.index for z in zs.zones if z.state in OPEN_STATES]
    active = [z.index for z in zs.zones if z.state in ACTIVE_STATES]
    assert zs.open_count == len(opened)
    assert zs.active_count == len(active)
    assert set(zs._implicit) == {z.index for z in zs.zones if z.state == ZoneState.IMPLICITLY_OPENED}
    if zs.max_open:
        assert zs.open_count <= zs.max_open
    if zs.max_active:
        assert zs.active_count <= zs.max_active
    for z in zs.zones:
        assert z.zslba <= z.wp <= z.write_boundary
        if z.state == ZoneState.EMPTY:
            assert z.wp == z.zslba
        if z.state == ZoneState.FULL:
            assert z.wp == z.write_boundary
