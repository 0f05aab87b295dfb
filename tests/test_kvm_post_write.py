"""ABI tests of the proposed KVM_IOEVENTFD_FLAG_POST_WRITE, against the real /dev/kvm.

The mode is decided at run time, once per module (printed; run with -s to see it):

* ``kernel``: the kernel has the flag (probe accepted and KVM_CAP_IOEVENTFD_POST_WRITE >
  0). Registrations are real KVM ioeventfds with post_addr; the registered writes must
  complete in the kernel: zero MMIO/IO exits for them.
* ``emulated``: the kernel lacks it (this development machine: PVM, probe EINVAL). The
  same scenarios run with the VMM's fallback: every registered write traps, and
  :class:`~vfio_user.vmm.post_write.PostWriteEmulator` stores the value then signals; each
  registered write must exit exactly once and be posted. Cases that are properties of the
  kernel implementation turn into checks that the flag itself is rejected (the
  detection), or (copy failure) are skipped with the reason.

Both modes check the same observable results: bytes at post_addr (exactly ``len`` bytes
written, a canary around them intact), eventfd counts, and which writes reached userspace.

``NVME_EMU_EXPECT_POST_WRITE=1`` requires ``kernel`` mode (every test fails otherwise),
``=0`` requires ``emulated``; unset adapts.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import cffi
import pytest

from vfio_user.vmm import kvm as K
from vfio_user.vmm import x86
from vfio_user.vmm.memory import GuestRam, MemfdRegion
from vfio_user.vmm.post_write import EXPECT_POST_WRITE_ENV, PostWriteEmulator, post_write_contract_violation, post_write_expectation
from .support.fds import efd_count

RAM_GPA = 0
RAM_SIZE = 0x10000
CODE_GPA = 0x1000
DB = 0xFEB0_1008            # unbacked doorbell GPA ("BAR0 + 0x1000 + 8*qid")
SYNC = 0xFEB0_2000          # unbacked, never registered: a write here is a plain exit
PORT = 0x510
POST_OFF = 0x10             # post_addr = shadow.addr + POST_OFF (8-byte aligned)
CANARY = b"\xa5\x5a\xc3\x3c"
KERNEL_HALF = 0xFFFF_8000_0000_0000
PAGE = mmap.PAGESIZE

VALUE = {1: 0x5B, 2: 0xBEEF, 4: 0xDEADBEEF, 8: 0x0123_4567_89AB_CDEF}
OTHER = {1: 0x11, 2: 0x1234, 4: 0x1234_5678, 8: 0x7766_5544_3322_1100}

_libc_ffi = cffi.FFI()
_libc_ffi.cdef("void *mmap(void *addr, size_t len, int prot, int flags, int fd, long off);"
               "int munmap(void *addr, size_t len);")
_libc = _libc_ffi.dlopen(None)


# --------------------------------------------------------------------------------------
# Mode decision
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    name: str                 # "kernel" or "emulated"
    why: str
    violation: Optional[str]  # NVME_EMU_EXPECT_POST_WRITE contradicted (tests must fail)
    probe_errno: Optional[int]

    @property
    def kernel(self) -> bool:
        return self.name == "kernel"


@pytest.fixture(scope="module")
def kvm():
    ok, why = K.Kvm.available()
    if not ok:
        if post_write_expectation() is not None:
            pytest.fail(f"{EXPECT_POST_WRITE_ENV} is set but KVM is unusable: {why}")
        pytest.skip(f"KVM unusable: {why}")
    with K.Kvm() as k:
        yield k


@pytest.fixture(scope="module")
def mode(kvm) -> Mode:
    with kvm.create_vm() as vm:
        supported, reason = vm.post_write_supported()
        probe_errno = vm.post_write_errno
    violation = post_write_contract_violation(supported, reason)
    if supported:
        m = Mode("kernel", f"kernel has KVM_IOEVENTFD_FLAG_POST_WRITE ({reason}): real registrations, "
                           f"registered writes must not exit", violation, probe_errno)
    else:
        m = Mode("emulated", f"kernel lacks KVM_IOEVENTFD_FLAG_POST_WRITE ({reason}): registered writes "
                             f"trap and PostWriteEmulator posts them (store, then signal)", violation, probe_errno)
    print(f"\n{__name__}: POST_WRITE mode = {m.name}: {m.why}"
          + (f"\n  CONTRACT VIOLATION: {violation}" if violation else ""))
    return m


# --------------------------------------------------------------------------------------
# Rig: one VM + vCPU + RAM, registrations in either mode, and everything to close
# --------------------------------------------------------------------------------------
@dataclass
class Reg:
    target: int
    width: int
    efd: int
    shadow: MemfdRegion
    off: int
    datamatch: Optional[int]
    pio: bool
    kvm_reg: Optional[K.IoEventFd] = None


Exits = list[tuple[K.VcpuExit, bool]]  # (MMIO/IO exit, posted by the emulator)


@dataclass
class Rig:
    mode: Mode
    vm: K.VirtualMachine
    ram: GuestRam = field(init=False)
    vcpu: K.Vcpu = field(init=False)
    emu: PostWriteEmulator = field(default_factory=PostWriteEmulator)
    _fds: list[int] = field(default_factory=list)
    _regions: list[MemfdRegion] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ram = self.vm.add_memory(RAM_GPA, RAM_SIZE, slot=0)
        self.vcpu = self.vm.create_vcpu(0)

    def require(self) -> None:
        """Fail (in the test body) when the run's expectation contradicts the kernel."""
        if self.mode.violation:
            pytest.fail(self.mode.violation)

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        return fd

    def shadow(self) -> MemfdRegion:
        """A one-page shadow region filled with the canary pattern."""
        r = MemfdRegion(PAGE, "post-write-shadow")
        self._regions.append(r)
        r.view[:] = CANARY * (PAGE // len(CANARY))
        return r

    def register(self, target: int, width: int, efd: int, shadow: MemfdRegion, off: int = POST_OFF, *,
                 datamatch: Optional[int] = None, pio: bool = False) -> Reg:
        self.require()
        reg = Reg(target, width, efd, shadow, off, datamatch, pio)
        if self.mode.kernel:
            reg.kvm_reg = self.vm.add_ioeventfd(target, width, efd, datamatch=datamatch,
                                                post_addr=shadow.addr + off, pio=pio)
        else:
            self.emu.add(target, width, shadow, off, efd, datamatch=datamatch, pio=pio)
        return reg

    def unregister(self, reg: Reg) -> None:
        if reg.kvm_reg is not None:
            self.vm.remove_ioeventfd(reg.kvm_reg)
        else:
            self.emu.remove(reg.target, pio=reg.pio)

    def run(self, prog: Optional[x86.GuestProgram] = None,
            on_exit: Optional[Callable[[K.VcpuExit], None]] = None) -> Exits:
        """Load ``prog`` (or continue after the last HLT) and run to the next HLT.

        Returns every MMIO/IO exit on the way with whether the emulator posted it; exits
        not posted are also passed to ``on_exit`` (the moment userspace sees them)."""
        if prog is not None:
            prog.load(self.vcpu, self.ram, CODE_GPA)
        exits: Exits = []

        def handler(ex: K.VcpuExit) -> bool:
            if ex.kind == "INTR":
                return True
            if ex.kind not in ("MMIO", "IO"):
                return False  # run_until raises with the description
            posted = self.emu.handle(ex)
            exits.append((ex, posted))
            if not posted and on_exit is not None:
                on_exit(ex)
            return True

        assert self.vcpu.run_until(handler, max_exits=200).kind == "HLT"
        return exits

    def check_registered_writes(self, exits: Exits, expected: list[tuple[int, int, int]], *,
                                pio: bool = False) -> None:
        """The registered writes (``(target, width, value)``, in order) were completed by
        POST_WRITE: in kernel mode without any exit; in emulated mode each as exactly one
        exit, posted by the emulator."""
        kind = "IO" if pio else "MMIO"
        posted = [(ex.kind, _where(ex), ex.length, ex.value) for ex, p in exits if p]
        if self.mode.kernel:
            assert posted == []  # the emulator holds no entries in kernel mode
            registered = {(kind, t, w, v) for t, w, v in expected}
            leaked = [ex for ex, _ in exits if (ex.kind, _where(ex), ex.length, ex.value) in registered]
            assert leaked == [], "registered POST_WRITE writes reached userspace"
        else:
            assert posted == [(kind, t, w, v) for t, w, v in expected]
            assert all(ex.is_write for ex, p in exits if p)

    def close(self) -> None:
        self.vm.close()  # drops KVM registrations before their shadows/eventfds go
        for r in self._regions:
            r.close()
        for fd in self._fds:
            os.close(fd)
        self._regions.clear()
        self._fds.clear()


def _where(ex: K.VcpuExit) -> int:
    return ex.port if ex.kind == "IO" else ex.phys_addr


def _unposted(exits: Exits) -> list[tuple[str, int, int, int]]:
    return [(ex.kind, _where(ex), ex.length, ex.value) for ex, p in exits if not p]


def _page_with(value: Optional[int], width: int, off: int = POST_OFF) -> bytes:
    """The canary page with ``value`` in exactly ``width`` bytes at ``off`` (None: untouched)."""
    page = bytearray(CANARY * (PAGE // len(CANARY)))
    if value is not None:
        page[off : off + width] = value.to_bytes(width, "little")
    return bytes(page)


@pytest.fixture
def rig(kvm, mode):
    vm = kvm.create_vm()
    try:
        r = Rig(mode, vm)
    except BaseException:
        vm.close()
        raise
    try:
        yield r
    finally:
        r.close()


# --------------------------------------------------------------------------------------
# Invalid configurations
# --------------------------------------------------------------------------------------
INVALID = {
    # name: (what, errno in kernel mode)
    "len0": ("len 0 with the flag", errno.EINVAL),
    "post_addr_null": ("post_addr 0 with the flag", errno.EINVAL),
    "post_addr_kernel_half": (f"post_addr {KERNEL_HALF:#x} (not a user address)", errno.EINVAL),
    "post_addr_without_flag": ("post_addr set without the flag", errno.EINVAL),
    "deassign_other_post_addr": ("deassign naming another post_addr", errno.ENOENT),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_configuration(rig, case):
    rig.require()
    what, kernel_errno = INVALID[case]
    vm, efd, shadow = rig.vm, rig.eventfd(), rig.shadow()
    post = shadow.addr + POST_OFF
    POST_WRITE = K.IOEVENTFD_FLAG_POST_WRITE
    attempts = {
        "len0": lambda: vm.ioeventfd_ioctl(DB, 0, efd, POST_WRITE, post_addr=post),
        "post_addr_null": lambda: vm.ioeventfd_ioctl(DB, 4, efd, POST_WRITE, post_addr=0),
        "post_addr_kernel_half": lambda: vm.ioeventfd_ioctl(DB, 4, efd, POST_WRITE, post_addr=KERNEL_HALF),
        "post_addr_without_flag": lambda: vm.ioeventfd_ioctl(DB, 4, efd, 0, post_addr=post),
        # assign is valid; the deassign with post+8 is what must fail
        "deassign_other_post_addr": lambda: vm.ioeventfd_ioctl(DB, 4, efd, POST_WRITE, post_addr=post),
    }
    if rig.mode.kernel:
        if case == "deassign_other_post_addr":
            attempts[case]()
            with pytest.raises(K.KvmError) as ei:
                vm.ioeventfd_ioctl(DB, 4, efd, POST_WRITE | K.IOEVENTFD_FLAG_DEASSIGN, post_addr=post + 8)
            assert ei.value.errno == kernel_errno, f"{what}: {ei.value}"
            # the registration is still there and still posts; the right post_addr removes it
            assert rig.run(x86.prog_write_loop(DB, 7, 1)) == [] and efd_count(efd) == 1
            assert bytes(shadow.view) == _page_with(7, 4)
            vm.ioeventfd_ioctl(DB, 4, efd, POST_WRITE | K.IOEVENTFD_FLAG_DEASSIGN, post_addr=post)
            with pytest.raises(K.KvmError) as ei:
                vm.ioeventfd_ioctl(DB, 4, efd, POST_WRITE | K.IOEVENTFD_FLAG_DEASSIGN, post_addr=post)
            assert ei.value.errno == errno.ENOENT
            return
        with pytest.raises(K.KvmError) as ei:
            attempts[case]()
        assert ei.value.errno == kernel_errno, f"{what}: {ei.value}"
        # nothing was registered: a write to DB still exits
        exits = rig.run(x86.prog_write_loop(DB, 7, 1))
        assert _unposted(exits) == [("MMIO", DB, 4, 7)] and efd_count(efd) == 0
        return

    # emulated: the kernel does not know the flag, so every configuration carrying it is
    # rejected with EINVAL before any of its fields are looked at (that is the detection).
    assert rig.mode.probe_errno == errno.EINVAL
    if case == "post_addr_without_flag":
        # Kernels without the flag never read these bytes (padding): accepted, and the
        # registration is a plain ioeventfd that posts nothing.
        attempts[case]()
        exits = rig.run(x86.prog_write_loop(DB, 7, 2))
        assert exits == [] and efd_count(efd) == 2
        assert bytes(shadow.view) == _page_with(None, 4)
        vm.ioeventfd_ioctl(DB, 4, efd, K.IOEVENTFD_FLAG_DEASSIGN, post_addr=post)
        return
    with pytest.raises(K.KvmError) as ei:
        attempts[case]()
    assert ei.value.errno == errno.EINVAL, f"{what}: {ei.value}"
    if case == "deassign_other_post_addr":
        # Stock kernels do not validate flags on deassign: it simply finds nothing.
        with pytest.raises(K.KvmError) as ei:
            vm.ioeventfd_ioctl(DB, 4, efd, POST_WRITE | K.IOEVENTFD_FLAG_DEASSIGN, post_addr=post + 8)
        assert ei.value.errno == errno.ENOENT


# --------------------------------------------------------------------------------------
# Widths, datamatch, ordering, deassign
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_mmio_widths_post_exactly_len_bytes(rig, width):
    efd, shadow = rig.eventfd(), rig.shadow()
    rig.register(DB, width, efd, shadow)
    value = VALUE[width]
    exits = rig.run(x86.prog_write_loop(DB, value, 3, width=width))
    rig.check_registered_writes(exits, [(DB, width, value)] * 3)
    assert _unposted(exits) == []
    assert bytes(shadow.view) == _page_with(value, width)
    assert efd_count(efd) == 3


@pytest.mark.parametrize("width", [2, 4])
def test_other_width_at_registered_address_is_not_posted(rig, width):
    """A registration matches its length only: a 1-byte write to it is a normal exit."""
    efd, shadow = rig.eventfd(), rig.shadow()
    rig.register(DB, width, efd, shadow)
    exits = rig.run(x86.prog_write_loop(DB, 0x77, 2, width=1))
    assert _unposted(exits) == [("MMIO", DB, 1, 0x77)] * 2
    assert bytes(shadow.view) == _page_with(None, width) and efd_count(efd) == 0


@pytest.mark.parametrize("width", [4, 8])
def test_datamatch(rig, width):
    """Mismatch: exits to userspace, post_addr untouched, no count. Match: posted."""
    efd, shadow = rig.eventfd(), rig.shadow()
    match, miss = VALUE[width], OTHER[width]
    rig.register(DB, width, efd, shadow, datamatch=match)
    pages: list[bytes] = []
    exits = rig.run(x86.prog_write_seq(DB, [miss, match, miss], width=width),
                    on_exit=lambda ex: pages.append(bytes(shadow.view)))
    rig.check_registered_writes(exits, [(DB, width, match)])
    assert _unposted(exits) == [("MMIO", DB, width, miss)] * 2
    assert pages == [_page_with(None, width), _page_with(match, width)]  # seen at each mismatch
    assert bytes(shadow.view) == _page_with(match, width)
    assert efd_count(efd) == 1


@pytest.mark.parametrize("sync", ["hlt", "mmio"])
def test_writes_with_an_exit_between_each(rig, sync):
    """After each write the vCPU comes back to userspace: post_addr holds that write's
    value and the eventfd counts exactly 1."""
    efd, shadow = rig.eventfd(), rig.shadow()
    rig.register(DB, 4, efd, shadow)
    values = [0x1111_0001, 0x2222_0002, 0x3333_0003]
    seen: list[tuple[int, int]] = []  # (post_addr value, eventfd count) at each sync point

    def at_sync(ex: K.VcpuExit) -> None:
        assert (ex.kind, ex.phys_addr) == ("MMIO", SYNC)
        seen.append((shadow.ptr("uint32_t *", POST_OFF)[0], efd_count(efd)))

    if sync == "hlt":
        prog = x86.prog_write_seq(DB, values, sync="hlt")
        for i, v in enumerate(values):
            exits = rig.run(prog if i == 0 else None)
            rig.check_registered_writes(exits, [(DB, 4, v)])
            assert _unposted(exits) == []
            seen.append((shadow.ptr("uint32_t *", POST_OFF)[0], efd_count(efd)))
        assert rig.run() == []  # the final HLT
    else:
        exits = rig.run(x86.prog_write_seq(DB, values, sync=SYNC), on_exit=at_sync)
        rig.check_registered_writes(exits, [(DB, 4, v) for v in values])
        assert _unposted(exits) == [("MMIO", SYNC, 4, i) for i in (1, 2, 3)]
    assert seen == [(v, 1) for v in values]
    assert bytes(shadow.view) == _page_with(values[-1], 4)


def test_writes_without_exit_between(rig):
    """Back to back: one eventfd read returns the number of writes; the last value wins."""
    efd, shadow = rig.eventfd(), rig.shadow()
    rig.register(DB, 4, efd, shadow)
    values = [0xA000_0001, 0xB000_0002, 0xC000_0003]
    exits = rig.run(x86.prog_write_seq(DB, values))
    rig.check_registered_writes(exits, [(DB, 4, v) for v in values])
    assert _unposted(exits) == []
    assert efd_count(efd) == 3
    assert bytes(shadow.view) == _page_with(values[-1], 4)


def test_deassign_restores_exits(rig):
    efd, shadow = rig.eventfd(), rig.shadow()
    reg = rig.register(DB, 4, efd, shadow)
    exits = rig.run(x86.prog_write_seq(DB, [0x0101_0101]))
    rig.check_registered_writes(exits, [(DB, 4, 0x0101_0101)])
    assert efd_count(efd) == 1
    rig.unregister(reg)
    exits = rig.run(x86.prog_write_seq(DB, [0x0202_0202, 0x0303_0303]))
    assert [p for _, p in exits] == [False, False]
    assert _unposted(exits) == [("MMIO", DB, 4, 0x0202_0202), ("MMIO", DB, 4, 0x0303_0303)]
    assert bytes(shadow.view) == _page_with(0x0101_0101, 4)  # untouched since the deassign
    assert efd_count(efd) == 0


def test_two_registrations_post_to_their_own_slots(rig):
    """Two doorbells, one shadow page, one eventfd each: values do not cross."""
    efd1, efd2, shadow = rig.eventfd(), rig.eventfd(), rig.shadow()
    rig.register(DB, 4, efd1, shadow, POST_OFF)
    rig.register(DB + 4, 4, efd2, shadow, POST_OFF + 8)
    exits = rig.run(x86.prog_write_seq(DB, [0x5151_5151]))
    exits += rig.run(x86.prog_write_seq(DB + 4, [0x6262_6262, 0x7373_7373]))
    rig.check_registered_writes(exits, [(DB, 4, 0x5151_5151), (DB + 4, 4, 0x6262_6262),
                                        (DB + 4, 4, 0x7373_7373)])
    expect = bytearray(_page_with(0x5151_5151, 4))
    expect[POST_OFF + 8 : POST_OFF + 12] = (0x7373_7373).to_bytes(4, "little")
    assert bytes(shadow.view) == bytes(expect)
    assert (efd_count(efd1), efd_count(efd2)) == (1, 2)


# --------------------------------------------------------------------------------------
# Port I/O
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 2, 4])
def test_pio_widths(rig, width):
    efd, shadow = rig.eventfd(), rig.shadow()
    rig.register(PORT, width, efd, shadow, pio=True)
    values = [OTHER[width], VALUE[width]]
    exits = rig.run(x86.prog_write_seq(PORT, values, pio=True, width=width))
    rig.check_registered_writes(exits, [(PORT, width, v) for v in values], pio=True)
    assert _unposted(exits) == []
    assert bytes(shadow.view) == _page_with(VALUE[width], width)
    assert efd_count(efd) == 2


@pytest.mark.parametrize("width", [1, 4])
def test_pio_datamatch(rig, width):
    efd, shadow = rig.eventfd(), rig.shadow()
    match, miss = VALUE[width], OTHER[width]
    rig.register(PORT, width, efd, shadow, datamatch=match, pio=True)
    pages: list[bytes] = []
    exits = rig.run(x86.prog_write_seq(PORT, [miss, match, miss], pio=True, width=width),
                    on_exit=lambda ex: pages.append(bytes(shadow.view)))
    rig.check_registered_writes(exits, [(PORT, width, match)], pio=True)
    assert _unposted(exits) == [("IO", PORT, width, miss)] * 2
    assert pages == [_page_with(None, width), _page_with(match, width)]
    assert efd_count(efd) == 1


# --------------------------------------------------------------------------------------
# Copy failure (kernel only)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["unmapped_after_assign", "unmapped_before_assign"])
def test_copy_failure_exits_without_signal(rig, when):
    """post_addr not mapped at write time: the copy fails, the eventfd is NOT signalled and
    the write reaches userspace as a normal MMIO exit.

    The page sits between two mapped guard pages, so the hole is exactly one page and
    nothing the test process maps meanwhile (all larger) can land in it."""
    rig.require()
    if not rig.mode.kernel:
        why = f"copy failure is a property of the kernel's POST_WRITE; {rig.mode.why}"
        print(f"not applicable in emulated mode: {why}")
        pytest.skip(why)
    efd = rig.eventfd()
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    base = _libc.mmap(_libc_ffi.NULL, 3 * PAGE, prot, flags, -1, 0)
    base_addr = int(_libc_ffi.cast("uintptr_t", base))
    assert base_addr != 2**64 - 1, "mmap failed"
    hole = base_addr + PAGE
    post = hole + POST_OFF
    unmapped = False
    registered = False
    try:
        _libc_ffi.cast("uint8_t *", hole)[POST_OFF] = 0xEE  # fault it in: it really was mapped
        if when == "unmapped_before_assign":
            assert _libc.munmap(_libc_ffi.cast("void *", hole), PAGE) == 0
            unmapped = True
            try:
                rig.vm.add_ioeventfd(DB, 4, efd, post_addr=post)
            except K.KvmError as e:  # access_ok-only kernels accept it; a stricter one may not
                assert e.errno == errno.EINVAL, e
                print(f"post_addr in an unmapped page rejected at assign time: {e}")
                return
        else:
            rig.vm.add_ioeventfd(DB, 4, efd, post_addr=post)
        registered = True
        if not unmapped:
            assert _libc.munmap(_libc_ffi.cast("void *", hole), PAGE) == 0
            unmapped = True
        exits = rig.run(x86.prog_write_loop(DB, 0xFA11_FA11, 2))
        assert _unposted(exits) == [("MMIO", DB, 4, 0xFA11_FA11)] * 2
        assert efd_count(efd) == 0
        rig.vm.remove_ioeventfd(DB, 4, efd, post_addr=post)  # same post_addr: must still match
        registered = False
    finally:
        if registered:
            rig.vm.close()  # the registration goes with the VM fd
        if unmapped:
            _libc.munmap(base, PAGE)
            _libc.munmap(_libc_ffi.cast("void *", hole + PAGE), PAGE)
        else:
            _libc.munmap(base, 3 * PAGE)


# --------------------------------------------------------------------------------------
# Housekeeping
# --------------------------------------------------------------------------------------
def test_rig_releases_fds_and_mappings(kvm, mode):
    """Everything a scenario opens (VM, vCPU, RAM, shadows, eventfds) is closed again."""
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(("memfd:" in line) or ("kvm-vcpu" in line) for line in f)

    before = fds(), maps()
    r = Rig(mode, kvm.create_vm())
    try:
        efd, shadow = r.eventfd(), r.shadow()
        r.register(DB, 8, efd, shadow)
        r.run(x86.prog_write_loop(DB, VALUE[8], 2, width=8))
        assert efd_count(efd) == 2
        assert fds() > before[0] and maps() > before[1]
    finally:
        r.close()
    assert (fds(), maps()) == before
