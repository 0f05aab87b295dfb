"""ZNS layouts: exact sizes and hand-computed offsets."""

from __future__ import annotations

import struct

import pytest

from nvme_emu.spec.commands import Status
from nvme_emu.spec.events import AsyncEventConfig, AsyncEventNotice
from nvme_emu.spec.log_pages import LogPageId
from nvme_emu.spec.zns import Ozcs, ZnsOpcode, ZoneSendAction, ZoneState
from nvme_emu.zoned import structures as zst
from nvme_emu.zoned.structures import resources_field
from nvme_emu.zoned.zone_set import Zone


@pytest.mark.parametrize("name", sorted(zst.LAYOUT_SIZES))
def test_layout_sizes(name):
    layout, size = zst.LAYOUT_SIZES[name]
    assert layout.sizeof() == size
    assert len(layout.build(layout.parse(bytes(size)))) == size


def test_spec_values():
    assert [int(o) for o in ZnsOpcode] == [0x79, 0x7A, 0x7D]
    assert [int(a) for a in ZoneSendAction] == [1, 2, 3, 4, 5, 0x10]
    assert [int(s) for s in ZoneState] == [1, 2, 3, 4, 0xD, 0xE, 0xF]
    zns = [Status.ZONE_BOUNDARY_ERROR, Status.ZONE_IS_FULL, Status.ZONE_IS_READ_ONLY, Status.ZONE_IS_OFFLINE,
           Status.ZONE_INVALID_WRITE, Status.TOO_MANY_ACTIVE_ZONES, Status.TOO_MANY_OPEN_ZONES, Status.INVALID_ZONE_STATE_TRANSITION]
    assert [(s.sct, s.sc) for s in zns] == [(1, sc) for sc in range(0xB8, 0xC0)]
    assert LogPageId.CHANGED_ZONE_LIST == 0xBF
    assert AsyncEventNotice.ZONE_DESCRIPTOR_CHANGED == 0xEF
    assert AsyncEventConfig.ZONE_DESCRIPTOR_CHANGED == 1 << 27


def test_zone_descriptor_offsets():
    zone = Zone(index=3, zslba=0x3000, zcap=0x800, wp=0x3010, state=ZoneState.CLOSED, attrs=0x84)
    d = zst.build_zone_descriptor(zone)
    assert d[:4] == bytes([0x02, 0x40, 0x84, 0x00])
    assert struct.unpack_from("<QQQ", d, 8) == (0x800, 0x3000, 0x3010)


def test_identify_namespace_zns_offsets():
    b = zst.build_identify_namespace_zns(zone_size=0x8000, lbaf_count=2, ozcs=int(Ozcs.RAZB), mar=resources_field(14), mor=resources_field(0), rrl=7, frl=9)
    assert len(b) == 4096
    assert struct.unpack_from("<HHIIII", b, 0) == (0, 1, 13, 0xFFFF_FFFF, 7, 9)
    assert struct.unpack_from("<QB", b, 2816) == (0x8000, 0)
    assert struct.unpack_from("<QB", b, 2816 + 16) == (0x8000, 0)
    assert struct.unpack_from("<Q", b, 2816 + 32)[0] == 0
    assert b[3840:] == bytes(256)
    with pytest.raises(TypeError):
        zst.build_identify_namespace_zns(zone_size=1, bogus=1)


def test_identify_namespace_zns_defaults_to_no_limits():
    b = zst.build_identify_namespace_zns(zone_size=16)
    assert struct.unpack_from("<II", b, 4) == (0xFFFF_FFFF, 0xFFFF_FFFF)


def test_identify_controller_zns():
    b = zst.build_identify_controller_zns(zasl=5)
    assert len(b) == 4096 and b[0] == 5 and b[1:] == bytes(4095)
