"""Zoned namespaces from ``--namespace`` specs (ram, file, blk keys), the geometry's rules and
errors, the namespace rounded to whole zones, and the CQE's 64-bit result (Zone Append's LBA
in DW0 and DW1)."""

from __future__ import annotations

import pytest

from nvme_emu.atomics import AtomicBuffer
from nvme_emu.backends.ram import RamBackend
from nvme_emu.namespace import Namespace
from nvme_emu.namespace_spec import open_namespace, parse_namespace_spec
from nvme_emu.queue import CQE
from nvme_emu.spec.identify import Csi
from nvme_emu.zoned.geometry import DEFAULT_ZONE_SIZE, ZoneGeometry, created_geometry


def test_zoned_keys():
    spec = parse_namespace_spec("ram:size=2G,zoned,zone_size=64M,zone_cap=48M,max_open=14,max_active=14,cross_read")
    assert spec.zoned == ZoneGeometry(64 << 20, 48 << 20, 14, 14, True)
    assert parse_namespace_spec("ram:size=1G,zoned").zoned == ZoneGeometry(DEFAULT_ZONE_SIZE)
    assert parse_namespace_spec("ram:size=1G,zoned=off").zoned is None
    assert parse_namespace_spec("ram:size=1G").zoned is None
    assert parse_namespace_spec("ram:size=1G,zoned,cross_read=no").zoned == ZoneGeometry()
    assert parse_namespace_spec("file:/tmp/z.img,size=1G,zoned,zone_size=1M,lba=4096").zoned == ZoneGeometry(1 << 20)
    assert parse_namespace_spec("blk:/dev/nullb0,zoned,zone_size=256M,max_active=8").zoned == ZoneGeometry(256 << 20, max_active=8)


@pytest.mark.parametrize("text, message", [
    ("ram:size=1G,zone_size=64M", "only for a zoned namespace"),
    ("ram:size=1G,max_open=4", "only for a zoned namespace"),
    ("ram:size=1G,zoned,zone_size=48M", "not a power of two"),
    ("ram:size=1G,zoned,zone_size=256", "smaller than one 512-byte block"),
    ("ram:size=1G,zoned,zone_size=4K,lba=4096,zone_cap=2K", "not a multiple of lba=4096"),
    ("ram:size=1G,zoned,zone_size=64M,zone_cap=128M", "zone_cap"),
    ("ram:size=1G,zoned,zone_cap=0", "zone_cap"),
    ("ram:size=1G,zoned,zone_size=fast", "bad size"),
    ("ram:size=1G,zoned,max_open=-1", "must be a count"),
    ("ram:size=1G,zoned,max_open=8,max_active=4", "max_open 8 exceeds max_active 4"),
    ("ram:size=1G,zoned=perhaps", "zoned must be a boolean"),
    ("ram:size=1G,zoned,cross_read=2", "cross_read must be a boolean"),
    ("ram:size=16M,zoned,zone_size=32M", "holds no zone"),
])
def test_bad_zoned_specs(text: str, message: str):
    with pytest.raises(ValueError, match=message) as e:
        parse_namespace_spec(text)
    assert text in str(e.value)  # the error names the spec it is about


def test_unknown_key_names_the_zoned_ones():
    with pytest.raises(ValueError, match="zone_size, zone_cap, max_open, max_active, cross_read"):
        parse_namespace_spec("ram:size=1G,zones=4")


def test_open_zoned_namespaces_rounded_to_whole_zones(tmp_path):
    ns = open_namespace("ram:size=100M,zoned,zone_size=16M,zone_cap=12M", 1)
    try:
        assert ns.csi == Csi.ZONED and ns.zones is not None
        assert (ns.zones.num_zones, ns.nsze, ns.size_bytes) == (6, 6 * 32768, 96 << 20)  # 4 MiB tail dropped
        assert ns.zones.zone_capacity == 12 << 11
        assert ns.identify_fields()["nsze"] == 6 * 32768
    finally:
        ns.close()
    f = open_namespace(f"file:{tmp_path / 'z.img'},size=8M,lba=4096,zoned,zone_size=1M", 2)
    try:
        assert f.zones is not None and (f.zones.num_zones, f.zones.zone_size, f.lba_size) == (8, 256, 4096)
    finally:
        f.close()


def test_an_existing_file_too_small_for_a_zone(tmp_path):
    (tmp_path / "small.img").write_bytes(bytes(1 << 20))
    with pytest.raises(ValueError, match="holds no zone"):
        open_namespace(f"file:{tmp_path / 'small.img'},zoned,zone_size=2M", 1)


def test_a_zoned_csi_needs_a_geometry():
    with pytest.raises(ValueError, match="zone geometry"):
        Namespace(1, RamBackend(1 << 20), csi=Csi.ZONED)


def test_created_geometry():
    assert created_geometry(1 << 30, 512) == ZoneGeometry(DEFAULT_ZONE_SIZE)
    assert created_geometry(100 << 20, 512) == ZoneGeometry(64 << 20)  # the largest power of two it holds
    assert created_geometry(4096, 4096) == ZoneGeometry(4096)


def test_cqe_carries_a_64_bit_result_in_dw0_and_dw1():
    page = bytearray(4096)
    buf = AtomicBuffer(page)
    alba = 0x1_2345_6789_ABCD
    buf.store_cqe(16, alba, 0, 3, 1, 42, 1)
    dw0, dw1, sqhd, sqid, cid, sf = CQE.unpack_from(page, 16)
    assert (dw1 << 32 | dw0, sqhd, sqid, cid, sf) == (alba, 3, 1, 42, 1)
    buf.store_cqe(0, 7, 0, 0, 0, 0, 0)  # a 32-bit result leaves DW1 zero
    assert CQE.unpack_from(page, 0)[:2] == (7, 0)
