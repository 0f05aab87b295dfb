"""Zone state as bytes: the round trip, what a restart leaves open (nothing), and refusal of
damaged bytes or bytes for another zone layout."""

from __future__ import annotations

import struct

import pytest

from nvme_emu.spec.zns import ZoneAttribute, ZoneSendAction, ZoneState
from nvme_emu.zoned import persist
from nvme_emu.zoned.zone_set import ZoneSet

from .helpers import ZONE_CAP, ZONE_SIZE, check_invariants, put_in_state, zone_set

LAYOUT = [
    ZoneState.EMPTY, ZoneState.IMPLICITLY_OPENED, ZoneState.EXPLICITLY_OPENED, ZoneState.CLOSED,
    ZoneState.FULL, ZoneState.READ_ONLY, ZoneState.OFFLINE, ZoneState.EMPTY,
]


def populated() -> ZoneSet:
    zs = zone_set(len(LAYOUT), max_open=3, max_active=4)
    for i, state in enumerate(LAYOUT):
        put_in_state(zs, i, state)
    zs.write(zs.zones[1].wp, 4)  # zone 1: 5 LBAs written
    zs.finish_by_controller(3)  # zone 3 Full with ZFC
    zs.write(7 * ZONE_SIZE, 2)
    zs.send(ZoneSendAction.OPEN, 7 * ZONE_SIZE)
    return zs


def snapshot(zs):
    return [(z.state, z.attrs, z.wp) for z in zs.zones]


def test_round_trip_of_zones_without_open_ones():
    zs = populated()
    zs.shutdown()
    data = persist.encode(zs)
    assert len(data) == 28 + 10 * len(LAYOUT) + 4
    fresh = zone_set(len(LAYOUT), max_open=3, max_active=4)
    persist.load(fresh, data)
    assert snapshot(fresh) == snapshot(zs)
    assert persist.encode(fresh) == data
    check_invariants(fresh)


def test_a_restart_leaves_no_zone_open():
    zs = populated()
    data = persist.encode(zs)
    fresh = zone_set(len(LAYOUT), max_open=3, max_active=4)
    persist.load(fresh, data)
    assert [z.state for z in fresh.zones] == [
        ZoneState.EMPTY,
        ZoneState.CLOSED,  # written: Closed
        ZoneState.EMPTY,  # explicitly opened, nothing written: Empty
        ZoneState.FULL,
        ZoneState.FULL,
        ZoneState.READ_ONLY,
        ZoneState.OFFLINE,
        ZoneState.CLOSED,
    ]
    assert [z.wp - z.zslba for z in fresh.zones] == [0, 5, 0, ZONE_CAP, ZONE_CAP, 2, 0, 2]
    assert fresh.zones[3].attrs == ZoneAttribute.ZFC
    assert (fresh.open_count, fresh.active_count) == (0, 2)
    check_invariants(fresh)
    fresh.write(ZONE_SIZE + 5, 1)  # the write pointer survived: writing continues after it
    assert fresh.zones[1].state == ZoneState.IMPLICITLY_OPENED


def test_decode_gives_the_geometry_and_offsets():
    image = persist.decode(persist.encode(populated()))
    assert (image.zone_size, image.zone_capacity, len(image.zones)) == (ZONE_SIZE, ZONE_CAP, len(LAYOUT))
    assert image.zones[1] == (ZoneState.IMPLICITLY_OPENED, ZoneAttribute(0), 5)


@pytest.mark.parametrize("offset", [0, 4, 6, 8, 16, 24, 28, 28 + 8, 28 + 16, 28 + 16 + 8 * 3, -1])
def test_any_damaged_byte_is_refused(offset):
    data = bytearray(persist.encode(populated()))
    data[offset] ^= 0x01
    with pytest.raises(ValueError):
        persist.decode(bytes(data))


@pytest.mark.parametrize("cut", [0, 10, 31, -1])
def test_truncated_bytes_are_refused(cut):
    data = persist.encode(populated())
    with pytest.raises(ValueError):
        persist.decode(data[:cut])


def reseal(body: bytes) -> bytes:
    import zlib

    return body + struct.pack("<I", zlib.crc32(body))


def test_version_and_magic_are_checked_before_the_rest():
    body = persist.encode(populated())[:-4]
    with pytest.raises(ValueError, match="version 2"):
        persist.decode(reseal(body[:4] + struct.pack("<H", 2) + body[6:]))
    with pytest.raises(ValueError, match="magic"):
        persist.decode(reseal(b"XXXX" + body[4:]))


def test_unknown_zone_state_is_refused():
    body = bytearray(persist.encode(populated())[:-4])
    body[28] = 0x7  # not a zone state
    with pytest.raises(ValueError, match="zone state"):
        persist.decode(reseal(bytes(body)))


@pytest.mark.parametrize(
    "other",
    [
        lambda: ZoneSet(len(LAYOUT) * ZONE_SIZE, ZONE_SIZE),  # another capacity
        lambda: zone_set(len(LAYOUT) + 1),  # more zones
        lambda: ZoneSet(len(LAYOUT) * 32, 32, ZONE_CAP),  # another zone size
    ],
)
def test_another_geometry_is_refused_and_left_alone(other):
    zs = other()
    before = snapshot(zs)
    with pytest.raises(ValueError, match="zone state for"):
        persist.load(zs, persist.encode(populated()))
    assert snapshot(zs) == before


def test_write_pointer_past_the_capacity_is_refused():
    body = bytearray(persist.encode(populated())[:-4])
    n = len(LAYOUT)
    struct.pack_into("<Q", body, 28 + 2 * n, ZONE_CAP + 1)  # zone 0's WP offset
    zs = zone_set(n, max_open=3, max_active=4)
    with pytest.raises(ValueError, match="past its capacity"):
        persist.load(zs, reseal(bytes(body)))
    assert all(z.state == ZoneState.EMPTY for z in zs.zones)
