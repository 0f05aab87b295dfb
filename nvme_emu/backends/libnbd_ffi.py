"""libnbd's C API through cffi (ABI mode): the aio calls the Python binding gets wrong.

Why not python3-libnbd for asynchronous I/O: Debian 12's binding (libnbd 1.14.2) leaks the
buffer of every ``aio_pread`` (+80 MiB of RSS per 20,000 4 KiB reads, bench/nbd_io.py) and,
without a completion callback, keeps a buffer export on guest memory it read into, so the
mapping can no longer be closed. The C library itself reads straight into a pointer we own;
cffi hands it one into guest memory (``ffi.from_buffer``), released when the command is
retired. Nothing here is built: ``libnbd.so.0`` (Debian's ``libnbd0``, which python3-libnbd
depends on) is opened at run time, and the declarations below are the documented ABI of
libnbd >= 1.2 (``man 3 libnbd``), so no ``libnbd-dev`` headers are needed.

Threading: every call here is made on the event loop's thread. libnbd touches a command's
buffer only inside the calls made on its handle (``aio_notify_read`` moves the reply's bytes
into it), so guest memory is written on the loop thread and nowhere else.
"""

from __future__ import annotations

import enum
from typing import Any

from cffi import FFI

ffi = FFI()
ffi.cdef("""
struct nbd_handle;
typedef struct {
    int (*callback) (void *user_data, int *error);
    void *user_data;
    void (*free) (void *user_data);
} nbd_completion_callback;

struct nbd_handle *nbd_create (void);
void nbd_close (struct nbd_handle *h);
const char *nbd_get_error (void);
int nbd_get_errno (void);
int nbd_set_handle_name (struct nbd_handle *h, const char *handle_name);

int nbd_aio_connect_uri (struct nbd_handle *h, const char *uri);
int nbd_aio_is_connecting (struct nbd_handle *h);
int nbd_aio_is_ready (struct nbd_handle *h);
int nbd_aio_is_processing (struct nbd_handle *h);
int nbd_aio_is_dead (struct nbd_handle *h);
int nbd_aio_is_closed (struct nbd_handle *h);

int64_t nbd_get_size (struct nbd_handle *h);
int nbd_is_read_only (struct nbd_handle *h);
int nbd_can_flush (struct nbd_handle *h);
int nbd_can_fua (struct nbd_handle *h);
int nbd_can_trim (struct nbd_handle *h);
int nbd_can_zero (struct nbd_handle *h);
int nbd_can_multi_conn (struct nbd_handle *h);

int nbd_aio_get_fd (struct nbd_handle *h);
unsigned nbd_aio_get_direction (struct nbd_handle *h);
int nbd_aio_notify_read (struct nbd_handle *h);
int nbd_aio_notify_write (struct nbd_handle *h);

int64_t nbd_aio_pread (struct nbd_handle *h, void *buf, size_t count, uint64_t offset,
                       nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_pwrite (struct nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                        nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_flush (struct nbd_handle *h, nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_trim (struct nbd_handle *h, uint64_t count, uint64_t offset,
                      nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_zero (struct nbd_handle *h, uint64_t count, uint64_t offset,
                      nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_peek_command_completed (struct nbd_handle *h);
int nbd_aio_command_completed (struct nbd_handle *h, uint64_t cookie);
int nbd_aio_in_flight (struct nbd_handle *h);
""")


class Direction(enum.IntFlag):
    """``nbd_aio_get_direction``: what the handle waits for on its fd (LIBNBD_AIO_DIRECTION_*)."""

    READ = 1
    WRITE = 2


class CmdFlag(enum.IntFlag):
    """Per-command flags (LIBNBD_CMD_FLAG_*)."""

    FUA = 0x01
    NO_HOLE = 0x02


_lib: list[Any] = []


def lib() -> Any:
    """``libnbd.so.0``, opened on first use; ValueError saying what to install without it."""
    if not _lib:
        try:
            _lib.append(ffi.dlopen("libnbd.so.0"))
        except OSError as e:
            raise ValueError(f"nbd: namespaces need libnbd (Debian's libnbd0; ./dev installs it): {e}") from None
    return _lib[0]


#: The completion argument that asks for none: commands are retired by
#: ``nbd_aio_command_completed`` instead (one call, no C-to-Python callback per command).
NO_COMPLETION = ffi.new("nbd_completion_callback *")[0]


class NbdError(OSError):
    """A libnbd call failed: its errno (ENOTCONN when the connection is gone) and message."""


def last_error() -> NbdError:
    """The calling thread's last libnbd error (libnbd keeps it per thread)."""
    L = lib()
    msg = L.nbd_get_error()
    return NbdError(L.nbd_get_errno() or 5, ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else "libnbd error")
