"""The Zoned command set's I/O in-process: real SQEs through the dispatcher into a zoned RAM
namespace: Write, Read, Zone Append (and the LBA its completion carries), Write Zeroes,
Dataset Management, Copy, Compare, Verify, with every zone status the spec names."""

from __future__ import annotations

import dataclasses
import os
import struct

from nvme_emu.backends.file import FileBackend
from nvme_emu.namespace import Namespace
from nvme_emu.outcome import DEFERRED
from nvme_emu.spec.commands import DsmAttr, NvmOpcode, RwCdw12, Status
from nvme_emu.spec.registers import Cc, CcCss
from nvme_emu.spec.zns import ZnsOpcode, ZoneState

from ..nvme_areas.area_helpers import BUF, KeptPool
from .area import GEOMETRY, LBA, ZONE_CAP_LBAS, ZONE_LBAS, ZONES, Zoned, ZoneSendAction, make_zoned


def test_namespace_is_whole_zones_and_not_plain(zoned: Zoned):
    assert zoned.ns.nsze == ZONES * ZONE_LBAS  # the 3-LBA tail is not exposed
    assert zoned.zones.num_zones == ZONES
    assert not zoned.ns.plain_rw and not zoned.ns.rw_is_plain()
    assert zoned.area.state.namespaces[1].zones is None  # the NVM namespace's attribute
    assert zoned.rw(NvmOpcode.READ, ZONES * ZONE_LBAS, 1) == Status.LBA_OUT_OF_RANGE


def test_sequential_writes_move_the_write_pointer(zoned: Zoned):
    data = os.urandom(8 * LBA)
    assert zoned.write(0, 8, data) == Status.SUCCESS
    zone = zoned.zones.zones[0]
    assert (zone.state, zone.wp) == (ZoneState.IMPLICITLY_OPENED, 8)
    assert zoned.write(8, 8) == Status.SUCCESS
    assert zoned.read(0, 8) == data
    assert zoned.read(16, 4) == bytes(4 * LBA)  # above the write pointer: zeros
    assert zoned.ns.stats.write_commands == 2  # counted by the namespace door, as NVM's


def test_write_statuses(zoned: Zoned):
    assert zoned.write(4, 1) == Status.ZONE_INVALID_WRITE  # not at the write pointer
    assert zoned.write(0, 16) == Status.SUCCESS
    assert zoned.write(16, ZONE_CAP_LBAS - 16 + 1) == Status.ZONE_BOUNDARY_ERROR  # past the capacity
    assert zoned.write(16, ZONE_CAP_LBAS - 16) == Status.SUCCESS
    assert zoned.zones.zones[0].state == ZoneState.FULL
    assert zoned.write(ZONE_CAP_LBAS, 1) == Status.ZONE_IS_FULL
    zoned.zones.make_read_only(1)
    assert zoned.write(zoned.zslba(1), 1) == Status.ZONE_IS_READ_ONLY
    zoned.zones.make_offline(2)
    assert zoned.write(zoned.zslba(2), 1) == Status.ZONE_IS_OFFLINE
    assert zoned.write(ZONES * ZONE_LBAS - 1, 2) == Status.LBA_OUT_OF_RANGE
    # a refused write moved nothing
    assert [z.wp for z in zoned.zones.zones[3:5]] == [zoned.zslba(3), zoned.zslba(4)]


def test_a_bad_data_pointer_leaves_the_zone_alone(zoned: Zoned):
    """The buffer is checked before the zone moves: no write pointer past unwritten data."""
    assert zoned.rw(NvmOpcode.WRITE, 0, 2, prp1=BUF + 1) != Status.SUCCESS
    assert zoned.zones.zones[0].wp == 0 and zoned.zones.zones[0].state == ZoneState.EMPTY


def test_reads_across_zones_and_of_offline_zones(zoned: Zoned, guest):
    assert zoned.rw(NvmOpcode.READ, ZONE_LBAS - 2, 4) == Status.ZONE_BOUNDARY_ERROR
    assert zoned.rw(NvmOpcode.COMPARE, ZONE_LBAS - 2, 4) == Status.ZONE_BOUNDARY_ERROR
    assert zoned.rw(NvmOpcode.VERIFY, ZONE_LBAS - 2, 4) == Status.ZONE_BOUNDARY_ERROR
    zoned.zones.make_offline(3)
    for opc in (NvmOpcode.READ, NvmOpcode.COMPARE, NvmOpcode.VERIFY):
        assert zoned.rw(opc, zoned.zslba(3), 1) == Status.ZONE_IS_OFFLINE
    # Read Across Zone Boundaries (cross_read, OZCS.RAZB)
    crossing = make_zoned(guest, dataclasses.replace(GEOMETRY, cross_read=True))
    assert crossing.read(ZONE_LBAS - 2, 4) == bytes(4 * LBA)
    crossing.zones.make_offline(1)
    assert crossing.rw(NvmOpcode.READ, ZONE_LBAS - 2, 4) == Status.ZONE_IS_OFFLINE


def test_compare_and_verify_in_a_zone(zoned: Zoned):
    data = os.urandom(4 * LBA)
    assert zoned.write(0, 4, data) == Status.SUCCESS
    zoned.guest.write(BUF, data)
    assert zoned.rw(NvmOpcode.COMPARE, 0, 4) == Status.SUCCESS
    zoned.guest.write(BUF, bytes(4 * LBA))
    assert zoned.rw(NvmOpcode.COMPARE, 0, 4) == Status.COMPARE_FAILURE
    assert zoned.rw(NvmOpcode.VERIFY, 0, 8) == Status.SUCCESS


def test_zone_append_returns_the_lba_written(zoned: Zoned):
    z1 = zoned.zslba(1)
    first, second = os.urandom(3 * LBA), os.urandom(5 * LBA)
    assert zoned.append(z1, 3, first) == (Status.SUCCESS, z1)
    assert zoned.append(z1, 5, second) == (Status.SUCCESS, z1 + 3)
    assert zoned.read(z1, 8) == first + second
    assert zoned.zones.counters.appends == 2
    assert zoned.append(z1 + 1, 1) == (Status.INVALID_FIELD, 0)  # not a zone start
    assert zoned.append(z1, ZONE_CAP_LBAS - 8 + 1)[0] == Status.ZONE_BOUNDARY_ERROR
    assert zoned.append(z1, ZONE_CAP_LBAS - 8) == (Status.SUCCESS, z1 + 8)
    assert zoned.append(z1, 1)[0] == Status.ZONE_IS_FULL
    assert zoned.append(ZONES * ZONE_LBAS, 1)[0] == Status.LBA_OUT_OF_RANGE


def test_zone_append_size_limit_is_zasl(guest):
    """ZASL 0 is the MDTS: a larger Zone Append is Invalid Field, before anything moves."""
    big = make_zoned(guest)
    big.area.state.config.mdts = 0  # one 4 KiB page
    status, _ = big.append(0, 9)
    assert status == Status.INVALID_FIELD
    assert big.zones.zones[0].wp == 0
    assert big.append(0, 8)[0] == Status.SUCCESS


def test_zone_append_on_a_file_namespace_completes_later_with_its_lba(zoned: Zoned, tmp_path):
    ns = Namespace(3, FileBackend(str(tmp_path / "zoned.img"), 1 << 20), zoned=GEOMETRY)
    state = zoned.area.state
    state.namespaces[3] = state.allocated[3] = ns
    pool = KeptPool()
    zoned.nvm.hooks = dataclasses.replace(zoned.area.hooks, io_pool=lambda: pool)
    z2 = 2 * ZONE_LBAS
    for _ in range(2):  # QD2: the second lands after the first, both before either is done
        zoned.guest.write(BUF, os.urandom(2 * LBA))
        assert zoned.execute(ZnsOpcode.ZONE_APPEND, nsid=3, cid=7, cdw10=z2, cdw12=1 | RwCdw12.FUA) is DEFERRED
    pool.finish_one()
    pool.finish_one()
    done = zoned.area.record.named("finish_request")
    assert [(cid, status, dw0) for _sq, cid, status, dw0, _stamps in done] == [(7, Status.SUCCESS, z2), (7, Status.SUCCESS, z2 + 2)]
    ns.close()


def test_write_zeroes_is_a_write_at_the_write_pointer(zoned: Zoned):
    data = os.urandom(4 * LBA)
    assert zoned.write(0, 4, data) == Status.SUCCESS
    assert zoned.rw(NvmOpcode.WRITE_ZEROES, 2, 2) == Status.ZONE_INVALID_WRITE
    assert zoned.rw(NvmOpcode.WRITE_ZEROES, 4, 4, cdw12=RwCdw12.DEAC) == Status.SUCCESS
    assert zoned.zones.zones[0].wp == 8
    assert zoned.read(0, 8) == data + bytes(4 * LBA)
    assert zoned.rw(NvmOpcode.WRITE_ZEROES, 8, ZONE_CAP_LBAS) == Status.ZONE_BOUNDARY_ERROR


def test_deallocate_leaves_zone_state_and_write_pointer(zoned: Zoned):
    assert zoned.write(0, 8) == Status.SUCCESS
    zoned.guest.write(BUF, struct.pack("<IIQ", 0, 4, 0))
    assert zoned.status(NvmOpcode.DATASET_MANAGEMENT, cdw10=0, cdw11=DsmAttr.AD) == Status.SUCCESS
    zone = zoned.zones.zones[0]
    assert (zone.state, zone.wp) == (ZoneState.IMPLICITLY_OPENED, 8)
    assert zoned.read(0, 4) == bytes(4 * LBA)


def copy_descriptors(*ranges: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<8xQH14x", slba, nlb - 1) for slba, nlb in ranges)


def test_copy_destination_is_a_write_at_the_write_pointer(zoned: Zoned):
    data = os.urandom(6 * LBA)
    assert zoned.write(0, 6, data) == Status.SUCCESS
    z1 = zoned.zslba(1)

    def copy(sdlba: int, *ranges: tuple[int, int]) -> int:
        zoned.guest.write(BUF, copy_descriptors(*ranges))
        return zoned.status(NvmOpcode.COPY, cdw10=sdlba, cdw12=len(ranges) - 1)

    assert copy(z1 + 1, (0, 2)) == Status.ZONE_INVALID_WRITE
    assert copy(z1, (0, 2), (4, 2)) == Status.SUCCESS
    assert zoned.zones.zones[1].wp == z1 + 4
    assert zoned.read(z1, 4) == data[: 2 * LBA] + data[4 * LBA :]
    assert copy(z1 + 4, (ZONE_LBAS - 1, 2)) == Status.ZONE_BOUNDARY_ERROR  # a source across zones
    zoned.zones.make_offline(5)
    assert copy(z1 + 4, (zoned.zslba(5), 1)) == Status.ZONE_IS_OFFLINE
    assert zoned.zones.zones[1].wp == z1 + 4  # refused copies moved nothing


def test_write_uncorrectable_is_not_in_the_set(zoned: Zoned):
    assert zoned.rw(NvmOpcode.WRITE_UNCORRECTABLE, 0, 1) == Status.INVALID_OPCODE
    assert zoned.rw(NvmOpcode.WRITE_UNCORRECTABLE, 0, 1, nsid=1) == Status.SUCCESS  # NVM's


def test_write_protected_zoned_namespace(zoned: Zoned):
    zoned.ns.write_protected = True
    assert zoned.write(0, 1) == Status.NAMESPACE_WRITE_PROTECTED
    assert zoned.append(0, 1)[0] == Status.NAMESPACE_WRITE_PROTECTED
    assert zoned.send(ZoneSendAction.OPEN, 0) == Status.NAMESPACE_WRITE_PROTECTED
    assert zoned.read(0, 1) == bytes(LBA)


def test_nvm_only_cc_css_makes_the_zoned_namespace_unusable(zoned: Zoned):
    """CC.CSS 000b: QEMU leaves a zoned namespace inactive; its I/O gets Invalid Namespace."""
    state = zoned.area.state
    state.cc &= ~(Cc.CSS_MASK << Cc.CSS_SHIFT)
    assert (state.cc >> Cc.CSS_SHIFT) & Cc.CSS_MASK == CcCss.NVM
    assert zoned.write(0, 1) == Status.INVALID_NAMESPACE_OR_FORMAT
    assert zoned.rw(NvmOpcode.READ, 0, 1) == Status.INVALID_NAMESPACE_OR_FORMAT
    assert zoned.send(ZoneSendAction.OPEN, 0) == Status.INVALID_NAMESPACE_OR_FORMAT
    assert zoned.rw(NvmOpcode.WRITE, 0, 1, nsid=1) == Status.SUCCESS  # the NVM namespace serves on
    assert zoned.zones.zones[0].state == ZoneState.EMPTY


def test_flush_of_a_zoned_namespace(zoned: Zoned):
    assert zoned.status(NvmOpcode.FLUSH) == Status.SUCCESS
    assert zoned.status(NvmOpcode.FLUSH, nsid=0xFFFFFFFF) == Status.SUCCESS
