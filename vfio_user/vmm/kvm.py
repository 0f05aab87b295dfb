"""A minimal KVM VMM in pure Python (cffi ABI mode + ``fcntl.ioctl``).

Why this exists: a vfio-user server can take a device's doorbell writes from KVM ioeventfds
(``GET_REGION_IO_FDS``) that also *post* the written value to a shadow page (the proposed
``KVM_IOEVENTFD_FLAG_POST_WRITE``). To test and benchmark that path without QEMU we need a
VMM small enough to reason about: create a VM, give it memfd-backed RAM (so the same pages
can later be handed to a vfio-user server by fd), register ioeventfds, and run a few bytes
of hand-encoded guest code (:mod:`vfio_user.vmm.x86`) that rings a doorbell and polls a
completion.

Scope and constraints
---------------------
* x86-64 host only. Structures are declared in :mod:`vfio_user.vmm._kvm_cdef` and checked
  against the layouts measured from ``linux/kvm.h``.
* On the development machine ``/dev/kvm`` is PVM (``kvm_pvm``): no VMX/SVM. Linux guests
  cannot run there, but small guest programs run in KVM's instruction emulator (about
  0.4-0.5 us per instruction). Both 16-bit real mode and 32-bit flat protected mode
  (paging off) work; see :meth:`Vcpu.enter_real_mode` / :meth:`Vcpu.enter_protected_mode`.
* POST_WRITE is in no released kernel. Support is detected by trying the ioctl and asking
  for :data:`KVM_CAP_IOEVENTFD_POST_WRITE` (:meth:`VirtualMachine.post_write_supported`);
  where it is missing, a VMM traps the MMIO/PIO write and does the same thing in userspace
  (:class:`~vfio_user.vmm.post_write.PostWriteEmulator`,
  :func:`~vfio_user.vmm.post_write.post_write_emulated`). Test runs can require one world or
  the other with ``NVME_EMU_EXPECT_POST_WRITE``
  (:func:`~vfio_user.vmm.post_write.post_write_expectation`).

This module holds the ioctl wrappers (``/dev/kvm``, the VM with its memory slots and
ioeventfds, the vCPU); the memfd-backed memory they map is :mod:`vfio_user.vmm.memory`'s,
the userspace POST_WRITE and the micro-measurement are :mod:`vfio_user.vmm.post_write`'s.

Every object owning a file descriptor or a mapping has ``close()`` and is a context manager;
``VirtualMachine.close()`` closes its vCPUs, its memory it allocated and its eventfd probes.

Run ``python -m vfio_user.vmm.post_write [N]`` for a micro-measurement of trapped vs ioeventfd doorbells.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

from ._kvm_cdef import EXPECTED_LAYOUT, ffi, measured_layout
from .memory import GuestRam, MemfdRegion, close_fd

__all__ = [
    "Kvm",
    "KvmError",
    "VirtualMachine",
    "Vcpu",
    "VcpuExit",
    "IoEventFd",
    "IOEVENTFD_FLAG_POST_WRITE",
    "KVM_CAP_IOEVENTFD_POST_WRITE",
]

_mismatch = {k: v for k, v in measured_layout().items() if v != EXPECTED_LAYOUT[k]}
if _mismatch:  # pragma: no cover - would mean the cdef is wrong for this platform
    raise ImportError(f"kvm struct layout mismatch (cffi vs linux/kvm.h): {_mismatch}")

# --------------------------------------------------------------------------------------
# ioctl numbers (asm-generic/ioctl.h encoding: dir<<30 | size<<16 | type<<8 | nr)
# --------------------------------------------------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOW(typ: int, nr: int, ctype: str) -> int:
    return _IOC(_IOC_WRITE, typ, nr, ffi.sizeof(ctype))


def _IOR(typ: int, nr: int, ctype: str) -> int:
    return _IOC(_IOC_READ, typ, nr, ffi.sizeof(ctype))


def _IOWR(typ: int, nr: int, ctype: str) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, ffi.sizeof(ctype))


KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, "struct kvm_userspace_memory_region")
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, "struct kvm_ioeventfd")
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, "struct kvm_regs")
KVM_SET_REGS = _IOW(KVMIO, 0x82, "struct kvm_regs")
KVM_GET_SREGS = _IOR(KVMIO, 0x83, "struct kvm_sregs")
KVM_SET_SREGS = _IOW(KVMIO, 0x84, "struct kvm_sregs")

# Values printed by gcc against /usr/include/linux/kvm.h; a wrong helper would break all.
assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46
assert KVM_IOEVENTFD == 0x4040AE79
assert KVM_GET_SREGS == 0x8138AE83 and KVM_SET_REGS == 0x4090AE82

KVM_API_VERSION = 12

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
#: Proposed together with IOEVENTFD_FLAG_POST_WRITE: KVM_CHECK_EXTENSION answers > 0 (on
#: /dev/kvm and on a VM fd) on kernels that have the flag; 0 (unknown cap) elsewhere.
KVM_CAP_IOEVENTFD_POST_WRITE = 248

IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
IOEVENTFD_FLAG_DEASSIGN = 1 << 2
#: Proposed (tmakatos, 2026-03): copy the written value to ``post_addr`` before signalling.
IOEVENTFD_FLAG_POST_WRITE = 1 << 5

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

_EXIT_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL",
    KVM_EXIT_DEBUG: "DEBUG",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

#: Scratch GPA for the POST_WRITE probe (registered and removed at once; unbacked, and
#: away from the doorbell addresses used by tests/benchmarks).
_PROBE_GPA = 0xFEBF_F000


class KvmError(OSError):
    """An ioctl on /dev/kvm or one of its fds failed; ``errno`` is the kernel's."""


def _ioctl(fd: int, request: int, arg: object = 0, what: str = "") -> int:
    """``fcntl.ioctl`` with a KVM-flavoured error.

    Struct arguments are passed as ``ffi.buffer(cdata)``: a writable buffer, so
    ``fcntl`` copies the kernel's output back into the cffi struct (mutate_flag).
    """
    while True:
        try:
            return fcntl.ioctl(fd, request, arg, True)  # type: ignore[call-overload]
        except InterruptedError:
            continue  # a signal arrived (PEP 475 does not retry ioctl); KVM calls are restartable
        except OSError as e:
            err = e.errno or _errno.EIO  # an OSError from ioctl always has one; the type allows None
            raise KvmError(err, f"{what or hex(request)}: {os.strerror(err)}") from None


# --------------------------------------------------------------------------------------
# /dev/kvm
# --------------------------------------------------------------------------------------
class Kvm:
    """The ``/dev/kvm`` system fd: API version, capabilities, VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        self.fd: int = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.api_version = _ioctl(self.fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if self.api_version != KVM_API_VERSION:
                raise KvmError(_errno.EINVAL, f"KVM API version {self.api_version} != 12")
            self.vcpu_mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            self.close()
            raise

    @classmethod
    def available(cls, path: str = "/dev/kvm") -> tuple[bool, str]:
        """Whether a VM with one vCPU can be created here, and why not if not.

        Used by tests to skip with a precise reason (missing device, permission, no
        ioeventfd capability, vCPU creation refused...).
        """
        if not os.path.exists(path):
            return False, f"{path} does not exist (no KVM module loaded / not exposed to this container)"
        if not os.access(path, os.R_OK | os.W_OK):
            return False, f"{path} is not readable+writable by uid {os.getuid()}"
        try:
            with cls(path) as kvm:
                if not kvm.check_extension(KVM_CAP_IOEVENTFD):
                    return False, "KVM_CAP_IOEVENTFD not supported"
                if not kvm.check_extension(KVM_CAP_USER_MEMORY):
                    return False, "KVM_CAP_USER_MEMORY not supported"
                with kvm.create_vm() as vm:
                    vm.create_vcpu(0)
        except OSError as e:
            return False, f"{path} unusable: {e}"
        return True, f"{path} usable (API {KVM_API_VERSION})"

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd (0 = unsupported, >0 = supported/value)."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def create_vm(self) -> "VirtualMachine":
        """KVM_CREATE_VM (machine type 0). The VM does not keep this object alive."""
        vm_fd = _ioctl(self.fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return VirtualMachine(vm_fd, self.vcpu_mmap_size)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        close_fd(fd)

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# VM
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IoEventFd:
    """What was registered, so that deassign passes exactly the same fields (KVM matches
    addr, len, fd, PIO-ness, datamatch and — with POST_WRITE — post_addr)."""

    gpa: int
    size: int
    fd: int
    datamatch: Optional[int]
    post_addr: Optional[int]
    pio: bool


class VirtualMachine:
    """A KVM VM fd: memory slots, ioeventfds, vCPUs."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self.ram: dict[int, GuestRam] = {}
        self.vcpus: list[Vcpu] = []
        self.ioeventfds: list[IoEventFd] = []
        self._post_write_probe: Optional[tuple[bool, str]] = None
        #: errno of the POST_WRITE probe (0 when supported, None before probing).
        self.post_write_errno: Optional[int] = None
        #: KVM_CHECK_EXTENSION(KVM_CAP_IOEVENTFD_POST_WRITE) as seen by the probe.
        self.post_write_cap: Optional[int] = None

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers can be VM-specific)."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    # -- memory ---------------------------------------------------------------------
    def add_memory(self, gpa: int, memfd_mmap_or_size: Union[int, MemfdRegion], slot: int,
                   *, flags: int = 0) -> GuestRam:
        """Map guest-physical ``[gpa, gpa+size)`` onto memfd-backed memory.

        ``memfd_mmap_or_size`` is either a size (a new memfd is created and owned by the
        VM) or an existing :class:`MemfdRegion` (shared with someone else, caller owns it).
        """
        if isinstance(memfd_mmap_or_size, int):
            region, owned = MemfdRegion(memfd_mmap_or_size, f"guest-ram-{slot}"), True
        else:
            region, owned = memfd_mmap_or_size, False
        try:
            self._set_region(slot, flags, gpa, region.size, region.addr)
        except BaseException:
            if owned:
                region.close()
            raise
        ram = GuestRam(gpa, slot, region, owned)
        self.ram[slot] = ram
        return ram

    def remove_memory(self, slot: int) -> None:
        """Delete a slot (memory_size 0) and close its region if the VM owned it."""
        ram = self.ram.pop(slot)
        self._set_region(slot, 0, ram.gpa, 0, 0)
        if ram.owned:
            ram.region.close()

    def _set_region(self, slot: int, flags: int, gpa: int, size: int, uaddr: int) -> None:
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, flags, gpa, size, uaddr
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, ffi.buffer(r), "KVM_SET_USER_MEMORY_REGION")

    def ram_for(self, gpa: int) -> GuestRam:
        for ram in self.ram.values():
            if ram.gpa <= gpa < ram.gpa + ram.size:
                return ram
        raise KeyError(f"no memory slot covers gpa {gpa:#x}")

    # -- ioeventfds -----------------------------------------------------------------
    def ioeventfd_ioctl(self, gpa: int, size: int, eventfd: int, flags: int, *, datamatch: int = 0,
                        post_addr: int = 0) -> None:
        """KVM_IOEVENTFD with exactly these fields (no bookkeeping, no flag derivation).

        For ABI tests that need combinations the typed methods refuse to build, e.g. a
        non-zero ``post_addr`` without IOEVENTFD_FLAG_POST_WRITE. Use :meth:`add_ioeventfd`
        / :meth:`remove_ioeventfd` otherwise.
        """
        a = ffi.new("struct kvm_ioeventfd *")
        a.addr, a.len, a.fd, a.flags = gpa, size, eventfd, flags
        a.datamatch, a.post_addr = datamatch, post_addr
        _ioctl(self.fd, KVM_IOEVENTFD, ffi.buffer(a),
               f"KVM_IOEVENTFD({'deassign ' if flags & IOEVENTFD_FLAG_DEASSIGN else ''}"
               f"{'pio' if flags & IOEVENTFD_FLAG_PIO else 'mmio'} {gpa:#x}/{size} flags={flags:#x}"
               f"{f' post_addr={post_addr:#x}' if post_addr else ''})")

    def _ioeventfd(self, gpa: int, size: int, eventfd: int, datamatch: Optional[int],
                   post_addr: Optional[int], pio: bool, deassign: bool) -> None:
        flags = 0
        if datamatch is not None:
            flags |= IOEVENTFD_FLAG_DATAMATCH
        if post_addr is not None:
            flags |= IOEVENTFD_FLAG_POST_WRITE
        if pio:
            flags |= IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= IOEVENTFD_FLAG_DEASSIGN
        self.ioeventfd_ioctl(gpa, size, eventfd, flags, datamatch=datamatch or 0, post_addr=post_addr or 0)

    def add_ioeventfd(self, gpa: int, size: int, eventfd: int, *, datamatch: Optional[int] = None,
                      post_addr: Optional[int] = None, pio: bool = False) -> IoEventFd:
        """Let KVM complete guest writes to ``gpa`` by signalling ``eventfd`` in-kernel.

        ``size`` 1/2/4/8 (0 = any length, not allowed with post_addr). ``datamatch``
        restricts it to writes of that value. ``post_addr`` (host virtual address, e.g.
        ``region.addr + off``) requests the proposed POST_WRITE: the written value is
        copied there before the eventfd is signalled; raises KvmError(EINVAL) on kernels
        without it. Writes to a registered address never reach userspace, even with no
        backing memory slot. The memory at ``post_addr`` must stay mapped for as long as
        the registration exists (close the VM before unmapping a shared shadow region).
        """
        self._ioeventfd(gpa, size, eventfd, datamatch, post_addr, pio, deassign=False)
        reg = IoEventFd(gpa, size, eventfd, datamatch, post_addr, pio)
        self.ioeventfds.append(reg)
        return reg

    def remove_ioeventfd(self, gpa_or_reg: Union[int, IoEventFd], size: int = 0, eventfd: int = -1, *,
                         datamatch: Optional[int] = None, post_addr: Optional[int] = None,
                         pio: bool = False) -> None:
        """Deassign; pass the :class:`IoEventFd` returned by add, or the same arguments.

        KVM looks the registration up by all fields, including post_addr under
        POST_WRITE: deassigning with a different post_addr fails with ENOENT.
        """
        if isinstance(gpa_or_reg, IoEventFd):
            reg = gpa_or_reg
        else:
            reg = IoEventFd(gpa_or_reg, size, eventfd, datamatch, post_addr, pio)
        self._ioeventfd(reg.gpa, reg.size, reg.fd, reg.datamatch, reg.post_addr, reg.pio, deassign=True)
        try:
            self.ioeventfds.remove(reg)
        except ValueError:
            pass

    def post_write_supported(self) -> tuple[bool, str]:
        """Does this kernel implement KVM_IOEVENTFD_FLAG_POST_WRITE? (cached)

        Two independent answers, both required:

        * the probe: register a 4-byte POST_WRITE ioeventfd on a scratch GPA with a valid
          post_addr (deassigned at once on success). Kernels without the flag reject the
          unknown bit with EINVAL; a control registration without the flag tells that
          apart from ioeventfds failing altogether;
        * ``KVM_CHECK_EXTENSION(KVM_CAP_IOEVENTFD_POST_WRITE)`` on this VM fd.

        Supported only when the probe succeeds and the capability is > 0. When they
        disagree the kernel is inconsistent (e.g. a half-applied patch, or 248 assigned to
        something else): reported unsupported, and the reason says so. The reason always
        states both answers. The errno is kept in :attr:`post_write_errno` (0 when the
        probe was accepted), the capability value in :attr:`post_write_cap` (None if the
        query itself failed).
        """
        if self._post_write_probe is not None:
            return self._post_write_probe
        probe_ok, probe_text = self._probe_post_write_flag()
        try:
            cap: Optional[int] = self.check_extension(KVM_CAP_IOEVENTFD_POST_WRITE)
            cap_text = f"KVM_CHECK_EXTENSION(KVM_CAP_IOEVENTFD_POST_WRITE={KVM_CAP_IOEVENTFD_POST_WRITE}) = {cap}"
        except KvmError as e:
            cap = None
            cap_text = (f"KVM_CHECK_EXTENSION(KVM_CAP_IOEVENTFD_POST_WRITE={KVM_CAP_IOEVENTFD_POST_WRITE}) "
                        f"failed: {e}")
        self.post_write_cap = cap
        cap_ok = bool(cap)
        if probe_ok and cap_ok:
            result = (True, f"{probe_text}; {cap_text}")
        elif probe_ok != cap_ok and cap is not None:
            result = (False, f"inconsistent kernel: probe says {probe_text}, but {cap_text}; "
                             f"treated as unsupported")
        else:
            result = (False, f"{probe_text}; {cap_text}")
        self._post_write_probe = result
        return result

    def _probe_post_write_flag(self) -> tuple[bool, str]:
        """The ioctl half of :meth:`post_write_supported`; sets :attr:`post_write_errno`."""
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        scratch = ffi.new("uint64_t[1]")  # valid, aligned userspace memory
        post_addr = int(ffi.cast("uintptr_t", scratch))
        try:
            try:
                self._ioeventfd(_PROBE_GPA, 4, efd, None, post_addr, False, deassign=False)
            except KvmError as e:
                self.post_write_errno = e.errno
                name = _errno.errorcode.get(e.errno or 0, str(e.errno))
                # Control: the same registration without the flag must work, otherwise the
                # error says nothing about POST_WRITE (e.g. ioeventfds broken altogether).
                try:
                    self._ioeventfd(_PROBE_GPA, 4, efd, None, None, False, deassign=False)
                except KvmError as e2:
                    return False, (f"{name} (errno {e.errno}) from POST_WRITE probe, but a plain "
                                   f"ioeventfd fails too ({e2}): inconclusive")
                self._ioeventfd(_PROBE_GPA, 4, efd, None, None, False, deassign=True)
                if e.errno == _errno.EINVAL:
                    return False, f"EINVAL (errno {e.errno}): kernel lacks KVM_IOEVENTFD_FLAG_POST_WRITE"
                return False, f"{name} (errno {e.errno}) from POST_WRITE probe: {e.strerror}"
            self._ioeventfd(_PROBE_GPA, 4, efd, None, post_addr, False, deassign=True)
            self.post_write_errno = 0
            return True, "KVM_IOEVENTFD_FLAG_POST_WRITE accepted"
        finally:
            os.close(efd)

    # -- vCPUs ----------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        try:
            vcpu = Vcpu(self, fd, vcpu_id)
        except BaseException:
            close_fd(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close vCPUs, then the VM fd (drops slots and ioeventfds), then owned memory.

        Memory is unmapped only after the VM fd is gone, so KVM never holds a slot
        pointing at unmapped host memory.
        """
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        fd, self.fd = self.fd, -1
        close_fd(fd)
        self.ioeventfds.clear()
        for ram in self.ram.values():
            if ram.owned:
                ram.region.close()
        self.ram.clear()

    def __enter__(self) -> "VirtualMachine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# vCPU
# --------------------------------------------------------------------------------------
class VcpuExit:
    """Why KVM_RUN returned. ``kind`` is a name from the KVM_EXIT_* list ("MMIO", "IO",
    "HLT", "INTERNAL_ERROR", ...) or "INTR" for EINTR; ``reason`` the raw number.

    MMIO: ``phys_addr``, ``length``, ``is_write``, ``data`` (the bytes written; for
    reads, answer with :meth:`Vcpu.complete_mmio_read` before the next run).
    IO: ``port``, ``length`` (size), ``is_write`` (direction OUT), ``count``, ``data``.
    """

    __slots__ = ("reason", "kind", "phys_addr", "port", "length", "is_write", "data", "count", "detail")

    def __init__(self, reason: int, kind: str) -> None:
        self.reason = reason
        self.kind = kind
        self.phys_addr = 0
        self.port = 0
        self.length = 0
        self.is_write = False
        self.data = b""
        self.count = 0
        self.detail = ""

    @property
    def value(self) -> int:
        """``data`` as a little-endian integer."""
        return int.from_bytes(self.data, "little")

    def __repr__(self) -> str:
        if self.kind == "MMIO":
            return (f"VcpuExit(MMIO {'write' if self.is_write else 'read'} {self.phys_addr:#x} "
                    f"len={self.length} data={self.data.hex()})")
        if self.kind == "IO":
            return f"VcpuExit(IO {'out' if self.is_write else 'in'} port={self.port:#x} len={self.length})"
        return f"VcpuExit({self.kind} reason={self.reason}{' ' + self.detail if self.detail else ''})"


# Segment descriptor "type" nibbles (S=1): code execute/read accessed, data read/write accessed.
_SEG_CODE_ER_A = 0xB
_SEG_DATA_RW_A = 0x3
_TSS_BUSY_32 = 0xB


class Vcpu:
    """A vCPU fd plus its mmapped ``struct kvm_run``."""

    def __init__(self, vm: VirtualMachine, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        self._run_mm: Optional[mmap.mmap] = mmap.mmap(fd, vm.vcpu_mmap_size, mmap.MAP_SHARED,
                                                      mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer("uint8_t[]", self._run_mm, require_writable=True)
        self.run_struct = ffi.cast("struct kvm_run *", self._run_buf)
        self._mmio = self.run_struct.u.mmio

    # -- registers ------------------------------------------------------------------
    def get_regs(self):
        r = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, KVM_GET_REGS, ffi.buffer(r), "KVM_GET_REGS")
        return r

    def set_regs(self, r) -> None:
        _ioctl(self.fd, KVM_SET_REGS, ffi.buffer(r), "KVM_SET_REGS")

    def get_sregs(self):
        s = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, KVM_GET_SREGS, ffi.buffer(s), "KVM_GET_SREGS")
        return s

    def set_sregs(self, s) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, ffi.buffer(s), "KVM_SET_SREGS")

    def _set_ip(self, ip: int, **gprs: int) -> None:
        r = ffi.new("struct kvm_regs *")
        for name, v in gprs.items():
            setattr(r, name, v)
        r.rip = ip
        r.rflags = 0x2  # bit 1 is reserved-as-one; IF=0 so no interrupts are expected
        self.set_regs(r)

    def enter_real_mode(self, cs: int = 0, ip: int = 0x1000, *, unreal: bool = False, **gprs: int) -> None:
        """Start executing 16-bit real-mode code at ``cs:ip`` (linear ``cs*16+ip``).

        DS/ES/SS/FS/GS = 0 (base 0). With ``unreal=True`` the data segments' cached limit
        is 4 GiB ("unreal mode"), so ``0x67``-prefixed 32-bit addresses above 64 KiB are
        usable; otherwise data addresses must be < 64 KiB.
        """
        s = self.get_sregs()
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            seg.base, seg.selector = 0, 0
            seg.limit = 0xFFFFFFFF if unreal else 0xFFFF
            seg.g = 1 if unreal else 0
            seg.db = 0
        s.cs.base, s.cs.selector, s.cs.limit = cs << 4, cs, 0xFFFF
        # 16-bit code segment even after enter_protected_mode on this vCPU (D=1 left in the
        # descriptor cache would make the CPU decode the real-mode code as 32-bit).
        s.cs.db, s.cs.g, s.cs.l = 0, 0, 0
        s.cr0 &= ~1
        self.set_sregs(s)
        self._set_ip(ip, **gprs)

    def enter_protected_mode(self, eip: int = 0x1000, **gprs: int) -> None:
        """Start executing 32-bit flat protected-mode code (paging off) at ``eip``.

        No GDT is needed in guest memory: KVM_SET_SREGS loads the hidden descriptor cache
        directly (CS base 0 limit 4G type code/ER D=1 G=1; data segments the same with
        type RW); the guest must just never reload a segment register. IF=0, no IDT.
        """
        s = self.get_sregs()

        def flat(seg, selector: int, typ: int) -> None:
            seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, typ
            seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 1, 0, 0

        flat(s.cs, 0x08, _SEG_CODE_ER_A)
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            flat(seg, 0x10, _SEG_DATA_RW_A)
        s.tr.base, s.tr.limit, s.tr.selector, s.tr.type = 0, 0x67, 0x18, _TSS_BUSY_32
        s.tr.present, s.tr.s, s.tr.unusable = 1, 0, 0
        s.cr0 = (s.cr0 | 0x1) & ~0x80000000  # PE on, PG off
        s.efer = 0
        self.set_sregs(s)
        self._set_ip(eip, **gprs)

    # -- running --------------------------------------------------------------------
    def run(self) -> VcpuExit:
        """KVM_RUN once (GIL released during the ioctl) and decode the exit."""
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except OSError as e:
            if e.errno in (_errno.EINTR, _errno.EAGAIN):
                return VcpuExit(KVM_EXIT_INTR, "INTR")
            err = e.errno or _errno.EIO
            raise KvmError(err, f"KVM_RUN: {os.strerror(err)}") from None
        run = self.run_struct
        reason = run.exit_reason
        ex = VcpuExit(reason, _EXIT_NAMES.get(reason, f"EXIT_{reason}"))
        if reason == KVM_EXIT_MMIO:
            m = self._mmio
            ex.phys_addr = m.phys_addr
            ex.length = m.len
            ex.is_write = bool(m.is_write)
            ex.data = bytes(ffi.buffer(m.data, m.len)) if ex.is_write else b""
        elif reason == KVM_EXIT_IO:
            io = run.u.io
            ex.port, ex.length, ex.count = io.port, io.size, io.count
            ex.is_write = io.direction == KVM_EXIT_IO_OUT
            if ex.is_write:
                ex.data = bytes(ffi.buffer(self._run_buf + io.data_offset, io.size * io.count))
        elif reason == KVM_EXIT_INTERNAL_ERROR:
            i = run.u.internal
            ex.detail = f"suberror={i.suberror} data={[hex(i.data[k]) for k in range(min(i.ndata, 16))]}"
        elif reason == KVM_EXIT_FAIL_ENTRY:
            ex.detail = f"hw_reason={run.u.fail_entry.hardware_entry_failure_reason:#x}"
        elif reason == KVM_EXIT_UNKNOWN:
            ex.detail = f"hw_reason={run.u.hardware_exit_reason:#x}"
        elif reason == KVM_EXIT_EXCEPTION:
            ex.detail = f"exception={run.u.ex.exception} error_code={run.u.ex.error_code:#x}"
        return ex

    def complete_mmio_read(self, data: bytes) -> None:
        """Answer the pending MMIO read exit: KVM takes ``data`` on the next KVM_RUN."""
        n = self._mmio.len
        ffi.memmove(self._mmio.data, data[:n].ljust(n, b"\0"), n)

    def complete_io_in(self, data: bytes) -> None:
        """Answer the pending port IN exit (size*count bytes at data_offset)."""
        io = self.run_struct.u.io
        n = io.size * io.count
        ffi.memmove(self._run_buf + io.data_offset, data[:n].ljust(n, b"\0"), n)

    def run_until(self, handler: Optional[Callable[[VcpuExit], bool]] = None,
                  *, stop: frozenset[str] = frozenset({"HLT"}), max_exits: int = 10_000_000) -> VcpuExit:
        """Run until an exit whose kind is in ``stop``; other exits go to ``handler``.

        ``handler`` returns True when it handled the exit; an unhandled exit that is not
        MMIO/IO/INTR raises :class:`KvmError` carrying its description (a guest bug).
        """
        for _ in range(max_exits):
            ex = self.run()
            if ex.kind in stop:
                return ex
            if handler is not None and handler(ex):
                continue
            if ex.kind in ("MMIO", "IO", "INTR"):
                continue  # writes dropped, reads return zeros
            raise KvmError(_errno.EIO, f"unexpected vCPU exit {ex!r}")
        raise KvmError(_errno.ETIME, f"no {sorted(stop)} exit after {max_exits} exits")

    def close(self) -> None:
        buf = getattr(self, "_run_buf", None)
        if buf is not None:
            self.run_struct = None
            self._mmio = None
            ffi.release(buf)
            self._run_buf = None
        if self._run_mm is not None:
            self._run_mm.close()
            self._run_mm = None
        fd, self.fd = self.fd, -1
        close_fd(fd)

    def __enter__(self) -> "Vcpu":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
