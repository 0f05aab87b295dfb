"""Controller registers in-process (no socket): what a Controller Reset keeps, and CC writes
with reserved values."""

from __future__ import annotations

import pytest

from .area_helpers import ADMIN_CQ, ADMIN_SQ, Guest
from nvme_emu.backends.ram import RamBackend
from nvme_emu.controller import Controller
from nvme_emu.namespace import Namespace
from nvme_emu.spec.commands import CQES_LOG2, SQES_LOG2
from nvme_emu.spec.events import AsyncEventError
from nvme_emu.spec.registers import NSSR_RESET_VALUE, Cc, Csts, Reg, Shn

AQA_32_32 = 31 << 16 | 31
CC_ENABLE = Cc.EN | SQES_LOG2 << Cc.IOSQES_SHIFT | CQES_LOG2 << Cc.IOCQES_SHIFT


@pytest.fixture
def ctrl():
    guest = Guest()
    c = Controller([Namespace(1, RamBackend(1 << 20))])
    c.attach_host(guest.memory, lambda vector: None)
    yield c
    c.close()
    guest.close()


def reg(c: Controller, offset: int, size: int = 4) -> int:
    return int.from_bytes(c.read_register(offset, size), "little")


def write(c: Controller, offset: int, value: int, size: int = 4) -> None:
    c.write_register(offset, value.to_bytes(size, "little"))


def enable(c: Controller) -> None:
    write(c, Reg.AQA, AQA_32_32)
    write(c, Reg.ASQ, ADMIN_SQ, 8)
    write(c, Reg.ACQ, ADMIN_CQ, 8)
    write(c, Reg.CC, CC_ENABLE)
    assert reg(c, Reg.CSTS) & Csts.RDY


def test_controller_reset_keeps_admin_queue_registers(ctrl):
    enable(ctrl)
    write(ctrl, Reg.CC, 0)  # CC.EN 1 -> 0
    assert not reg(ctrl, Reg.CSTS) & Csts.RDY
    assert reg(ctrl, Reg.AQA) == AQA_32_32
    assert reg(ctrl, Reg.ASQ, 8) == ADMIN_SQ
    assert reg(ctrl, Reg.ACQ, 8) == ADMIN_CQ
    write(ctrl, Reg.CC, CC_ENABLE)  # re-enable without programming them again
    assert reg(ctrl, Reg.CSTS) & Csts.RDY and not reg(ctrl, Reg.CSTS) & Csts.CFS
    assert ctrl.state.sqs[0].ring.base == ADMIN_SQ


def test_subsystem_reset_clears_admin_queue_registers(ctrl):
    enable(ctrl)
    write(ctrl, Reg.NSSR, NSSR_RESET_VALUE)
    assert reg(ctrl, Reg.AQA) == 0 and reg(ctrl, Reg.ASQ, 8) == 0 and reg(ctrl, Reg.ACQ, 8) == 0


def test_reserved_shn_is_ignored_whole_write_applies(ctrl):
    enable(ctrl)
    write(ctrl, Reg.CC, CC_ENABLE | 0b11 << Cc.SHN_SHIFT)  # no exception
    cc = reg(ctrl, Reg.CC)
    assert cc & Cc.EN and (cc >> Cc.SHN_SHIFT) & Cc.SHN_MASK == Shn.NONE
    assert (reg(ctrl, Reg.CSTS) >> Csts.SHST_SHIFT) & Csts.SHST_MASK == 0
    # a later valid shutdown still works
    write(ctrl, Reg.CC, CC_ENABLE | Shn.NORMAL << Cc.SHN_SHIFT)
    assert (reg(ctrl, Reg.CSTS) >> Csts.SHST_SHIFT) & Csts.SHST_MASK == 0b10


def test_invalid_doorbells_leave_error_information_entries(ctrl):
    enable(ctrl)
    ctrl.doorbell(5, False, 1)  # SQ 5 does not exist
    ctrl.doorbell(0, False, 99)  # beyond the admin SQ's 32 entries
    ctrl.doorbell(7, True, 0)  # CQ 7 does not exist
    entries = list(ctrl.state.error_log.entries)  # newest first
    assert [(e["sqid"], e["cid"]) for e in entries] == [(0xFFFF, 0xFFFF), (0, 0xFFFF), (5, 0xFFFF)]
    assert [info for _, info, _ in ctrl.state.events.queued] == [
        AsyncEventError.INVALID_DOORBELL_REGISTER,
        AsyncEventError.INVALID_DOORBELL_WRITE_VALUE,
    ]  # the third is the same event as the first: it waits once
