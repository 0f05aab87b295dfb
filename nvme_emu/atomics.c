/* atomics.c - explicit memory ordering for memory shared with the host (guest RAM).
 *
 * nvme-emu and the guest's driver share rings and doorbell pages without any lock. The NVMe
 * protocol orders them with a few rules, and CPython gives us no way to state them:
 *
 *  - a CQE's last dword (CID, status, phase) is stored with release semantics, so a host
 *    that sees the new phase also sees bytes 0-11 of the entry;
 *  - the host (tests, benchmarks) loads that dword with acquire semantics before reading the
 *    rest of the entry;
 *  - a shadow-doorbell EventIdx store and the re-load of the shadow tail that follows it are
 *    separated by a full (sequentially consistent) fence: store->load order, which even x86
 *    does not keep on its own.
 *
 * GCC's __atomic builtins emit what each architecture needs (x86-64: a plain mov for the
 * release store, mfence/locked op for the fence; aarch64: stlr / ldar / dmb ish).
 *
 * Every access is bounds- and alignment-checked against the length of the buffer the caller
 * passed: a bad offset returns -1 and touches nothing (Python turns it into an exception).
 * Compiled as a cffi API-mode extension module on first use (nvme_emu/atomics.py).
 */
#include <stddef.h>
#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "NVMe structures are little-endian; this file stores native words"
#endif

/* Exported for the cffi module that includes this file (and for a plain .so, bench/atomics.py). */
#define EXPORT __attribute__((visibility("default")))

/* [off, off + n) lies inside [0, len) and base + off is a multiple of align (a power of two;
 * 4 for a CQE too: only its last dword needs to be a single-copy atomic store). */
static inline int in_bounds(const uint8_t *base, size_t len, size_t off, size_t n, size_t align)
{
    return off <= len && n <= len - off && ((uintptr_t)(base + off) & (align - 1)) == 0;
}

EXPORT void nvme_emu_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

EXPORT int nvme_emu_store_release_u32(uint8_t *base, size_t len, size_t off, uint32_t value)
{
    if (!in_bounds(base, len, off, 4, 4))
        return -1;
    __atomic_store_n((uint32_t *)(base + off), value, __ATOMIC_RELEASE);
    return 0;
}

/* The loaded word (0..2^32-1), or -1 when the offset is refused. */
EXPORT int64_t nvme_emu_load_acquire_u32(const uint8_t *base, size_t len, size_t off)
{
    if (!in_bounds(base, len, off, 4, 4))
        return -1;
    return __atomic_load_n((const uint32_t *)(base + off), __ATOMIC_ACQUIRE);
}

/* One 16-byte CQE: dw0, dw1, SQ head | SQ id << 16 as plain stores, then CID | status-and-
 * phase << 16 as a release store, so the phase is never visible before the rest.
 * `result` is the command's result: DW0, and for a 64-bit one (Zone Append's ALBA, ZNS 1.1
 * "Zone Append command completion") its upper half is ORed into DW1, so the callers pass
 * what a handler returned as it is (no split on the hot path). */
EXPORT int nvme_emu_store_cqe(uint8_t *base, size_t len, size_t off, uint64_t result, uint32_t dw1,
                              uint32_t sqhd, uint32_t sqid, uint32_t cid, uint32_t status_phase)
{
    uint32_t *e;

    if (!in_bounds(base, len, off, 16, 4))
        return -1;
    e = (uint32_t *)(base + off);
    e[0] = (uint32_t)result;
    e[1] = dw1 | (uint32_t)(result >> 32);
    e[2] = (sqhd & 0xFFFF) | (sqid & 0xFFFF) << 16;
    __atomic_store_n(&e[3], (cid & 0xFFFF) | (status_phase & 0xFFFF) << 16, __ATOMIC_RELEASE);
    return 0;
}
