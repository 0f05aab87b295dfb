/* A SIGBUS guard for guest memory (see dma_guard.py for the why).
 *
 * Python registers the address range of each fd-backed DMA mapping in a slot. A SIGBUS whose
 * address lies in a registered range (the client shrank its memfd, or a sparse file's
 * filesystem is full) is absorbed: an anonymous page is mapped over the faulting page with
 * MAP_FIXED, so the access that faulted completes harmlessly into scratch memory, the range's
 * poison count and the process-wide fault count go up, and the handler returns. Any other
 * SIGBUS goes to the disposition that was there before (a real bug still kills the process).
 *
 * The handler only reads the slot table and does one mmap (a plain system call) and atomic
 * adds: nothing that takes a lock. Slots are written by one thread at a time (Python's GIL);
 * a slot is published start first, then end (release), and withdrawn end first.
 */
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define DMA_GUARD_SLOTS 65536 /* vfio_user.constants.DEFAULT_MAX_DMA_MAPS + 1 */

struct dma_guard_range {
    uintptr_t start;
    uintptr_t end; /* 0: a free slot */
    uint64_t poisoned;
};

static struct dma_guard_range dma_guard_ranges[DMA_GUARD_SLOTS];
static int dma_guard_high; /* slots [0, high) may be in use: the handler scans no further */
static uint64_t *dma_guard_faults; /* Python's counter, read on the hot path without a call */
static struct sigaction dma_guard_previous;
static int dma_guard_installed;
static uintptr_t dma_guard_page_mask;

static int dma_guard_absorb(uintptr_t addr)
{
    int high = __atomic_load_n(&dma_guard_high, __ATOMIC_ACQUIRE);
    for (int i = 0; i < high; i++) {
        struct dma_guard_range *r = &dma_guard_ranges[i];
        uintptr_t end = __atomic_load_n(&r->end, __ATOMIC_ACQUIRE);
        if (end == 0 || addr >= end || addr < __atomic_load_n(&r->start, __ATOMIC_RELAXED))
            continue;
        void *page = (void *)(addr & dma_guard_page_mask);
        if (mmap(page, ~dma_guard_page_mask + 1, PROT_READ | PROT_WRITE,
                 MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED)
            return 0;
        __atomic_add_fetch(&r->poisoned, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(dma_guard_faults, 1, __ATOMIC_SEQ_CST);
        return 1;
    }
    return 0;
}

static void dma_guard_handler(int sig, siginfo_t *info, void *context)
{
    (void)context;
    /* si_code > 0: the kernel raised it for an access; kill()/raise() have si_code <= 0 */
    if (info->si_code > 0 && dma_guard_absorb((uintptr_t)info->si_addr))
        return;
    sigaction(sig, &dma_guard_previous, NULL);
    if (info->si_code <= 0)
        raise(sig); /* delivered when this handler returns (the signal is blocked in it) */
    /* else: returning re-executes the access, which faults again under the old disposition */
}

int dma_guard_install(uint64_t *faults)
{
    if (dma_guard_installed)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = dma_guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    dma_guard_page_mask = ~((uintptr_t)sysconf(_SC_PAGESIZE) - 1);
    dma_guard_faults = faults;
    if (sigaction(SIGBUS, &sa, &dma_guard_previous) != 0)
        return -1;
    dma_guard_installed = 1;
    return 0;
}

int dma_guard_register(uintptr_t start, uintptr_t end)
{
    if (end <= start)
        return -1;
    for (int i = 0; i < DMA_GUARD_SLOTS; i++) {
        struct dma_guard_range *r = &dma_guard_ranges[i];
        if (__atomic_load_n(&r->end, __ATOMIC_RELAXED) != 0)
            continue;
        r->start = start;
        __atomic_store_n(&r->poisoned, 0, __ATOMIC_RELAXED);
        if (i >= dma_guard_high)
            __atomic_store_n(&dma_guard_high, i + 1, __ATOMIC_RELEASE);
        __atomic_store_n(&r->end, end, __ATOMIC_RELEASE);
        return i;
    }
    return -1;
}

void dma_guard_unregister(int slot)
{
    if (slot >= 0 && slot < DMA_GUARD_SLOTS)
        __atomic_store_n(&dma_guard_ranges[slot].end, 0, __ATOMIC_RELEASE);
}

uint64_t dma_guard_poisoned(int slot)
{
    if (slot < 0 || slot >= DMA_GUARD_SLOTS)
        return 0;
    return __atomic_load_n(&dma_guard_ranges[slot].poisoned, __ATOMIC_ACQUIRE);
}
