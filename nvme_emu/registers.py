"""The controller registers and the CC/CSTS state machine, in one place.

Every way the host changes what a controller *is* (enabled, ready, shutting down, fatal,
reset) goes through a register write, so the whole state machine sits here, as h11 keeps
its connection state machine in one object: CAP, VS, INTMS/INTMC, CC, CSTS, NSSR, AQA,
ASQ and ACQ (Base 2.0, "Controller Registers" and "Controller Initialization").

What a transition *causes* elsewhere (queues torn down, the admin queue pair created,
namespaces flushed, held interrupts re-raised) is the controller's business, reached
through the named :class:`RegisterHooks`; nothing here holds a pointer to the controller.
The values themselves live in :class:`~nvme_emu.state.ControllerState`, so a reset or a
reader elsewhere (the PCI function, Identify) sees them without asking this object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from .spec.registers import NSSR_RESET_VALUE, Aqa, Cap, CapCss, Cc, CcCss, Csts, Reg, Shn, Shst
from .state import ControllerConfig, ControllerState

log = logging.getLogger(__name__)

#: Registers 0x00-0x3F are implemented; everything above reads 0 (no CMB, no boot partitions,
#: no PMR: CMBLOC/CMBSZ 0 say so).
REGISTER_BLOCK_SIZE = 0x40


@dataclass(frozen=True)
class RegisterHooks:
    """What a register write causes outside the registers; the controller binds them.

    - ``controller_reset()``: CC.EN 1 -> 0; queues go, the register values are reset after it
      returns (:meth:`Registers.reset`).
    - ``subsystem_reset()``: NSSR with "NVMe": a reset that also clears AQA/ASQ/ACQ; CSTS.NSSRO
      is set after it returns.
    - ``create_admin_queues(asqs, acqs)``: CC.EN 0 -> 1 passed every check (page size known).
    - ``flush_namespaces(done)``: CC.SHN: make every namespace durable, then call ``done``
      (later, from the loop, for blocking backends).
    - ``interrupts_unmasked()``: INTMC cleared mask bits: vectors with pending entries fire.
    """

    controller_reset: Callable[[], None]
    subsystem_reset: Callable[[], None]
    create_admin_queues: Callable[[int, int], None]
    flush_namespaces: Callable[[Callable[[], None]], None]
    interrupts_unmasked: Callable[[], None]


def capabilities(config: ControllerConfig) -> int:
    """CAP from the configuration: CQR (queues must be physically contiguous), NSSR
    supported, NVM and I/O command set selection (CC.CSS 110b) supported."""
    return (
        (config.max_queue_entries - 1) << Cap.MQES_SHIFT
        | Cap.CQR
        | config.timeout_500ms << Cap.TO_SHIFT
        | 0 << Cap.DSTRD_SHIFT
        | Cap.NSSRS
        | (CapCss.NVM | CapCss.IO_COMMAND_SETS) << Cap.CSS_SHIFT
        | 0 << Cap.MPSMIN_SHIFT
        | config.mpsmax << Cap.MPSMAX_SHIFT
    )


class Registers:
    """BAR0's controller registers over one controller's state; see the module docstring."""

    def __init__(self, state: ControllerState, hooks: RegisterHooks) -> None:
        self.state = state
        self.hooks = hooks
        state.cap = capabilities(state.config)

    # -- resets --------------------------------------------------------------------------

    def reset(self, *, admin_queue_registers: bool) -> None:
        """CC, CSTS and INTMS back to 0 (a Controller Reset); AQA, ASQ and ACQ too when
        ``admin_queue_registers`` (NSSR, PCI reset, a departed host): the spec has a
        Controller Reset keep them, so a host may re-enable with the admin queue it set up."""
        state = self.state
        state.cc = state.csts = state.intms = 0
        if admin_queue_registers:
            state.aqa = state.asq = state.acq = 0

    def set_fatal(self, reason: str) -> None:
        """CSTS.CFS: the host must reset us; nothing more is processed until then."""
        if not self.state.fatal:
            log.error("controller fatal status: %s", reason)
        self.state.csts |= Csts.CFS

    # -- reads ---------------------------------------------------------------------------

    def _block(self) -> bytes:
        """Registers 0x00-0x3F as the host reads them (INTMC reads as INTMS)."""
        s = self.state
        out = bytearray(REGISTER_BLOCK_SIZE)
        out[Reg.CAP : Reg.CAP + 8] = s.cap.to_bytes(8, "little")
        out[Reg.VS : Reg.VS + 4] = s.vs.to_bytes(4, "little")
        out[Reg.INTMS : Reg.INTMS + 4] = s.intms.to_bytes(4, "little")
        out[Reg.INTMC : Reg.INTMC + 4] = s.intms.to_bytes(4, "little")
        out[Reg.CC : Reg.CC + 4] = s.cc.to_bytes(4, "little")
        out[Reg.CSTS : Reg.CSTS + 4] = s.csts.to_bytes(4, "little")
        out[Reg.AQA : Reg.AQA + 4] = s.aqa.to_bytes(4, "little")
        out[Reg.ASQ : Reg.ASQ + 8] = s.asq.to_bytes(8, "little")
        out[Reg.ACQ : Reg.ACQ + 8] = s.acq.to_bytes(8, "little")
        return bytes(out)

    def read(self, offset: int, size: int) -> bytes:
        """Register reads of any width inside 0x000-0xFFF; unknown registers read 0."""
        if offset + size <= REGISTER_BLOCK_SIZE:
            return self._block()[offset : offset + size]
        return bytes(size)

    # -- writes --------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """Register writes of 4 or 8 bytes (8-byte ASQ/ACQ may also come as two halves)."""
        value = int.from_bytes(data, "little")
        size = len(data)
        if size == 8 and offset in (Reg.ASQ, Reg.ACQ):
            self._write_dword(offset, value & 0xFFFFFFFF)
            self._write_dword(offset + 4, value >> 32)
        elif size == 4:
            self._write_dword(offset, value)
        else:
            log.debug("ignored %d-byte register write at %#x", size, offset)

    def _write_dword(self, offset: int, value: int) -> None:
        state = self.state
        if offset == Reg.INTMS:
            state.intms |= value
        elif offset == Reg.INTMC:
            state.intms &= ~value
            self.hooks.interrupts_unmasked()
        elif offset == Reg.CC:
            self._write_cc(value)
        elif offset == Reg.NSSR:
            if value == NSSR_RESET_VALUE:
                log.info("NVM subsystem reset")
                self.hooks.subsystem_reset()
                state.csts |= Csts.NSSRO
        elif offset == Reg.AQA and not state.enabled:
            state.aqa = value & (Aqa.ASQS_MASK | Aqa.ACQS_MASK << Aqa.ACQS_SHIFT)
        elif offset in (Reg.ASQ, Reg.ASQ + 4, Reg.ACQ, Reg.ACQ + 4) and not state.enabled:
            self._write_queue_base(offset, value)
        elif offset == Reg.CSTS and value & Csts.NSSRO:
            state.csts &= ~Csts.NSSRO  # write 1 to clear

    def _write_queue_base(self, offset: int, value: int) -> None:
        base = Reg.ASQ if offset < Reg.ACQ else Reg.ACQ
        current = self.state.asq if base == Reg.ASQ else self.state.acq
        if offset == base:
            current = (current & ~0xFFFFFFFF) | (value & ~0xFFF)
        else:
            current = (current & 0xFFFFFFFF) | value << 32
        if base == Reg.ASQ:
            self.state.asq = current
        else:
            self.state.acq = current

    def _write_cc(self, value: int) -> None:
        was_enabled = self.state.enabled
        now_enabled = bool(value & Cc.EN)
        if was_enabled and not now_enabled:
            log.info("controller disabled (CC.EN 1 -> 0)")
            self.hooks.controller_reset()
            return
        shn_before = (self.state.cc >> Cc.SHN_SHIFT) & Cc.SHN_MASK
        value = _without_reserved_shn(value, shn_before)
        self.state.cc = value
        if not was_enabled and now_enabled:
            self._enable()
        shn = (value >> Cc.SHN_SHIFT) & Cc.SHN_MASK
        if shn != Shn.NONE and shn_before == Shn.NONE:
            self._shutdown(Shn(shn))
        elif shn == Shn.NONE and shn_before != Shn.NONE:
            self.state.csts &= ~(Csts.SHST_MASK << Csts.SHST_SHIFT)

    def _enable(self) -> None:
        """CC.EN 0 -> 1: check what the host configured, then create the admin queue pair
        and set CSTS.RDY; anything wrong is a fatal status (the host sees CFS, not RDY)."""
        state = self.state
        mps = (state.cc >> Cc.MPS_SHIFT) & Cc.MPS_MASK
        css = (state.cc >> Cc.CSS_SHIFT) & Cc.CSS_MASK
        asqs = ((state.aqa >> Aqa.ASQS_SHIFT) & Aqa.ASQS_MASK) + 1
        acqs = ((state.aqa >> Aqa.ACQS_SHIFT) & Aqa.ACQS_MASK) + 1
        problem = None
        if mps > state.config.mpsmax:
            problem = f"CC.MPS {mps} above MPSMAX"
        elif css not in (CcCss.NVM, CcCss.ALL_IO_COMMAND_SETS):
            problem = f"CC.CSS {css:#b} not supported"
        elif asqs < 2 or acqs < 2:
            problem = f"admin queue sizes {asqs}/{acqs} too small"
        elif state.memory is None:
            problem = "no host attached"
        if problem is not None:
            log.warning("cannot enable controller: %s", problem)
            self.set_fatal(problem)
            return
        state.page_size = 1 << (12 + mps)
        if state.asq % state.page_size or state.acq % state.page_size:
            self.set_fatal("admin queue base not page aligned")
            return
        self.hooks.create_admin_queues(asqs, acqs)
        state.csts = (state.csts & Csts.NSSRO) | Csts.RDY
        log.info("controller enabled: page size %d, admin queues %d/%d", state.page_size, asqs, acqs)

    def _shutdown(self, kind: Shn) -> None:
        """Flush every namespace, then report shutdown complete. SHST reads "occurring"
        meanwhile (the host polls it) and every queue stays served; a reset or SHN cleared
        before the flush ends cancels the "complete"."""
        self._set_shst(Shst.OCCURRING)

        def flushed() -> None:
            if (self.state.csts >> Csts.SHST_SHIFT) & Csts.SHST_MASK == Shst.OCCURRING:
                self._set_shst(Shst.COMPLETE)
                log.info("controller shutdown (%s) complete", kind.name.lower())

        self.hooks.flush_namespaces(flushed)

    def _set_shst(self, shst: Shst) -> None:
        self.state.csts = (self.state.csts & ~(Csts.SHST_MASK << Csts.SHST_SHIFT)) | shst << Csts.SHST_SHIFT


def _without_reserved_shn(value: int, shn_before: int) -> int:
    """CC.SHN 11b is reserved: the field keeps its value and the rest of CC applies, so
    a host's mistake neither half-applies the write nor starts a shutdown."""
    shn = (value >> Cc.SHN_SHIFT) & Cc.SHN_MASK
    if shn in Shn.__members__.values():
        return value
    log.warning("CC.SHN %s is reserved: ignored", bin(shn))
    return (value & ~(Cc.SHN_MASK << Cc.SHN_SHIFT)) | shn_before << Cc.SHN_SHIFT
