#!/usr/bin/env python3
"""Doorbell harness on real KVM: the experiment behind the POST_WRITE proposal, done properly.

A minimal KVM VMM in Python (ioctls on /dev/kvm, :mod:`vfio_user.vmm.kvm`) is a vfio-user client
of nvme-emu, which runs as a separate process (``python -m nvme_emu serve --doorbell MODE``):

* guest RAM is one memfd, a KVM memory slot at GPA 0 and DMA-mapped to the server at IOVA 0
  (the server reads SQEs and writes data and CQEs straight into it);
* BAR0 sits at :data:`BAR0_GPA` in guest-physical space; a guest access there that KVM does
  not complete exits to this VMM and is forwarded as a REGION_WRITE (posted) / REGION_READ;
* the ioeventfds from GET_REGION_IO_FDS are registered with KVM: with POST_WRITE when the
  kernel has it; otherwise the shadow path is *emulated* (the write still exits to this VMM,
  which stores the value in the shadow slot and signals the eventfd: ``post_write_emulated``)
  and the true KVM fast path of this kernel is measured on the ``ioeventfd`` path: NVMe
  shadow doorbells (Doorbell Buffer Config) in guest RAM + a plain KVM ioeventfd on the MMIO
  doorbell;
* the poll path maps BAR0's mmappable doorbell page (sparse area) into the guest as a KVM
  memory slot: guest stores land in memory the server polls, no exit at all;
* MSI-X is enabled with eventfds: the admin commands of the set-up wait on vector 0, the I/O
  queue's interrupts (vector 1) are counted (the guest itself polls the CQ, IF=0).

The host side sets the controller up with :class:`NvmeHost` over the same RAM (enable, Doorbell
Buffer Config for the ioeventfd path, one I/O queue pair) and pre-fills every SQ slot with a
4 KiB read of the RAM namespace. Then hand-assembled 32-bit guest programs run:

1. doorbell write cost: K stores of the *current* SQ tail to the SQ-tail doorbell (a no-op
   for the controller), minus the same loop storing to RAM: the vCPU stall per doorbell;
2. QD1: per command, RDTSC, ring (shadow store first on the dbbuf path), spin on the phase
   bit of the next CQE, RDTSC, store the TSC delta, write the CQ head; latencies come from
   the guest's own TSC (RDTSC works under PVM; its rate is calibrated against the host
   clock), so p50/p99 need no exit per command;
3. throughput at QD 8 and 32: the guest advances the tail by the batch, rings once, reaps the
   batch, writes the CQ head once; commands/s from the host wall clock around KVM_RUN.

The floor: a bare eventfd wake-up (a uvloop process blocked on an eventfd, woken by a write,
answering with a store the waker spins on: the same shape as vCPU -> server -> polled CQE)
plus the server's per-doorbell processing on the shadow path (measured in-process: the
eventfd callback -> scan -> fetch -> 4 KiB read -> CQE -> MSI-X eventfd).

Run: ``python bench/kvm_doorbell.py`` (about a minute). Output: a table on stdout,
``bench/results/kvm_doorbell.{json,png,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import mmap
import os
import platform
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nvme_emu.doorbell import ShadowPath  # noqa: E402
from nvme_emu.testing.host import HostMemory, NvmeHost  # noqa: E402
from nvme_emu.sqe import SQE  # noqa: E402
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode  # noqa: E402
from nvme_emu.spec.registers import Reg  # noqa: E402
from vfio_user.vmm import kvm as K  # noqa: E402
from vfio_user.vmm import x86  # noqa: E402
from vfio_user.vmm.memory import GuestRam, MemfdRegion  # noqa: E402
from vfio_user.vmm.post_write import PostWriteEmulator, measure_doorbell_exits  # noqa: E402
from vfio_user.vmm._kvm_cdef import ffi  # noqa: E402
from vfio_user.vmm.client import IoFd, VfioUserClient  # noqa: E402
from vfio_user.constants import IO_FD_TYPE_IOEVENTFD, IO_FD_TYPE_IOEVENTFD_SHADOW, REGION_FLAG_MMAP, IrqIndex  # noqa: E402

RESULTS = REPO / "bench" / "results"

# -- guest-physical layout ---------------------------------------------------------------
RAM_GPA = 0  # == IOVA in the server
RAM_SIZE = 8 << 20
CODE_GPA = 0x1000
SCRATCH_GPA = 0x8000  # RAM target of the baseline loops
SCRATCH2_GPA = 0x8040
TS_GPA = 0x10000  # guest TSC deltas, 4 bytes each
TS_MAX = (0x100000 - TS_GPA) // 4
HOST_MEM_START = 0x100000  # NvmeHost allocates its queues and buffers from here
BAR0_GPA = 0xFE00_0000
DOORBELL_SLOT = 1  # KVM slot of the mapped doorbell page (poll path)

QID = 1
QSIZE = 64
LBA = 4096
NAMESPACE = f"ram:size=64M,lba={LBA}"
SERVER_QUEUES = 4
SQ_SLOT, CQ_SLOT = 2 * QID, 2 * QID + 1
SQ_DB_OFF = Reg.DOORBELLS + 4 * SQ_SLOT
CQ_DB_OFF = Reg.DOORBELLS + 4 * CQ_SLOT

PATHS = ("trap", "shadow", "shadow_emu", "ioeventfd", "poll")
#: The server's --doorbell mode of each path (shadow_emu: the shadow server, POST_WRITE emulated
#: by this VMM even where the kernel has it, so one run compares both on the same kernel).
SERVER_MODE = {"shadow_emu": "shadow"}
PATH_COLORS = {"trap": "#c0392b", "shadow": "#e67e22", "shadow_emu": "#f5b041", "ioeventfd": "#27ae60", "poll": "#2980b9"}
TARGET_WRITE_RATIO = 5.0  # shadow doorbell write at most 1/5 of trap's
TARGET_QD1_FLOOR = 1.5  # shadow QD1 within 1.5x of the floor


# ----------------------------------------------------------------------------------------
# guest code
# ----------------------------------------------------------------------------------------
class Asm(x86.Asm):
    """:class:`vfio_user.vmm.x86.Asm` plus the few instructions the timed programs need
    (32-bit flat protected mode only) and rel32 jumps."""

    def __init__(self) -> None:
        super().__init__(32)
        self.fixups32: list[tuple[int, str]] = []

    def rdtsc(self) -> None:
        """rdtsc : 0F 31 (edx:eax = TSC)"""
        self.code += b"\x0f\x31"

    def mov_r_r(self, dst: int, src: int) -> None:
        """mov dst, src : 89 /r (ModRM 11 src dst)"""
        self.code += bytes([0x89, 0xC0 | (src << 3) | dst])

    def sub_r_r(self, dst: int, src: int) -> None:
        """sub dst, src : 29 /r (ModRM 11 src dst)"""
        self.code += bytes([0x29, 0xC0 | (src << 3) | dst])

    def store_ecx4(self, base: int, src: int) -> None:
        """mov [ecx*4 + base], src : 89 /r, ModRM 00 src 100, SIB 10 001 101, disp32"""
        self.code += bytes([0x89, (src << 3) | 0b100, 0b10_001_101]) + struct.pack("<I", base)

    def jb(self, target: str) -> None:
        """jb rel8 : 72 cb (unsigned below)"""
        self._jcc(0x72, target)

    def sub_r_imm(self, r: int, imm: int) -> None:
        """sub r32, imm32 : 81 /5 id (ModRM 11 101 r)"""
        self.code += bytes([0x81, 0xE8 | r]) + struct.pack("<I", imm & 0xFFFFFFFF)

    def jnz32(self, target: str) -> None:
        """jnz rel32 : 0F 85 cd"""
        self.code += b"\x0f\x85\0\0\0\0"
        self.fixups32.append((len(self.code) - 4, target))

    def assemble(self) -> bytes:
        code = bytearray(super().assemble())
        for pos, target in self.fixups32:
            code[pos : pos + 4] = struct.pack("<i", self.labels[target] - (pos + 4))
        return bytes(code)


def prog_store_loop(targets: list[int], value: int, n: int) -> x86.GuestProgram:
    """``n`` times: store ``value`` to each of ``targets`` in order; then HLT."""
    a = Asm()
    a.mov_r_imm(x86.EAX, value)
    a.mov_r_imm(x86.ECX, n)
    a.label("loop")
    for t in targets:
        a.store_abs(t, x86.EAX)
    a.dec(x86.ECX)
    a.jnz("loop")
    a.hlt()
    return x86.GuestProgram(a.assemble(), 32, f"store {value:#x} to {[hex(t) for t in targets]} x{n}")


@dataclass
class QueueState:
    """Guest-side queue state carried from one program to the next (read back from regs)."""

    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1  # expected phase tag of cq[cq_head]


def prog_batches(*, sq_db: int, sq_shadow: Optional[int], cq_db: Optional[int], cq_shadow: Optional[int],
                 cq_base: int, qsize: int, batch: int, n: int, ts_base: int, state: QueueState) -> x86.GuestProgram:
    """``n`` rounds of: RDTSC; tail += batch; [shadow tail]; ring; reap ``batch`` CQEs by the
    phase bit; RDTSC; store the TSC delta at ts_base[4*ecx]; [shadow head]; [CQ-head doorbell].

    Registers: ebx SQ tail, ebp CQ head, esi &cq[head], edi expected phase (bit 16 of CQE
    dword 3), ecx rounds left, edx CQEs left in the batch, eax TSC, esp scratch (no stack).
    The timed window is exactly: ring (+ exit, when it traps) ... last CQE of the batch seen.
    """
    if not 1 <= batch < min(qsize, 128):
        raise ValueError("batch must be 1..min(qsize-1, 127)")
    if n > TS_MAX:
        raise ValueError("too many rounds for the TSC array")
    a = Asm()
    a.mov_r_imm(x86.ECX, n)
    a.mov_r_imm(x86.EBX, state.sq_tail)
    a.mov_r_imm(x86.EBP, state.cq_head)
    a.mov_r_imm(x86.ESI, cq_base + 16 * state.cq_head)
    a.mov_r_imm(x86.EDI, state.phase << 16)
    a.label("loop")
    a.add_r_imm8(x86.EBX, batch)
    a.cmp_r_imm(x86.EBX, qsize)
    a.jb("nowrap_sq")
    a.sub_r_imm(x86.EBX, qsize)
    a.label("nowrap_sq")
    a.rdtsc()
    if sq_shadow is not None:
        a.store_abs(sq_shadow, x86.EBX)
    a.store_abs(sq_db, x86.EBX)
    a.mov_r_imm(x86.EDX, batch)
    a.label("poll")
    a.load(x86.ESP, x86.ESI, 12)
    a.and_r_imm(x86.ESP, 0x10000)
    a.cmp_r_r(x86.ESP, x86.EDI)
    a.jnz("poll")
    a.add_r_imm8(x86.ESI, 16)
    a.inc(x86.EBP)
    a.cmp_r_imm(x86.EBP, qsize)
    a.jnz("nowrap_cq")
    a.xor_r_r(x86.EBP, x86.EBP)
    a.mov_r_imm(x86.ESI, cq_base)
    a.xor_r_imm(x86.EDI, 0x10000)
    a.label("nowrap_cq")
    a.dec(x86.EDX)
    a.jnz("poll")
    a.mov_r_r(x86.ESP, x86.EAX)
    a.rdtsc()
    a.sub_r_r(x86.EAX, x86.ESP)
    a.store_ecx4(ts_base - 4, x86.EAX)  # ecx runs n..1 -> slots n-1..0
    if cq_shadow is not None:
        a.store_abs(cq_shadow, x86.EBP)
    if cq_db is not None:
        a.store_abs(cq_db, x86.EBP)
    a.dec(x86.ECX)
    a.jnz32("loop")
    a.hlt()
    return x86.GuestProgram(a.assemble(), 32, f"qd{batch} x{n}")


def prog_rdtsc(dst: int) -> x86.GuestProgram:
    a = Asm()
    a.rdtsc()
    a.store_abs(dst, x86.EAX)
    a.store_abs(dst + 4, x86.EDX)
    a.hlt()
    return x86.GuestProgram(a.assemble(), 32, "rdtsc")


# ----------------------------------------------------------------------------------------
# machine / kernel facts
# ----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect_pvm() -> tuple[bool, str]:
    """PVM = KVM without VMX/SVM: the kvm_pvm module, or /dev/kvm with no vmx/svm flag."""
    why = []
    if os.path.isdir("/sys/module/kvm_pvm"):
        why.append("/sys/module/kvm_pvm present")
    try:
        if "kvm_pvm" in open("/proc/modules").read():
            why.append("kvm_pvm in /proc/modules")
    except OSError:
        pass
    module = bool(why)
    flags = cpu_flags()
    if not flags & {"vmx", "svm"}:
        why.append("no vmx/svm in /proc/cpuinfo")
    pvm = module or (os.path.exists("/dev/kvm") and not flags & {"vmx", "svm"})
    return pvm, "; ".join(why) or "vmx/svm present, no kvm_pvm module"


def kernel_caps() -> dict:
    with K.Kvm() as kvm, kvm.create_vm() as vm:
        supported, why = vm.post_write_supported()
        caps = {
            "api_version": kvm.api_version,
            "KVM_CAP_USER_MEMORY": kvm.check_extension(K.KVM_CAP_USER_MEMORY),
            "KVM_CAP_NR_MEMSLOTS": kvm.check_extension(K.KVM_CAP_NR_MEMSLOTS),
            "KVM_CAP_IOEVENTFD": kvm.check_extension(K.KVM_CAP_IOEVENTFD),
            "KVM_CAP_IOEVENTFD_NO_LENGTH": kvm.check_extension(K.KVM_CAP_IOEVENTFD_NO_LENGTH),
            "KVM_CAP_IOEVENTFD_ANY_LENGTH": kvm.check_extension(K.KVM_CAP_IOEVENTFD_ANY_LENGTH),
            "post_write_supported": supported,
            "post_write_errno": vm.post_write_errno,
            "post_write_probe": why,
        }
    pvm, pvm_why = detect_pvm()
    caps["pvm"] = pvm
    caps["pvm_evidence"] = pvm_why
    return caps


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def wait_quiet(max_wait: float, busy_max: float = 0.25, window: float = 2.0) -> float:
    """Wait (at most ``max_wait`` s) for a ``window`` in which the machine's CPUs are at most
    ``busy_max`` busy: other jobs on a 2-CPU machine distort every number here. Returns the
    busy fraction of the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = _cpu_times()
        time.sleep(window)
        b1, t1 = _cpu_times()
        busy = (b1 - b0) / max(t1 - t0, 1)
        if busy <= busy_max or time.monotonic() >= deadline:
            return busy
        print(f"  machine {busy:.0%} busy with other work; waiting for a quieter moment...", flush=True)


def machine() -> dict:
    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values), "p50": pct(values, 50), "p90": pct(values, 90),
            "p99": pct(values, 99), "min": min(values), "max": max(values)}


# ----------------------------------------------------------------------------------------
# the server process
# ----------------------------------------------------------------------------------------
class ServerProcess:
    """``python -m nvme_emu serve`` with stdout in a log file; stats by SIGUSR1."""

    def __init__(self, workdir: str, mode: str, spin_us: Optional[float] = None, name: Optional[str] = None) -> None:
        self.sock = os.path.join(workdir, f"{name or mode}.sock")
        self.log_path = os.path.join(workdir, f"{name or mode}.log")
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "nvme_emu", "serve", "--socket", self.sock, "--doorbell", mode,
               "--namespace", NAMESPACE, "--queues", str(SERVER_QUEUES)]
        if spin_us is not None:
            cmd += ["--spin-us", str(spin_us)]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server ({mode}) did not start:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        try:
            return open(self.log_path, errors="replace").read()
        except OSError:
            return ""

    def stats(self) -> dict:
        """The ``doorbell path ...`` line the CLI prints on SIGUSR1, parsed."""
        n = self.log().count("doorbell path ")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while self.log().count("doorbell path ") <= n:
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.01)
        text = self.log()
        block = text[text.rindex("doorbell path ") :].splitlines()
        out: dict = {}
        m = re.match(r"doorbell path (\w+): (.*)", block[0])
        if m:
            out["mode"] = m.group(1)
            for k, v in re.findall(r"([\w/]+)=([0-9./]+)", m.group(2)):
                out[k] = v
        for line in block[1:]:
            line = line.strip()
            if line.startswith("sq"):
                name, rest = line.split(":", 1)
                out[name] = dict(re.findall(r"([\w/]+)=([0-9./]+)", rest))
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


class GuestTimeout(Exception):
    pass


class guest_deadline:
    """SIGALRM every 0.2 s while a guest runs: KVM_RUN returns (EINTR) so Python can run the
    handler, which raises :class:`GuestTimeout` once ``seconds`` have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def _alarm(self, signum, frame) -> None:
        if time.monotonic() > self.deadline:
            raise GuestTimeout()

    def __enter__(self) -> "guest_deadline":
        self.deadline = time.monotonic() + self.seconds
        self.old = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, self.old)


# ----------------------------------------------------------------------------------------
# one doorbell path: server + vfio-user client + KVM VM
# ----------------------------------------------------------------------------------------
class _MappedArea:
    """A server-region mmap with the attributes VirtualMachine.add_memory wants."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.size = len(mm)
        self.fd = -1
        self._cbuf = ffi.from_buffer("uint8_t[]", mm, require_writable=True)
        self.addr = int(ffi.cast("uintptr_t", self._cbuf))

    def close(self) -> None:
        if self._cbuf is not None:
            ffi.release(self._cbuf)
            self._cbuf = None


@dataclass
class PathResult:
    path: str
    label: str
    mechanism: str
    write_cost_us: float = 0.0
    write_gross_us: float = 0.0
    write_ram_us: float = 0.0
    write_exits_per_write: float = 0.0
    qd1: dict = field(default_factory=dict)
    qd1_host_us_per_cmd: float = 0.0
    qd1_exits_per_cmd: float = 0.0
    throughput: dict = field(default_factory=dict)
    interrupts_per_cmd: float = 0.0
    server_stats: dict = field(default_factory=dict)
    rounds: list = field(default_factory=list)
    notes: list = field(default_factory=list)


class PathBench:
    def __init__(self, mode: str, workdir: str, tsc_hz: float, post_write: bool, args: argparse.Namespace) -> None:
        self.mode = mode
        self.args = args
        self.tsc_hz = tsc_hz
        self.post_write = post_write and mode == "shadow"
        self.server = ServerProcess(workdir, SERVER_MODE.get(mode, mode), spin_us=None, name=mode)
        try:
            self.ram = MemfdRegion(RAM_SIZE, "guest-ram")
            self.client = VfioUserClient(self.server.sock, timeout=20)
        except BaseException:
            self.server.stop()
            raise
        self.exits = 0
        self.emulator: Optional[PostWriteEmulator] = None
        self.shadow_regions: list[MemfdRegion] = []
        self.mapped: Optional[_MappedArea] = None
        self.kvm = K.Kvm()
        self.vm = self.kvm.create_vm()
        self.sq_shadow: Optional[int] = None
        self.cq_shadow: Optional[int] = None
        self.cq_mmio = True
        self.state = QueueState()
        self.notes: list[str] = []

    # -- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.client
        c.negotiate()
        c.dma_map(RAM_GPA, RAM_SIZE, self.ram)  # type: ignore[arg-type]  # .fd/.view is all it needs
        self.irq_fds = c.enable_irqs(IrqIndex.MSIX, 2)
        self.vm.add_memory(RAM_GPA, self.ram, slot=0)
        self.vcpu = self.vm.create_vcpu(0)
        self.bar0 = c.region_info(0)
        self.mem = HostMemory(self.ram.view, RAM_GPA)
        self.mem.next = HOST_MEM_START
        self.host = NvmeHost(c, self.mem, irq_fd=self.irq_fds[0])
        self.host.enable()

        if self.mode in ("shadow", "shadow_emu", "ioeventfd"):
            iofds = c.region_io_fds(0)
            self._wire_ioeventfds(iofds)
        if self.mode == "ioeventfd":
            shadow, eventidx = self.mem.alloc(4096), self.mem.alloc(4096)
            self.mem.write(shadow, bytes(4096))
            self.mem.write(eventidx, bytes(4096))
            self.host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=eventidx)
            self.sq_shadow = shadow + 4 * SQ_SLOT
            self.cq_shadow = shadow + 4 * CQ_SLOT
            # EventIdx: the controller publishes "ring me past the tail I consumed" for the SQ,
            # so at QD1 and per batch the guest always rings (the check is skipped: it would
            # always say yes). For the CQ head it only asks when the CQ fills (and then also
            # re-reads the shadow itself), so the guest writes the CQ head to the shadow only.
            self.cq_mmio = False
        if self.mode == "poll":
            if not self.bar0.flags & REGION_FLAG_MMAP or (Reg.DOORBELLS, 4096) not in self.bar0.areas:
                raise RuntimeError(f"poll server offers no mmappable doorbell page: {self.bar0}")
            maps = c.mmap_region(self.bar0)
            self.mapped = _MappedArea(maps[Reg.DOORBELLS])
            self.vm.add_memory(BAR0_GPA + Reg.DOORBELLS, self.mapped, slot=DOORBELL_SLOT)  # type: ignore[arg-type]

        q = self.host.create_io_queue_pair(QID, QSIZE, vector=1)
        self.q = q
        # one 4 KiB read per SQ slot, each into its own buffer; cid = slot
        for i in range(QSIZE):
            buf = self.mem.alloc(4096)
            entry = SQE.pack(NvmOpcode.READ, 0, i, 1, 0, 0, 0, buf, 0, i, 0, 0, 0, 0, 0)
            self.mem.write(q.sq + 64 * i, entry)
        self.drain_irqs()

    def _wire_ioeventfds(self, iofds: list[IoFd]) -> None:
        for f in iofds:
            gpa = BAR0_GPA + f.gpa_offset
            if f.type == IO_FD_TYPE_IOEVENTFD_SHADOW:
                assert f.shadow_fd is not None
                region = self._shadow_region(f.shadow_fd)
                if self.post_write:
                    self.vm.add_ioeventfd(gpa, f.size, f.eventfd, post_addr=region.addr + f.shadow_offset)
                else:
                    if self.emulator is None:
                        self.emulator = PostWriteEmulator()
                    self.emulator.add(gpa, f.size, region, f.shadow_offset, f.eventfd)
            elif f.type == IO_FD_TYPE_IOEVENTFD:
                dm = f.datamatch if f.flags & K.IOEVENTFD_FLAG_DATAMATCH else None
                self.vm.add_ioeventfd(gpa, f.size, f.eventfd, datamatch=dm)

    def _shadow_region(self, fd: int) -> MemfdRegion:
        for r in self.shadow_regions:
            if r.fd == fd:
                return r
        r = MemfdRegion(os.fstat(fd).st_size, "shadow", fd=fd)
        self.shadow_regions.append(r)
        return r

    @property
    def label(self) -> str:
        if self.mode == "trap":
            return "trap (MMIO exit -> REGION_WRITE)"
        if self.mode in ("shadow", "shadow_emu"):
            return "shadow POST_WRITE (in-kernel)" if self.post_write else "shadow, POST_WRITE emulated (exit)"
        if self.mode == "ioeventfd":
            return "dbbuf + KVM ioeventfd"
        return "poll (doorbell page mapped)"

    @property
    def mechanism(self) -> str:
        return {
            "trap": "every doorbell write exits KVM_RUN to this VMM, which sends a posted REGION_WRITE",
            "shadow": ("KVM copies the value to the shadow page and signals the eventfd (KVM_IOEVENTFD_FLAG_POST_WRITE)"
                       if self.post_write else
                       "kernel lacks POST_WRITE: the write exits to this VMM, which stores it in the shadow page and "
                       "signals the eventfd (post_write_emulated); a userspace exit still happens"),
            "shadow_emu": "POST_WRITE emulated although the kernel has it: the write exits to this VMM, which stores it "
                          "in the shadow page and signals the eventfd (post_write_emulated)",
            "ioeventfd": "guest stores the tail in the NVMe shadow doorbell (dbbuf, guest RAM), then writes the MMIO "
                         "doorbell, which a plain KVM ioeventfd completes in-kernel (no userspace exit)",
            "poll": "BAR0 doorbell page mmapped from the server and mapped into the guest as a KVM memory slot; "
                    "stores never exit; the server polls the page",
        }[self.mode]

    # -- running -------------------------------------------------------------------------
    def handle(self, ex: K.VcpuExit) -> bool:
        if ex.kind != "MMIO":
            return False
        self.exits += 1
        off = ex.phys_addr - BAR0_GPA
        if not 0 <= off < self.bar0.size:
            raise K.KvmError(5, f"guest access outside BAR0: {ex!r}")
        if ex.is_write:
            if self.emulator is not None and self.emulator.handle(ex):
                return True
            self.client.region_write(0, off, ex.data, posted=True)
        else:
            self.vcpu.complete_mmio_read(self.client.region_read(0, off, ex.length))
        return True

    def run(self, prog: x86.GuestProgram) -> float:
        """Load and run ``prog`` to its HLT; a guest still spinning after ``--guest-timeout``
        (a completion that never came) is interrupted by SIGALRM and reported with the
        server's log instead of hanging the benchmark."""
        prog.load(self.vcpu, self.ram_slot, CODE_GPA)
        try:
            with guest_deadline(self.args.guest_timeout):
                t0 = time.perf_counter()
                ex = self.vcpu.run_until(self.handle)
                dt = time.perf_counter() - t0
        except GuestTimeout:
            alive = "running" if self.server.proc.poll() is None else f"exited {self.server.proc.returncode}"
            raise GuestDidNotFinish(f"{self.mode}: guest program '{prog.description}' did not finish within "
                               f"{self.args.guest_timeout} s (server {alive}); server log tail:\n{self.server.log()[-3000:]}") from None
        assert ex.kind == "HLT", ex
        return dt

    @property
    def ram_slot(self) -> GuestRam:
        return self.vm.ram[0]

    def drain_irqs(self) -> int:
        n = 0
        for fd in self.irq_fds:
            try:
                n += os.eventfd_read(fd)
            except BlockingIOError:
                pass
        return n

    def sq_targets(self, mmio: bool) -> list[int]:
        db = BAR0_GPA + SQ_DB_OFF if mmio else SCRATCH_GPA
        shadow = [self.sq_shadow] if self.sq_shadow is not None else []
        return shadow + [db]

    def write_cost(self, n: int, repeat: int = 3) -> tuple[float, float, float]:
        """Best-of-``repeat`` us per write: path, RAM baseline, and exits per write."""
        value = self.state.sq_tail  # the current tail: the controller sees no change
        best_db = best_ram = float("inf")
        exits0 = self.exits
        for _ in range(repeat):
            best_ram = min(best_ram, self.run(prog_store_loop(self.sq_targets(False), value, n)))
            best_db = min(best_db, self.run(prog_store_loop(self.sq_targets(True), value, n)))
        exits = (self.exits - exits0) / (n * repeat)
        return best_db / n * 1e6, best_ram / n * 1e6, exits

    def batches(self, batch: int, n: int) -> tuple[list[float], float, int]:
        """Run ``n`` batches; returns (per-batch guest latencies in us, host seconds, exits)."""
        prog = prog_batches(
            sq_db=BAR0_GPA + SQ_DB_OFF, sq_shadow=self.sq_shadow,
            cq_db=BAR0_GPA + CQ_DB_OFF if self.cq_mmio else None, cq_shadow=self.cq_shadow,
            cq_base=self.q.cq, qsize=QSIZE, batch=batch, n=n, ts_base=TS_GPA, state=self.state,
        )
        exits0 = self.exits
        dt = self.run(prog)
        regs = self.vcpu.get_regs()
        self.state = QueueState(regs.rbx & 0xFFFFFFFF, regs.rbp & 0xFFFFFFFF, (regs.rdi >> 16) & 1)
        raw = struct.unpack_from(f"<{n}I", self.ram.view, TS_GPA)
        lat = [raw[n - 1 - i] / self.tsc_hz * 1e6 for i in range(n)]  # slot n-1 is round 1
        self.check_completions(batch)
        return lat, dt, self.exits - exits0

    def check_completions(self, batch: int) -> None:
        """The last batch's CQEs say success (status 0) and carry the expected cids."""
        head = self.state.cq_head
        for k in range(1, batch + 1):
            idx = (head - k) % QSIZE
            dw3 = struct.unpack_from("<I", self.ram.view, self.q.cq + 16 * idx + 12)[0]
            cid, status = dw3 & 0xFFFF, (dw3 >> 17) & 0x7FF
            if status != 0:
                raise RuntimeError(f"{self.mode}: command cid {cid} failed with status {status:#x}")

    def measure_round(self) -> dict:
        """One round of every measurement on this path (rounds of all paths interleave)."""
        a = self.args
        out: dict = {}
        trapping = self.mode == "trap" or (self.mode in ("shadow", "shadow_emu") and not self.post_write)
        n_writes = a.writes_trap if trapping else a.writes_fast
        gross, ram, exits = self.write_cost(n_writes)
        out["write"] = {"gross_us": gross, "ram_us": ram, "net_us": gross - ram, "exits_per_write": exits}
        self.batches(1, 50)  # warm-up: page faults, allocator, caches
        self.drain_irqs()
        lat, dt, exits = self.batches(1, a.qd1)
        out["qd1_lat"] = lat
        out["qd1"] = summary(lat)
        out["qd1_host_us_per_cmd"] = dt / a.qd1 * 1e6
        out["qd1_exits_per_cmd"] = exits / a.qd1
        out["interrupts_per_cmd"] = self.drain_irqs() / a.qd1
        out["tput"] = {"1": {"cmds_per_s": a.qd1 / dt, "batch_latency_us": out["qd1"]["mean"], "exits_per_cmd": exits / a.qd1}}
        for qd in (8, 32):
            n = max(4, a.tput_cmds // qd)
            lat, dt, exits = self.batches(qd, n)
            out["tput"][str(qd)] = {"cmds_per_s": n * qd / dt, "batch_latency_us": statistics.fmean(lat[1:]),
                                    "exits_per_cmd": exits / (n * qd)}
            self.drain_irqs()
        return out

    def result(self, rounds: list[dict]) -> PathResult:
        """Combine the interleaved rounds (other jobs on a 2-CPU machine only ever add time):
        the lowest write cost, QD1 latencies pooled over all rounds, the highest throughput."""
        res = PathResult(self.mode, self.label, self.mechanism)
        # best doorbell loop and best RAM loop, each over all rounds (noise only adds time)
        res.write_gross_us = min(r["write"]["gross_us"] for r in rounds)
        res.write_ram_us = min(r["write"]["ram_us"] for r in rounds)
        res.write_cost_us = res.write_gross_us - res.write_ram_us
        res.write_exits_per_write = rounds[-1]["write"]["exits_per_write"]
        # QD1 latency: all rounds' samples pooled (a per-round best would flatter a noisy path)
        res.qd1 = summary([x for r in rounds for x in r["qd1_lat"]])
        res.qd1_host_us_per_cmd = min(r["qd1_host_us_per_cmd"] for r in rounds)
        res.qd1_exits_per_cmd = rounds[-1]["qd1_exits_per_cmd"]
        res.interrupts_per_cmd = rounds[-1]["interrupts_per_cmd"]
        for qd in ("1", "8", "32"):
            res.throughput[qd] = max((r["tput"][qd] for r in rounds), key=lambda x: x["cmds_per_s"])
        res.rounds = [{"write_net_us": r["write"]["net_us"], "qd1_p50_us": r["qd1"]["p50"], "qd1_mean_us": r["qd1"]["mean"],
                       "qd1_p99_us": r["qd1"]["p99"], **{f"qd{q}_cmds_per_s": r["tput"][q]["cmds_per_s"] for q in ("1", "8", "32")}}
                      for r in rounds]
        res.server_stats = self.server.stats()
        res.notes = self.notes
        return res

    def close(self) -> None:
        try:
            self.vm.close()  # before unmapping anything KVM points at
            self.kvm.close()
        finally:
            if self.mapped is not None:
                self.mapped.close()
            for r in self.shadow_regions:
                r.close()
            try:
                self.client.close()
            finally:
                self.mem = None  # type: ignore[assignment]
                self.host = None  # type: ignore[assignment]
                self.ram.close()
                rc = self.server.stop()
                if rc != 0:
                    print(f"warning: {self.mode} server exited with {rc}:\n{self.server.log()[-2000:]}", file=sys.stderr)


class GuestDidNotFinish(RuntimeError):
    """A guest program still running after --guest-timeout (a completion that never came,
    or a vCPU gone astray)."""


def measure_round_retrying(b: PathBench, rnd: int) -> dict:
    """One round of ``b``; a round whose guest program strays outside BAR0 is retried once.

    Seen only in the nested rig (L1 KVM on TCG's emulated SVM): once in a few thousand guest
    programs the L2 vCPU takes an event it should not (it pushes FLAGS/CS below address 0 as
    for a 16-bit interrupt gate) or stops making progress, and the program never reaches
    its HLT. Every program reloads
    all registers, so the next round starts clean; the retry is recorded in the path's notes.
    """
    try:
        return b.measure_round()
    except (K.KvmError, GuestDidNotFinish) as e:
        if isinstance(e, K.KvmError) and e.errno != 5:
            raise
        note = f"round {rnd + 1} retried after a stray guest program: {str(e).splitlines()[0]}"
        print(f"  {b.label}: {note}", flush=True)
        b.notes.append(note)
        return b.measure_round()


# ----------------------------------------------------------------------------------------
# TSC calibration and the floor
# ----------------------------------------------------------------------------------------
def calibrate_tsc(interval: float = 0.25) -> float:
    """Guest RDTSC rate against the host's perf_counter (two guest reads ``interval`` apart)."""
    with K.Kvm() as kvm, kvm.create_vm() as vm:
        ram = vm.add_memory(0, 0x10000, slot=0)
        vcpu = vm.create_vcpu(0)
        prog = prog_rdtsc(0x8000)
        pts = []
        for i in range(2):
            if i:
                time.sleep(interval)
            prog.load(vcpu, ram, 0x1000)
            t0 = time.perf_counter()
            vcpu.run_until()
            t1 = time.perf_counter()
            lo, hi = struct.unpack("<II", ram.read(0x8000, 8))
            pts.append(((hi << 32) | lo, (t0 + t1) / 2))
    return (pts[1][0] - pts[0][0]) / (pts[1][1] - pts[0][1])


_WAKE_CHILD = r"""
import os, sys, struct
sys.path.insert(0, sys.argv[3])
from vfio_user.server import new_event_loop
efd, shm_fd = int(sys.argv[1]), int(sys.argv[2])
import mmap
mm = mmap.mmap(shm_fd, 4096)
loop = new_event_loop()
count = 0
def cb():
    global count
    n = os.eventfd_read(efd)
    count += 1
    mm[0:4] = struct.pack("<I", count)
    if count >= int(sys.argv[4]):
        loop.stop()
loop.add_reader(efd, cb)
mm[4:8] = b"RDY!"
loop.run_forever()
"""


def measure_eventfd_wake(n: int) -> list[float]:
    """One-way eventfd wake-up of a blocked (uvloop) process, seen by a spinning waker: us."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    shm = MemfdRegion(4096, "wake")
    proc = subprocess.Popen([sys.executable, "-c", _WAKE_CHILD, str(efd), str(shm.fd), str(REPO), str(n)],
                            pass_fds=(efd, shm.fd))
    out: list[float] = []
    u32 = None
    try:
        view = shm.view
        deadline = time.monotonic() + 30
        while bytes(view[4:8]) != b"RDY!":
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("wake child did not start")
            time.sleep(0.01)
        u32 = view.cast("I")
        for i in range(1, n + 1):
            time.sleep(0.0003)  # let the child go back to sleep in epoll_wait
            t0 = time.perf_counter_ns()
            os.eventfd_write(efd, 1)
            while u32[0] != i:
                pass
            out.append((time.perf_counter_ns() - t0) / 1000)
        proc.wait(10)
    finally:
        if u32 is not None:
            u32.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(efd)
        shm.close()
    return out


class _InProcServer:
    """Server(NvmeFunction) on a uvloop in a thread: for timing the server's own work."""

    def __init__(self, path: str, mode: str) -> None:
        from nvme_emu.controller import ControllerConfig
        from nvme_emu.function import NvmeFunction
        from nvme_emu.namespace_spec import open_namespace
        from vfio_user.server import Server, new_event_loop

        # spin_us=0: the floor is the work of one doorbell, not the spin the shadow path
        # would add after it by default
        self.function = NvmeFunction([open_namespace(NAMESPACE, 1)], ControllerConfig(max_io_queues=SERVER_QUEUES), doorbell=mode, spin_us=0.0)
        self.server = Server(self.function, path)
        self.loop = new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("in-process server did not start")

    def call(self, fn: Callable[[], object]) -> object:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def cb() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # pragma: no cover
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(cb)
        return fut.result(60)

    def close(self) -> None:
        self.call(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.function.close()


class _ProcessingBench:
    """Server-side work of one QD1 doorbell on the shadow path, in us: the eventfd callback
    (drain, scan the shadow page, fetch the SQE, 4 KiB read of the RAM namespace, post the
    CQE, MSI-X eventfd write), timed on the server's own loop thread (in-process server)."""

    def __init__(self, workdir: str) -> None:
        path = os.path.join(workdir, "inproc.sock")
        self.srv = _InProcServer(path, "shadow")
        self.ram = MemfdRegion(RAM_SIZE, "floor-ram")
        self.client = VfioUserClient(path, timeout=20)
        self.tail = 0
        self.commands = 0
        try:
            c = self.client
            c.negotiate()
            c.dma_map(RAM_GPA, RAM_SIZE, self.ram)  # type: ignore[arg-type]
            irq = c.enable_irqs(IrqIndex.MSIX, 2)
            mem = HostMemory(self.ram.view, RAM_GPA)
            mem.next = HOST_MEM_START
            host = NvmeHost(c, mem, irq_fd=irq[0])
            host.enable()
            q = host.create_io_queue_pair(QID, QSIZE, vector=1)
            for i in range(QSIZE):
                buf = mem.alloc(4096)
                mem.write(q.sq + 64 * i, SQE.pack(NvmOpcode.READ, 0, i, 1, 0, 0, 0, buf, 0, i, 0, 0, 0, 0, 0))
            del mem, host
            doorbells = self.srv.function.doorbells
            assert isinstance(doorbells, ShadowPath)  # the in-process server runs --doorbell shadow
            self.path = doorbells
            efds = {e.offset: e for e in self.path.ioeventfds}
            self.sq_efd, self.cq_efd = efds[SQ_DB_OFF], efds[CQ_DB_OFF]
        except BaseException:
            self.close()
            raise

    def run(self, n: int) -> list[float]:
        path, values, sq_efd, cq_efd = self.path, self.path.page.values, self.sq_efd, self.cq_efd

        def loop_body() -> list[float]:
            out = []
            tail = self.tail
            for _ in range(n):
                tail = (tail + 1) % QSIZE
                values[SQ_SLOT] = tail
                os.eventfd_write(sq_efd.fd, 1)
                t0 = time.perf_counter_ns()
                path._signalled(SQ_SLOT)
                out.append((time.perf_counter_ns() - t0) / 1000)
                values[CQ_SLOT] = tail  # consumed (completions are in order): CQ head = tail
                os.eventfd_write(cq_efd.fd, 1)
                path._signalled(CQ_SLOT)
            self.tail = tail
            return out

        out = self.srv.call(loop_body)
        self.commands += n
        stats = self.srv.call(self.srv.function.stats)
        cmds = int(stats["queues"].get(f"sq{QID}", {}).get("commands", -1))  # type: ignore[index]
        if cmds != self.commands:
            raise RuntimeError(f"in-process processing ran {cmds} commands, expected {self.commands}")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.ram.close()
            self.srv.close()


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------
def print_table(caps: dict, results: list[PathResult], floor: dict, targets: dict, mach: dict, rounds: int) -> str:
    lines: list[str] = []
    p = lines.append
    p(f"machine: {mach['cpu']}, {mach['cpus']} CPUs, Python {mach['python']}, {mach['date']}; load average "
      f"{mach['loadavg_before'][0]:.2f} before, {mach['loadavg_after'][0]:.2f} after"
      + (" (OTHER JOBS WERE RUNNING)" if max(mach['loadavg_before'][0], mach['loadavg_after'][0]) > 1.0 else "")
      + f"; {rounds} interleaved rounds: write cost = best loop minus best RAM loop, QD1 and floor = all rounds' samples "
      "pooled, cmd/s = best round")
    p("KVM capabilities: API %d, KVM_CAP_IOEVENTFD=%d, IOEVENTFD_ANY_LENGTH=%d, NR_MEMSLOTS=%d" % (
        caps["api_version"], caps["KVM_CAP_IOEVENTFD"], caps["KVM_CAP_IOEVENTFD_ANY_LENGTH"], caps["KVM_CAP_NR_MEMSLOTS"]))
    p(f"POST_WRITE: {'supported' if caps['post_write_supported'] else 'NOT supported'} ({caps['post_write_probe']})")
    if caps["pvm"]:
        p(f"NOTE: this host's KVM is PVM ({caps['pvm_evidence']}): guest code is EMULATED instruction by instruction "
          f"(~{caps.get('emulated_ns_per_insn', 0):.0f} ns/instruction here), so every guest instruction is ~100x slower "
          "than on VMX/SVM hardware; exits and eventfd costs are real.")
    p("")
    hdr = f"{'path':38s} {'db write':>9s} {'exits/':>6s} {'QD1 mean':>9s} {'p50':>8s} {'p99':>8s} {'QD1':>8s} {'QD8':>8s} {'QD32':>8s} {'irq/':>5s}"
    p(hdr)
    p(f"{'':38s} {'us/write':>9s} {'write':>6s} {'us':>9s} {'us':>8s} {'us':>8s} {'cmd/s':>8s} {'cmd/s':>8s} {'cmd/s':>8s} {'cmd':>5s}")
    p("-" * len(hdr))
    for r in results:
        t = r.throughput
        p(f"{r.label:38s} {max(r.write_cost_us, 0.0):9.2f} {r.write_exits_per_write:6.2f} {r.qd1['mean']:9.1f} {r.qd1['p50']:8.1f} "
          f"{r.qd1['p99']:8.1f} {t['1']['cmds_per_s']:8.0f} {t['8']['cmds_per_s']:8.0f} {t['32']['cmds_per_s']:8.0f} {r.interrupts_per_cmd:5.2f}")
    p("-" * len(hdr))
    p(f"floor: eventfd wake-up of a blocked uvloop process {floor['wake']['p50']:.1f} us p50 ({floor['wake']['mean']:.1f} mean)"
      f" + server processing per QD1 doorbell {floor['processing']['p50']:.1f} us p50 ({floor['processing']['mean']:.1f} mean)"
      f" = {floor['p50']:.1f} us p50 ({floor['mean']:.1f} mean)")
    p("'db write' = guest-visible vCPU stall of one SQ-tail doorbell write (loop of writes minus the same loop to RAM);")
    p("QD1 = guest RDTSC from the doorbell write to the CQE's phase bit seen (excludes the CQ-head write after it).")
    p("")
    for key, t in targets.items():
        p(f"target {key}: {'MET' if t['met'] else 'MISSED'} - {t['text']}")
    text = "\n".join(lines)
    print(text)
    return text


def plot(results: list[PathResult], floor: dict, caps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"trap": "trap\n(exit+REGION_WRITE)", "shadow": "shadow\n(POST_WRITE\nemulated)" if not caps["post_write_supported"]
             else "shadow\n(POST_WRITE)", "shadow_emu": "shadow\n(POST_WRITE\nemulated)",
             "ioeventfd": "dbbuf +\nKVM ioeventfd", "poll": "poll\n(mapped page)"}
    labels = [short[r.path] for r in results]
    colors = [PATH_COLORS[r.path] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6))
    ax = axes[0]
    vals = [max(r.write_cost_us, 0.01) for r in results]
    ax.bar(range(len(results)), vals, color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("us per doorbell write (guest vCPU stall)")
    ax.set_title("Doorbell write cost")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{results[i].write_cost_us:.2f}", ha="center", va="bottom", fontsize=8)

    ax = axes[1]
    p50 = [r.qd1["p50"] for r in results]
    p99 = [r.qd1["p99"] for r in results]
    mean = [r.qd1["mean"] for r in results]
    x = range(len(results))
    ax.bar(x, p50, color=colors, label="p50")
    ax.errorbar(x, p50, yerr=[[0] * len(results), [b - a for a, b in zip(p50, p99, strict=True)]], fmt="none", ecolor="k", capsize=4, label="p99")
    ax.scatter(x, mean, color="k", marker="_", s=300, label="mean", zorder=3)
    ax.axhline(floor["p50"], color="gray", ls="--", label=f"floor {floor['p50']:.0f} us")
    ax.axhline(TARGET_QD1_FLOOR * floor["p50"], color="gray", ls=":", label="1.5x floor")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("us (log)")
    ax.set_title("QD1 doorbell-to-completion latency")
    ax.legend(fontsize=7)

    ax = axes[2]
    qds = ["1", "8", "32"]
    w = 0.8 / len(results)
    for i, r in enumerate(results):
        ax.bar([j + i * w for j in range(len(qds))], [r.throughput[q]["cmds_per_s"] for q in qds], width=w, color=colors[i],
               label=short[r.path].replace("\n", " "))
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(qds))], [f"QD{q}" for q in qds])
    ax.set_ylabel("commands / s (4 KiB reads)")
    ax.set_title("Throughput")
    ax.legend(fontsize=7)
    title = "nvme-emu doorbell paths on real KVM (Python VMM, vfio-user)"
    if caps["pvm"]:
        title += " - this KVM is PVM: guest code is emulated"
    if not caps["post_write_supported"]:
        title += "; POST_WRITE missing: shadow path emulated"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, doc: dict, table: str) -> None:
    caps, m = doc["kernel"], doc["machine"]
    res = {r["path"]: r for r in doc["paths"]}
    floor = doc["floor"]
    lines = [
        "## Doorbell paths on real KVM (`bench/kvm_doorbell.py`)",
        "",
        "**Method.** A minimal KVM VMM in Python (`vfio_user/vmm/kvm.py`: ioctls on /dev/kvm) is a vfio-user client of",
        "`python -m nvme_emu serve --doorbell MODE` (a separate process). Guest RAM is one memfd, a KVM memory slot at",
        "GPA 0 and DMA-mapped to the server at the same address; BAR0 sits at 0xFE000000. Trapped MMIO writes are",
        "forwarded as posted REGION_WRITEs; ioeventfds from GET_REGION_IO_FDS are registered with KVM; MSI-X uses",
        "eventfds (set-up waits on them; during the runs they are counted, the guest polls the CQ). `NvmeHost` enables",
        "the controller and creates one I/O queue pair (depth 64) over the guest RAM and pre-fills every SQE with a",
        "4 KiB read (RAM namespace). Hand-assembled 32-bit protected-mode guest programs then (1) write the current SQ",
        "tail K times (no-op for the controller; minus the same loop to RAM = vCPU stall per write), (2) run QD1:",
        "RDTSC, ring, spin on the CQE phase bit, RDTSC (guest TSC calibrated against the host clock), (3) ring once per",
        "batch of 8 / 32 and reap the batch (commands/s from the host clock). The floor is a bare eventfd wake-up of a",
        "blocked uvloop process (seen by a spinning waker) plus the server's own work per QD1 doorbell on the shadow",
        "path (eventfd callback -> scan -> SQE -> 4 KiB read -> CQE -> MSI-X), timed in-process.",
        "",
        f"**Machine.** {m['cpu']}, {m['cpus']} CPUs; `{m['uname']}`; Python {m['python']}; {m['date']}.",
        f"KVM API {caps['api_version']}, KVM_CAP_IOEVENTFD={caps['KVM_CAP_IOEVENTFD']}; POST_WRITE: "
        f"{'supported' if caps['post_write_supported'] else 'not supported — ' + caps['post_write_probe']}.",
    ]
    if caps["pvm"]:
        lines += [f"**This host's KVM is PVM** ({caps['pvm_evidence']}): guest code is emulated instruction by instruction "
                  f"(~{caps['emulated_ns_per_insn']:.0f} ns per instruction measured here), so guest-side loops (polling the "
                  "CQ, the instructions around a doorbell) are ~100x slower than on VMX/SVM; the exits, ioeventfds and "
                  "eventfd wake-ups are real."]
    la = max(m["loadavg_before"][0], m["loadavg_after"][0])
    lines += ["", f"The four paths take turns in {doc['parameters']['rounds']} rounds: the write cost is the best doorbell loop "
              "minus the best RAM loop (noise only adds time), QD1 latencies and the floor pool every round's samples, "
              "commands/s is the best round; the load average was "
              f"{m['loadavg_before'][0]:.2f} before and {m['loadavg_after'][0]:.2f} after the run"
              + (" — other jobs were running, so the means and p99s carry their scheduling delays; p50s are robust." if la > 1.0 else ".")]
    lines += ["", "Paths:"] + [f"* **{r['label']}**: {r['mechanism']}." for r in doc["paths"]]
    lines += ["", "```", table, "```", "", "**Reading it.**"]
    tr, sh, io = res.get("trap"), res.get("shadow"), res.get("ioeventfd")
    if tr and sh and io:
        lines.append(f"* Doorbell write: trap {tr['write_cost_us']:.2f} us, {sh['label']} {sh['write_cost_us']:.2f} us, "
                     f"dbbuf + KVM ioeventfd {io['write_cost_us']:.2f} us ({tr['write_cost_us'] / max(io['write_cost_us'], 1e-3):.0f}x "
                     "cheaper than trap): the in-kernel ioeventfd completion is what POST_WRITE adds a copy_to_user to.")
    for key, t in doc["targets"].items():
        lines.append(f"* Target {key}: **{'met' if t['met'] else 'missed'}** — {t['text']}")
    lines.append(f"* Floor: wake {floor['wake']['p50']:.1f} us + processing {floor['processing']['p50']:.1f} us (p50).")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------
# --nested: the same benchmark inside the nested rig, on Debian's KVM and on ours
# ----------------------------------------------------------------------------------------
#: Inner-run sizes for --nested (each TCG-emulated exit costs ~0.5 ms); explicit options win.
NESTED_DEFAULTS = {"--rounds": "1", "--writes-trap": "200", "--writes-fast": "2000", "--qd1": "200",
                   "--tput-cmds": "512", "--floor-n": "200"}
NESTED_CAVEAT = ("Nested numbers: this benchmark ran in an L1 guest under QEMU TCG (-cpu max, emulated SVM with nested "
                 "paging), so every VM exit, and every instruction of L1 and the L2 program, is emulated by TCG. Absolute "
                 "times say nothing about hardware; only ratios between paths within one boot carry over.")


def nested_rows(doc: dict, kvm: str) -> list[dict]:
    """One row per path of an inner run, with its ratios to the trap path of the same boot."""
    paths = {r["path"]: r for r in doc["paths"]}
    trap = paths.get("trap")
    rows = []
    for r in doc["paths"]:
        row = {
            "modules": kvm, "path": r["path"], "label": r["label"],
            "write_us": max(r["write_cost_us"], 0.0), "exits_per_doorbell": r["write_exits_per_write"],
            "qd1_exits_per_cmd": r["qd1_exits_per_cmd"], "qd1_mean_us": r["qd1"]["mean"], "qd1_p50_us": r["qd1"]["p50"],
            "qd1_p99_us": r["qd1"]["p99"], "qd32_cmds_per_s": r["throughput"]["32"]["cmds_per_s"],
        }
        if trap:
            row["write_vs_trap"] = row["write_us"] / max(trap["write_cost_us"], 1e-9)
            row["qd1_mean_vs_trap"] = row["qd1_mean_us"] / trap["qd1"]["mean"]
            row["qd32_vs_trap"] = row["qd32_cmds_per_s"] / trap["throughput"]["32"]["cmds_per_s"]
        rows.append(row)
    return rows


def nested_table(rows: list[dict], docs: dict[str, dict]) -> str:
    lines = [NESTED_CAVEAT, ""]
    for kvm, doc in docs.items():
        lines.append(f"{kvm} modules: POST_WRITE {'supported' if doc['kernel']['post_write_supported'] else 'NOT supported'} "
                     f"({doc['kernel']['post_write_probe']})")
    hdr = (f"{'modules':8s} {'path':34s} {'db write':>9s} {'x trap':>7s} {'exits/':>7s} {'QD1 exits':>9s} "
           f"{'QD1 mean':>9s} {'x trap':>7s} {'QD32':>8s} {'x trap':>7s}")
    lines += ["", hdr, f"{'':8s} {'':34s} {'us':>9s} {'':>7s} {'doorbell':>7s} {'per cmd':>9s} {'us':>9s} {'':>7s} {'cmd/s':>8s}",
              "-" * len(hdr)]
    for r in rows:
        lines.append(f"{r['modules']:8s} {r['label']:34s} {r['write_us']:9.2f} {r.get('write_vs_trap', 0):7.3f} "
                     f"{r['exits_per_doorbell']:7.2f} {r['qd1_exits_per_cmd']:9.2f} {r['qd1_mean_us']:9.1f} "
                     f"{r.get('qd1_mean_vs_trap', 0):7.2f} {r['qd32_cmds_per_s']:8.0f} {r.get('qd32_vs_trap', 0):7.2f}")
    lines += ["-" * len(hdr),
              "'db write' = vCPU stall of one SQ-tail doorbell write (loop of writes minus the same loop to RAM); "
              "'exits/doorbell' = userspace exits per doorbell write in that loop; 'QD1 exits per cmd' = userspace exits "
              "per command at QD1 (SQ tail + CQ head writes); 'x trap' = ratio to the trap path of the same boot."]
    return "\n".join(lines)


def nested_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['modules']}\n{r['path']}" for r in rows]
    colors = [PATH_COLORS[r["path"]] for r in rows]
    hatches = ["" if r["modules"] == "patched" else "//" for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.8))
    for ax, key, title, log in ((axes[0], "write_us", "vCPU stall per doorbell write (us)", True),
                                (axes[1], "exits_per_doorbell", "userspace exits per doorbell write", False),
                                (axes[2], "qd1_mean_us", "QD1 mean latency (us)", True),
                                (axes[3], "qd32_cmds_per_s", "QD32 throughput (cmd/s)", False)):
        vals = [max(r[key], 1e-3) if log else r[key] for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        for b, h in zip(bars, hatches, strict=True):
            b.set_hatch(h)
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=60)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        for i, r in enumerate(rows):
            ax.text(i, vals[i], f"{r[key]:.2f}" if r[key] < 100 else f"{r[key]:.0f}", ha="center", va="bottom", fontsize=6)
    fig.suptitle("nvme-emu doorbell paths on real KVM in the nested rig: our POST_WRITE modules (solid) vs Debian's "
                 "(hatched)\n" + NESTED_CAVEAT, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def nested_main(args: argparse.Namespace, passthrough: list[str]) -> int:
    """Boot the rig twice (patched, then stock modules), run this benchmark inside each,
    and combine both runs into one table, JSON and plot."""
    from nvme_emu import nested

    out = Path(args.out)
    inner_dir = out / "tmp" / "kvm_doorbell_nested"
    inner_dir.mkdir(parents=True, exist_ok=True)
    docs: dict[str, dict] = {}
    t0 = time.monotonic()
    for kvm in ("patched", "stock"):
        d = inner_dir / kvm
        d.mkdir(exist_ok=True)
        print(f"== nested rig, {kvm} KVM modules ==", flush=True)
        res = nested.run_nested([sys.executable, str(Path(__file__).resolve()), "--out", str(d), *passthrough],
                                kvm=kvm, cwd=str(REPO), out_dirs=[str(d)], timeout=args.nested_timeout)
        print(res.output, flush=True)
        if res.returncode != 0:
            print(f"inner benchmark failed on {kvm} modules:\n{res.describe_failure()}", file=sys.stderr)
            return 1
        docs[kvm] = json.loads((d / "kvm_doorbell.json").read_text())
    rows = nested_rows(docs["patched"], "patched") + nested_rows(docs["stock"], "stock")
    table = nested_table(rows, docs)
    print(table)
    doc = {"benchmark": "kvm_doorbell --nested", "caveat": NESTED_CAVEAT, "host": machine(), "rows": rows,
           "inner": docs, "elapsed_s": time.monotonic() - t0}
    (out / "kvm_doorbell_nested.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "kvm_doorbell_nested.md").write_text("## Doorbell paths on real KVM, nested rig (`bench/kvm_doorbell.py --nested`)\n\n"
                                                "```\n" + table + "\n```\n")
    try:
        nested_plot(rows, out / "kvm_doorbell_nested.png")
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)", file=sys.stderr)
    print(f"\nwrote {out / 'kvm_doorbell_nested.json'}, .png, .md in {time.monotonic() - t0:.0f} s")
    return 0


# ----------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default=None,
                    help="comma-separated subset of " + ",".join(PATHS) + " (default: all; shadow_emu only where the "
                         "kernel has POST_WRITE, elsewhere shadow is already emulated)")
    ap.add_argument("--writes-trap", type=int, default=2000, help="doorbell writes per timed loop on exiting paths")
    ap.add_argument("--writes-fast", type=int, default=20000, help="doorbell writes per timed loop on exit-free paths")
    ap.add_argument("--qd1", type=int, default=1500, help="QD1 commands per path and round")
    ap.add_argument("--tput-cmds", type=int, default=4096, help="commands per throughput point (QD8/QD32)")
    ap.add_argument("--floor-n", type=int, default=1500, help="samples for each floor component per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all paths")
    ap.add_argument("--guest-timeout", type=float, default=60.0, metavar="SECONDS",
                    help="abort (with the server's log) when one guest program runs longer than this")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to SECONDS for the machine to be idle (other jobs distort the numbers)")
    ap.add_argument("--out", default=str(RESULTS), help="directory for the json/png/md")
    ap.add_argument("--nested", action="store_true",
                    help="run inside the nested rig (nvme_emu.nested), once on our POST_WRITE KVM modules and once on "
                         "Debian's, and combine both into kvm_doorbell_nested.{json,png,md}; other options pass through")
    ap.add_argument("--nested-timeout", type=float, default=2400, help="seconds per nested boot")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if args.nested:
        skip = {"--nested", "--out", "--nested-timeout"}
        passthrough, i = [], 0
        while i < len(raw):
            a = raw[i]
            key = a.split("=", 1)[0]
            if key in skip:
                i += 1 if "=" in a or a == "--nested" else 2
                continue
            passthrough.append(a)
            i += 1
        # What one boot completes reliably: in the rig a second round on the same vCPU has
        # repeatedly sent a guest program astray (open problem, see bench/README.md).
        for opt, val in NESTED_DEFAULTS.items():
            if not any(a.split("=", 1)[0] == opt for a in passthrough):
                passthrough += [opt, val]
        return nested_main(args, passthrough)

    ok, why = K.Kvm.available()
    if not ok:
        print(f"KVM unavailable: {why}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    busy_before = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    caps = kernel_caps()
    post_write = bool(caps["post_write_supported"])
    # KVM-only micro-measurement (no server): best of 3 calls per component, nets recomputed
    micro = [measure_doorbell_exits(5000, repeat=3) for _ in range(3)]
    emu = {k: min(m[k] for m in micro) for k in micro[0] if not k.endswith("_net")}
    for k in list(emu):
        if k != "ram":
            emu[k + "_net"] = max(0.0, emu[k] - emu["ram"])
    caps["emulated_ns_per_insn"] = emu["ram"] / 3 * 1000  # the RAM loop is 3 instructions per write
    tsc_hz = calibrate_tsc()
    print(f"guest TSC {tsc_hz / 1e6:.1f} MHz (calibrated); POST_WRITE: {caps['post_write_probe']}; "
          f"PVM: {caps['pvm']} ({caps['pvm_evidence']})", flush=True)

    workdir = tempfile.mkdtemp(prefix="kvm-doorbell-")
    default_paths = [p for p in PATHS if p != "shadow_emu" or post_write]
    modes = [p.strip() for p in args.paths.split(",") if p.strip()] if args.paths else default_paths
    for mode in modes:
        if mode not in PATHS:
            ap.error(f"unknown path {mode}")
    load_before = os.getloadavg()
    benches: list[PathBench] = []
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    floor_rounds: list[dict] = []
    wake_all: list[float] = []
    proc_all: list[float] = []
    results: list[PathResult] = []
    inproc: Optional[_ProcessingBench] = None
    try:
        for mode in modes:
            b = PathBench(mode, workdir, tsc_hz, post_write, args)
            benches.append(b)
            b.setup()
        inproc = _ProcessingBench(workdir)
        for rnd in range(args.rounds):
            for b in benches:
                r = measure_round_retrying(b, rnd)
                rounds[b.mode].append(r)
                print(f"  round {rnd + 1} {b.label}: write {r['write']['net_us']:.2f} us, QD1 p50 {r['qd1']['p50']:.1f} us, "
                      f"QD32 {r['tput']['32']['cmds_per_s']:.0f} cmd/s", flush=True)
            wake = measure_eventfd_wake(args.floor_n)
            proc = inproc.run(args.floor_n)
            warm = args.floor_n // 20
            wake_all += wake[warm:]
            proc_all += proc[warm:]
            fr = {"wake": summary(wake[warm:]), "processing": summary(proc[warm:])}
            fr["p50"] = fr["wake"]["p50"] + fr["processing"]["p50"]
            fr["mean"] = fr["wake"]["mean"] + fr["processing"]["mean"]
            floor_rounds.append(fr)
            print(f"  round {rnd + 1} floor: wake {fr['wake']['p50']:.1f} us + processing {fr['processing']['p50']:.1f} us (p50)", flush=True)
        results = [b.result(rounds[b.mode]) for b in benches]
    finally:
        for b in benches:
            b.close()
        if inproc is not None:
            inproc.close()
    load_after = os.getloadavg()
    # the floor's components, all rounds' samples pooled (as the paths' QD1 latencies)
    fw = summary(wake_all)
    fp = summary(proc_all)
    floor = {"wake": fw, "processing": fp, "p50": fw["p50"] + fp["p50"], "mean": fw["mean"] + fp["mean"],
             "rounds": [{"wake_p50": f["wake"]["p50"], "processing_p50": f["processing"]["p50"]} for f in floor_rounds]}

    by = {r.path: r for r in results}
    targets: dict = {}
    if "trap" in by and "shadow" in by:
        tr, sh = by["trap"].write_cost_us, by["shadow"].write_cost_us
        ratio = tr / sh if sh > 0 else float("inf")
        met = sh <= tr / TARGET_WRITE_RATIO
        text = f"shadow write {sh:.2f} us vs trap {tr:.2f} us = 1/{ratio:.2f} of trap (target <= 1/{TARGET_WRITE_RATIO:.0f})"
        if not met:
            text += (f"; missed by {sh / (tr / TARGET_WRITE_RATIO):.1f}x because this kernel lacks POST_WRITE: the emulated "
                     "shadow path still exits to userspace on every write (plus the shadow store and eventfd write)")
            if "ioeventfd" in by:
                io = by["ioeventfd"].write_cost_us
                text += (f". The in-kernel fast path POST_WRITE would use (KVM ioeventfd, measured on the dbbuf path with the "
                         f"server waiting on it) costs {io:.2f} us = 1/{tr / max(io, 1e-3):.1f} of trap "
                         f"({'meets' if io <= tr / TARGET_WRITE_RATIO else 'misses'} the 1/{TARGET_WRITE_RATIO:.0f} bar); "
                         f"with nobody waiting on the eventfd it is {emu['ioeventfd_net']:.2f} us "
                         f"(vs {emu['trap_net']:.2f} us for a bare exit to this VMM)")
        targets["write_cost"] = {"met": met, "shadow_us": sh, "trap_us": tr, "ratio": ratio, "text": text}
    if "shadow" in by:
        for stat in ("p50", "mean"):
            v = by["shadow"].qd1[stat]
            f = floor[stat]
            met = v <= TARGET_QD1_FLOOR * f
            text = f"shadow QD1 {stat} {v:.1f} us vs floor {f:.1f} us = {v / f:.2f}x (target <= {TARGET_QD1_FLOOR}x)"
            if not met:
                excess = v - TARGET_QD1_FLOOR * f
                text += f"; missed by {excess:.1f} us ({v / (TARGET_QD1_FLOOR * f):.2f}x the allowance)"
                reasons = []
                if not post_write:
                    reasons.append(f"the emulated POST_WRITE puts a userspace exit (~{by['shadow'].write_cost_us:.1f} us measured "
                                   "above) in front of the wake-up")
                reasons.append(f"the guest's poll loop is emulated by PVM (4 instructions per look, ~{4 * caps['emulated_ns_per_insn'] / 1000:.1f} us)"
                               if caps["pvm"] else "the guest's poll loop adds its own delay")
                if stat == "mean":
                    reasons.append("the mean carries scheduler outliers (2 CPUs shared by vCPU, server and any other job)")
                text += ": " + "; ".join(reasons)
            else:
                text += f"; {TARGET_QD1_FLOOR * f - v:.1f} us to spare"
            if "ioeventfd" in by:
                io = by["ioeventfd"].qd1[stat]
                text += f" [KVM fast path of this kernel, dbbuf + ioeventfd: {io:.1f} us = {io / f:.2f}x floor]"
            targets[f"qd1_{stat}_vs_floor"] = {"met": met, "value_us": v, "floor_us": f, "ratio": v / f, "text": text}
    for res in results:
        res.notes.append(f"QD1 {res.qd1['p50'] / floor['p50']:.2f}x floor (p50)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mach = machine()
    mach["loadavg_before"], mach["loadavg_after"] = load_before, load_after
    mach["cpu_busy_before_start"] = busy_before
    table = print_table(caps, results, floor, targets, mach, args.rounds)
    doc = {
        "benchmark": "kvm_doorbell",
        "machine": mach,
        "kernel": caps,
        "tsc_hz": tsc_hz,
        "kvm_micro_us_per_write": emu,
        "parameters": {"queue_depth": QSIZE, "io": "4 KiB read, RAM namespace", "lba": LBA, **vars(args)},
        "paths": [r.__dict__ for r in results],
        "floor": floor,
        "targets": targets,
        "elapsed_s": time.monotonic() - t_start,
    }
    (out / "kvm_doorbell.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    try:
        plot(results, floor, caps, out / "kvm_doorbell.png")
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)", file=sys.stderr)
    write_markdown(out / "kvm_doorbell.md", doc, table)
    print(f"\nwrote {out / 'kvm_doorbell.json'}, .png, .md in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
