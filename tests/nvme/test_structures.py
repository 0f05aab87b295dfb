"""Identify and log page layouts: exact sizes, hand-computed offsets, round trips."""

from __future__ import annotations

import struct
import uuid

import pytest

from nvme_emu import structures as st
from nvme_emu.spec.commands import NSID_ALL, AdminOpcode, NvmOpcode, NvmeError, Status
from nvme_emu.spec.events import AsyncEventType, async_event_dw0
from nvme_emu.spec.identify import Csi, Ctratt, IoCommandSetVector, Oacs, Oaes, flbas_decode, flbas_encode
from nvme_emu.spec.log_pages import CommandEffects, LogPageId
from nvme_emu.spec.registers import NVME_VERSION, cq_head_doorbell, sq_tail_doorbell


@pytest.mark.parametrize("name", sorted(st.LAYOUT_SIZES))
def test_layout_sizes(name):
    layout, size = st.LAYOUT_SIZES[name]
    assert layout.sizeof() == size
    assert len(layout.build(layout.parse(bytes(size)))) == size


def u16(b, off):
    return struct.unpack_from("<H", b, off)[0]


def u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def u64(b, off):
    return struct.unpack_from("<Q", b, off)[0]


def test_identify_controller_offsets():
    b = st.build_identify_controller(
        vid=0x1234, ssvid=0x5678, sn="SER123", mn="Model X", fr="FW1.0", mdts=5, cntlid=0x42,
        oaes=int(Oaes.NAMESPACE_ATTRIBUTE), ctratt=int(Ctratt.HOST_ID_128BIT),
        oacs=int(Oacs.FORMAT_NVM | Oacs.DOORBELL_BUFFER_CONFIG), acl=3, aerl=7,
        lpa=0x7, elpe=15, npss=0, wctemp=343, cctemp=373, tnvmcap=1 << 100, kas=10,
        nn=256, oncs=0x1FF, vwc=7, sgls=0x1_0001, subnqn="nqn.2014-08.org.example:sub", cntrltype=1,
        psd=[dict(mp=2500, enlat=10, exlat=20)],
    )
    assert len(b) == 4096
    assert u16(b, 0) == 0x1234 and u16(b, 2) == 0x5678
    assert b[4:24] == b"SER123".ljust(20, b" ")
    assert b[24:64] == b"Model X".ljust(40, b" ")
    assert b[64:72] == b"FW1.0   "
    assert b[77] == 5
    assert u16(b, 78) == 0x42
    assert u32(b, 80) == 0x00020000
    assert u32(b, 92) == 1 << 8
    assert u32(b, 96) == 1
    assert b[111] == 1
    assert u16(b, 256) == (1 << 1) | (1 << 8)
    assert (b[258], b[259], b[261], b[262], b[263]) == (3, 7, 7, 15, 0)
    assert u16(b, 266) == 343 and u16(b, 268) == 373
    assert int.from_bytes(b[280:296], "little") == 1 << 100
    assert u16(b, 320) == 10
    assert b[512] == 0x66 and b[513] == 0x44
    assert u32(b, 516) == 256
    assert u16(b, 520) == 0x1FF
    assert b[525] == 7
    assert u32(b, 536) == 0x1_0001
    assert b[768:795] == b"nqn.2014-08.org.example:sub" and b[795] == 0
    # power state descriptor 0 at 2048: MP u16, ENLAT at +4, EXLAT at +8
    assert u16(b, 2048) == 2500 and u32(b, 2052) == 10 and u32(b, 2056) == 20
    assert b[2080:4096] == bytes(2016)


def test_identify_controller_round_trip_and_unknown_field():
    b = st.build_identify_controller(sn="ABC", nn=3, mdts=6)
    c = st.IdentifyController.parse(b)
    assert (c.sn, c.nn, c.mdts, c.ver) == ("ABC", 3, 6, NVME_VERSION)
    assert st.IdentifyController.build(c) == b
    with pytest.raises(TypeError, match="nnn"):
        st.build_identify_controller(nnn=3)
    with pytest.raises(ValueError):
        st.build_identify_controller(sn="X" * 21)


def test_identify_namespace_offsets():
    nguid = bytes(range(1, 17))
    eui = bytes(range(0xA0, 0xA8))
    b = st.build_identify_namespace(
        nsze=1000, ncap=900, nuse=10, nsfeat=0, flbas=1, dlfeat=9, nvmcap=512000, npwg=7, mssrl=128,
        mcl=1024, msrc=7, anagrpid=3, nsattr=1, nguid=nguid, eui64=eui, lbaf=[(0, 9, 0), (8, 12, 2)],
    )
    assert len(b) == 4096
    assert u64(b, 0) == 1000 and u64(b, 8) == 900 and u64(b, 16) == 10
    assert b[25] == 1  # NLBAF, 0-based: two formats
    assert b[26] == 1 and b[33] == 9
    assert int.from_bytes(b[48:64], "little") == 512000
    assert u16(b, 64) == 7 and u16(b, 74) == 128 and u32(b, 76) == 1024 and b[80] == 7
    assert u32(b, 92) == 3 and b[99] == 1
    assert b[104:120] == nguid and b[120:128] == eui
    assert b[128:132] == bytes([0, 0, 9, 0])
    assert b[132:136] == bytes([8, 0, 12, 2])
    assert b[136:384] == bytes(248)
    ns = st.IdentifyNamespace.parse(b)
    assert ns.lbaf[1].lbads == 12 and ns.nguid == nguid
    assert st.IdentifyNamespace.build(ns) == b


def test_flbas_encoding():
    assert flbas_encode(1) == 1
    assert flbas_encode(17) == 0x21
    assert all(flbas_decode(flbas_encode(i)) == i for i in range(64))


def test_ns_id_descriptors():
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    b = st.build_ns_id_descriptors(eui64=b"\x02" * 8, nguid=b"\x11" * 16, uuid=u, csi=Csi.NVM)
    assert len(b) == 4096
    assert b[0:4] == bytes([1, 8, 0, 0]) and b[4:12] == b"\x02" * 8
    assert b[12:16] == bytes([2, 16, 0, 0]) and b[16:32] == b"\x11" * 16
    assert b[32:36] == bytes([3, 16, 0, 0]) and b[36:52] == u.bytes
    assert b[52:56] == bytes([4, 1, 0, 0]) and b[56] == 0
    assert b[57:] == bytes(4096 - 57)
    assert st.parse_ns_id_descriptors(b) == [(1, b"\x02" * 8), (2, b"\x11" * 16), (3, u.bytes), (4, b"\0")]
    # an all-zero identifier means "not reported" and is left out
    assert st.parse_ns_id_descriptors(st.build_ns_id_descriptors(eui64=bytes(8), csi=0)) == [(4, b"\0")]
    with pytest.raises(ValueError):
        st.build_ns_id_descriptors(eui64=b"\x01" * 7)


def test_independent_and_nvm_specific_pages():
    b = st.build_identify_namespace_independent(nmic=1, anagrpid=5, nvmsetid=2, endgid=3)
    assert b[1] == 1 and u32(b, 4) == 5 and u16(b, 10) == 2 and u16(b, 12) == 3 and b[14] == 1
    b = st.build_identify_controller_nvm(vsl=7, wzsl=8, wusl=9, dmrl=255, dmrsl=0x10000, dmsl=1 << 40)
    assert b[0:4] == bytes([7, 8, 9, 255]) and u32(b, 4) == 0x10000 and u64(b, 8) == 1 << 40
    assert b[16:] == bytes(4080)
    b = st.build_identify_namespace_nvm(lbstm=0xFF, pic=1, elbaf=[5, 6])
    assert u64(b, 0) == 0xFF and b[8] == 1 and u32(b, 12) == 5 and u32(b, 16) == 6
    assert st.build_identify_namespace_nvm() == bytes(4096)


def test_io_command_set_and_nsid_list():
    b = st.build_identify_io_command_set([IoCommandSetVector.NVM, 0b101])
    assert u64(b, 0) == 1 and u64(b, 8) == 5 and b[16:] == bytes(4080)
    b = st.build_nsid_list([5, 1, 3, 3], greater_than=1)
    assert u32(b, 0) == 3 and u32(b, 4) == 5 and u32(b, 8) == 0
    b = st.build_nsid_list(range(1, 2000))
    assert u32(b, 4092) == 1024


def test_error_log_entry():
    b = st.build_error_log_entry(error_count=7, sqid=1, cid=0x99, status=0x80 << 1, lba=123, nsid=1, opcode=2, lpver=1)
    assert u64(b, 0) == 7 and u16(b, 8) == 1 and u16(b, 10) == 0x99 and u16(b, 12) == 0x100
    assert u16(b, 14) == 0xFFFF and u64(b, 16) == 123 and u32(b, 24) == 1 and b[31] == 2 and b[63] == 1
    e = st.ErrorLogEntry.parse(b)
    assert st.ErrorLogEntry.build(e) == b


def test_smart_log():
    b = st.build_smart_log(
        critical_warning=0, composite_temperature=310, data_units_read=(1 << 70) + 5, data_units_written=2,
        host_read_commands=3, host_write_commands=4, controller_busy_time=5, power_cycles=6, power_on_hours=7,
        unsafe_shutdowns=8, media_errors=9, num_error_log_entries=10, temperature_sensors=[300, 301],
    )
    assert len(b) == 512
    assert u16(b, 1) == 310 and b[3] == 100 and b[4] == 10
    assert int.from_bytes(b[32:48], "little") == (1 << 70) + 5
    for i, off in enumerate(range(48, 192, 16), start=2):
        assert int.from_bytes(b[off : off + 16], "little") == i
    assert u16(b, 200) == 300 and u16(b, 202) == 301
    s = st.SmartLog.parse(b)
    assert s.data_units_read == (1 << 70) + 5
    assert st.SmartLog.build(s) == b
    assert st.smart_data_units(0) == 0
    assert st.smart_data_units(1) == 1
    assert st.smart_data_units(512_000) == 1
    assert st.smart_data_units(512_001) == 2


def test_firmware_slot_changed_ns_effects_supported_logs():
    b = st.build_firmware_slot_log(afi=1, frs=["1.0"])
    assert b[0] == 1 and b[8:16] == b"1.0     " and b[16:64] == bytes(48)
    b = st.build_changed_ns_list([4, 2])
    assert u32(b, 0) == 2 and u32(b, 4) == 4 and u32(b, 8) == 0
    assert u32(st.build_changed_ns_list(range(1, 1100)), 0) == NSID_ALL
    b = st.build_commands_effects_log(
        {AdminOpcode.IDENTIFY: CommandEffects.CSUPP},
        {NvmOpcode.WRITE: CommandEffects.CSUPP | CommandEffects.LBCC},
    )
    assert u32(b, 4 * 6) == 1 and u32(b, 1024 + 4 * 1) == 3 and b[2048:] == bytes(2048)
    b = st.build_supported_log_pages([0, 1, 2])
    assert len(b) == 1024 and u32(b, 0) == 1 and u32(b, 8) == 1 and u32(b, 12) == 0


def test_spec_status_values():
    S = Status
    assert (S.INVALID_FIELD, S.DATA_TRANSFER_ERROR, S.PRP_OFFSET_INVALID, S.LBA_OUT_OF_RANGE) == (2, 4, 0x13, 0x80)
    assert (S.INVALID_SGL_SEGMENT_DESCRIPTOR, S.INVALID_NUMBER_OF_SGL_DESCRIPTORS, S.DATA_SGL_LENGTH_INVALID) == (0xD, 0xE, 0xF)
    assert (S.SGL_DESCRIPTOR_TYPE_INVALID, S.CAPACITY_EXCEEDED, S.NAMESPACE_NOT_READY, S.FORMAT_IN_PROGRESS) == (0x11, 0x81, 0x82, 0x84)
    assert (S.COMPLETION_QUEUE_INVALID, S.INVALID_QUEUE_DELETION, S.INVALID_LOG_PAGE, S.INVALID_FORMAT) == (0x100, 0x10C, 0x109, 0x10A)
    assert (S.CONFLICTING_ATTRIBUTES, S.ATTEMPTED_WRITE_TO_READ_ONLY_RANGE) == (0x180, 0x182)
    assert (S.WRITE_FAULT, S.UNRECOVERED_READ_ERROR, S.COMPARE_FAILURE, S.ACCESS_DENIED) == (0x280, 0x281, 0x285, 0x286)
    assert S.COMPARE_FAILURE.sct == 2 and S.COMPARE_FAILURE.sc == 0x85
    e = NvmeError(S.LBA_OUT_OF_RANGE)
    assert e.dnr and e.status_field == 0x80 | (1 << 14)
    assert NvmeError(S.INTERNAL_ERROR, dnr=False, more=True).status_field == 0x6 | (1 << 13)
    assert sq_tail_doorbell(0) == 0x1000 and cq_head_doorbell(0) == 0x1004
    assert sq_tail_doorbell(2, dstrd=1) == 0x1000 + 4 * 8 and cq_head_doorbell(1) == 0x100C
    assert async_event_dw0(AsyncEventType.NOTICE, 0, LogPageId.CHANGED_NAMESPACE_LIST) == 0x040002
