"""The CC/CSTS state machine on its own: :class:`nvme_emu.registers.Registers` over a bare
state, with hooks that record what each register write causes. No controller, no queues:
what the machine decides is here, what it causes is the hooks' business."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest

from nvme_emu.registers import RegisterHooks, Registers
from nvme_emu.spec.registers import NSSR_RESET_VALUE, Cc, CcCss, Csts, Reg, Shn, Shst
from nvme_emu.state import ControllerConfig, ControllerState
from vfio_user.dma import DmaTable, GuestMemory

AQA_32_16 = 15 << 16 | 31  # ASQS 32, ACQS 16 (0-based)
PAGE = 4096


@dataclass
class Recorder:
    calls: list[tuple] = field(default_factory=list)
    pending_flush: list[Callable[[], None]] = field(default_factory=list)

    def hooks(self) -> RegisterHooks:
        return RegisterHooks(
            controller_reset=lambda: self.calls.append(("controller_reset",)),
            subsystem_reset=lambda: self.calls.append(("subsystem_reset",)),
            create_admin_queues=lambda asqs, acqs: self.calls.append(("create_admin_queues", asqs, acqs)),
            flush_namespaces=self._flush,
            interrupts_unmasked=lambda: self.calls.append(("interrupts_unmasked",)),
        )

    def _flush(self, done: Callable[[], None]) -> None:
        self.calls.append(("flush_namespaces",))
        self.pending_flush.append(done)


@pytest.fixture
def rig() -> tuple[Registers, ControllerState, Recorder]:
    state = ControllerState.of([], ControllerConfig())
    state.memory = GuestMemory(DmaTable())
    rec = Recorder()
    return Registers(state, rec.hooks()), state, rec


def w(regs: Registers, offset: int, value: int, size: int = 4) -> None:
    regs.write(offset, value.to_bytes(size, "little"))


def r(regs: Registers, offset: int, size: int = 4) -> int:
    return int.from_bytes(regs.read(offset, size), "little")


def configure(regs: Registers) -> None:
    w(regs, Reg.AQA, AQA_32_16)
    w(regs, Reg.ASQ, 4 * PAGE, 8)
    w(regs, Reg.ACQ, 8 * PAGE, 8)


def shst(state: ControllerState) -> int:
    return (state.csts >> Csts.SHST_SHIFT) & Csts.SHST_MASK


def test_enable_creates_the_admin_queue_pair_then_sets_ready(rig):
    regs, state, rec = rig
    configure(regs)
    w(regs, Reg.CC, Cc.EN | 1 << Cc.MPS_SHIFT)
    assert rec.calls == [("create_admin_queues", 32, 16)]
    assert state.csts & (Csts.RDY | Csts.CFS) == Csts.RDY
    assert state.page_size == 2 * PAGE


@pytest.mark.parametrize(
    "cc, aqa, asq, memory, why",
    [
        (Cc.EN | 15 << Cc.MPS_SHIFT, AQA_32_16, 4 * PAGE, True, "MPS above MPSMAX"),
        (Cc.EN | 1 << Cc.CSS_SHIFT, AQA_32_16, 4 * PAGE, True, "CSS 001b is reserved"),
        (Cc.EN, 0, 4 * PAGE, True, "admin queues of one entry"),
        (Cc.EN, AQA_32_16, 4 * PAGE, False, "no host attached"),
        (Cc.EN | 1 << Cc.MPS_SHIFT, AQA_32_16, 5 * PAGE, True, "ASQ 4 KiB aligned, the page is 8 KiB"),
    ],
)
def test_enable_refused_is_fatal_and_creates_nothing(rig, cc, aqa, asq, memory, why):
    regs, state, rec = rig
    if not memory:
        state.memory = None
    w(regs, Reg.AQA, aqa)
    w(regs, Reg.ASQ, asq, 8)
    w(regs, Reg.ACQ, 8 * PAGE, 8)
    w(regs, Reg.CC, cc)
    assert rec.calls == [], why
    assert state.csts & (Csts.RDY | Csts.CFS) == Csts.CFS, why


@pytest.mark.parametrize("css", [CcCss.NVM, CcCss.ALL_IO_COMMAND_SETS])
def test_enable_accepts_the_command_set_selections_cap_offers(rig, css):
    regs, state, rec = rig
    configure(regs)
    w(regs, Reg.CC, Cc.EN | css << Cc.CSS_SHIFT)
    assert state.ready and not state.fatal


def test_disable_asks_for_a_controller_reset_and_changes_nothing_itself(rig):
    regs, state, rec = rig
    configure(regs)
    w(regs, Reg.CC, Cc.EN)
    rec.calls.clear()
    w(regs, Reg.CC, 0)
    assert rec.calls == [("controller_reset",)]
    assert state.ready  # the controller's reset (the hook) clears it, via Registers.reset


@pytest.mark.parametrize("admin_queue_registers", [False, True])
def test_reset_keeps_the_admin_queue_registers_only_for_a_controller_reset(rig, admin_queue_registers):
    regs, state, _ = rig
    configure(regs)
    w(regs, Reg.CC, Cc.EN)
    w(regs, Reg.INTMS, 0x5)
    regs.reset(admin_queue_registers=admin_queue_registers)
    assert (state.cc, state.csts, state.intms) == (0, 0, 0)
    kept = (state.aqa, state.asq, state.acq)
    assert kept == ((0, 0, 0) if admin_queue_registers else (AQA_32_16, 4 * PAGE, 8 * PAGE))


def test_shutdown_reports_complete_only_after_the_flush(rig):
    regs, state, rec = rig
    configure(regs)
    w(regs, Reg.CC, Cc.EN)
    w(regs, Reg.CC, Cc.EN | Shn.NORMAL << Cc.SHN_SHIFT)
    assert rec.calls[-1] == ("flush_namespaces",)
    assert shst(state) == Shst.OCCURRING
    rec.pending_flush.pop()()
    assert shst(state) == Shst.COMPLETE


def test_shn_cleared_before_the_flush_ends_cancels_complete(rig):
    regs, state, rec = rig
    configure(regs)
    w(regs, Reg.CC, Cc.EN)
    w(regs, Reg.CC, Cc.EN | Shn.ABRUPT << Cc.SHN_SHIFT)
    w(regs, Reg.CC, Cc.EN)  # SHN back to 00b: SHST cleared
    rec.pending_flush.pop()()
    assert shst(state) == Shst.NORMAL


def test_reserved_shn_keeps_the_field_and_starts_nothing(rig):
    regs, state, rec = rig
    configure(regs)
    w(regs, Reg.CC, Cc.EN)
    rec.calls.clear()
    w(regs, Reg.CC, Cc.EN | 3 << Cc.SHN_SHIFT)
    assert rec.calls == []
    assert (state.cc >> Cc.SHN_SHIFT) & Cc.SHN_MASK == Shn.NONE


def test_nssr_resets_the_subsystem_then_sets_nssro_which_is_write_one_to_clear(rig):
    regs, state, rec = rig
    w(regs, Reg.NSSR, 0x12345678)  # not "NVMe": nothing
    assert rec.calls == []
    w(regs, Reg.NSSR, NSSR_RESET_VALUE)
    assert rec.calls == [("subsystem_reset",)]
    assert state.csts & Csts.NSSRO
    w(regs, Reg.CSTS, Csts.NSSRO)
    assert not state.csts & Csts.NSSRO


def test_intmc_clears_mask_bits_and_asks_for_the_interrupts(rig):
    regs, state, rec = rig
    w(regs, Reg.INTMS, 0b1011)
    assert r(regs, Reg.INTMS) == r(regs, Reg.INTMC) == 0b1011
    w(regs, Reg.INTMC, 0b0010)
    assert state.intms == 0b1001
    assert rec.calls == [("interrupts_unmasked",)]


def test_admin_queue_registers_are_read_only_while_enabled(rig):
    regs, state, _ = rig
    configure(regs)
    w(regs, Reg.CC, Cc.EN)
    w(regs, Reg.AQA, 0)
    w(regs, Reg.ASQ, 64 * PAGE, 8)
    assert (r(regs, Reg.AQA), r(regs, Reg.ASQ, 8)) == (AQA_32_16, 4 * PAGE)


def test_queue_base_halves_and_reserved_low_bits(rig):
    regs, _, _ = rig
    w(regs, Reg.ACQ, 0x1234_5FFF)
    w(regs, Reg.ACQ + 4, 0x9)
    assert r(regs, Reg.ACQ, 8) == 0x9_1234_5000


def test_registers_above_the_block_read_zero(rig):
    regs, _, _ = rig
    assert regs.read(0x40, 4) == bytes(4)
    assert regs.read(0xFFC, 4) == bytes(4)
