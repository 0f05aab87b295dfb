"""Tests of vfio_user.vmm.kvm against the real /dev/kvm.

On the development machine /dev/kvm is PVM: guest code runs in KVM's instruction
emulator, both real mode and 32-bit protected mode work, ioeventfds work, and
KVM_IOEVENTFD_FLAG_POST_WRITE is absent (probe answers EINVAL, capability 0): the
POST_WRITE semantics test then checks the userspace emulation instead (and, with
NVME_EMU_EXPECT_POST_WRITE=1, fails). The ABI itself is covered by test_kvm_post_write.py.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

import pytest

from nvme_emu.testing import guest_programs
from vfio_user.vmm import kvm as K
from vfio_user.vmm import x86
from vfio_user.vmm.memory import MemfdRegion
from vfio_user.vmm.post_write import (
    EXPECT_POST_WRITE_ENV,
    PostWriteEmulator,
    measure_doorbell_exits,
    post_write_contract_violation,
    post_write_emulated,
    post_write_expectation,
)
from .support.fds import efd_count
from vfio_user.vmm._kvm_cdef import EXPECTED_LAYOUT, measured_layout

RAM_GPA = 0
RAM_SIZE = 0x10000
CODE_GPA = 0x1000
DATA_GPA = 0x8000              # guest RAM word used for polling
DOORBELL_32 = 0xFEB0_1008      # unbacked: "BAR0 + 0x1000 + 8*qid" style (qid 1)
DOORBELL_16 = 0xA1008          # unbacked and < 1 MiB for real mode

MODES = [pytest.param(32, DOORBELL_32, id="protected32"), pytest.param(16, DOORBELL_16, id="real16")]


def _skip_reason() -> str | None:
    ok, why = K.Kvm.available()
    return None if ok else why


@pytest.fixture(scope="module")
def kvm():
    why = _skip_reason()
    if why is not None:
        print(f"skipping KVM tests: {why}")
        pytest.skip(f"KVM unusable: {why}")
    with K.Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm):
    with kvm.create_vm() as v:
        yield v


@pytest.fixture
def guest(vm):
    """A VM with 64 KiB of memfd RAM at GPA 0 and one vCPU."""
    ram = vm.add_memory(RAM_GPA, RAM_SIZE, slot=0)
    vcpu = vm.create_vcpu(0)
    return vm, ram, vcpu


def _efd(nonblock: bool = True) -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblock else 0))


def _run_collect(vcpu: K.Vcpu, limit: int = 10_000) -> tuple[list[K.VcpuExit], K.VcpuExit]:
    """Run to HLT, returning the MMIO/IO exits seen on the way and the final exit."""
    seen: list[K.VcpuExit] = []

    def handler(ex: K.VcpuExit) -> bool:
        seen.append(ex)
        return ex.kind in ("MMIO", "IO")

    last = vcpu.run_until(handler, max_exits=limit)
    return seen, last


# ---------------------------------------------------------------------------------------
def test_struct_layout_matches_kernel_headers():
    assert measured_layout() == EXPECTED_LAYOUT
    hdr = "/usr/include/linux/kvm.h"
    if os.path.exists(hdr):
        text = open(hdr).read()
        assert "__u8  pad[36];" in text or "pad[36]" in text  # upstream layout we extend


def test_ioctl_numbers():
    assert K.KVM_RUN == 0xAE80
    assert K.KVM_CREATE_VCPU == 0xAE41
    assert K.KVM_GET_REGS == 0x8090AE81
    assert K.KVM_SET_SREGS == 0x4138AE84


def test_program_encodings_match_documentation():
    """Byte-exact check of the encodings documented in the program docstrings."""
    a = x86.prog_write_loop(0x11223344, 0xAABBCCDD, 5)
    assert a.code.hex(" ") == "bb 44 33 22 11 b8 dd cc bb aa b9 05 00 00 00 89 03 49 75 fb f4"
    a16 = x86.prog_write_loop(0xA0000, 0x12345678, 3, bits=16)
    assert a16.code.hex(" ") == ("66 bb 00 00 0a 00 66 b8 78 56 34 12 66 b9 03 00 00 00 "
                                 "67 66 89 03 66 49 75 f8 f4")
    b = x86.prog_ring_and_poll(0x11223344, 0x8000, 5)
    assert b.code.hex(" ") == ("bb 44 33 22 11 be 00 80 00 00 b9 05 00 00 00 b8 01 00 00 00 "
                               "8b 3e 89 03 39 3e 74 fc 40 49 75 f4 f4")
    c = guest_programs.prog_nvme_qd1(0xFEB01008, 0xFEB0100C, 0x9000, 4, 11)
    assert c.code.hex(" ") == (
        "b9 0b 00 00 00 31 c0 31 d2 be 00 90 00 00 bf 00 00 01 00 "
        "40 81 f8 04 00 00 00 75 02 31 c0 89 05 08 10 b0 fe "
        "8b 6e 0c 81 e5 00 00 01 00 39 fd 75 f3 83 c6 10 42 81 fa 04 00 00 00 75 0d "
        "31 d2 be 00 90 00 00 81 f7 00 00 01 00 89 15 0c 10 b0 fe 49 75 c0 f4")
    a8 = x86.prog_write_loop(0x11223344, 0x8877665544332211, 5, width=8, scratch=0x500)
    assert a8.code.hex(" ") == ("be 00 05 00 00 b8 11 22 33 44 89 06 b8 55 66 77 88 89 46 04 0f 6f 06 "
                                "bb 44 33 22 11 b9 05 00 00 00 0f 7f 03 49 75 fa f4")
    s = x86.prog_write_seq(0xFEB01008, [1, 2], sync=0xFEB02000)
    assert s.code.hex(" ") == ("bb 08 10 b0 fe b8 01 00 00 00 89 03 b8 01 00 00 00 89 05 00 20 b0 fe "
                               "bb 08 10 b0 fe b8 02 00 00 00 89 03 b8 02 00 00 00 89 05 00 20 b0 fe f4")
    p = x86.prog_write_seq(0x510, [7], pio=True, width=2, sync="hlt")
    assert p.code.hex(" ") == "66 ba 10 05 b8 07 00 00 00 66 ef f4 f4"


@pytest.mark.parametrize("bits", [32, 16])
def test_mmx_store_is_one_8_byte_mmio_write(guest, bits):
    """Width 8 needs MMX ``movq [ebx], mm0``; KVM's emulator must complete it as ONE
    8-byte MMIO write (SSE ``movq xmm`` is not emulated: internal error on PVM)."""
    vm, ram, vcpu = guest
    db = DOORBELL_32 if bits == 32 else DOORBELL_16
    x86.prog_write_loop(db, 0x8877665544332211, 2, width=8, bits=bits).load(vcpu, ram, CODE_GPA)
    seen, last = _run_collect(vcpu)
    assert last.kind == "HLT"
    assert [(e.kind, e.phys_addr, e.length, e.value) for e in seen] == [("MMIO", db, 8, 0x8877665544332211)] * 2


def test_real_mode_after_protected_mode_on_one_vcpu(guest):
    """enter_real_mode must reset the code segment to 16-bit after enter_protected_mode."""
    vm, ram, vcpu = guest
    for bits, db in ((32, DOORBELL_32), (16, DOORBELL_16)):
        x86.prog_write_loop(db, 0x55, 2, bits=bits).load(vcpu, ram, CODE_GPA)
        seen, last = _run_collect(vcpu, limit=10)
        assert last.kind == "HLT" and [(e.phys_addr, e.value) for e in seen] == [(db, 0x55)] * 2


def test_available_reports(kvm):
    ok, why = K.Kvm.available()
    assert ok, why
    assert kvm.api_version == 12
    assert kvm.vcpu_mmap_size >= 4096
    assert kvm.check_extension(K.KVM_CAP_IOEVENTFD)


def test_available_missing_device():
    ok, why = K.Kvm.available("/nonexistent/kvm")
    assert not ok and "does not exist" in why


@pytest.mark.parametrize("bits,db", MODES)
@pytest.mark.parametrize("width,value", [(4, 0xDEADBEEF), (2, 0xBEEF), (1, 0x5A)])
def test_mmio_write_exits_to_userspace(guest, bits, db, width, value):
    vm, ram, vcpu = guest
    prog = x86.prog_write_loop(db, value, 3, width=width, bits=bits)
    prog.load(vcpu, ram, CODE_GPA)
    seen, last = _run_collect(vcpu)
    assert last.kind == "HLT"
    assert len(seen) == 3
    for ex in seen:
        assert ex.kind == "MMIO" and ex.is_write
        assert ex.phys_addr == db
        assert ex.length == width
        assert ex.value == value
        assert ex.data == value.to_bytes(width, "little")
    assert vcpu.get_regs().rcx == 0


def test_mmio_read_is_answered_by_userspace(guest):
    """A poll of an unbacked address exits as an MMIO read; the answer reaches the guest."""
    vm, ram, vcpu = guest
    # ring DOORBELL, poll an *unbacked* word: first read returns the snapshot (0), the
    # second one a changed value, so exactly one iteration completes.
    prog = x86.prog_ring_and_poll(DOORBELL_32, 0xFEB0_2000, 1)
    prog.load(vcpu, ram, CODE_GPA)
    reads = 0

    def handler(ex: K.VcpuExit) -> bool:
        nonlocal reads
        if ex.kind == "MMIO" and not ex.is_write:
            assert ex.phys_addr == 0xFEB0_2000 and ex.length == 4
            reads += 1
            vcpu.complete_mmio_read((0 if reads == 1 else 7).to_bytes(4, "little"))
        return True

    assert vcpu.run_until(handler).kind == "HLT"
    assert reads == 2
    assert vcpu.get_regs().rdi == 0  # the snapshot the guest took


@pytest.mark.parametrize("bits,db", MODES)
def test_ioeventfd_swallows_writes(guest, bits, db):
    vm, ram, vcpu = guest
    efd = _efd()
    try:
        vm.add_ioeventfd(db, 4, efd)
        n = 57
        x86.prog_write_loop(db, 0x1234, n, bits=bits).load(vcpu, ram, CODE_GPA)
        seen, last = _run_collect(vcpu)
        assert last.kind == "HLT"
        assert seen == []
        assert efd_count(efd) == n
        assert efd_count(efd) == 0
    finally:
        vm.close()  # deregisters before the eventfd goes away
        os.close(efd)


@pytest.mark.parametrize("bits", [32, 16])
def test_pio_exit_and_pio_ioeventfd(guest, bits):
    vm, ram, vcpu = guest
    x86.prog_out_loop(0x510, 0xABCD1234, 2, bits=bits).load(vcpu, ram, CODE_GPA)
    seen, last = _run_collect(vcpu)
    assert last.kind == "HLT"
    assert [(e.kind, e.port, e.length, e.is_write, e.value) for e in seen] == [("IO", 0x510, 4, True, 0xABCD1234)] * 2
    efd = _efd()
    try:
        vm.add_ioeventfd(0x510, 4, efd, pio=True)
        x86.prog_out_loop(0x510, 7, 9, bits=bits).load(vcpu, ram, CODE_GPA)
        seen, last = _run_collect(vcpu)
        assert last.kind == "HLT" and seen == [] and efd_count(efd) == 9
    finally:
        vm.close()
        os.close(efd)


def test_remove_ioeventfd_restores_exits(guest):
    vm, ram, vcpu = guest
    efd = _efd()
    try:
        reg = vm.add_ioeventfd(DOORBELL_32, 4, efd)
        vm.remove_ioeventfd(reg)
        assert vm.ioeventfds == []
        x86.prog_write_loop(DOORBELL_32, 1, 2).load(vcpu, ram, CODE_GPA)
        seen, _ = _run_collect(vcpu)
        assert len(seen) == 2 and efd_count(efd) == 0
        with pytest.raises(K.KvmError) as ei:
            vm.remove_ioeventfd(reg)
        assert ei.value.errno == errno.ENOENT
    finally:
        vm.close()
        os.close(efd)


def test_datamatch_only_catches_matching_values(guest):
    vm, ram, vcpu = guest
    efd = _efd()
    try:
        vm.add_ioeventfd(DOORBELL_32, 4, efd, datamatch=0xAAAA)
        x86.prog_write_loop(DOORBELL_32, 0xAAAA, 5).load(vcpu, ram, CODE_GPA)
        seen, last = _run_collect(vcpu)
        assert last.kind == "HLT" and seen == [] and efd_count(efd) == 5

        x86.prog_write_loop(DOORBELL_32, 0xBBBB, 3).load(vcpu, ram, CODE_GPA)
        seen, last = _run_collect(vcpu)
        assert last.kind == "HLT"
        assert [(e.kind, e.phys_addr, e.value) for e in seen] == [("MMIO", DOORBELL_32, 0xBBBB)] * 3
        assert efd_count(efd) == 0
    finally:
        vm.close()
        os.close(efd)


def test_post_write_probe_is_definite(kvm, vm):
    supported, reason = vm.post_write_supported()
    print(f"POST_WRITE probe: supported={supported} reason={reason!r}")
    assert isinstance(supported, bool) and reason
    assert vm.post_write_supported() == (supported, reason)  # cached
    # the capability (VM fd and /dev/kvm) must agree with the ioctl probe
    cap_vm = vm.check_extension(K.KVM_CAP_IOEVENTFD_POST_WRITE)
    cap_sys = kvm.check_extension(K.KVM_CAP_IOEVENTFD_POST_WRITE)
    assert vm.post_write_cap == cap_vm
    assert f"KVM_CAP_IOEVENTFD_POST_WRITE={K.KVM_CAP_IOEVENTFD_POST_WRITE}) = {cap_vm}" in reason
    assert "inconsistent" not in reason, reason
    assert bool(cap_vm) == bool(cap_sys) == supported, (cap_vm, cap_sys, reason)
    violation = post_write_contract_violation(supported, reason)
    if violation:
        pytest.fail(violation)
    if supported:
        assert vm.post_write_errno == 0
    else:
        # the only answer an unpatched kernel can give for an unknown flag bit
        assert vm.post_write_errno == errno.EINVAL
        assert "EINVAL" in reason and "lacks KVM_IOEVENTFD_FLAG_POST_WRITE" in reason
        efd = _efd()
        try:
            with pytest.raises(K.KvmError) as ei:
                vm.add_ioeventfd(DOORBELL_32, 4, efd, post_addr=0x1000)
            assert ei.value.errno == errno.EINVAL
        finally:
            os.close(efd)


def test_post_write_probe_and_capability_must_agree(vm, monkeypatch):
    """If KVM_CHECK_EXTENSION contradicts the probe, the kernel is reported unsupported and
    the reason says it is inconsistent (forced here by lying about the capability)."""
    real = vm.check_extension
    truth = bool(real(K.KVM_CAP_IOEVENTFD_POST_WRITE))
    monkeypatch.setattr(vm, "check_extension",
                        lambda cap: int(not truth) if cap == K.KVM_CAP_IOEVENTFD_POST_WRITE else real(cap))
    supported, reason = vm.post_write_supported()
    print(reason)
    assert supported is False
    assert reason.startswith("inconsistent kernel") and f"= {int(not truth)}" in reason
    assert vm.post_write_cap == int(not truth)


def test_post_write_expectation_contract(monkeypatch):
    monkeypatch.delenv(EXPECT_POST_WRITE_ENV, raising=False)
    assert post_write_expectation() is None
    assert post_write_contract_violation(False, "r") is None and post_write_contract_violation(True, "r") is None
    monkeypatch.setenv(EXPECT_POST_WRITE_ENV, "1")
    assert post_write_expectation() is True
    assert post_write_contract_violation(True, "r") is None
    assert "refusing to fall back" in post_write_contract_violation(False, "why-not")
    monkeypatch.setenv(EXPECT_POST_WRITE_ENV, "0")
    assert post_write_expectation() is False
    assert post_write_contract_violation(False, "r") is None
    assert "requires a kernel without" in post_write_contract_violation(True, "r")
    monkeypatch.setenv(EXPECT_POST_WRITE_ENV, "yes")
    with pytest.raises(ValueError):
        post_write_expectation()


def test_post_write_semantics(guest):
    """Back-to-back doorbell writes under POST_WRITE: the shadow holds the last value, in
    exactly ``len`` bytes, and the eventfd counts every write. With the kernel flag no
    write exits; without it the same is checked of the userspace fallback (every write
    traps once and PostWriteEmulator stores, then signals). Never skipped."""
    vm, ram, vcpu = guest
    supported, reason = vm.post_write_supported()
    violation = post_write_contract_violation(supported, reason)
    if violation:
        pytest.fail(violation)
    if not supported:
        print(f"kernel lacks KVM_IOEVENTFD_FLAG_POST_WRITE ({reason}); falling back to the emulation: "
              f"PostWriteEmulator (the write traps, the VMM stores the value, then signals the eventfd)")
    efd = _efd()
    shadow = MemfdRegion(mmap.PAGESIZE, "shadow")
    try:
        post = shadow.addr + 0x10
        emu = PostWriteEmulator()
        if supported:
            reg = vm.add_ioeventfd(DOORBELL_32, 4, efd, post_addr=post)
        else:
            emu.add(DOORBELL_32, 4, shadow, 0x10, efd)
        exits: list[tuple[K.VcpuExit, bool]] = []  # (exit, handled by the emulator)

        def handler(ex: K.VcpuExit) -> bool:
            exits.append((ex, emu.handle(ex)))
            return True

        # two bursts with different values, nobody reading in between
        x86.prog_write_loop(DOORBELL_32, 0x11111111, 2).load(vcpu, ram, CODE_GPA)
        assert vcpu.run_until(handler, max_exits=100).kind == "HLT"
        x86.prog_write_loop(DOORBELL_32, 0x33333333, 3).load(vcpu, ram, CODE_GPA)
        assert vcpu.run_until(handler, max_exits=100).kind == "HLT"
        if supported:
            assert exits == []                                  # completed in the kernel
        else:
            assert [(e.kind, e.is_write, e.phys_addr, e.length, e.value, handled) for e, handled in exits] == \
                [("MMIO", True, DOORBELL_32, 4, 0x11111111, True)] * 2 + \
                [("MMIO", True, DOORBELL_32, 4, 0x33333333, True)] * 3
            assert emu.posted == 5
        assert shadow.ptr("uint32_t *", 0x10)[0] == 0x33333333  # last value
        assert shadow.ptr("uint32_t *", 0x14)[0] == 0          # exactly len bytes
        assert shadow.ptr("uint32_t *", 0x0C)[0] == 0
        assert efd_count(efd) == 5                                 # every write counted
        assert efd_count(efd) == 0
        if supported:
            with pytest.raises(K.KvmError) as ei:  # deassign must name the same post_addr
                vm.remove_ioeventfd(DOORBELL_32, 4, efd, post_addr=post + 8)
            assert ei.value.errno == errno.ENOENT
            vm.remove_ioeventfd(reg)
    finally:
        vm.close()
        shadow.close()
        os.close(efd)


def test_emulated_post_write_value_before_signal():
    """The reader, woken by the eventfd, must already see a shadow value at least as new as
    the number of signals it has consumed. It maps the memfd separately, like a server."""
    shadow = MemfdRegion(mmap.PAGESIZE, "shadow")
    efd = _efd(nonblock=False)
    n = 3000
    violations: list[tuple[int, int]] = []
    done = threading.Event()

    def reader() -> None:
        mm = mmap.mmap(shadow.fd, mmap.PAGESIZE)  # second mapping, as another process would
        try:
            with memoryview(mm) as mv, mv.cast("I") as words:
                consumed = 0
                while consumed < n:
                    consumed += os.eventfd_read(efd)
                    seen = words[0x40 // 4]
                    if seen < consumed:
                        violations.append((consumed, seen))
        finally:
            mm.close()
            done.set()

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, n + 1):
            if i % 2:
                post_write_emulated(shadow, 0x40, i, 4, efd)
            else:
                post_write_emulated(shadow.view, 0x40, i, 4, efd)  # memoryview path
        assert done.wait(30)
    finally:
        t.join(30)
        os.close(efd)
        shadow.close()
    assert violations == []


@pytest.mark.parametrize("size,value", [(1, 0x1AB), (2, 0x12345), (4, 0x1_2345_6789), (8, 2**64 + 5)])
def test_emulated_post_write_widths(size, value):
    with MemfdRegion(mmap.PAGESIZE, "shadow") as shadow:
        shadow.view[0:16] = b"\xff" * 16
        efd = _efd()
        try:
            post_write_emulated(shadow.view, 8, value, size, efd)
            expect = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            assert bytes(shadow.view[8 : 8 + size]) == expect
            assert bytes(shadow.view[8 + size : 16]) == b"\xff" * (8 - size)  # no overrun
            assert efd_count(efd) == 1
            with pytest.raises(ValueError):
                post_write_emulated(shadow, 3, 1, 4, efd)  # misaligned
        finally:
            os.close(efd)


def test_trapped_doorbell_emulated_post_write(guest):
    """VMM without POST_WRITE: guest write traps, PostWriteEmulator posts it."""
    vm, ram, vcpu = guest
    efd = _efd()
    try:
        with MemfdRegion(mmap.PAGESIZE, "shadow") as shadow:
            emu = PostWriteEmulator()
            emu.add(DOORBELL_32, 4, shadow, 8, efd)
            x86.prog_write_loop(DOORBELL_32, 0xCAFE0001, 4).load(vcpu, ram, CODE_GPA)
            assert vcpu.run_until(emu.handle).kind == "HLT"
            assert shadow.ptr("uint32_t *", 8)[0] == 0xCAFE0001
            assert efd_count(efd) == 4
    finally:
        os.close(efd)


@pytest.mark.parametrize("bits,db", MODES)
def test_ring_and_poll_trapped(guest, bits, db):
    """Program (b) with the 'device' in the exit handler: each doorbell write completes
    by bumping the polled word in guest RAM."""
    vm, ram, vcpu = guest
    n = 10
    x86.prog_ring_and_poll(db, DATA_GPA, n, first=1, wrap=4, bits=bits).load(vcpu, ram, CODE_GPA)
    values: list[int] = []

    def device(ex: K.VcpuExit) -> bool:
        assert ex.kind == "MMIO" and ex.is_write and ex.phys_addr == db
        values.append(ex.value)
        word = int.from_bytes(ram.read(DATA_GPA, 4), "little")
        ram.write(DATA_GPA, (word + 1).to_bytes(4, "little"))
        return True

    assert vcpu.run_until(device).kind == "HLT"
    assert values == [1, 2, 3, 0, 1, 2, 3, 0, 1, 2]  # tail wraps at 4


def test_ring_and_poll_with_ioeventfd_and_server_thread(guest):
    """Program (b) the way the real thing works: the doorbell is an ioeventfd, a separate
    thread (the 'server') wakes on it and completes by writing guest RAM via the memfd."""
    vm, ram, vcpu = guest
    efd = _efd(nonblock=False)
    n = 20
    vm.add_ioeventfd(DOORBELL_32, 4, efd)
    x86.prog_ring_and_poll(DOORBELL_32, DATA_GPA, n).load(vcpu, ram, CODE_GPA)
    stop = threading.Event()

    def server() -> None:
        mm = mmap.mmap(ram.fd, RAM_SIZE)  # the server maps guest RAM by fd
        try:
            with memoryview(mm) as mv, mv.cast("I") as words:
                done = 0
                while done < n and not stop.is_set():
                    done += os.eventfd_read(efd)
                    words[DATA_GPA // 4] = done
        finally:
            mm.close()

    t = threading.Thread(target=server, daemon=True)
    t.start()
    try:
        seen, last = _run_collect(vcpu, limit=1000)
        assert last.kind == "HLT" and seen == []
        t.join(10)
        assert not t.is_alive()
        assert int.from_bytes(ram.read(DATA_GPA, 4), "little") == n
    finally:
        stop.set()
        if t.is_alive():
            os.eventfd_write(efd, 1)
            t.join(5)
        vm.close()
        os.close(efd)


def test_nvme_qd1_program(guest):
    """Program (c): SQ-tail doorbell, CQE phase polling, CQ-head doorbell, with wrap."""
    vm, ram, vcpu = guest
    bar0 = 0xFEB0_0000
    sqdb, cqdb = bar0 + 0x1000 + 8 * 1, bar0 + 0x1000 + 8 * 1 + 4
    cq_base, qsize, n = 0x9000, 4, 11
    guest_programs.prog_nvme_qd1(sqdb, cqdb, cq_base, qsize, n).load(vcpu, ram, CODE_GPA)
    state = {"cq_tail": 0, "phase": 1, "sq_head": 0}
    log: list[tuple[str, int]] = []

    def controller(ex: K.VcpuExit) -> bool:
        assert ex.kind == "MMIO" and ex.is_write and ex.length == 4
        if ex.phys_addr == sqdb:
            log.append(("sq", ex.value))
            while state["sq_head"] != ex.value:  # "execute" each new SQE: post a CQE
                slot = cq_base + 16 * state["cq_tail"]
                dw3 = (state["phase"] << 16) | state["sq_head"]  # status phase | CID
                ram.write(slot, bytes(12) + dw3.to_bytes(4, "little"))
                state["sq_head"] = (state["sq_head"] + 1) % qsize
                state["cq_tail"] += 1
                if state["cq_tail"] == qsize:
                    state["cq_tail"], state["phase"] = 0, state["phase"] ^ 1
        elif ex.phys_addr == cqdb:
            log.append(("cq", ex.value))
        else:
            raise AssertionError(ex)
        return True

    assert vcpu.run_until(controller).kind == "HLT"
    expect = []
    for i in range(1, n + 1):
        expect += [("sq", i % qsize), ("cq", i % qsize)]
    assert log == expect


def test_fds_and_mappings_are_released(kvm):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def memfd_maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(("memfd:" in line) or ("kvm-vcpu" in line) for line in f)

    before_fd, before_maps = fds(), memfd_maps()
    efd = _efd()
    with kvm.create_vm() as vm:
        ram = vm.add_memory(0, RAM_SIZE, slot=0)
        vm.add_memory(0x100000, 2 * mmap.PAGESIZE, slot=1)
        vcpu = vm.create_vcpu(0)
        vm.add_ioeventfd(DOORBELL_32, 4, efd)
        vm.post_write_supported()
        x86.prog_write_loop(DOORBELL_32, 1, 3).load(vcpu, ram, CODE_GPA)
        assert vcpu.run_until().kind == "HLT"
        assert fds() > before_fd + 3
        assert memfd_maps() >= before_maps + 3
        vm.remove_memory(1)
    os.close(efd)
    assert fds() == before_fd
    assert memfd_maps() == before_maps
    assert vcpu.fd == -1 and ram.region.mmap is None


def test_measure_doorbell_exits_smoke(kvm):
    r = measure_doorbell_exits(300, repeat=1)
    print({k: round(v, 3) for k, v in r.items()})
    assert r["trap"] > r["ioeventfd"] > 0
    assert r["trap_emulated_post"] > r["ioeventfd"]
