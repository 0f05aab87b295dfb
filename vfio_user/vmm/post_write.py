"""KVM_IOEVENTFD_FLAG_POST_WRITE where the kernel lacks it: the userspace fallback, the test
contract, and a micro-measurement of the doorbell paths.

POST_WRITE is in no released kernel (:meth:`vfio_user.vmm.kvm.VirtualMachine.post_write_supported`
detects it). Where it is missing, a VMM traps the MMIO/PIO write and does the same thing in
userspace (:class:`PostWriteEmulator`, :func:`post_write_emulated`). Test runs can require one
world or the other with ``NVME_EMU_EXPECT_POST_WRITE`` (:func:`post_write_expectation`).

Run ``python -m vfio_user.vmm.post_write [N]`` for a micro-measurement of trapped vs ioeventfd doorbells.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from typing import Callable, Literal, Optional, Union

from .kvm import Kvm, VcpuExit
from .memory import MemfdRegion
from .x86 import prog_write_loop

__all__ = [
    "PostWriteEmulator",
    "post_write_emulated",
    "post_write_expectation",
    "post_write_contract_violation",
    "measure_doorbell_exits",
    "EXPECT_POST_WRITE_ENV",
]

_CTYPE_FOR_SIZE = {1: "uint8_t *", 2: "uint16_t *", 4: "uint32_t *", 8: "uint64_t *"}
_FORMAT_FOR_SIZE: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}


def post_write_emulated(shadow: Union[memoryview, MemfdRegion], offset: int, value: int, size: int,
                        eventfd: int) -> None:
    """What KVM's POST_WRITE does, done by a VMM that trapped the MMIO write instead.

    1. store ``value`` into the shadow slot with exactly ``size`` bytes, as ONE aligned
       store of that width (the reader must never see a torn tail);
    2. then add 1 to the eventfd.

    Order matters: the server wakes on the eventfd and reads the shadow; the value must be
    visible first. On x86 stores are not reordered with later stores and the eventfd
    write(2) is a full barrier, so program order is enough.

    ``shadow`` is a :class:`MemfdRegion` (typed cffi store) or a memoryview over shared
    memory (cast to the width's format: CPython stores one element with a fixed-size copy).
    """
    if size not in _CTYPE_FOR_SIZE:
        raise ValueError(f"size must be 1, 2, 4 or 8, got {size}")
    if offset % size:
        raise ValueError(f"shadow offset {offset:#x} not aligned to {size}")
    value &= (1 << (8 * size)) - 1
    if isinstance(shadow, MemfdRegion):
        shadow.ptr(_CTYPE_FOR_SIZE[size], offset)[0] = value
    else:
        with shadow[offset : offset + size] as window, window.cast(_FORMAT_FOR_SIZE[size]) as typed:
            typed[0] = value
    os.eventfd_write(eventfd, 1)


class PostWriteEmulator:
    """Table of trapped doorbells for a VMM without POST_WRITE.

    ``add(gpa, size, shadow_region, shadow_offset, eventfd, datamatch=None, pio=False)``;
    then feed every exit to :meth:`handle`, which returns True when the exit was a write
    that a kernel POST_WRITE registration with the same fields would have caught (same
    MMIO address or port, same width, and the datamatch value if one was given), after
    posting it with :func:`post_write_emulated` (value first, then signal). Anything else
    (reads, other widths, a datamatch mismatch, string I/O with count > 1) returns False:
    the exit is the VMM's to handle, as it would be with the kernel flag.
    :attr:`posted` counts the writes posted so far.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[bool, int], tuple[int, Union[memoryview, MemfdRegion], int, int,
                                                  Optional[int]]] = {}
        self.posted = 0

    def add(self, gpa: int, size: int, shadow: Union[memoryview, MemfdRegion], shadow_offset: int,
            eventfd: int, *, datamatch: Optional[int] = None, pio: bool = False) -> None:
        """Register ``gpa`` (a port when ``pio``); replaces an earlier entry for it.

        Checks what KVM checks at assign time for POST_WRITE: a width of 1/2/4/8 (no
        "any length"), and a shadow slot inside the region, aligned to the width.
        """
        if size not in _CTYPE_FOR_SIZE:
            raise ValueError(f"size must be 1, 2, 4 or 8, got {size}")
        length = shadow.size if isinstance(shadow, MemfdRegion) else shadow.nbytes
        if shadow_offset % size or not 0 <= shadow_offset <= length - size:
            raise ValueError(f"shadow offset {shadow_offset:#x} misaligned or out of range for size {size}")
        self._slots[(pio, gpa)] = (size, shadow, shadow_offset, eventfd, datamatch)

    def remove(self, gpa: int, *, pio: bool = False) -> None:
        del self._slots[(pio, gpa)]

    def handle(self, ex: VcpuExit) -> bool:
        if not ex.is_write:
            return False
        if ex.kind == "MMIO":
            slot = self._slots.get((False, ex.phys_addr))
        elif ex.kind == "IO" and ex.count == 1:
            slot = self._slots.get((True, ex.port))
        else:
            return False
        if slot is None or slot[0] != ex.length:
            return False
        size, shadow, off, efd, datamatch = slot
        value = ex.value
        if datamatch is not None and value != datamatch & ((1 << (8 * size)) - 1):
            return False
        post_write_emulated(shadow, off, value, size, efd)
        self.posted += 1
        return True


#: Environment variable of the test contract (see :func:`post_write_expectation`).
EXPECT_POST_WRITE_ENV = "NVME_EMU_EXPECT_POST_WRITE"


def post_write_expectation() -> Optional[bool]:
    """What the test run demands of the kernel, from ``NVME_EMU_EXPECT_POST_WRITE``.

    ``"1"`` → True: the kernel must implement KVM_IOEVENTFD_FLAG_POST_WRITE; tests that
    would otherwise fall back to :class:`PostWriteEmulator` must fail instead.
    ``"0"`` → False: the kernel must lack it (a stock-module run must not silently pick
    up a patched kernel). Unset or empty → None: adapt to whatever the kernel does.
    Any other value raises ValueError (a typo must not turn into "adapt").
    """
    raw = os.environ.get(EXPECT_POST_WRITE_ENV, "").strip()
    if raw == "":
        return None
    if raw in ("0", "1"):
        return raw == "1"
    raise ValueError(f"{EXPECT_POST_WRITE_ENV}={raw!r}: expected '1', '0' or unset")


def post_write_contract_violation(supported: bool, reason: str) -> Optional[str]:
    """The failure message when ``supported`` (from :meth:`VirtualMachine.post_write_supported`)
    contradicts :func:`post_write_expectation`, else None."""
    expected = post_write_expectation()
    if expected is None or expected == supported:
        return None
    if expected:
        return (f"{EXPECT_POST_WRITE_ENV}=1 requires a kernel with KVM_IOEVENTFD_FLAG_POST_WRITE, "
                f"but this kernel does not have it ({reason}); refusing to fall back to the emulation")
    return (f"{EXPECT_POST_WRITE_ENV}=0 requires a kernel without KVM_IOEVENTFD_FLAG_POST_WRITE, "
            f"but this kernel has it ({reason})")




# --------------------------------------------------------------------------------------
# Micro-measurement
# --------------------------------------------------------------------------------------
def _drain_eventfd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def measure_doorbell_exits(n: int = 20_000, *, bits: int = 32, ram_gpa: int = 0,
                           doorbell_gpa: int = 0xFEB0_1000, repeat: int = 3) -> dict[str, float]:
    """Per-write cost (microseconds) of a guest doorbell write, by path, in one run.

    Runs program (a) with ``n`` writes four ways (best of ``repeat``):

    * ``ram``: target is guest RAM (no exit): the cost of the emulated loop itself;
    * ``trap``: target unbacked, no ioeventfd: every write exits to this Python VMM and
      re-enters (what a VMM without ioeventfds pays, plus Python's per-exit overhead);
    * ``trap_emulated_post``: same, and the VMM posts the value to a memfd shadow and
      signals an eventfd (:func:`post_write_emulated`: the no-POST_WRITE fallback);
    * ``ioeventfd``: KVM completes the write in-kernel (signal only);
    * ``post_write`` (only where the kernel has it): ioeventfd + shadow copy in-kernel.

    Also returns ``*_net`` = path minus ``ram`` (the doorbell's own cost).
    """
    if bits == 16 and doorbell_gpa >= 0x100000:
        doorbell_gpa = 0xA0000 + (doorbell_gpa & 0xFFF)
    with Kvm() as kvm, kvm.create_vm() as vm:
        ram = vm.add_memory(ram_gpa, 0x10000, slot=0)
        vcpu = vm.create_vcpu(0)
        code_gpa = ram_gpa + 0x1000
        scratch_gpa = ram_gpa + 0x8000
        shadow = MemfdRegion(mmap.PAGESIZE, "shadow-doorbells")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            def timed(target: int, handler: Optional[Callable[[VcpuExit], bool]] = None) -> float:
                best = float("inf")
                prog = prog_write_loop(target, 0xD00DF00D, n, bits=bits)
                for _ in range(repeat):
                    prog.load(vcpu, ram, code_gpa)
                    t0 = time.perf_counter()
                    vcpu.run_until(handler)
                    best = min(best, time.perf_counter() - t0)
                return best / n * 1e6

            out: dict[str, float] = {}
            out["ram"] = timed(scratch_gpa)
            writes = 0

            def count(ex: VcpuExit) -> bool:
                nonlocal writes
                writes += ex.kind == "MMIO" and ex.is_write
                return True

            out["trap"] = timed(doorbell_gpa, count)
            assert writes == n * repeat, (writes, n * repeat)
            emu = PostWriteEmulator()
            emu.add(doorbell_gpa, 4, shadow, 0, efd)
            out["trap_emulated_post"] = timed(doorbell_gpa, emu.handle)
            assert _drain_eventfd(efd) == n * repeat and shadow.ptr("uint32_t *")[0] == 0xD00DF00D
            reg = vm.add_ioeventfd(doorbell_gpa, 4, efd)
            out["ioeventfd"] = timed(doorbell_gpa)
            vm.remove_ioeventfd(reg)
            assert _drain_eventfd(efd) == n * repeat
            if vm.post_write_supported()[0]:
                reg = vm.add_ioeventfd(doorbell_gpa, 4, efd, post_addr=shadow.addr + 8)
                out["post_write"] = timed(doorbell_gpa)
                vm.remove_ioeventfd(reg)
                _drain_eventfd(efd)
            for k in list(out):
                if k != "ram":
                    out[k + "_net"] = out[k] - out["ram"]
            return out
        finally:
            os.close(efd)
            shadow.close()


def _main(argv: list[str]) -> int:
    ok, why = Kvm.available()
    if not ok:
        print(f"KVM unavailable: {why}")
        return 1
    n = int(argv[1]) if len(argv) > 1 else 20_000
    with Kvm() as kvm, kvm.create_vm() as vm:
        print(f"POST_WRITE: {vm.post_write_supported()}")
    for bits in (32, 16):
        r = measure_doorbell_exits(n, bits=bits)
        print(f"{bits}-bit guest, {n} writes, us/write (best of 3):")
        for k, v in r.items():
            print(f"  {k:24s} {v:8.3f}")
        print(f"  trap/ioeventfd (gross)   {r['trap'] / r['ioeventfd']:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
