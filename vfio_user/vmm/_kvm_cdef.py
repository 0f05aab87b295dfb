"""C layouts of the KVM ABI structures used by :mod:`vfio_user.vmm.kvm`, for cffi ABI mode.

Why a separate module: the declarations are long, purely descriptive and checked once
against ``/usr/include/linux/kvm.h`` (x86-64); keeping them apart keeps ``kvm.py``
readable. cffi's ABI mode computes offsets from these declarations with the platform
rules, so no C compiler is needed at install time. :data:`EXPECTED_LAYOUT` records the
offsets/sizes measured with gcc against the kernel headers of the development machine
(Linux 6.18 uapi); ``kvm.py`` asserts them at import so a typo here cannot silently
corrupt an ioctl argument.

Only x86-64 is described. ``struct kvm_run`` is declared up to the end of the exit-reason
union (the parts we read); the real structure is larger (2352 bytes in 6.18) and is
always accessed through the vCPU mmap, whose size comes from KVM_GET_VCPU_MMAP_SIZE.
"""

from __future__ import annotations

import cffi

CDEF = r"""
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;       /* bytes */
    uint64_t userspace_addr;    /* start of the userspace allocated memory */
};

/* struct kvm_ioeventfd with the proposed KVM_IOEVENTFD_FLAG_POST_WRITE extension:
 * upstream has `__u8 pad[36]` after `flags` (offset 28). The proposal inserts an
 * `__aligned_u64 post_addr` which, being 8-byte aligned, lands at offset 32 (4 bytes of
 * implicit padding after flags); pad shrinks to 24 so the struct stays 64 bytes and the
 * ioctl number (which encodes the size) is unchanged. On a kernel without the proposal
 * these bytes are padding, and KVM ignores them unless the flag bit is set. */
struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;              /* legal pio/mmio address */
    uint32_t len;               /* 1, 2, 4, or 8 bytes; or 0 to ignore length */
    int32_t  fd;
    uint32_t flags;
    uint32_t _hole;             /* implicit alignment padding before post_addr */
    uint64_t post_addr;         /* proposed: userspace address KVM copies the value to */
    uint8_t  pad[24];
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8,  r9,  r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t  type;
    uint8_t  present, dpl, db, s, l, g, avl;
    uint8_t  unusable;
    uint8_t  padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];   /* (KVM_NR_INTERRUPTS=256 + 63) / 64 */
};

struct kvm_run_io {
    uint8_t  direction;         /* KVM_EXIT_IO_IN 0 / KVM_EXIT_IO_OUT 1 */
    uint8_t  size;              /* bytes */
    uint16_t port;
    uint32_t count;
    uint64_t data_offset;       /* relative to kvm_run start */
};

struct kvm_run_mmio {
    uint64_t phys_addr;
    uint8_t  data[8];
    uint32_t len;
    uint8_t  is_write;
};

struct kvm_run_internal {
    uint32_t suberror;
    uint32_t ndata;
    uint64_t data[16];
};

struct kvm_run_fail_entry {
    uint64_t hardware_entry_failure_reason;
    uint32_t cpu;
};

struct kvm_run_ex {
    uint32_t exception;
    uint32_t error_code;
};

struct kvm_run {
    /* in */
    uint8_t  request_interrupt_window;
    uint8_t  immediate_exit;
    uint8_t  padding1[6];
    /* out */
    uint32_t exit_reason;
    uint8_t  ready_for_interrupt_injection;
    uint8_t  if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        uint64_t hardware_exit_reason;           /* KVM_EXIT_UNKNOWN */
        struct kvm_run_fail_entry fail_entry;    /* KVM_EXIT_FAIL_ENTRY */
        struct kvm_run_ex ex;                    /* KVM_EXIT_EXCEPTION */
        struct kvm_run_io io;                    /* KVM_EXIT_IO */
        struct kvm_run_mmio mmio;                /* KVM_EXIT_MMIO */
        struct kvm_run_internal internal;        /* KVM_EXIT_INTERNAL_ERROR */
        char padding[256];
    } u;
};
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)

#: (expression, value) pairs measured with gcc + /usr/include/linux/kvm.h (x86-64, 6.18).
#: kvm.py checks them at import; the test suite checks them again.
EXPECTED_LAYOUT: dict[str, int] = {
    "sizeof(struct kvm_userspace_memory_region)": 32,
    "sizeof(struct kvm_ioeventfd)": 64,
    "offsetof(struct kvm_ioeventfd, flags)": 24,
    "offsetof(struct kvm_ioeventfd, post_addr)": 32,
    "sizeof(struct kvm_regs)": 144,
    "sizeof(struct kvm_segment)": 24,
    "sizeof(struct kvm_dtable)": 16,
    "sizeof(struct kvm_sregs)": 312,
    "offsetof(struct kvm_sregs, gdt)": 192,
    "offsetof(struct kvm_sregs, cr0)": 224,
    "offsetof(struct kvm_sregs, efer)": 264,
    "offsetof(struct kvm_sregs, apic_base)": 272,
    "offsetof(struct kvm_sregs, interrupt_bitmap)": 280,
    "offsetof(struct kvm_run, exit_reason)": 8,
    "offsetof(struct kvm_run, u)": 32,          # io, mmio, ex, internal all start here
    "offsetof(struct kvm_run_mmio, len)": 16,   # kvm_run offset 48
    "offsetof(struct kvm_run_mmio, is_write)": 20,  # kvm_run offset 52
    "offsetof(struct kvm_run_internal, data)": 8,   # kvm_run offset 40
    "offsetof(struct kvm_run_fail_entry, cpu)": 8,  # kvm_run offset 40
}


def measured_layout() -> dict[str, int]:
    """Evaluate every :data:`EXPECTED_LAYOUT` expression with cffi's own layout rules."""
    out: dict[str, int] = {}
    for expr in EXPECTED_LAYOUT:
        kind, _, rest = expr.partition("(")
        rest = rest.rstrip(")")
        if kind == "sizeof":
            out[expr] = ffi.sizeof(rest)
        else:
            ctype, field = (s.strip() for s in rest.split(","))
            out[expr] = ffi.offsetof(ctype, field)
    return out
