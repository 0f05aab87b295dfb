"""Real KVM: a few guest instructions ring an NVMe doorbell of the server and poll the CQ.

The server runs in this process (a thread), so the test reaches its eventfds through the
client's GET_REGION_IO_FDS. Guest RAM is one memfd that is both the KVM memory slot (GPA 0)
and what the vfio-user client DMA-maps to the server (IOVA 0 = GPA 0): the NVMe queues and
data buffers live in KVM guest memory. The host driver prepares the SQEs; the guest program
advances the SQ tail, writes the doorbell, spins on the CQ phase bit and writes the CQ head.

* shadow path: the doorbell registers are KVM ioeventfds with POST_WRITE pointing at the
  server's shadow slots where the kernel has the flag; where it does not (no released kernel
  has it), a plain KVM ioeventfd with the server's eventfd is registered on a separate probe
  address (proving the in-kernel signal reaches the server), and the real doorbell writes
  trap to this VMM, which posts them with PostWriteEmulator (value, then signal).
* ioeventfd path + Doorbell Buffer Config: the guest stores its tail in the shadow doorbell
  buffer, then writes the doorbell, which a plain KVM ioeventfd (the server's type-0 record)
  completes in-kernel; the server reads the value from the shadow buffer.

Skipped (with the reason printed) only where /dev/kvm is unusable.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import threading
import time

import pytest

from ..support.server import DEADLINE, wait_until
from .db_helpers import LBA, PAGE, HostSession, pattern
from nvme_emu.queue import CQE
from nvme_emu.spec.commands import CQE_SIZE, NvmOpcode, Status
from nvme_emu.spec.registers import Reg
from nvme_emu.testing import guest_programs
from vfio_user.vmm import kvm as K
from vfio_user.vmm import x86
from vfio_user.vmm.memory import MemfdRegion
from vfio_user.vmm.post_write import PostWriteEmulator, post_write_expectation

BAR0_GPA = 0xFEB0_0000  # unbacked: every access is MMIO
PROBE_GPA = 0xFEBF_E000  # the "separate probe address" (not the kvm module's own probe GPA)
RAM_SIZE = 2 << 20
CODE_GPA = 0x1000
HOST_MEM = 0x10000  # the host driver allocates from here up; code and stack below
QID = 2  # a queue pair only the guest drives (starts at tail/head 0, phase 1)
DEPTH = 16
N = 10


def _kvm_or_skip() -> None:
    """Skip where there is no /dev/kvm for us; where there is one, it must work."""
    if not os.path.exists("/dev/kvm") or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        _ok, why = K.Kvm.available()
        print(f"KVM doorbell test skipped: {why}")
        pytest.skip(f"KVM unusable: {why}")
    for attempt in range(3):  # a VM creation can fail transiently while others use KVM
        ok, why = K.Kvm.available()
        if ok:
            return
        print(f"KVM not usable (attempt {attempt + 1}): {why}")
        time.sleep(0.5)
    pytest.fail(f"/dev/kvm exists but is not usable: {why}")


def _db_gpa(slot: int) -> int:
    return BAR0_GPA + Reg.DOORBELLS + 4 * slot


class GuestHung(Exception):
    """Not an OSError: Vcpu.run() turns OSErrors out of KVM_RUN into KvmError."""


class _Watchdog:
    """Interrupts KVM_RUN (EINTR via a signal to this thread) so a guest spinning forever
    on a completion that never comes fails the test instead of hanging it."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.main = threading.get_ident()
        self.done = threading.Event()

    def _handler(self, signum, frame) -> None:
        if time.monotonic() > self.deadline:
            raise GuestHung("the guest program did not reach HLT: a doorbell was not served")

    def __enter__(self) -> "_Watchdog":
        self.old = signal.signal(signal.SIGUSR2, self._handler)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.done.wait(0.1):
            signal.pthread_kill(self.main, signal.SIGUSR2)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        signal.signal(signal.SIGUSR2, self.old)


def _run_guest(vcpu: K.Vcpu, handler) -> K.VcpuExit:
    with _Watchdog(DEADLINE * 2):
        return vcpu.run_until(handler)


def _prepare(s: HostSession) -> tuple[list[int], list[int]]:
    """Data on the namespace (written by the host), then N read SQEs on queue QID, not rung."""
    for i in range(N):
        buf = s.mem.alloc(PAGE)
        s.mem.write(buf, pattern(99, i))
        s.submit_io(1, NvmOpcode.WRITE, i * (PAGE // LBA), buf, ring=True)
        assert s.host.wait(1, 1)[0].status == Status.SUCCESS
    s.host.create_io_queue_pair(QID, DEPTH)
    rbufs = [s.mem.alloc(PAGE) for _ in range(N)]
    for buf in rbufs:
        s.mem.write(buf, b"\xee" * PAGE)
    cids = [s.submit_io(QID, NvmOpcode.READ, i * (PAGE // LBA), buf, ring=False) for i, buf in enumerate(rbufs)]
    return cids, rbufs


def _check_done(s: HostSession, cids: list[int], rbufs: list[int]) -> None:
    q = s.host.queues[QID]
    for i, cid in enumerate(cids):
        _dw0, _dw1, sqhd, sqid, got_cid, sf = CQE.unpack_from(s.mem.view, q.cq + i * CQE_SIZE - s.mem.iova)
        assert (sqid, got_cid, sf & 1, (sf >> 1) & 0x7FF) == (QID, cid, 1, Status.SUCCESS), f"CQE {i}"
    for i, buf in enumerate(rbufs):
        assert s.mem.read(buf, PAGE) == pattern(99, i), f"read {i}: wrong data"


def _create_vm(kvm: K.Kvm) -> K.VirtualMachine:
    """KVM_CREATE_VM, retried on EINTR (seen here when a signal is pending during creation;
    vfio_user.vmm.kvm does not retry ioctls itself)."""
    for attempt in range(5):
        try:
            return kvm.create_vm()
        except K.KvmError as e:
            if e.errno != errno.EINTR or attempt == 4:
                raise
            print(f"KVM_CREATE_VM interrupted (attempt {attempt + 1}), retrying")
    raise AssertionError("unreachable")


def _guest_ram(vm: K.VirtualMachine):
    region = MemfdRegion(RAM_SIZE, "kvm-guest-ram")
    ram = vm.add_memory(0, region, slot=0)
    return region, ram


def test_guest_doorbell_shadow_ioeventfd(inproc):
    _kvm_or_skip()
    srv = inproc("shadow")
    with K.Kvm() as kvm:
        vm = _create_vm(kvm)
        region, ram = _guest_ram(vm)
        s = HostSession(srv.path, ram=region, ram_size=RAM_SIZE, iova=0, mem_offset=HOST_MEM)
        shadow = None
        try:
            vcpu = vm.create_vcpu(0)
            s.bring_up("trap", depth=16)  # admin and setup by trapped writes
            iofds = s.client.region_io_fds(0)
            by_slot = {(f.gpa_offset - Reg.DOORBELLS) // 4: f for f in iofds}
            sq_fd, cq_fd = by_slot[2 * QID], by_slot[2 * QID + 1]
            assert sq_fd.shadow_fd is not None and sq_fd.shadow_fd == cq_fd.shadow_fd
            # the server's shadow memfd, mapped here with an address KVM can post to
            shadow = MemfdRegion(os.fstat(sq_fd.shadow_fd).st_size, fd=sq_fd.shadow_fd)
            cids, rbufs = _prepare(s)

            supported, why = vm.post_write_supported()
            expected = post_write_expectation()
            if expected is not None and expected != supported:
                pytest.fail(f"NVME_EMU_EXPECT_POST_WRITE={int(expected)} but the kernel says: {why}")
            emulator = None
            db0 = srv.doorbell_stats()
            if supported:
                mechanism = "KVM POST_WRITE (in-kernel value copy + eventfd signal)"
                for fd, slot in ((sq_fd, 2 * QID), (cq_fd, 2 * QID + 1)):
                    vm.add_ioeventfd(_db_gpa(slot), 4, fd.eventfd, post_addr=shadow.addr + fd.shadow_offset)
            else:
                mechanism = f"emulated POST_WRITE (trapped MMIO exit -> post_write_emulated; kernel: {why})"
                # Prove the in-kernel path: a plain KVM ioeventfd with the server's SQ eventfd on
                # a probe address swallows guest writes and wakes the server.
                probe = vm.add_ioeventfd(PROBE_GPA, 4, sq_fd.eventfd)
                exits: list[K.VcpuExit] = []
                x86.prog_write_loop(PROBE_GPA, 0, 3).load(vcpu, ram, CODE_GPA)
                _run_guest(vcpu, lambda ex: exits.append(ex) or True)
                assert not exits, f"probe writes reached userspace: {exits}"
                wait_until(lambda: srv.doorbell_stats()["signals"] >= db0["signals"] + 3, "the server to see the 3 KVM-signalled probe writes")
                vm.remove_ioeventfd(probe)
                emulator = PostWriteEmulator()
                for fd, slot in ((sq_fd, 2 * QID), (cq_fd, 2 * QID + 1)):
                    emulator.add(_db_gpa(slot), 4, shadow, fd.shadow_offset, fd.eventfd)
            q = s.host.queues[QID]
            prog = guest_programs.prog_nvme_qd1(_db_gpa(2 * QID), _db_gpa(2 * QID + 1), q.cq, DEPTH, N)
            prog.load(vcpu, ram, CODE_GPA)
            posted, unexpected = [], []
            doorbells = {_db_gpa(2 * QID), _db_gpa(2 * QID + 1)}
            doorbell_exits = 0

            def handler(ex: K.VcpuExit) -> bool:
                nonlocal doorbell_exits
                doorbell_exits += ex.kind == "MMIO" and ex.phys_addr in doorbells
                if emulator is not None and emulator.handle(ex):
                    posted.append((ex.phys_addr, ex.value))
                elif ex.kind != "INTR":
                    unexpected.append(ex)
                return True

            db1 = srv.doorbell_stats()
            ex = _run_guest(vcpu, handler)
            assert ex.kind == "HLT" and not unexpected, unexpected
            _check_done(s, cids, rbufs)
            srv.settle()
            db2 = srv.doorbell_stats()
            sq = srv.stats()["queues"][f"sq{QID}"]
            print(
                f"KVM doorbell via {mechanism}: {N} commands, vCPU MMIO exits on the doorbells {doorbell_exits}, guest doorbell writes posted by "
                f"VMM {len(posted)}, server signals +{db2['signals'] - db1['signals']} wakeups +{db2['wakeups'] - db1['wakeups']}, sq{QID} {sq}"
            )
            assert sq["commands"] == N
            # 2N doorbell writes (N SQ tails, N CQ heads): all in-kernel, or each one exit
            assert doorbell_exits == (0 if supported else 2 * N) == (0 if supported else len(posted))
            assert db2["signals"] - db1["signals"] >= N  # the SQ tail writes arrived by eventfd
            assert db2["trapped"] == db1["trapped"]  # none by REGION_WRITE
            if emulator is not None:
                sq_writes = [v for a, v in posted if a == _db_gpa(2 * QID)]
                assert sq_writes == [(i + 1) % DEPTH for i in range(N)]
        finally:
            vm.close()  # KVM registrations go before the memory they point at
            s.close()
            if shadow is not None:
                shadow.close()
            region.close()


def _prog_dbbuf_qd1(sq_db: int, cq_db: int, sq_shadow: int, cq_shadow: int, cq_base: int, qsize: int, n: int) -> x86.GuestProgram:
    """prog_nvme_qd1 with NVMe shadow doorbells: store the tail (head) into the shadow
    doorbell buffer in guest RAM, then write the real doorbell (always: no EventIdx check)."""
    a = x86.Asm(32)
    a.mov_r_imm(x86.ECX, n)
    a.xor_r_r(x86.EAX, x86.EAX)
    a.xor_r_r(x86.EDX, x86.EDX)
    a.mov_r_imm(x86.ESI, cq_base)
    a.mov_r_imm(x86.EDI, 0x10000)
    a.label("loop")
    a.inc(x86.EAX)
    a.cmp_r_imm(x86.EAX, qsize)
    a.jnz("ring")
    a.xor_r_r(x86.EAX, x86.EAX)
    a.label("ring")
    a.store_abs(sq_shadow, x86.EAX)
    a.store_abs(sq_db, x86.EAX)
    a.label("poll")
    a.load(x86.EBP, x86.ESI, 12)
    a.and_r_imm(x86.EBP, 0x10000)
    a.cmp_r_r(x86.EBP, x86.EDI)
    a.jnz("poll")
    a.add_r_imm8(x86.ESI, CQE_SIZE)
    a.inc(x86.EDX)
    a.cmp_r_imm(x86.EDX, qsize)
    a.jnz("head")
    a.xor_r_r(x86.EDX, x86.EDX)
    a.mov_r_imm(x86.ESI, cq_base)
    a.xor_r_imm(x86.EDI, 0x10000)
    a.label("head")
    a.store_abs(cq_shadow, x86.EDX)
    a.store_abs(cq_db, x86.EDX)
    a.dec(x86.ECX)
    a.jnz("loop")
    a.hlt()
    return x86.GuestProgram(a.assemble(), 32, "nvme qd1 with shadow doorbells")


def test_guest_doorbell_plain_ioeventfd_with_dbbuf(inproc):
    _kvm_or_skip()
    srv = inproc("ioeventfd")
    with K.Kvm() as kvm:
        vm = _create_vm(kvm)
        region, ram = _guest_ram(vm)
        s = HostSession(srv.path, ram=region, ram_size=RAM_SIZE, iova=0, mem_offset=HOST_MEM)
        try:
            vcpu = vm.create_vcpu(0)
            s.bring_up("dbbuf-ioeventfd", depth=16)
            by_slot = {(f.gpa_offset - Reg.DOORBELLS) // 4: f for f in s.iofds}
            cids, rbufs = _prepare(s)
            for slot in (2 * QID, 2 * QID + 1):
                vm.add_ioeventfd(_db_gpa(slot), 4, by_slot[slot].eventfd)  # in-kernel, no value
            shadow, _eventidx = s.dbbuf
            q = s.host.queues[QID]
            prog = _prog_dbbuf_qd1(_db_gpa(2 * QID), _db_gpa(2 * QID + 1), shadow + 8 * QID, shadow + 8 * QID + 4, q.cq, DEPTH, N)
            prog.load(vcpu, ram, CODE_GPA)
            unexpected = []
            db0 = srv.doorbell_stats()
            ex = _run_guest(vcpu, lambda e: e.kind == "INTR" or unexpected.append(e) or True)
            assert ex.kind == "HLT" and not unexpected, unexpected
            _check_done(s, cids, rbufs)
            srv.settle()
            db1 = srv.doorbell_stats()
            sq = srv.stats()["queues"][f"sq{QID}"]
            print(
                f"KVM doorbell via plain in-kernel ioeventfd + shadow doorbell buffer: {N} commands, server signals "
                f"+{db1['signals'] - db0['signals']}, sq{QID} {sq}"
            )
            assert sq["commands"] == N
            assert db1["signals"] - db0["signals"] >= N and db1["trapped"] == db0["trapped"] and db1["lost_values"] == 0
            assert struct.unpack_from("<I", s.mem.view, shadow + 8 * QID - s.mem.iova)[0] == N % DEPTH
        finally:
            vm.close()
            s.close()
            region.close()
