"""A tiny x86 assembler and the generic guest programs the Python KVM VMM runs.

Why hand-encoded machine code: the test and benchmark VMM (:mod:`vfio_user.vmm.kvm`) needs
a guest that does exactly one thing per measured event (one MMIO or port write, one poll of
a word in RAM) with no firmware or kernel around it. The handful of instructions that
takes is encoded by :class:`Asm`; each ``prog_*`` function documents its bytes.

Nothing here knows NVMe: the NVMe queue-pair loop is :func:`nvme_emu.testing.guest_programs.prog_nvme_qd1`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # only for annotations: the loader drives a vCPU it is given
    from .kvm import Vcpu
    from .memory import GuestRam

__all__ = [
    "Asm",
    "GuestProgram",
    "SCRATCH_GPA",
    "prog_write_loop",
    "prog_write_seq",
    "prog_out_loop",
    "prog_ring_and_poll",
    "EAX", "ECX", "EDX", "EBX", "ESP", "EBP", "ESI", "EDI",
]

# Register numbers in ModRM/opcode+r encodings.
EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI = range(8)


class Asm:
    """A tiny x86 encoder for the handful of instructions our guest programs use.

    ``bits`` is the code-segment default size: 32 (flat protected mode) or 16 (real mode).
    All operations are 32-bit and all addressing is 32-bit, so in 16-bit mode the encoder
    emits the operand-size prefix 0x66 before 32-bit operations and the address-size
    prefix 0x67 before memory operands. Each method documents its bytes for 32-bit mode.
    Jumps are rel8; labels may be used before they are defined (patched at the end).
    """

    def __init__(self, bits: int) -> None:
        if bits not in (16, 32):
            raise ValueError("bits must be 16 or 32")
        self.bits = bits
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def _o32(self) -> None:  # operand size 32
        if self.bits == 16:
            self.code.append(0x66)

    def _o16(self) -> None:  # operand size 16
        if self.bits == 32:
            self.code.append(0x66)

    def _a32(self) -> None:  # address size 32
        if self.bits == 16:
            self.code.append(0x67)

    @staticmethod
    def _modrm_mem(reg: int, base: int, disp: int = 0) -> bytes:
        """ModRM for [base + disp8] (mod 00 or 01). ESP (needs SIB) and EBP with mod 00
        (means disp32) are not supported as bases."""
        if base == ESP:
            raise ValueError("esp base needs a SIB byte; not supported")
        if disp == 0 and base != EBP:
            return bytes([(0b00 << 6) | (reg << 3) | base])
        if -128 <= disp <= 127:
            return bytes([(0b01 << 6) | (reg << 3) | base, disp & 0xFF])
        raise ValueError("disp8 only")

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def mov_r_imm(self, r: int, imm: int) -> None:
        """mov r32, imm32 : B8+r id"""
        self._o32()
        self.code += bytes([0xB8 + r]) + struct.pack("<I", imm & 0xFFFFFFFF)

    def store(self, base: int, src: int, width: int = 4, disp: int = 0) -> None:
        """mov [base+disp], src : 89 /r (32-bit), 66 89 /r (16-bit value), 88 /r (8-bit, AL..BL)"""
        self._a32()
        if width == 4:
            self._o32()
            op = 0x89
        elif width == 2:
            self._o16()
            op = 0x89
        elif width == 1:
            if src > EBX:
                raise ValueError("8-bit store needs al/cl/dl/bl")
            op = 0x88
        else:
            raise ValueError("width must be 1, 2 or 4 (8-byte stores: movq_store from an MMX register)")
        self.code += bytes([op]) + self._modrm_mem(src, base, disp)

    def movq_load(self, mm: int, base: int, disp: int = 0) -> None:
        """movq mm, [base+disp] : 0F 6F /r (MMX; no operand-size prefix in either mode)

        MMX needs CR0.EM=0 and CR0.TS=0, which is how a fresh vCPU starts; KVM's
        instruction emulator implements 0F 6F / 0F 7F (SSE ``movq xmm`` F3 0F 7E is not)."""
        self._a32()
        self.code += bytes([0x0F, 0x6F]) + self._modrm_mem(mm, base, disp)

    def movq_store(self, base: int, mm: int, disp: int = 0) -> None:
        """movq [base+disp], mm : 0F 7F /r — one 8-byte store (an 8-byte MMIO exit)."""
        self._a32()
        self.code += bytes([0x0F, 0x7F]) + self._modrm_mem(mm, base, disp)

    def mov_mm_imm64(self, mm: int, value: int, scratch: int) -> None:
        """Load a 64-bit immediate into an MMX register through 8 bytes of guest RAM at
        ``scratch`` (there is no move of a 64-bit immediate in 32-bit code), using ESI
        and EAX::

            BE <scratch:4>   mov esi, scratch
            B8 <lo:4>        mov eax, lo
            89 06            mov [esi], eax
            B8 <hi:4>        mov eax, hi
            89 46 04         mov [esi+4], eax
            0F 6F 06         movq mm, [esi]
        """
        self.mov_r_imm(ESI, scratch)
        self.mov_r_imm(EAX, value & 0xFFFFFFFF)
        self.store(ESI, EAX)
        self.mov_r_imm(EAX, (value >> 32) & 0xFFFFFFFF)
        self.store(ESI, EAX, disp=4)
        self.movq_load(mm, ESI)

    def store_abs(self, addr: int, src: int) -> None:
        """mov [disp32], src32 : 89 /r with ModRM mod 00 rm 101 (= absolute disp32)"""
        self._a32()
        self._o32()
        self.code += bytes([0x89, (src << 3) | 0b101]) + struct.pack("<I", addr & 0xFFFFFFFF)

    def load(self, dst: int, base: int, disp: int = 0) -> None:
        """mov dst32, [base+disp] : 8B /r"""
        self._a32()
        self._o32()
        self.code += bytes([0x8B]) + self._modrm_mem(dst, base, disp)

    def cmp_mem_r(self, base: int, r: int, disp: int = 0) -> None:
        """cmp [base+disp], r32 : 39 /r"""
        self._a32()
        self._o32()
        self.code += bytes([0x39]) + self._modrm_mem(r, base, disp)

    def cmp_r_r(self, a: int, b: int) -> None:
        """cmp a32, b32 : 39 /r, ModRM mod 11 reg=b rm=a"""
        self._o32()
        self.code += bytes([0x39, 0xC0 | (b << 3) | a])

    def cmp_r_imm(self, r: int, imm: int) -> None:
        """cmp r32, imm32 : 81 /7 id (ModRM 11 111 r)"""
        self._o32()
        self.code += bytes([0x81, 0xF8 | r]) + struct.pack("<I", imm & 0xFFFFFFFF)

    def and_r_imm(self, r: int, imm: int) -> None:
        """and r32, imm32 : 81 /4 id (ModRM 11 100 r)"""
        self._o32()
        self.code += bytes([0x81, 0xE0 | r]) + struct.pack("<I", imm & 0xFFFFFFFF)

    def xor_r_imm(self, r: int, imm: int) -> None:
        """xor r32, imm32 : 81 /6 id (ModRM 11 110 r)"""
        self._o32()
        self.code += bytes([0x81, 0xF0 | r]) + struct.pack("<I", imm & 0xFFFFFFFF)

    def add_r_imm8(self, r: int, imm: int) -> None:
        """add r32, imm8 (sign-extended) : 83 /0 ib (ModRM 11 000 r)"""
        self._o32()
        self.code += bytes([0x83, 0xC0 | r, imm & 0xFF])

    def xor_r_r(self, a: int, b: int) -> None:
        """xor a32, b32 : 31 /r (ModRM 11 b a); xor r,r zeroes r"""
        self._o32()
        self.code += bytes([0x31, 0xC0 | (b << 3) | a])

    def inc(self, r: int) -> None:
        """inc r32 : 40+r (one byte outside long mode)"""
        self._o32()
        self.code.append(0x40 + r)

    def dec(self, r: int) -> None:
        """dec r32 : 48+r"""
        self._o32()
        self.code.append(0x48 + r)

    def mov_dx_imm16(self, imm: int) -> None:
        """mov dx, imm16 : BA iw (66 BA iw in 32-bit mode)"""
        self._o16()
        self.code += bytes([0xBA]) + struct.pack("<H", imm & 0xFFFF)

    def out_dx(self, width: int) -> None:
        """out dx, al/ax/eax : EE / 66 EF / EF (32-bit mode; 16-bit mode swaps the 66)"""
        if width == 1:
            self.code.append(0xEE)
            return
        if width == 4:
            self._o32()
        elif width == 2:
            self._o16()
        else:
            raise ValueError("port width must be 1, 2 or 4")
        self.code.append(0xEF)

    def _jcc(self, opcode: int, target: str) -> None:
        self.code += bytes([opcode, 0])
        self.fixups.append((len(self.code) - 1, target))

    def jnz(self, target: str) -> None:
        """jnz rel8 : 75 cb"""
        self._jcc(0x75, target)

    def jz(self, target: str) -> None:
        """jz rel8 : 74 cb"""
        self._jcc(0x74, target)

    def jmp(self, target: str) -> None:
        """jmp rel8 : EB cb"""
        self._jcc(0xEB, target)

    def hlt(self) -> None:
        """hlt : F4"""
        self.code.append(0xF4)

    def assemble(self) -> bytes:
        for pos, target in self.fixups:
            rel = self.labels[target] - (pos + 1)  # relative to the next instruction
            if not -128 <= rel <= 127:
                raise ValueError(f"jump to {target} out of rel8 range ({rel})")
            self.code[pos] = rel & 0xFF
        return bytes(self.code)


@dataclass(frozen=True)
class GuestProgram:
    """Machine code plus what the loader must know. ``bits`` selects the CPU mode
    (16 → :meth:`Vcpu.enter_real_mode`, 32 → :meth:`Vcpu.enter_protected_mode`)."""

    code: bytes
    bits: int
    description: str

    def load(self, vcpu: Vcpu, ram: GuestRam, gpa: int, **gprs: int) -> None:
        """Copy the code to ``gpa`` and point the vCPU at it in the right mode.

        Real mode uses CS = gpa >> 4, IP = gpa & 0xF (so gpa < 1 MiB) with unreal data
        segments, so 32-bit data addresses work in both modes.
        """
        ram.write(gpa, self.code)
        if self.bits == 32:
            vcpu.enter_protected_mode(gpa, **gprs)
        else:
            if gpa >= 0x100000:
                raise ValueError("real-mode code must sit below 1 MiB")
            vcpu.enter_real_mode(gpa >> 4, gpa & 0xF, unreal=True, **gprs)


#: Default guest-RAM scratch (8 bytes) through which 8-byte programs load their value.
SCRATCH_GPA = 0x500


def prog_write_loop(addr: int, value: int, n: int, *, width: int = 4, bits: int = 32,
                    scratch: int = SCRATCH_GPA) -> GuestProgram:
    """(a) Write ``value`` to ``addr`` ``n`` times (loop counted in ECX), then HLT.

    32-bit encoding (16-bit mode adds 66/67 prefixes)::

        BB <addr:4>      mov ebx, addr
        B8 <value:4>     mov eax, value
        B9 <n:4>         mov ecx, n
      loop:
        89 03            mov [ebx], eax        (width 2: 66 89 03; width 1: 88 03)
        49               dec ecx
        75 FB            jnz loop              (-5: back over 89 03 49 75 FB)
        F4               hlt

    Per iteration the guest executes 3 instructions (store, dec, jnz).

    ``width=8`` stores from MMX register mm0 (``0F 7F 03  movq [ebx], mm0``), loaded
    first from 8 bytes of guest RAM at ``scratch`` (see :meth:`Asm.mov_mm_imm64`, which
    precedes ``mov ebx``); each store is one 8-byte MMIO write.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    a = Asm(bits)
    if width == 8:
        a.mov_mm_imm64(0, value, scratch)
    a.mov_r_imm(EBX, addr)
    if width != 8:
        a.mov_r_imm(EAX, value)
    a.mov_r_imm(ECX, n)
    a.label("loop")
    if width == 8:
        a.movq_store(EBX, 0)
    else:
        a.store(EBX, EAX, width)
    a.dec(ECX)
    a.jnz("loop")
    a.hlt()
    return GuestProgram(a.assemble(), bits, f"write {value:#x} to {addr:#x} x{n} (width {width})")


def prog_write_seq(target: int, values: "list[int] | tuple[int, ...]", *, width: int = 4, pio: bool = False,
                   sync: Union[None, str, int] = None, bits: int = 32,
                   scratch: int = SCRATCH_GPA) -> GuestProgram:
    """Straight-line code: write each of ``values`` in turn to ``target``, then HLT.

    ``target`` is a guest-physical address (``mov [ebx], eax``; width 8: MMX ``movq``), or a
    port when ``pio`` (``out dx, al/ax/eax``; widths 1/2/4). ``sync`` puts an exit to
    userspace after every write: ``"hlt"`` (a HLT; run again to continue, so the program
    stops ``len(values) + 1`` times) or an int: a 4-byte MMIO write of the write's index
    (1, 2, ...) to that unbacked guest-physical address. 32-bit encoding per write::

        BB <target:4>    mov ebx, target        (pio: 66 BA <port:2>  mov dx, port)
        B8 <value:4>     mov eax, value          (width 8: mov_mm_imm64, see Asm)
        89 03            mov [ebx], eax          (pio: EF  out dx, eax)
      [ F4               hlt                     sync="hlt"
      | B8 <i:4>         mov eax, i              sync=<gpa>
        89 05 <gpa:4>    mov [gpa], eax ]
    """
    if not values:
        raise ValueError("values must not be empty")
    if pio and width not in (1, 2, 4):
        raise ValueError("port writes are 1, 2 or 4 bytes")
    a = Asm(bits)
    for i, value in enumerate(values, 1):
        if pio:
            a.mov_dx_imm16(target)
            a.mov_r_imm(EAX, value)
            a.out_dx(width)
        elif width == 8:
            a.mov_mm_imm64(0, value, scratch)
            a.mov_r_imm(EBX, target)
            a.movq_store(EBX, 0)
        else:
            a.mov_r_imm(EBX, target)
            a.mov_r_imm(EAX, value)
            a.store(EBX, EAX, width)
        if sync == "hlt":
            a.hlt()
        elif isinstance(sync, int):
            a.mov_r_imm(EAX, i)
            a.store_abs(sync, EAX)
        elif sync is not None:
            raise ValueError(f"sync must be None, 'hlt' or a guest-physical address, got {sync!r}")
    a.hlt()
    where = f"port {target:#x}" if pio else f"{target:#x}"
    return GuestProgram(a.assemble(), bits, f"write {[hex(v) for v in values]} to {where} "
                                            f"(width {width}, sync {sync!r})")


def prog_out_loop(port: int, value: int, n: int, *, width: int = 4, bits: int = 32) -> GuestProgram:
    """(d) Port-I/O variant of (a): ``out dx, eax`` ``n`` times, then HLT. 32-bit encoding::

        66 BA <port:2>   mov dx, port
        B8 <value:4>     mov eax, value
        B9 <n:4>         mov ecx, n
      loop:
        EF               out dx, eax           (width 2: 66 EF; width 1: EE)
        49               dec ecx
        75 FC            jnz loop
        F4               hlt
    """
    a = Asm(bits)
    a.mov_dx_imm16(port)
    a.mov_r_imm(EAX, value)
    a.mov_r_imm(ECX, n)
    a.label("loop")
    a.out_dx(width)
    a.dec(ECX)
    a.jnz("loop")
    a.hlt()
    return GuestProgram(a.assemble(), bits, f"out {value:#x} to port {port:#x} x{n}")


def prog_ring_and_poll(doorbell: int, poll_addr: int, n: int, *, first: int = 1, wrap: int = 0,
                       bits: int = 32) -> GuestProgram:
    """(b) ``n`` times: snapshot the 32-bit word at ``poll_addr``, write a doorbell value to
    ``doorbell``, spin until the word changes; value starts at ``first`` and increments
    (wrapping to 0 when it reaches ``wrap``, if non-zero: an SQ tail modulo queue size).

    Snapshotting *before* ringing means a completion that lands before the first poll
    is not missed. 32-bit encoding::

        BB <doorbell:4>  mov ebx, doorbell
        BE <poll:4>      mov esi, poll_addr
        B9 <n:4>         mov ecx, n
        B8 <first:4>     mov eax, first
      loop:
        8B 3E            mov edi, [esi]        snapshot
        89 03            mov [ebx], eax        ring
      spin:
        39 3E            cmp [esi], edi
        74 FC            je spin               (-4)
        40               inc eax
      [ 81 F8 <wrap:4>   cmp eax, wrap         only when wrap != 0
        75 02            jne +2
        31 C0            xor eax, eax ]
      next:
        49               dec ecx
        75 xx            jnz loop
        F4               hlt
    """
    a = Asm(bits)
    a.mov_r_imm(EBX, doorbell)
    a.mov_r_imm(ESI, poll_addr)
    a.mov_r_imm(ECX, n)
    a.mov_r_imm(EAX, first)
    a.label("loop")
    a.load(EDI, ESI)
    a.store(EBX, EAX)
    a.label("spin")
    a.cmp_mem_r(ESI, EDI)
    a.jz("spin")
    a.inc(EAX)
    if wrap:
        a.cmp_r_imm(EAX, wrap)
        a.jnz("next")
        a.xor_r_r(EAX, EAX)
    a.label("next")
    a.dec(ECX)
    a.jnz("loop")
    a.hlt()
    return GuestProgram(a.assemble(), bits, f"ring {doorbell:#x}, poll {poll_addr:#x} x{n}")
