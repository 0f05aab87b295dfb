"""What this process can really hold: the bound on DMA mappings the server advertises.

Each fd-backed DMA_MAP costs the server one file descriptor (Python's ``mmap`` keeps a
duplicate of the fd it maps) and at least one entry in its memory map. The protocol lets a
server announce ``max_dma_maps`` up to 65535, but with the usual ``RLIMIT_NOFILE`` of 1024 a
client would drive the server to EMFILE long before that, and then *everything* needing an
fd fails: accepting the next client, receiving the next client's eventfds (the kernel drops
them silently), timers. So the server advertises and enforces only what is left once its own
needs are reserved.
"""

from __future__ import annotations

import logging
import os
import resource

log = logging.getLogger(__name__)

#: fds kept free for the server's own needs beyond what it holds at start and the client's
#: interrupt eventfds: the client socket, a refused second client, control-plane connections,
#: the doorbell agent, namespaces created at run time, logging.
FD_RESERVE = 64
#: Memory-map entries kept free for the interpreter and libraries (malloc arenas, numpy,
#: threads' stacks) beyond what the process has mapped at start.
MAP_RESERVE = 4096
MAX_MAP_COUNT_PATH = "/proc/sys/vm/max_map_count"


def open_fds() -> int:
    """File descriptors this process holds now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def mapped_areas() -> int:
    """Entries in this process's memory map now."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def max_map_count() -> int | None:
    try:
        with open(MAX_MAP_COUNT_PATH) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def dma_map_budget(requested: int, irq_vectors: int) -> int:
    """How many DMA mappings the server can hold next to everything else it needs.

    ``irq_vectors``: how many interrupt eventfds a client may hand over (all indexes), which
    must stay receivable however many maps the client made. At least 1, so a tiny limit still
    lets a client map its RAM (with a warning, since the operator should raise the limit).
    """
    budget = requested
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        budget = min(budget, soft - open_fds() - irq_vectors - 1 - FD_RESERVE)  # 1: resample fd
    limit = max_map_count()
    if limit is not None:
        budget = min(budget, limit - mapped_areas() - MAP_RESERVE)
    if budget < 1:
        log.warning("RLIMIT_NOFILE %s / vm.max_map_count %s leave no room for DMA maps; allowing 1", soft, limit)
        return 1
    log.info("max_dma_maps %d (asked %d; RLIMIT_NOFILE %s, vm.max_map_count %s)", budget, requested, soft, limit)
    return budget
