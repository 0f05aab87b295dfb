"""NVMe host-driver loops as tiny guest programs for the Python KVM VMM.

These are the NVMe half of what :mod:`vfio_user.vmm.x86` assembles: a guest that drives a
queue pair through real doorbell writes (trapped, ioeventfd or POST_WRITE) and polls real
completion entries in its RAM, so the doorbell benchmarks and the KVM doorbell tests measure
a vCPU doing what a driver does. The layouts they rely on (CQE size, phase tag bit) are the
spec's, from :mod:`nvme_emu.spec.commands`; the rest of the driver work (queue creation, SQE filling)
is :class:`nvme_emu.testing.host.NvmeHost`'s.
"""

from __future__ import annotations

from vfio_user.vmm.x86 import EAX, EBP, ECX, EDI, EDX, ESI, Asm, GuestProgram

from ..spec.commands import CQE_SIZE

__all__ = ["prog_nvme_qd1"]


def prog_nvme_qd1(sq_tail_db: int, cq_head_db: int, cq_base: int, qsize: int, n: int, *,
                  cqe_size: int = CQE_SIZE, bits: int = 32) -> GuestProgram:
    """(c) An NVMe queue pair driven at queue depth 1, ``n`` commands.

    The harness pre-fills all ``qsize`` SQ entries (the guest never writes SQEs) and
    zeroes the CQ. Per command the guest advances the SQ tail and rings the SQ-tail
    doorbell (BAR0 + 0x1000 + 2*qid*stride), spins on the phase tag (bit 16 of CQE
    dword 3, byte offset 12) of ``cq[head]`` until it equals the expected phase, advances
    the CQ head (flipping the expected phase on wrap) and writes the CQ-head doorbell.
    Registers: eax SQ tail, edx CQ head, esi &cq[head], edi expected phase bit, ecx
    count, ebp scratch. 32-bit encoding::

        B9 <n:4>           mov ecx, n
        31 C0              xor eax, eax
        31 D2              xor edx, edx
        BE <cq_base:4>     mov esi, cq_base
        BF 00 00 01 00     mov edi, 0x10000        phase 1 expected first
      loop:
        40                 inc eax
        81 F8 <qsize:4>    cmp eax, qsize
        75 02              jne ring
        31 C0              xor eax, eax
      ring:
        89 05 <sqdb:4>     mov [sq_tail_db], eax
      poll:
        8B 6E 0C           mov ebp, [esi+12]
        81 E5 00 00 01 00  and ebp, 0x10000
        39 FD              cmp ebp, edi
        75 F3              jne poll                (-13)
        83 C6 <cqe_size>   add esi, cqe_size
        42                 inc edx
        81 FA <qsize:4>    cmp edx, qsize
        75 0D              jne head
        31 D2              xor edx, edx
        BE <cq_base:4>     mov esi, cq_base
        81 F7 00 00 01 00  xor edi, 0x10000        phase flips on wrap
      head:
        89 15 <cqdb:4>     mov [cq_head_db], edx
        49                 dec ecx
        75 xx              jnz loop
        F4                 hlt
    """
    if qsize < 2:
        raise ValueError("qsize must be >= 2")
    a = Asm(bits)
    a.mov_r_imm(ECX, n)
    a.xor_r_r(EAX, EAX)
    a.xor_r_r(EDX, EDX)
    a.mov_r_imm(ESI, cq_base)
    a.mov_r_imm(EDI, 0x10000)
    a.label("loop")
    a.inc(EAX)
    a.cmp_r_imm(EAX, qsize)
    a.jnz("ring")
    a.xor_r_r(EAX, EAX)
    a.label("ring")
    a.store_abs(sq_tail_db, EAX)
    a.label("poll")
    a.load(EBP, ESI, 12)
    a.and_r_imm(EBP, 0x10000)
    a.cmp_r_r(EBP, EDI)
    a.jnz("poll")
    a.add_r_imm8(ESI, cqe_size)
    a.inc(EDX)
    a.cmp_r_imm(EDX, qsize)
    a.jnz("head")
    a.xor_r_r(EDX, EDX)
    a.mov_r_imm(ESI, cq_base)
    a.xor_r_imm(EDI, 0x10000)
    a.label("head")
    a.store_abs(cq_head_db, EDX)
    a.dec(ECX)
    a.jnz("loop")
    a.hlt()
    return GuestProgram(a.assemble(), bits, f"nvme qd1 sqdb={sq_tail_db:#x} cqdb={cq_head_db:#x} x{n}")
