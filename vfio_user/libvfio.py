"""A second server backend: nutanix/libvfio-user, loaded at run time through cffi (ABI mode).

:class:`LibvfioUserServer` serves the same :class:`~vfio_user.device.Device` as
:class:`vfio_user.server.Server` and offers the same surface (``start``, ``serve_forever``,
``close``, ``client``, ``on_connect``/``on_disconnect``), so a device runs unchanged on
either backend. The library does the wire protocol; this module translates the device API
into libvfio-user calls and runs the context from the asyncio loop through its poll fd:

* config space: region 7 is registered with ``VFU_REGION_FLAG_ALWAYS_CB``, so every access
  reaches our :class:`~vfio_user.pci.PciConfigSpace` (masks, hooks, FLR) and libvfio-user's
  own copy is never used;
* BARs/ROM: ``vfu_setup_region`` with a callback per region (``Region.do_read/do_write``)
  and the region's sparse mmap areas backed by its memfd;
* DMA: register/unregister callbacks keep a :class:`~vfio_user.dma.DmaTable`, so the device
  gets the usual :class:`~vfio_user.dma.GuestMemory`. Each fd-backed region is re-mapped
  (``mremap(old, 0, ...)`` makes a second mapping of the same shared pages) and that mapping
  is unmapped only when the last view of it is gone, so a device that keeps a view past
  ``dma_unmapping`` reads stale memory instead of crashing the process. Regions without an
  fd go through ``vfu_addr_to_sgl`` + ``vfu_sgl_read/write`` (DMA_READ/DMA_WRITE messages);
* interrupts: a small adapter with the :class:`~vfio_user.irq.IrqState` methods devices use,
  firing through ``vfu_irq_trigger``;
* ioeventfds: ``vfu_create_ioeventfd`` per ``Region.ioeventfds`` entry, shadow ones included
  when the library was built with ``-Dshadow-ioeventfd=true``;
* reset: ``vfu_setup_device_reset_cb`` -> ``config.reset_registers()`` + ``device.reset``.

libvfio-user has no callback for SET_IRQS (which index the client enabled) nor for
GET_REGION_IO_FDS; the server peeks at each request (``recvmsg(MSG_PEEK)``: the header, the
first payload bytes, copies of its fds, closed at once) before ``vfu_run_ctx`` processes it,
to keep ``active_index()`` and ``Device.ioeventfds_taken`` working, and to refuse itself what
the library would take unchecked (``_screen``). Where the library's wire behaviour differs from the
Python backend, see docs/libvfio-user.md and tests/libvfio/.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes.util
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .constants import (
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_PGSIZE,
    DMA_FLAG_WRITE,
    HEADER_SIZE,
    IO_FDS_HEADER_SIZE,
    IO_FD_RECORD_SIZE,
    IOEVENTFD_FLAG_DATAMATCH,
    IOEVENTFD_FLAG_PIO,
    IRQ_ACTION_TRIGGER,
    IRQ_ACTION_TYPE_MASK,
    IRQ_DATA_EVENTFD,
    IRQ_DATA_NONE,
    IRQ_DATA_TYPE_MASK,
    IRQ_INFO_EVENTFD,
    FLAG_ERROR,
    Command,
    IrqIndex,
    MsgType,
)
from .device import Device, DeviceContext, Region, ResetKind
from . import dma_guard
from .dma import DmaError, DmaMapping, DmaTable, GuestMemory, check_dma_fd, guard_memory
from .irq import IrqRouting, UnmaskCallback, is_eventfd
from .messages import HEADER
from .resources import dma_map_budget
from .server_api import ServerBackend
from .pci import EXP_DEVCTL, EXP_DEVCTL_BCR_FLR, REVISION_ID
from .client_watch import (
    ACCEPT_RETRY,
    DEFAULT_DMA_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    PeerCredentials,
    StallTimer,
    client_timeout,
    peer_credentials,
)
from .unix import refuse_live_socket, remove_stale_socket

log = logging.getLogger(__name__)

#: Environment variable: path of libvfio-user.so.0 (or of the directory holding it).
ENV_LIBRARY = "NVME_EMU_LIBVFIO_USER"
SONAME = "libvfio-user.so.0"
#: Where an install of the library usually lands (prefix /usr/local or /opt/libvfio-user).
COMMON_DIRS = (
    "/usr/local/lib/x86_64-linux-gnu",
    "/usr/local/lib64",
    "/usr/local/lib",
    "/opt/libvfio-user/lib/x86_64-linux-gnu",
    "/opt/libvfio-user/lib64",
    "/opt/libvfio-user/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
)

INSTALL_HINT = (
    "libvfio-user is not installed: build nutanix/libvfio-user (commit f3742ed of 2026-03 or newer) "
    "with `./dev libvfio-user TARBALL_OR_SOURCE_DIR` (installs the Debian build packages meson ninja-build "
    "libjson-c-dev libcmocka-dev pkg-config, builds with -Dshadow-ioeventfd=true into the cache, where it is "
    f"found), or install it where ldconfig finds it, or set {ENV_LIBRARY}=/path/to/{SONAME}"
)


def cache_dir() -> str:
    """Where ``./dev libvfio-user`` (vfio_user/build-libvfio-user.sh) links its newest build."""
    base = os.environ.get("NVME_EMU_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nvme-emu")
    return os.path.join(base, "libvfio-user", "current", "lib")

CDEF = r"""
typedef struct vfu_ctx vfu_ctx_t;
typedef struct dma_sg dma_sg_t;
struct iovec { void *iov_base; size_t iov_len; };

typedef struct vfu_dma_info {
    struct iovec iova;
    void *vaddr;
    struct iovec mapping;
    size_t page_size;
    uint32_t prot;
} vfu_dma_info_t;

typedef void (*vfu_log_fn_t)(vfu_ctx_t *vfu_ctx, int level, const char *msg);
typedef ssize_t (*vfu_region_access_cb_t)(vfu_ctx_t *vfu_ctx, char *buf, size_t count, int64_t offset, _Bool is_write);
typedef int (*vfu_reset_cb_t)(vfu_ctx_t *vfu_ctx, int type);
typedef void (*vfu_dma_register_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
typedef void (*vfu_dma_unregister_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
typedef void (*vfu_dev_irq_state_cb_t)(vfu_ctx_t *vfu_ctx, uint32_t start, uint32_t count, _Bool mask);

size_t dma_sg_size(void);
vfu_ctx_t *vfu_create_ctx(int trans, const char *path, int flags, void *pvt, int dev_type);
int vfu_realize_ctx(vfu_ctx_t *vfu_ctx);
int vfu_attach_ctx(vfu_ctx_t *vfu_ctx);
int vfu_get_poll_fd(vfu_ctx_t *vfu_ctx);
int vfu_run_ctx(vfu_ctx_t *vfu_ctx);
void vfu_destroy_ctx(vfu_ctx_t *vfu_ctx);
int vfu_setup_log(vfu_ctx_t *vfu_ctx, vfu_log_fn_t log, int level);
int vfu_setup_region(vfu_ctx_t *vfu_ctx, int region_idx, size_t size, vfu_region_access_cb_t region_access,
                     int flags, struct iovec *mmap_areas, uint32_t nr_mmap_areas, int fd, uint64_t offset);
int vfu_setup_device_reset_cb(vfu_ctx_t *vfu_ctx, vfu_reset_cb_t reset);
int vfu_setup_device_dma(vfu_ctx_t *vfu_ctx, size_t max_regions, vfu_dma_register_cb_t dma_register,
                         vfu_dma_unregister_cb_t dma_unregister);
int vfu_setup_device_nr_irqs(vfu_ctx_t *vfu_ctx, int type, uint32_t count);
int vfu_setup_irq_state_callback(vfu_ctx_t *vfu_ctx, int type, vfu_dev_irq_state_cb_t cb);
int vfu_irq_trigger(vfu_ctx_t *vfu_ctx, uint32_t subindex);
int vfu_addr_to_sgl(vfu_ctx_t *vfu_ctx, void *dma_addr, size_t len, dma_sg_t *sgl, size_t max_nr_sgs, int prot);
int vfu_sgl_get(vfu_ctx_t *vfu_ctx, dma_sg_t *sgl, struct iovec *iov, size_t cnt, int flags);
void vfu_sgl_put(vfu_ctx_t *vfu_ctx, dma_sg_t *sgl, struct iovec *iov, size_t cnt);
int vfu_sgl_read(vfu_ctx_t *vfu_ctx, dma_sg_t *sg, size_t sg_cnt, void *data, int flags);
int vfu_sgl_write(vfu_ctx_t *vfu_ctx, dma_sg_t *sg, size_t sg_cnt, void *data, int flags);
int vfu_pci_init(vfu_ctx_t *vfu_ctx, int pci_type, int hdr_type, int revision);
int vfu_create_ioeventfd(vfu_ctx_t *vfu_ctx, uint32_t region_idx, int fd, size_t gpa_offset, uint32_t size,
                         uint32_t flags, uint64_t datamatch, int shadow_fd, size_t shadow_offset);
"""

LIBC_CDEF = r"""
void *mremap(void *old_address, size_t old_size, size_t new_size, int flags, ...);
int munmap(void *addr, size_t length);
ssize_t recv(int sockfd, void *buf, size_t len, int flags);
int shutdown(int sockfd, int how);
"""

# libvfio-user.h constants
VFU_TRANS_SOCK = 0
VFU_DEV_TYPE_PCI = 0
LIBVFIO_USER_FLAG_ATTACH_NB = 1
VFU_REGION_FLAG_READ = 1 << 0
VFU_REGION_FLAG_WRITE = 1 << 1
VFU_REGION_FLAG_RW = VFU_REGION_FLAG_READ | VFU_REGION_FLAG_WRITE
VFU_REGION_FLAG_MEM = 1 << 2
VFU_REGION_FLAG_ALWAYS_CB = 1 << 3
VFU_REGION_FLAG_64_BITS = 1 << 4
VFU_REGION_FLAG_PREFETCH = 1 << 5
VFU_RESET_DEVICE, VFU_RESET_LOST_CONN, VFU_RESET_PCI_FLR = 0, 1, 2
VFU_PCI_TYPE_CONVENTIONAL, VFU_PCI_TYPE_EXPRESS = 0, 3
PCI_HEADER_TYPE_NORMAL = 0
VFU_PCI_DEV_CFG_REGION_IDX = 7
# syslog levels (vfu_setup_log)
LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = 3, 4, 5, 6, 7
_SYSLOG_TO_LOGGING = {LOG_ERR: logging.ERROR, LOG_WARNING: logging.WARNING, LOG_NOTICE: logging.INFO, LOG_INFO: logging.INFO, LOG_DEBUG: logging.DEBUG}

MREMAP_MAYMOVE = 1
MSG_PEEK = 0x2
MSG_DONTWAIT = 0x40
SHUT_RDWR = 2
#: libvfio-user's largest request (SERVER_MAX_MSG_SIZE: a 1 MiB REGION_WRITE); it rejects a
#: header announcing more without reading a body, so such a header is handed over at once.
LIB_MAX_MSG_SIZE = (1 << 20) + HEADER_SIZE + 16
PROT_READ, PROT_WRITE = 1, 2
#: Bytes peeked per request: the 16-byte header and the first 32 payload bytes (DMA_MAP).
PEEK_SIZE = HEADER_SIZE + 32
#: Room for the fds a peek may bring along (more than any client may send: MAX_MSG_FDS).
PEEK_ANCILLARY = socket.CMSG_SPACE(256 * 4)
#: Requests served per readable event before other fds get their turn.
RUN_BUDGET = 64
#: accept/attach failures that pass once fds or memory are free again
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_DISCONNECT_ERRNOS = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN}
_NOTHING = object()
_PARTIAL = object()
_SCREENED = object()


class LibvfioUserUnavailable(OSError):
    """libvfio-user.so.0 could not be found or loaded; the message says what to install."""


@dataclass
class _Library:
    ffi: Any
    lib: Any
    libc: Any
    path: str


_loaded: _Library | None = None


def _candidates() -> list[str]:
    env = os.environ.get(ENV_LIBRARY)
    if env:
        return [os.path.join(env, SONAME) if os.path.isdir(env) else env]
    out = [os.path.join(cache_dir(), SONAME)]
    found = ctypes.util.find_library("vfio-user")
    if found:
        out.append(found)
    out.extend(os.path.join(d, SONAME) for d in COMMON_DIRS)
    return out


def load_library() -> _Library:
    """Find and dlopen libvfio-user (cached); :class:`LibvfioUserUnavailable` if absent."""
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        import cffi
    except ImportError as e:  # a dependency of the package, but say so plainly
        raise LibvfioUserUnavailable(f"the cffi module is missing ({e}); pip install cffi") from None
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.cdef(LIBC_CDEF)
    errors = []
    for cand in _candidates():
        if os.path.isabs(cand) and not os.path.exists(cand):
            continue
        try:
            lib = ffi.dlopen(cand)
            lib.vfu_create_ioeventfd  # noqa: B018 - the newest symbol we need: fail now, not later
        except (OSError, AttributeError) as e:
            errors.append(f"{cand}: {e}")
            continue
        _loaded = _Library(ffi, lib, ffi.dlopen(None), cand)
        log.debug("loaded %s", cand)
        return _loaded
    detail = ("; tried " + "; ".join(errors)) if errors else ""
    if os.environ.get(ENV_LIBRARY):
        raise LibvfioUserUnavailable(f"{ENV_LIBRARY}={os.environ[ENV_LIBRARY]} does not name a loadable {SONAME}{detail}. {INSTALL_HINT}")
    raise LibvfioUserUnavailable(INSTALL_HINT + detail)


def available() -> bool:
    try:
        load_library()
    except LibvfioUserUnavailable:
        return False
    return True


def unavailable_reason() -> str | None:
    try:
        load_library()
    except LibvfioUserUnavailable as e:
        return str(e)
    return None


# -- guest memory ---------------------------------------------------------------------------


class ForeignDmaTable(DmaTable):
    """A DMA table whose mappings libvfio-user made: entries come in, never from an fd here."""

    def insert(self, mapping: DmaMapping) -> None:
        """Add a mapping libvfio-user accepted (it did the alignment checks); overlaps raise."""
        import bisect

        i = bisect.bisect_right(self._starts, mapping.iova)
        if i > 0 and self._maps[i - 1].iova == mapping.iova and self._maps[i - 1].size == mapping.size:
            return  # libvfio-user treats an identical DMA_MAP as a no-op
        if (i > 0 and self._maps[i - 1].iova + self._maps[i - 1].size > mapping.iova) or (i < len(self._maps) and self._maps[i].iova < mapping.end):
            raise DmaError(errno.EEXIST, f"DMA range at {mapping.iova:#x} overlaps an existing mapping")
        self._starts.insert(i, mapping.iova)
        self._maps.insert(i, mapping)


class _SglRemote:
    """RemoteDma for fd-less regions: DMA_READ/DMA_WRITE messages sent by libvfio-user.

    libvfio-user's exchange is synchronous on the one socket (no twin socket with QEMU):
    ``vfu_sgl_read/write`` send the message and block in ``recv`` until the reply. So the
    exchange runs in the server's worker thread (:meth:`LibvfioUserServer._blocking`) while
    the loop keeps running everything else; requests from this client wait (the reply comes
    on the same socket), and a client that does not answer within ``dma_timeout`` is dropped.
    """

    def __init__(self, server: "LibvfioUserServer") -> None:
        self.server = server

    def _transfer(self, iova: int, length: int, data: Any, write: bool) -> None:
        srv = self.server
        ffi, lib = srv._ffi, srv._lib
        if srv._vfu is None or not srv.attached:
            raise DmaError(errno.ENOTCONN, "client disconnected")
        prot = PROT_READ | (PROT_WRITE if write else 0)
        nsg = 16
        sgl = ffi.new("char[]", lib.dma_sg_size() * nsg)
        n = lib.vfu_addr_to_sgl(srv._vfu, ffi.cast("void *", iova), length, ffi.cast("dma_sg_t *", sgl), nsg, prot)
        if n < 0:
            err = ffi.errno or errno.EFAULT
            raise DmaError(err, f"DMA range {iova:#x}+{length:#x}: vfu_addr_to_sgl failed ({os.strerror(err)})")
        # The sgl splits at region boundaries; vfu_sgl_read/write take one entry at a time.
        buf = ffi.from_buffer(data, require_writable=not write)
        sizes = self._split(iova, length)
        pos = 0
        for i in range(n):
            sg = ffi.cast("dma_sg_t *", sgl + i * lib.dma_sg_size())
            fn = lib.vfu_sgl_write if write else lib.vfu_sgl_read
            if fn(srv._vfu, sg, 1, buf + pos, 0) < 0:
                err = ffi.errno or errno.EIO
                raise DmaError(err, f"{'DMA_WRITE' if write else 'DMA_READ'} at {iova:#x} failed: {os.strerror(err)}")
            pos += sizes[i] if i < len(sizes) else 0

    def _split(self, iova: int, length: int) -> list[int]:
        out = []
        end = iova + length
        while iova < end:
            m = self.server._table.lookup(iova, 1) if self.server._table is not None else None
            n = (min(end, m.end) - iova) if m is not None else end - iova
            out.append(n)
            iova += n
        return out

    async def dma_read(self, iova: int, length: int) -> bytes:
        out = bytearray(length)
        await self.server._blocking(self._transfer, iova, length, out, False, what=f"DMA_READ at {iova:#x}")
        return bytes(out)

    async def dma_write(self, iova: int, data: bytes) -> None:
        await self.server._blocking(self._transfer, iova, len(data), bytes(data), True, what=f"DMA_WRITE at {iova:#x}")


# -- interrupts -----------------------------------------------------------------------------


class LibvfioIrqs(IrqRouting):
    """:class:`~vfio_user.irq.IrqRouting` on top of ``vfu_irq_trigger``.

    libvfio-user keeps one eventfd array shared by INTx/MSI/MSI-X and picks no index itself;
    which index the client enabled is learnt from the SET_IRQS headers the server peeks at.
    INTx is auto-masked here after firing (as in the Python backend), unmasked by the
    client's UNMASK action (reported by libvfio-user's irq state callback).
    """

    def __init__(self, server: "LibvfioUserServer", counts: dict[IrqIndex, int], on_unmask: UnmaskCallback | None) -> None:
        super().__init__(counts, on_unmask)
        self.server = server

    def info_flags(self, index: IrqIndex) -> int:
        return IRQ_INFO_EVENTFD  # what libvfio-user answers for every index

    def saw_set_irqs(self, flags: int, index: int, start: int, count: int) -> None:
        if index not in self.counts.keys():
            return
        index = IrqIndex(index)
        action, dtype = flags & IRQ_ACTION_TYPE_MASK, flags & IRQ_DATA_TYPE_MASK
        if action != IRQ_ACTION_TRIGGER:
            return
        if dtype == IRQ_DATA_EVENTFD and count:
            if index in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX):
                for other in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX):
                    self.enabled[other] = False  # one eventfd array: the last one set wins
            self.enabled[index] = True
            for v in range(start, min(start + count, self.counts[index])):
                self.masked[index][v] = False
        elif dtype == IRQ_DATA_NONE and count == 0:
            self.enabled[index] = False

    def state_changed(self, index: IrqIndex, start: int, count: int, mask: bool) -> None:
        for v in range(start, min(start + count, self.counts[index])):
            was = self.masked[index][v]
            self.masked[index][v] = mask
            if was and not mask and self.on_unmask is not None:
                self.on_unmask(index, v)

    def trigger(self, index: IrqIndex, vector: int = 0) -> bool:
        if vector >= self.counts[index] or self.masked[index][vector]:
            return False
        if index not in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX) or not self.enabled[index]:
            return False  # ERR/REQ cannot be raised through libvfio-user's API
        srv = self.server
        if srv._vfu is None or not srv.attached:
            return False
        if srv._lib.vfu_irq_trigger(srv._vfu, vector) != 0:
            return False  # no eventfd for that vector (libvfio-user logs it)
        if index == IrqIndex.INTX:
            self.masked[index][vector] = True
        self.fired[index] += 1
        return True

    def unmask(self, index: IrqIndex, vector: int = 0) -> None:
        self.state_changed(index, vector, 1, False)

    def close(self) -> None:
        for index in IrqIndex:
            self.enabled[index] = False


# -- the server -----------------------------------------------------------------------------


@dataclass(eq=False)
class LibvfioClient:
    """The attached client, as far as the server knows it."""

    fd: int
    peer: PeerCredentials | None
    closed: asyncio.Future = field(repr=False)
    memory: GuestMemory = field(repr=False)
    irqs: LibvfioIrqs = field(repr=False)


class LibvfioUserServer:
    """Serves one device on a Unix socket path through libvfio-user; one client at a time."""

    backend = ServerBackend.LIBVFIO_USER

    def __init__(
        self,
        device: Device,
        path: str,
        *,
        mode: int = 0o600,
        max_dma_maps: int = DEFAULT_MAX_DMA_MAPS,
        library_log_level: int = LOG_WARNING,
        on_connect: Callable[[LibvfioClient], None] | None = None,
        on_disconnect: Callable[[LibvfioClient, str], None] | None = None,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        dma_timeout: float = DEFAULT_DMA_TIMEOUT,
        dma_unsealed: bool = False,
        **_ignored: Any,
    ) -> None:
        lib = load_library()  # fail early, with the install hint
        self._ffi, self._lib, self._libc = lib.ffi, lib.lib, lib.libc
        self.library_path = lib.path
        self.device = device
        self.path = path
        self.mode = mode
        self.max_dma_maps = max_dma_maps
        self.library_log_level = library_log_level
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        #: Seconds a client may take to finish VERSION, or stay stopped inside a message,
        #: before it is dropped (None or <= 0: never), as on the Python backend: it must not
        #: hold the one client slot.
        self.handshake_timeout = client_timeout(handshake_timeout)
        #: Seconds a client may take to answer a DMA_READ/DMA_WRITE before it is dropped.
        self.dma_timeout = dma_timeout
        #: Accept memfds not sealed against shrinking (as the Python backend's ServerLimits).
        self.dma_unsealed = dma_unsealed
        self.client: LibvfioClient | None = None
        self.clients_served = 0
        #: Whether shadow ioeventfds were accepted (library built with -Dshadow-ioeventfd=true).
        self.shadow_ioeventfds: bool | None = None
        self.skipped_ioeventfds = 0
        self._offered_ioeventfds: dict[int, int] = {}
        self._vfu = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen_fd = -1
        self._conn_fd = -1
        self._table: ForeignDmaTable | None = None
        self._callbacks: list[Any] = []  # keep every cffi callback alive as long as the ctx
        self._done: asyncio.Future[None] | None = None
        # Calls into libvfio-user that block on the client (accept + VERSION, DMA_READ/WRITE)
        # run one at a time in this thread; while one runs the loop makes no other vfu_* call.
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._busy: concurrent.futures.Future | None = None
        self._blocking_lock: asyncio.Lock | None = None
        self._drop_reason: str | None = None
        # The connection is watched edge-triggered through this epoll fd: a partial message
        # waits for its next bytes without the loop spinning on a readable socket.
        self._epoll: select.epoll | None = None
        self._peer_closed = False
        self._partial_bytes = -1  # bytes queued of an incomplete message; -1 when none
        self._stall: StallTimer | None = None  # from start(), on the loop
        self._worker_thread: int | None = None  # its ident, once it has run something
        #: Callbacks libvfio-user made from the worker (a DMA exchange that found the client
        #: gone resets the context there): run on the loop thread once the call returns.
        self._deferred: list[Callable[[], None]] = []

    @property
    def attached(self) -> bool:
        return self.client is not None and not self.client.closed.done()

    # -- set-up ---------------------------------------------------------------------------

    def _check(self, ret: int, what: str) -> int:
        if ret is None:
            return 0
        if (isinstance(ret, int) and ret < 0) or ret == self._ffi.NULL:
            err = self._ffi.errno or errno.EIO
            raise OSError(err, f"libvfio-user {what} failed: {os.strerror(err)}")
        return ret

    async def start(self) -> None:
        """Create, set up and realize the context; the socket exists when this returns."""
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._blocking_lock = asyncio.Lock()
        self._stall = StallTimer(
            self._loop,
            self.handshake_timeout,
            in_message=lambda: self.attached and self._partial_bytes >= 0 and self._busy is None,
            on_stall=self._stalled,
        )
        refuse_live_socket(self.path)
        remove_stale_socket(self.path)
        dma_guard.ensure_ready()  # a missing compiler is reported now, not at the first DMA_MAP
        ffi, lib = self._ffi, self._lib
        # libvfio-user keeps each DMA_MAP's fd: bound the maps by what the process can hold
        # (as the Python backend does), or a flood of maps runs the server into EMFILE
        self.max_dma_maps = dma_map_budget(self.max_dma_maps, sum(self.device.irq_counts.values()))
        old_umask = os.umask(0o777 & ~self.mode)
        try:
            vfu = lib.vfu_create_ctx(VFU_TRANS_SOCK, self.path.encode(), LIBVFIO_USER_FLAG_ATTACH_NB, ffi.NULL, VFU_DEV_TYPE_PCI)
        finally:
            os.umask(old_umask)
        if vfu == ffi.NULL:
            err = ffi.errno or errno.EIO
            raise OSError(err, f"vfu_create_ctx({self.path}) failed: {os.strerror(err)}")
        self._vfu = vfu
        try:
            os.chmod(self.path, self.mode)
            self._setup()
            self._check(lib.vfu_realize_ctx(vfu), "vfu_realize_ctx")
        except BaseException:
            self._destroy()
            raise
        self.device.config.write_hooks.append(self._config_hook)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="libvfio-user")
        self._listen_fd = lib.vfu_get_poll_fd(vfu)
        self._loop.add_reader(self._listen_fd, self._try_attach)
        log.info("libvfio-user (%s) listening on %s (mode %o)", self.library_path, self.path, self.mode)

    def _cb(self, ctype: str, fn: Callable) -> Any:
        cb = self._ffi.callback(ctype, fn)
        self._callbacks.append(cb)
        return cb

    def _setup(self) -> None:
        ffi, lib, vfu, dev = self._ffi, self._lib, self._vfu, self.device
        self._check(lib.vfu_setup_log(vfu, self._cb("vfu_log_fn_t", self._log), self.library_log_level), "vfu_setup_log")
        pci_type = VFU_PCI_TYPE_EXPRESS if dev.config.size > 256 else VFU_PCI_TYPE_CONVENTIONAL
        self._check(lib.vfu_pci_init(vfu, pci_type, PCI_HEADER_TYPE_NORMAL, dev.config.get(REVISION_ID, 1)), "vfu_pci_init")
        # Config space: always through our callback, so PciConfigSpace stays authoritative.
        cfg_cb = self._cb("vfu_region_access_cb_t", self._config_access)
        self._check(
            lib.vfu_setup_region(vfu, VFU_PCI_DEV_CFG_REGION_IDX, dev.config.size, cfg_cb, VFU_REGION_FLAG_RW | VFU_REGION_FLAG_ALWAYS_CB, ffi.NULL, 0, -1, 0),
            "vfu_setup_region(config)",
        )
        for index, region in sorted(dev.regions.items()):
            self._setup_region(int(index), region)
        for index in IrqIndex:
            count = dev.irq_counts.get(index, 0)
            self._check(lib.vfu_setup_device_nr_irqs(vfu, int(index), count), f"vfu_setup_device_nr_irqs({index.name})")
            if count:
                cb = self._cb("vfu_dev_irq_state_cb_t", lambda _ctx, start, n, mask, index=index: self._irq_state(index, start, n, mask))
                self._check(lib.vfu_setup_irq_state_callback(vfu, int(index), cb), "vfu_setup_irq_state_callback")
        self._check(
            lib.vfu_setup_device_dma(
                vfu, self.max_dma_maps, self._cb("vfu_dma_register_cb_t", self._dma_register), self._cb("vfu_dma_unregister_cb_t", self._dma_unregister)
            ),
            "vfu_setup_device_dma",
        )
        self._check(lib.vfu_setup_device_reset_cb(vfu, self._cb("vfu_reset_cb_t", self._reset)), "vfu_setup_device_reset_cb")
        for index, region in sorted(dev.regions.items()):
            for efd in region.ioeventfds:
                self._create_ioeventfd(int(index), efd)

    def _setup_region(self, index: int, region: Region) -> None:
        ffi, lib = self._ffi, self._lib
        flags = (VFU_REGION_FLAG_READ if region.readable else 0) | (VFU_REGION_FLAG_WRITE if region.writable else 0)
        if not flags:
            log.warning("region %d is neither readable nor writable: not offered", index)
            return
        if not region.io:
            flags |= VFU_REGION_FLAG_MEM
        if region.bits64:
            flags |= VFU_REGION_FLAG_64_BITS
        if region.prefetchable:
            flags |= VFU_REGION_FLAG_PREFETCH
        cb = self._cb("vfu_region_access_cb_t", lambda _ctx, buf, count, offset, is_write: self._region_access(region, buf, count, offset, is_write))
        areas, nr, fd = ffi.NULL, 0, -1
        if region.mmap_areas and region.memory is not None:
            nr = len(region.mmap_areas)
            areas = ffi.new("struct iovec[]", nr)
            for i, (off, size) in enumerate(region.mmap_areas):
                areas[i].iov_base = ffi.cast("void *", off)
                areas[i].iov_len = size
            fd = region.memory.fd
        self._check(lib.vfu_setup_region(self._vfu, index, region.size, cb, flags, areas, nr, fd, 0), f"vfu_setup_region({index})")

    def _create_ioeventfd(self, index: int, efd: Any) -> None:
        flags = (IOEVENTFD_FLAG_DATAMATCH if efd.datamatch is not None else 0) | (IOEVENTFD_FLAG_PIO if efd.pio else 0)
        shadow_fd = efd.shadow.fd if efd.shadow is not None else -1
        ret = self._lib.vfu_create_ioeventfd(self._vfu, index, efd.fd, efd.offset, efd.size, flags, efd.datamatch or 0, shadow_fd, efd.shadow_offset)
        if ret < 0:
            err = self._ffi.errno
            if shadow_fd != -1 and err == errno.EINVAL:
                # Built without -Dshadow-ioeventfd=true: a plain record would signal without the
                # value, so the device would act on a stale shadow slot. Offer nothing instead:
                # those writes keep arriving as REGION_WRITEs.
                if self.shadow_ioeventfds is None:
                    log.warning("libvfio-user was built without shadow ioeventfd support (-Dshadow-ioeventfd=true): shadow ioeventfds not offered")
                self.shadow_ioeventfds = False
                self.skipped_ioeventfds += 1
                return
            raise OSError(err, f"vfu_create_ioeventfd(region {index}, offset {efd.offset:#x}) failed: {os.strerror(err)}")
        if shadow_fd != -1:
            self.shadow_ioeventfds = True
        self._offered_ioeventfds[index] = self._offered_ioeventfds.get(index, 0) + 1

    # -- callbacks from libvfio-user (all on the loop thread, inside vfu_run_ctx) ------------

    def _log(self, _ctx: Any, level: int, msg: Any) -> None:
        log.log(_SYSLOG_TO_LOGGING.get(level, logging.ERROR), "libvfio-user: %s", self._ffi.string(msg).decode(errors="replace"))

    def _fail(self, err: int) -> int:
        self._ffi.errno = err
        return -1

    def _region_access(self, region: Region, buf: Any, count: int, offset: int, is_write: bool) -> int:
        ffi = self._ffi
        try:
            if is_write:
                region.do_write(offset, ffi.unpack(buf, count))
            else:
                data = region.do_read(offset, count)
                if len(data) != count:
                    log.warning("device returned %d of %d bytes", len(data), count)
                    return self._fail(errno.EIO)
                ffi.memmove(buf, data, count)
            return count
        except PermissionError:
            return self._fail(errno.EPERM)
        except Exception:  # a device bug must not take the server down
            log.exception("region access failed in the device")
            return self._fail(errno.EIO)

    def _config_access(self, _ctx: Any, buf: Any, count: int, offset: int, is_write: bool) -> int:
        ffi = self._ffi
        try:
            if is_write:
                self.device.config.write(offset, ffi.unpack(buf, count))
            else:
                ffi.memmove(buf, self.device.config.read(offset, count), count)
            return count
        except IndexError:
            return self._fail(errno.EINVAL)
        except Exception:
            log.exception("config access failed in the device")
            return self._fail(errno.EIO)

    def _config_hook(self, offset: int, old: int, new: int) -> None:
        exp = self.device.config.exp_offset
        if exp is not None and offset == exp + EXP_DEVCTL and new & EXP_DEVCTL_BCR_FLR:
            log.info("function-level reset requested")
            self._device_reset(ResetKind.FLR)
            return
        self.device.config_written(offset, old, new)

    def _device_reset(self, kind: ResetKind) -> None:
        self.device.config.reset_registers()
        self.device.reset(kind)

    def _off_loop(self, fn: Callable, *args: Any) -> bool:
        """Called from the worker thread: queue ``fn(*args)`` for the loop thread (True)."""
        if threading.get_ident() != self._worker_thread:
            return False
        self._deferred.append(lambda: fn(*args))
        return True

    def _run_deferred(self) -> None:
        while self._deferred:
            self._deferred.pop(0)()

    def _reset(self, _ctx: Any, kind: int) -> int:
        if self._off_loop(self._reset, _ctx, kind):
            return 0
        try:
            if kind == VFU_RESET_LOST_CONN:
                self._lost_connection(self._drop_reason or "client disconnected")
            else:
                self._device_reset(ResetKind.FLR if kind == VFU_RESET_PCI_FLR else ResetKind.DEVICE)
            return 0
        except Exception:
            log.exception("reset failed in the device")
            return self._fail(errno.EIO)

    def _irq_state(self, index: IrqIndex, start: int, count: int, mask: bool) -> None:
        try:
            if self.client is not None:
                self.client.irqs.state_changed(index, start, count, bool(mask))
        except Exception:
            log.exception("interrupt state change failed in the device")

    def _dma_register(self, _ctx: Any, info: Any) -> None:
        ffi = self._ffi
        try:
            iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
            size = int(info.iova.iov_len)
            prot = int(info.prot)
            mapping = DmaMapping(iova, size, prot)
            if info.vaddr != ffi.NULL:
                mapping.view, mapping.guard_slot, mapping.unguard_on_close = self._own_view(info, size, prot)
            assert self._table is not None
            self._table.insert(mapping)
        except Exception:
            # libvfio-user has already accepted the map; the device just cannot reach it.
            log.exception("DMA register callback failed")

    def _own_view(self, info: Any, size: int, prot: int) -> tuple[memoryview, int, bool]:
        """A view on a second mapping of the region's pages, unmapped when its last view dies;
        with its SIGBUS guard slot (withdrawn right before that munmap) and whether the
        mapping's close must withdraw it instead (libvfio-user's own mapping, the fallback)."""
        ffi, libc = self._ffi, self._libc
        base = info.mapping.iov_base
        length = int(info.mapping.iov_len)
        delta = int(ffi.cast("uintptr_t", info.vaddr)) - int(ffi.cast("uintptr_t", base))
        new = libc.mremap(base, ffi.cast("size_t", 0), ffi.cast("size_t", length), ffi.cast("int", MREMAP_MAYMOVE))
        if int(ffi.cast("intptr_t", new)) == -1:
            log.warning("mremap failed (%s): using libvfio-user's mapping directly", os.strerror(ffi.errno))
            view = memoryview(ffi.buffer(ffi.cast("char *", info.vaddr), size))
            slot, unguard_on_close = guard_memory(view), True
        else:
            slot, unguard_on_close = dma_guard.guard_range(int(ffi.cast("uintptr_t", new)), length), False

            def unmap(p: Any, n: int = length, s: int = slot) -> None:
                dma_guard.unguard(s)
                libc.munmap(p, n)

            owner = ffi.gc(ffi.cast("char *", new), unmap)
            # the buffer must reference ``owner`` itself (``owner + n`` would not keep it alive)
            view = memoryview(ffi.buffer(owner, length))[delta : delta + size]
        return (view if prot & DMA_FLAG_WRITE else view.toreadonly()), slot, unguard_on_close

    def _dma_unregister(self, _ctx: Any, info: Any) -> None:
        ffi = self._ffi
        try:
            iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
            size = int(info.iova.iov_len)
            if self._off_loop(self._forget_dma, iova, size):
                return  # our views are our own mappings: libvfio-user may unmap its own now
            self._forget_dma(iova, size)
        except Exception:
            log.exception("DMA unregister callback failed")

    def _forget_dma(self, iova: int, size: int) -> None:
        try:
            if self._table is not None:
                self._table.remove(iova, size)  # listeners (device.dma_unmapping) first
        except DmaError as e:
            log.warning("DMA unregister of an unknown range: %s", e)
        except Exception:
            log.exception("DMA unregister failed")

    # -- running ----------------------------------------------------------------------------

    def _try_attach(self) -> None:
        """The listen fd is readable: accept + VERSION in the worker (both block on the client)."""
        if self._vfu is None or self._busy is not None or self._worker is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(self._listen_fd)
        self._drop_reason = None
        future = self._start_blocking(self._attach_call)
        timer = None
        if self.handshake_timeout is not None:
            timer = self._loop.call_later(self.handshake_timeout, self._abort_blocking, f"no VERSION within {self.handshake_timeout:g} s")
        asyncio.wrap_future(future, loop=self._loop).add_done_callback(lambda f: self._attach_done(f, timer))

    def _attach_call(self) -> tuple[int, int]:
        """In the worker: vfu_attach_ctx and its errno (thread-local, so read here)."""
        vfu = self._vfu
        if vfu is None:
            return -1, errno.ENOTCONN
        ret = self._lib.vfu_attach_ctx(vfu)
        return ret, (self._ffi.errno if ret < 0 else 0)

    def _attach_done(self, future: asyncio.Future, timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()
        self._busy = None
        if self._vfu is None or self._loop is None or future.cancelled():
            return
        exc = future.exception()
        ret, err = future.result() if exc is None else (-1, errno.EIO)
        if ret < 0:
            if exc is not None:
                log.error("vfu_attach_ctx raised: %r", exc)
            elif self._drop_reason is not None:
                log.warning("client dropped at attach: %s", self._drop_reason)
            elif err in _OUT_OF_RESOURCES:
                # the client waits in the backlog, so the listen fd stays readable: retry
                # shortly rather than spin (the Python backend's accept loop does the same)
                log.error("accept failed: %s", os.strerror(err))
                self._drop_reason = None
                self._loop.call_later(ACCEPT_RETRY, self._listen_again)
                return
            elif err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                log.warning("client refused at attach: %s", os.strerror(err))
            self._drop_reason = None
            self._listen_again()
            return
        self._attached()

    def _listen_again(self) -> None:
        """Watch the listen fd for the next client (re-queried: the library may have a new one)."""
        if self._vfu is None or self._loop is None or self._busy is not None or self.attached:
            return
        self._listen_fd = self._lib.vfu_get_poll_fd(self._vfu)
        self._loop.add_reader(self._listen_fd, self._try_attach)

    def _attached(self) -> None:
        lib = self._lib
        assert self._loop is not None
        self._conn_fd = lib.vfu_get_poll_fd(self._vfu)
        self._table = ForeignDmaTable(self.max_dma_maps)
        self._table.unmap_listeners.append(self.device.dma_unmapping)
        irqs = LibvfioIrqs(self, self.device.irq_counts, self.device.irq_unmasked)
        memory = GuestMemory(self._table, remote=_SglRemote(self))
        self.client = LibvfioClient(self._conn_fd, peer_credentials(self._conn_fd), self._loop.create_future(), memory, irqs)
        self.clients_served += 1
        log.info("client connected (pid/uid/gid %s)", self.client.peer)
        self.device.attached(DeviceContext(memory=memory, irqs=irqs, loop=self._loop))
        # The connection socket stays blocking (accept() gave it so), as libvfio-user reads
        # bodies and DMA replies with blocking recv(); we only hand it a request once all of
        # it is queued. The loop polls an epoll fd watching it edge-triggered, not the socket.
        self._peer_closed = False
        self._partial_bytes = -1
        self._epoll = select.epoll(1)
        self._epoll.register(self._conn_fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._loop.add_reader(self._epoll.fileno(), self._readable)
        self._loop.call_soon(self._readable)  # bytes that came with or right after VERSION
        if self.on_connect is not None:
            self.on_connect(self.client)

    def _start_blocking(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        assert self._worker is not None and self._busy is None
        self._busy = self._worker.submit(self._in_worker, fn, *args)
        return self._busy

    def _in_worker(self, fn: Callable, *args: Any) -> Any:
        self._worker_thread = threading.get_ident()
        return fn(*args)

    async def _blocking(self, fn: Callable, *args: Any, what: str) -> Any:
        """Run ``fn`` (a libvfio-user call that waits on the client) in the worker thread.

        One at a time; no request of this client is processed meanwhile (the client's answer
        comes on the same socket); past ``dma_timeout`` the client is dropped, which wakes
        the call up with an error."""
        assert self._blocking_lock is not None and self._loop is not None
        async with self._blocking_lock:
            if self._vfu is None or not self.attached:
                raise DmaError(errno.ENOTCONN, "client disconnected")
            future = self._start_blocking(fn, *args)
            expired = f"{what} not answered within {self.dma_timeout:g} s"
            timer = self._loop.call_later(self.dma_timeout, self._abort_blocking, expired)
            try:
                return await asyncio.shield(asyncio.wrap_future(future, loop=self._loop))
            except DmaError as e:
                if self._drop_reason == expired:  # what the Python backend answers, too
                    raise DmaError(errno.ETIMEDOUT, f"{expired} (client dropped)") from e
                raise
            finally:
                timer.cancel()
                if not future.done():  # cancelled while the worker runs: it must end first
                    self._abort_blocking(f"{what} abandoned")
                    await asyncio.wrap_future(future, loop=self._loop)
                self._busy = None
                self._run_deferred()
                if self._drop_reason is not None:
                    self._peer_closed = True
                self._loop.call_soon(self._readable)  # requests that queued up meanwhile

    def _abort_blocking(self, reason: str) -> None:
        """Wake a blocking call up by shutting the client's socket down; the client is dropped."""
        if self._vfu is None or self._busy is None or self._busy.done():
            return
        fd = self._lib.vfu_get_poll_fd(self._vfu)
        if fd < 0 or fd == self._listen_fd:
            return  # not accepted yet: nothing waits on a client
        log.warning("dropping client: %s", reason)
        self._drop_reason = reason
        self._libc.shutdown(fd, SHUT_RDWR)

    def _drop(self, reason: str) -> None:
        """Drop the client: shut its socket down; libvfio-user then reads EOF and resets."""
        log.warning("dropping client: %s", reason)
        self._drop_reason = reason
        self._libc.shutdown(self._conn_fd, SHUT_RDWR)
        self._peer_closed = True

    def _readable(self) -> None:
        """The connection got bytes (or EOF): hand libvfio-user each request that is complete."""
        ffi, lib = self._ffi, self._lib
        if self._epoll is not None:
            try:
                for _fd, events in self._epoll.poll(0):  # consume the edge
                    if events & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                        self._peer_closed = True
            except OSError:
                pass
        if self._busy is not None or self._conn_fd < 0:
            return  # a DMA exchange owns the socket (_blocking calls us again afterwards), or gone
        for _ in range(RUN_BUDGET):
            if not self.attached or self._vfu is None:
                break
            peeked = self._peek_request()
            if peeked is _NOTHING:
                self._partial_bytes = -1
                return  # no request waiting: spare vfu_run_ctx its own EAGAIN recv
            if peeked is _PARTIAL:
                self._partial_received()
                return  # the rest comes with a new edge (or the stall timer drops the client)
            self._partial_bytes = -1
            if peeked is _SCREENED:
                continue  # we answered it (or dropped a stray reply) ourselves
            ret = lib.vfu_run_ctx(self._vfu)
            if ret < 0:
                err = ffi.errno
                if err in _DISCONNECT_ERRNOS or not self.attached:
                    if err != errno.ENOTCONN and self.attached:
                        # the library has not reset yet (a reply failed): the next call sees EOF
                        self._peer_closed = True
                        continue
                    self._lost_connection(self._drop_reason or "client disconnected")
                    self._finish_disconnect()
                    return
                if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY):
                    return
                # The library refused a header without reading its body (junk, a huge size):
                # the stream cannot be resynchronised, so the client is dropped, not hung.
                self._drop(f"vfu_run_ctx: {os.strerror(err)}")
                continue
            if isinstance(peeked, tuple):
                self._after_request(*peeked)
            if ret == 0 and not self._peer_closed:
                return  # (after EOF, go on: the next call reads it and resets the context)
        else:
            # budget spent with requests still queued: no new edge will say so
            if self._loop is not None:
                self._loop.call_soon(self._readable)
            return
        if not self.attached:
            self._finish_disconnect()

    def _queued(self) -> int:
        """Bytes waiting in the connection's receive queue (FIONREAD)."""
        try:
            return struct.unpack("i", fcntl.ioctl(self._conn_fd, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            return 0

    def _peek_request(self) -> tuple[int, bytes] | object | None:
        """(command, first payload bytes) of the next request when all of it is queued;
        _NOTHING when no byte waits, _PARTIAL when only part of a message does, _SCREENED when
        we consumed the message ourselves (see _screen), None when vfu_run_ctx should look
        itself (EOF, an error, a header it will refuse)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, self._conn_fd)
        try:
            raw, ancillary, msg_flags, _addr = sock.recvmsg(PEEK_SIZE, PEEK_ANCILLARY, MSG_PEEK | MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return _NOTHING
        except OSError:
            return None  # vfu_run_ctx finds out (and resets the context)
        finally:
            sock.detach()
        fds = _fds_of(ancillary)  # a peek installs copies of the message's fds: ours to close
        try:
            if not raw:
                return None  # EOF
            if len(raw) < HEADER_SIZE:
                return self._short_header()
            msg_id, command, size, flags = struct.unpack_from("<HHII", raw)
            if HEADER_SIZE < size <= LIB_MAX_MSG_SIZE and not self._peer_closed and self._queued() < size:
                return _PARTIAL
            if not HEADER_SIZE <= size <= LIB_MAX_MSG_SIZE:
                if not self._peer_closed:
                    self._refuse_header(msg_id, command, size, flags)
                return None  # the library reads the header, fails to reply, and resets
            if msg_flags & socket.MSG_CTRUNC:
                refusal: int | None = errno.EMFILE  # out of fds: the kernel dropped this message's fds
            else:
                refusal = _screen(command, flags, raw[HEADER_SIZE:], fds, unsealed_ok=self.dma_unsealed)
            if refusal is None:
                return command, raw[HEADER_SIZE:]
            self._consume(msg_id, command, size, refusal)
            return _SCREENED
        finally:
            for fd in fds:
                os.close(fd)

    def _short_header(self) -> object | None:
        """Less than a header can be peeked: _PARTIAL while more may come; else the fragment
        is read and its fds closed here, never handed to the library.

        libvfio-user's header read (``get_msg``) returns ECONNRESET on a short read without
        closing the fds that came with it: a client sending a few header bytes with fds and
        closing leaked them all (79 such connections exhausted a 20,000-fd limit). A peek
        also stops at an fd-carrying segment, so a header split there (queued >= a header,
        peeked < one) would reach the library short too: that client is dropped."""
        if not self._peer_closed:
            if self._queued() < HEADER_SIZE:
                return _PARTIAL
            self._drop("a message header split at its fds")
        self._discard_queued()
        return None  # the library now reads EOF and resets the context

    def _discard_queued(self) -> None:
        """Read what the client left queued (it is gone, or being dropped), closing its fds."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, self._conn_fd)
        try:
            while _recv_closing_fds(sock, PEEK_SIZE):
                pass
        except OSError:
            pass  # nothing more queued (EAGAIN), or the connection is gone with its queue
        finally:
            sock.detach()

    def _refuse_header(self, msg_id: int, command: int, size: int, flags: int) -> None:
        """A header whose body the library would not read (it takes the body for the next
        headers, with no way back): answer a request E2BIG/EINVAL, as the Python backend does,
        then drop the client rather than let it hang on a desynchronised stream."""
        if flags & 0xF == MsgType.REQUEST:
            err = errno.E2BIG if size > LIB_MAX_MSG_SIZE else errno.EINVAL
            try:
                os.write(self._conn_fd, HEADER.pack(msg_id, command, HEADER_SIZE, MsgType.REPLY | FLAG_ERROR, err))
            except OSError:
                pass  # the drop below is the answer then
        self._drop(f"message size {size} outside {HEADER_SIZE}..{LIB_MAX_MSG_SIZE}")

    def _consume(self, msg_id: int, command: int, size: int, refusal: int) -> None:
        """Read one whole queued message (closing its fds) past the library and answer it with
        ``refusal`` (an errno), or not at all (0: an unsolicited reply is dropped)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, self._conn_fd)
        try:
            left = size
            while left > 0:
                got = _recv_closing_fds(sock, left)
                if not got:
                    return
                left -= got
            if refusal:
                log.warning("refused %s with %s before libvfio-user saw it", _command_name(command), errno.errorcode.get(refusal, refusal))
                sock.send(HEADER.pack(msg_id, command, HEADER_SIZE, MsgType.REPLY | FLAG_ERROR, refusal), MSG_DONTWAIT)
        except OSError as e:
            self._drop(f"refusing a request failed: {e}")
        finally:
            sock.detach()

    def _partial_received(self) -> None:
        """Part of a message is queued: new bytes are progress; arm the stall check."""
        assert self._stall is not None
        queued = self._queued()
        if queued != self._partial_bytes:
            self._partial_bytes = queued
            self._stall.progress()
        else:
            self._stall.arm()

    def _stalled(self, reason: str) -> None:
        """The stall check: the client stopped mid-message; drop it."""
        self._drop(reason)
        self._readable()  # libvfio-user reads the fragment, fails, and resets the context

    def _after_request(self, command: int, payload: bytes) -> None:
        client = self.client
        if client is None:
            return
        if command == Command.DEVICE_SET_IRQS and len(payload) >= 20:
            _argsz, flags, index, start, count = struct.unpack_from("<IIIII", payload)
            client.irqs.saw_set_irqs(flags, index, start, count)
        elif command == Command.DEVICE_GET_REGION_IO_FDS and len(payload) >= 16:
            argsz, flags, index, count = struct.unpack_from("<IIII", payload)
            offered = self._offered_ioeventfds.get(index, 0)
            if offered and not flags and not count and argsz >= IO_FDS_HEADER_SIZE + offered * IO_FD_RECORD_SIZE:
                self.device.ioeventfds_taken(index)

    def _lost_connection(self, reason: str) -> None:
        """The client is gone (reset callback LOST_CONN, or vfu_run_ctx said so)."""
        client = self.client
        if client is None or client.closed.done():
            return
        self._unwatch_connection()
        client.irqs.close()
        try:
            self.device.detached()
        finally:
            client.closed.set_result(reason)

    def _unwatch_connection(self) -> None:
        """Stop watching the connection: its epoll fd is closed, the stall check cancelled."""
        if self._stall is not None:
            self._stall.cancel()
        if self._epoll is not None:
            epoll, self._epoll = self._epoll, None
            if self._loop is not None:
                try:
                    self._loop.remove_reader(epoll.fileno())
                except (OSError, ValueError):
                    pass
            epoll.close()

    def _finish_disconnect(self) -> None:
        if self._conn_fd < 0:
            return  # done already
        client = self.client
        self._conn_fd = -1
        self._unwatch_connection()
        if self._table is not None:
            self._table.remove_all()  # libvfio-user unregistered them already; belt and braces
        if client is not None:
            reason = client.closed.result() if client.closed.done() else "client disconnected"
            log.info("client gone: %s", reason)
            if self.on_disconnect is not None:
                self.on_disconnect(client, reason)
        if self._vfu is not None and self._loop is not None:
            self._listen_fd = self._lib.vfu_get_poll_fd(self._vfu)
            self._loop.add_reader(self._listen_fd, self._try_attach)

    async def serve_forever(self) -> None:
        if self._vfu is None:
            await self.start()
        assert self._done is not None
        await self._done

    def close(self) -> None:
        """Drop the client, destroy the context (removes the socket path)."""
        if self._loop is not None and self._listen_fd >= 0:
            try:
                self._loop.remove_reader(self._listen_fd)
            except (OSError, ValueError):
                pass
        self._unwatch_connection()
        if self._stop_worker():
            self._run_deferred()
            self._destroy()
        else:
            self._vfu = None  # a call still inside the library: leak the context, do not race it
        if self.client is not None and not self.client.closed.done():
            self._lost_connection("server shutting down")
        if self._config_hook in self.device.config.write_hooks:
            self.device.config.write_hooks.remove(self._config_hook)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _stop_worker(self) -> bool:
        """Wake a blocking call up and let the worker end (vfu_destroy_ctx must not race it);
        False if it is still inside libvfio-user after a few seconds."""
        busy = self._busy
        for _ in range(100):
            if busy is None or busy.done():
                break
            self._abort_blocking("server shutting down")
            concurrent.futures.wait([busy], timeout=0.05)
        ended = busy is None or busy.done()
        if not ended:
            log.error("a libvfio-user call did not return at shutdown: context left as is")
        if self._worker is not None:
            self._worker.shutdown(wait=ended)
            self._worker = None
        return ended

    def _destroy(self) -> None:
        if self._vfu is not None:
            vfu, self._vfu = self._vfu, None
            # vfu_destroy_ctx resets a live connection: our unregister and LOST_CONN
            # callbacks run from inside it, so _vfu must look valid to them... but they only
            # touch the table and the device.
            self._lib.vfu_destroy_ctx(vfu)
            self._listen_fd = self._conn_fd = -1
        if self._table is not None:
            self._table.remove_all()


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS message brought into this process."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"<{usable // 4}i", data[:usable]))
    return fds


def _recv_closing_fds(sock: socket.socket, limit: int) -> int:
    """Read up to ``limit`` queued bytes past the library, closing the fds they carry; 0 at EOF."""
    data, ancillary, _flags, _addr = sock.recvmsg(limit, PEEK_ANCILLARY, MSG_DONTWAIT)
    for fd in _fds_of(ancillary):
        os.close(fd)
    return len(data)


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


def _screen_dma_map(payload: bytes, fds: list[int], unsealed_ok: bool) -> int | None:
    """The DMA_MAP checks libvfio-user lacks: a range that wraps past 2^64 or is not page
    aligned, more than one fd, or an fd too small for the range (SIGBUS on first touch)."""
    if len(payload) < 32:
        return None  # the library refuses a short payload itself
    _argsz, _flags, offset, iova, size = struct.unpack_from("<IIQQQ", payload)
    if iova + size > 1 << 64 or (iova | size | offset) % DEFAULT_PGSIZE:
        return errno.EINVAL
    if len(fds) > 1:
        return errno.EINVAL
    if fds:
        try:
            check_dma_fd(fds[0], offset, size, unsealed_ok=unsealed_ok)
        except DmaError as e:
            return e.errno
    return None


def _screen(command: int, flags: int, payload: bytes, fds: list[int], *, unsealed_ok: bool = False) -> int | None:
    """What we answer for a message before libvfio-user sees it: None to hand it over, an
    errno to refuse it, 0 to drop it unanswered. The library takes any fd on any command, so
    fds it would keep, or map past their end (SIGBUS), or write interrupts to (a pipe would
    block), are refused here, with the errnos of the Python backend."""
    if flags & 0xF != MsgType.REQUEST:
        return 0  # a reply nobody asked for (DMA replies are read while a DMA call is busy)
    if command == Command.DMA_MAP:
        return _screen_dma_map(payload, fds, unsealed_ok)
    if not fds:
        return None
    if command == Command.DEVICE_SET_IRQS and len(payload) >= 8:
        irq_flags = struct.unpack_from("<I", payload, 4)[0]
        if irq_flags & IRQ_DATA_TYPE_MASK == IRQ_DATA_EVENTFD and all(is_eventfd(fd) for fd in fds):
            return None
    return errno.EINVAL  # fds on a command that takes none, or not eventfds for interrupts
