"""Message definitions: the construct structs, their struct.Struct twins, the VERSION JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfio_user import messages as m
from vfio_user.constants import HEADER_SIZE, IO_FD_RECORD_SIZE, REGION_INFO_BASE_SIZE
from vfio_user.vmm.client import QEMU_CAPABILITIES

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


@given(u16, u16, u32, u32, u32)
def test_header_twins_encode_identically(msg_id, command, size, flags, error_no):
    fields = {"msg_id": msg_id, "command": command, "size": size, "flags": flags, "error_no": error_no}
    built = m.Header.build(fields)
    packed = m.HEADER.pack(msg_id, command, size, flags, error_no)
    assert built == packed
    assert len(packed) == HEADER_SIZE
    parsed = m.Header.parse(packed)
    assert (parsed.msg_id, parsed.command, parsed.size, parsed.flags, parsed.error_no) == m.HEADER.unpack(built)


@given(u64, u32, u32, st.binary(max_size=64))
def test_region_access_twins_encode_identically(offset, region, count, data):
    built = m.RegionAccess.build({"offset": offset, "region": region, "count": count, "data": data})
    assert built == m.REGION_ACCESS.pack(offset, region, count) + data
    parsed = m.RegionAccess.parse(built)
    assert (parsed.offset, parsed.region, parsed.count) == m.REGION_ACCESS.unpack_from(built)
    assert parsed.data == data


@given(u64, u64, st.binary(max_size=64))
def test_dma_access_twins_encode_identically(address, count, data):
    built = m.DmaAccess.build({"address": address, "count": count, "data": data})
    assert built == m.DMA_ACCESS.pack(address, count) + data


def test_fixed_sizes_match_the_wire():
    assert m.Header.sizeof() == 16
    assert m.DmaMap.sizeof() == 32  # QEMU: argsz 32, 48-byte message
    assert m.DmaUnmap.sizeof() == 24  # QEMU: argsz 24, 40-byte message
    assert m.DeviceInfo.sizeof() == 16
    assert m.RegionInfo.sizeof() == REGION_INFO_BASE_SIZE == 32
    assert m.IoFdRecord.sizeof() == IO_FD_RECORD_SIZE == 48
    assert m.IrqInfo.sizeof() == 16
    assert m.WriteMultiEntry.sizeof() == 24
    assert m.REGION_ACCESS.size == 16 and m.DMA_ACCESS.size == 16


def test_sparse_mmap_cap_layout():
    raw = m.SparseMmapCap.build({"next": 0, "nr_areas": 2, "reserved": 0, "areas": [{"offset": 0x1000, "size": 0x2000}, {"offset": 0x8000, "size": 0x1000}]})
    assert raw[:8] == bytes([1, 0, 1, 0, 0, 0, 0, 0])  # id 1, version 1, next 0
    assert int.from_bytes(raw[8:12], "little") == 2
    assert int.from_bytes(raw[16:24], "little") == 0x1000
    assert int.from_bytes(raw[40:48], "little") == 0x1000
    assert len(raw) == 16 + 2 * 16


def test_write_multi_layout():
    raw = m.WriteMulti.build({"wr_cnt": 2, "entries": [
        {"offset": 4, "region": 0, "count": 4, "data": b"abcd\0\0\0\0"},
        {"offset": 8, "region": 7, "count": 2, "data": b"xy" + bytes(6)},
    ]})
    assert len(raw) == 8 + 2 * 24  # 24 + 24 * wr_cnt with the header
    assert raw[8:16] == (4).to_bytes(8, "little")
    assert raw[8 + 24 + 8 : 8 + 24 + 12] == (7).to_bytes(4, "little")


def test_version_json_is_compact_and_nul_terminated():
    raw = m.encode_version_json(QEMU_CAPABILITIES)
    assert raw.endswith(b"\0") and raw.count(b"\0") == 1
    assert b", " not in raw and b": " not in raw
    assert json.loads(raw[:-1]) == {"capabilities": QEMU_CAPABILITIES}
    assert m.decode_version_json(raw) == QEMU_CAPABILITIES


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"capabilities":{}}', id="no-nul"),
        pytest.param(b"[1,2]\0", id="not-an-object"),
        pytest.param(b'{"capabilities":[]}\0', id="caps-not-an-object"),
        pytest.param(b"{not json\0", id="syntax"),
        pytest.param(b'{"capabilities":{"a":"\xff"}}\0', id="not-utf8"),
    ],
)
def test_decode_version_json_rejects(raw):
    with pytest.raises(ValueError):
        m.decode_version_json(raw)


def test_decode_version_json_empty_forms():
    assert m.decode_version_json(b"") == {}
    assert m.decode_version_json(b"\0") == {}
    assert m.decode_version_json(b'{"other":1}\0') == {}
