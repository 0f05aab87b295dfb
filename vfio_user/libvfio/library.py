"""Finding and loading libvfio-user.so.0 through cffi (ABI mode): the declarations the
backend uses, the library's constants, and the install hint when it is absent.

Nothing is loaded at import: :func:`load_library` dlopens the library on first use (the
libvfio-user tests skip, printing :func:`unavailable_reason`, where it cannot be loaded).
"""

from __future__ import annotations

import ctypes.util
import errno
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..constants import HEADER_SIZE

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
SYSLOG_TO_LOGGING = {LOG_ERR: logging.ERROR, LOG_WARNING: logging.WARNING, LOG_NOTICE: logging.INFO, LOG_INFO: logging.INFO, LOG_DEBUG: logging.DEBUG}

MREMAP_MAYMOVE = 1
MSG_PEEK = 0x2
MSG_DONTWAIT = 0x40
SHUT_RDWR = 2
#: libvfio-user's largest request (SERVER_MAX_MSG_SIZE: a 1 MiB REGION_WRITE); it rejects a
#: header announcing more without reading a body, so such a header is handed over at once.
LIB_MAX_MSG_SIZE = (1 << 20) + HEADER_SIZE + 16
PROT_READ, PROT_WRITE = 1, 2


class LibvfioUserUnavailable(OSError):
    """libvfio-user.so.0 could not be found or loaded; the message says what to install."""


@dataclass
class Library:
    """The loaded library: its cffi module, libvfio-user's functions, libc's, and its path."""

    ffi: Any
    lib: Any
    libc: Any
    path: str

    def check(self, ret: int, what: str) -> int:
        """``ret`` of a libvfio-user call; OSError with the call's errno when it failed (< 0, NULL)."""
        if ret is None:
            return 0
        if (isinstance(ret, int) and ret < 0) or ret == self.ffi.NULL:
            err = self.ffi.errno or errno.EIO
            raise OSError(err, f"libvfio-user {what} failed: {os.strerror(err)}")
        return ret


_loaded: Library | None = None


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


def load_library() -> Library:
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
        _loaded = Library(ffi, lib, ffi.dlopen(None), cand)
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
