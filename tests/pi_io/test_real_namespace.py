"""The metadata commands on a real RAM namespace with PI (the namespace side's store, not the
fake): a write with PRACT read back with every check, a guard corrupted by the control plane's
fault (nvme_emu.pi_faults) failing exactly its block, Deallocate giving metadata whose PI
escapes every check, and a Write repairing the damage."""

from __future__ import annotations

import os
import struct

import pytest

from nvme_emu.namespace_spec import open_namespace
from nvme_emu.nvm import NvmCommands
from nvme_emu.pi.engine import PiField
from nvme_emu.pi.format import Prinfo
from nvme_emu.pi_faults import corrupt_pi
from nvme_emu.spec.commands import NvmOpcode, Status
from nvme_emu.sqe import SQE
from tests.nvme_areas.area_helpers import BUF, Area
from tests.pi_io.test_nvm_hooks import cmd

SLBA, NLB = 16, 8
DSM_RANGES = BUF + 0x30000


@pytest.fixture
def ns(area: Area):
    with open_namespace("ram:size=1M,lba=512,ms=8,pi=1", 1) as ns:
        area.state.namespaces[1] = ns
        yield ns


def status(nvm: NvmCommands, area: Area, e: tuple) -> int:
    return nvm.execute(area.admin_sq, e)[0] & 0x7FF


def read_all_checks(slba: int, nlb: int) -> tuple:
    return cmd(NvmOpcode.READ, slba, nlb, prinfo=Prinfo.PRCHK_ALL, cdw14=slba, cdw15=0xFFFF << 16 | 0x4242)


def test_corruption_fails_exactly_its_block_and_a_write_repairs_it(area: Area, ns) -> None:
    nvm = NvmCommands(area.state, area.hooks)
    data = os.urandom(NLB * 512)
    area.guest.write(BUF, data)
    assert status(nvm, area, cmd(NvmOpcode.WRITE, SLBA, NLB, prinfo=Prinfo.PRACT, cdw14=SLBA, cdw15=0x4242)) == Status.SUCCESS
    area.guest.write(BUF, bytes(NLB * 512))
    assert status(nvm, area, read_all_checks(SLBA, NLB)) == Status.SUCCESS
    assert area.guest.read(BUF, NLB * 512) == data

    for field in PiField:
        corrupt_pi(ns, field, SLBA + 3, 1)
        assert status(nvm, area, read_all_checks(SLBA, NLB)) == field.status
        assert area.state.error_log.entries[0]["lba"] == SLBA + 3
        assert status(nvm, area, read_all_checks(SLBA, 3)) == Status.SUCCESS      # the blocks before
        assert status(nvm, area, read_all_checks(SLBA + 4, 4)) == Status.SUCCESS  # and after
        # PRACT on the write regenerates the block's PI: repaired
        area.guest.write(BUF, data[3 * 512 : 4 * 512])
        e = cmd(NvmOpcode.WRITE, SLBA + 3, 1, prinfo=Prinfo.PRACT, cdw14=SLBA + 3, cdw15=0x4242)
        assert status(nvm, area, e) == Status.SUCCESS
        assert status(nvm, area, read_all_checks(SLBA, NLB)) == Status.SUCCESS


def test_corrupting_outside_or_without_pi_is_refused(ns) -> None:
    with pytest.raises(ValueError, match="outside"):
        corrupt_pi(ns, PiField.GUARD, ns.nsze - 1, 2)
    with open_namespace("ram:size=1M,lba=512", 2) as plain, pytest.raises(ValueError, match="no protection information"):
        corrupt_pi(plain, PiField.GUARD, 0, 1)


def test_deallocated_blocks_escape_every_check(area: Area, ns) -> None:
    nvm = NvmCommands(area.state, area.hooks)
    area.guest.write(BUF, os.urandom(NLB * 512))
    assert status(nvm, area, cmd(NvmOpcode.WRITE, SLBA, NLB, prinfo=Prinfo.PRACT, cdw14=SLBA, cdw15=0x4242)) == Status.SUCCESS
    corrupt_pi(ns, PiField.GUARD, SLBA, NLB)
    assert status(nvm, area, read_all_checks(SLBA, NLB)) == Status.END_TO_END_GUARD_CHECK_ERROR
    # Dataset Management, Deallocate (AD), one range: the blocks' data and metadata go
    area.guest.write(DSM_RANGES, struct.pack("<IIQ", 0, NLB, SLBA))
    e = SQE.unpack(SQE.pack(NvmOpcode.DATASET_MANAGEMENT, 0, 8, 1, 0, 0, 0, DSM_RANGES, 0, 0, 1 << 2, 0, 0, 0, 0))
    assert status(nvm, area, e) == Status.SUCCESS
    assert status(nvm, area, read_all_checks(SLBA, NLB)) == Status.SUCCESS
    assert area.guest.read(BUF, NLB * 512) == bytes(NLB * 512)
    assert bytes(ns.read_meta(SLBA, 1)) == b"\xff" * 8  # the PI escape: application tag FFFFh, reference tag all ones
