"""The NBD backend: a namespace on an export of a Network Block Device server (issue 27).

The client is libnbd's Python binding, Debian's ``python3-libnbd``: the reference client, and
the only maintained one (PyPI has none). It is built for Debian's python3; ``./dev`` links its
two files (``nbd.py``, ``libnbdmod.cpython-311-x86_64-linux-gnu.so``) into the venv, whose
Python shares the ABI tag (README, "Namespaces on NBD"). It is imported when an ``nbd:``
namespace is opened, so nvme-emu without it serves every other kind.

The connection is the backend's way to its storage, not an NVMe transport: libnbd opens the
socket; nothing of nvme_emu does.

Design: a **blocking** backend, like ``file:`` and ``blk:``. Each call runs on the
controller's I/O pool (:mod:`nvme_emu.aio`), never on the loop (:attr:`inline_budget` is None:
a server that stops answering would freeze every queue for the command timeout). Each call
takes a connection from a small pool: one per worker thread (:data:`CONNECTIONS`) when the
server offers multi-conn (its flush then covers writes acknowledged on every connection),
else one connection the workers take in turn. Inside a call, commands go through libnbd's
aio API and ``poll`` with a deadline: a Read of one flat view lands straight in guest memory
(``nbd.Buffer.from_buffer``), a call of several chunks is pipelined on the connection, and no
command waits longer than :data:`COMMAND_TIMEOUT_S`.

Measured against nbdkit's memory plugin over a Unix socket (libnbd 1.14.2, this 2-CPU
machine, one handle, QD1): a 4 KiB read 27 us, a write 10 us, the same whether synchronous
(``pread``, which returns a new ``bytes``) or aio into the caller's buffer; eight reads
pipelined on one handle 10.4 us each. The I/O pool's hand-off costs 10-40 us, so on a local
server it is about as much again as the command itself: tests/nbd/test_nbd_bench.py measures
the QD1 and QD4 figures through a Namespace, the basis for deciding whether driving libnbd's
aio from the event loop's fd is worth it (README).

Flags: the export's size and flags are read at connection time (:class:`NbdFlags`) and
decide what each NVMe operation becomes:

- Read, Write: NBD_CMD_READ, NBD_CMD_WRITE (read-only export: write protected namespace);
- FUA: NBD_CMD_FLAG_FUA where ``can_fua``, else the write then NBD_CMD_FLUSH;
- Flush: NBD_CMD_FLUSH where ``can_flush``; without it the server has nothing volatile to
  flush (the NBD protocol's reading, and QEMU's NBD client's);
- Write Zeroes: NBD_CMD_WRITE_ZEROES where ``can_zero`` (NO_HOLE unless DEAC), else writes of
  zeros;
- Deallocate: NBD_CMD_WRITE_ZEROES without NO_HOLE where ``can_zero`` (the server may trim,
  and the blocks read as zeros, so DLFEAT says so); else NBD_CMD_TRIM where ``can_trim``
  (then DLFEAT says nothing: a trimmed NBD block may read anything); else nothing.

Failures: a connection that fails (refused, reset, the server killed) or a command past its
deadline fails the command with Namespace Not Ready and DNR clear (:class:`NotReadyError`):
the spec's "re-issuing the command at a later time may succeed", which a host retries (Linux
five times, then an I/O error). The broken connection is closed, and the next command
connects again. An error the server answers a command with is the command's, as a file's
errno is (:func:`~nvme_emu.backends.errors.translate_os_error`).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Self, TypeVar

from ..spec.commands import Status
from .base import Backend, BackendKind, BackendSpec
from .errors import BackendError, ReadOnlyError, translate_os_error
from .iov import ZERO_CHUNK, ZEROS, Buffers, byte_views, is_byte_view

log = logging.getLogger(__name__)

T = TypeVar("T")

#: URI schemes libnbd connects to (``nbds``: TLS, with libnbd's defaults).
SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")
#: The NBD port an ``nbd://HOST/`` URI means (IANA).
DEFAULT_PORT = 10809
#: Connections with a multi-conn server: one per I/O pool worker, so no worker waits for another.
CONNECTIONS = 4
#: The longest one NBD call may take (connecting included) before its command fails with
#: Namespace Not Ready: below Linux's 30 s I/O timeout, so the host sees a retryable error
#: rather than aborting the command and resetting the controller.
COMMAND_TIMEOUT_S = 20.0
#: Bytes per NBD read or write: the protocol's safe maximum without block size negotiation
#: (32 MiB; libnbd refuses more than 64 MiB).
MAX_REQUEST = 32 << 20
#: Bytes per NBD_CMD_WRITE_ZEROES or TRIM: their length is 32 bits; whole 1 GiB pieces.
MAX_ZERO_REQUEST = 1 << 30


def _libnbd() -> Any:
    """The ``nbd`` module of python3-libnbd, or ValueError saying how to get it."""
    try:
        import nbd
    except ImportError as e:
        raise ValueError(f"nbd: namespaces need libnbd's Python binding (Debian's python3-libnbd; ./dev links it into the venv): {e}") from None
    return nbd


# -- the URI --------------------------------------------------------------------------------------


def check_uri(uri: str) -> urllib.parse.SplitResult:
    """The parts of an NBD URI (ValueError: why not one): ``nbd://HOST[:PORT]/EXPORT``,
    ``nbd+unix:///EXPORT?socket=PATH`` (and ``nbds``, ``+vsock``), as libnbd reads them."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"{uri!r} is not an NBD URI ({', '.join(s + '://' for s in SCHEMES)})")
    query = urllib.parse.parse_qs(parts.query)
    if parts.scheme.lower().endswith("+unix"):
        if not query.get("socket"):
            raise ValueError(f"{uri!r}: a Unix socket URI needs ?socket=PATH")
        if parts.netloc:
            raise ValueError(f"{uri!r}: a Unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)")
    elif not parts.hostname:
        raise ValueError(f"{uri!r}: needs a host (nbd://HOST[:PORT]/EXPORT)")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError as e:
        raise ValueError(f"{uri!r}: {e}") from None
    return parts


def normalise_uri(uri: str) -> str:
    """The URI that names the same export whatever way it was written: scheme and host in
    lower case, the default port spelled out, the export name unquoted, a Unix socket's path
    made absolute, other query keys (TLS settings: how, not what) dropped. What the
    namespace's IDs derive from, and what the backend connects to."""
    parts = check_uri(uri)
    scheme = parts.scheme.lower()
    export = urllib.parse.quote(urllib.parse.unquote(parts.path.lstrip("/")), safe="/")
    if scheme.endswith("+unix"):
        sock = os.path.abspath(urllib.parse.parse_qs(parts.query)["socket"][0])
        return f"{scheme}:///{export}?socket={urllib.parse.quote(sock, safe='/')}"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host.lower()
    return f"{scheme}://{host}:{parts.port or DEFAULT_PORT}/{export}"


# -- one connection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NbdFlags:
    """What an export said of itself in the handshake (NBD transmission flags), read once per
    connection: a restarted server may say something else."""

    size: int
    read_only: bool
    flush: bool
    fua: bool
    trim: bool
    zero: bool
    multi_conn: bool

    @classmethod
    def of(cls, h: Any) -> "NbdFlags":
        return cls(size=h.get_size(), read_only=bool(h.is_read_only()), flush=bool(h.can_flush()), fua=bool(h.can_fua()),
                   trim=bool(h.can_trim()), zero=bool(h.can_zero()), multi_conn=bool(h.can_multi_conn()))


class NotReadyError(BackendError):
    """The export cannot be reached now (connection refused or lost, a command past its
    deadline): Namespace Not Ready with DNR clear, so the host retries; the next command
    connects again."""

    def __init__(self, message: str) -> None:
        super().__init__(Status.NAMESPACE_NOT_READY, errno.ENOTCONN, message, dnr=False)


class _Timeout(Exception):
    """A call passed its deadline; its connection must go."""


class _Conn:
    """One libnbd handle and the flags its export gave it."""

    __slots__ = ("h", "flags")

    def __init__(self, h: Any, flags: NbdFlags) -> None:
        self.h = h
        self.flags = flags

    def usable(self) -> bool:
        """Connected, handshake done, no failure on the wire."""
        h = self.h
        return bool(h.aio_is_ready() or h.aio_is_processing())

    def close(self) -> None:
        """Close the handle now (libnbd retires its commands: no buffer is used after this);
        the binding only closes in ``__del__``, which a traceback may postpone."""
        h, self.h = self.h, None
        if h is not None and hasattr(h, "_o"):
            h.__del__()
            del h._o

    def wait(self, cookies: list[int], deadline: float) -> None:
        """Until every command is retired (none may still use a buffer when this returns);
        the first command error is raised then. :class:`_Timeout` past ``deadline``."""
        h = self.h
        error: BaseException | None = None
        pending = cookies
        while True:
            left = []
            for c in pending:
                try:
                    if not h.aio_command_completed(c):
                        left.append(c)
                except Exception as e:  # nbd.Error: this command failed (the others go on)
                    error = error or e
            pending = left
            if not pending:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout(f"{len(pending)} NBD command(s) unanswered after {COMMAND_TIMEOUT_S:g} s")
            h.poll(int(remaining * 1000) + 1)
        if error is not None:
            raise error


def connect(uri: str, deadline: float) -> _Conn:
    """A new connection to ``uri``, handshake done, by ``deadline`` (raises nbd.Error or
    :class:`_Timeout`)."""
    nbd = _libnbd()
    h = nbd.NBD()
    conn = _Conn(h, NbdFlags(0, True, False, False, False, False, False))
    try:
        h.set_handle_name("nvme-emu")
        h.aio_connect_uri(uri)
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise nbd.Error(f"connect {uri}: connection closed during the handshake", errno.ECONNRESET)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout(f"connect {uri}: no handshake after {COMMAND_TIMEOUT_S:g} s")
            h.poll(int(remaining * 1000) + 1)
        conn.flags = NbdFlags.of(h)
    except BaseException:
        conn.close()
        raise
    return conn


# -- the backend ----------------------------------------------------------------------------------


@dataclass
class NbdStats:
    """The backend's counters (:meth:`NbdBackend.describe`)."""

    #: calls running now (on pool workers)
    in_flight: int = 0
    #: connections made, and of those the ones after a lost connection
    connects: int = 0
    reconnects: int = 0
    #: commands failed with Namespace Not Ready (connection refused, lost, timed out)
    transient_errors: int = 0
    #: commands the server answered with an error
    errors: int = 0


class NbdBackend(Backend):
    """An NBD export, through a few libnbd connections (the module docstring)."""

    kind = BackendKind.NBD
    spec_path = True
    blocking = True

    def __init__(self, uri: str, *, readonly: bool = False, timeout: float = COMMAND_TIMEOUT_S) -> None:
        self.path = self.uri = normalise_uri(uri)
        self.timeout = timeout
        self.stats = NbdStats()
        nbd = _libnbd()
        self._error_type: type[BaseException] = nbd.Error
        self._lock = threading.Lock()
        self._idle: list[_Conn] = []
        try:
            first = connect(self.uri, time.monotonic() + timeout)
        except (nbd.Error, _Timeout) as e:
            raise ValueError(f"nbd: cannot open {self.uri}: {e}") from None
        self.stats.connects = 1
        flags = self.flags = first.flags
        self.size = flags.size
        if self.size <= 0:
            first.close()
            raise ValueError(f"nbd: {self.uri} has no capacity")
        self.readonly = readonly or flags.read_only
        #: a deallocated range reads zeros only where the server zeroes it (DLFEAT)
        self.deallocate_zeroes = flags.zero
        #: multi-conn: a flush on one connection covers writes acknowledged on every one
        self.connections = CONNECTIONS if flags.multi_conn else 1
        self._slots = threading.BoundedSemaphore(self.connections)
        self._idle.append(first)
        self._closed = False

    # -- the registry's view ----------------------------------------------------------------------

    @classmethod
    def check_spec(cls, spec: BackendSpec) -> None:
        if spec.size is not None:
            raise ValueError("an NBD namespace's size comes from the export")
        assert spec.path is not None
        check_uri(spec.path)

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        assert spec.path is not None
        return cls(spec.path, readonly=spec.readonly)

    @classmethod
    def identity_seed(cls, spec: BackendSpec, controller_seed: str) -> str:
        """The normalised URI: the same export has the same IDs whichever nvme-emu serves it,
        on this host or another (a host named differently, or by address, is another URI)."""
        assert spec.path is not None
        return f"{cls.kind}:{normalise_uri(spec.path)}"

    # -- connections ------------------------------------------------------------------------------

    def _call(self, what: str, op: Callable[[_Conn, float], T], *, writing: bool) -> T:
        """Run ``op(conn, deadline)`` on a pooled connection (a new one when none is idle);
        failures become the command's status (the module docstring)."""
        self._slots.acquire()  # held by at most :attr:`connections` calls, each bounded by its deadline
        try:
            deadline = time.monotonic() + self.timeout
            with self._lock:
                if self._closed:
                    raise NotReadyError(f"{what}: {self.uri} is closed")
                conn = self._idle.pop() if self._idle else None
                self.stats.in_flight += 1
            try:
                if conn is None:
                    conn = self._reconnect(what, deadline)
                try:
                    result = op(conn, deadline)
                except _Timeout as e:
                    self._lost(conn, what, str(e))
                    raise NotReadyError(f"{what}: {e}") from None
                except self._error_type as e:
                    if not conn.usable():
                        self._lost(conn, what, str(e))
                        raise NotReadyError(f"{what}: {self.uri}: {e}") from None
                    self._give_back(conn)
                    with self._lock:
                        self.stats.errors += 1
                    err: Any = e
                    raise translate_os_error(OSError(err.errnum or errno.EIO, err.string), f"{what} {self.uri}", writing=writing) from None
                self._give_back(conn)
                return result
            finally:
                with self._lock:
                    self.stats.in_flight -= 1
        finally:
            self._slots.release()

    def _reconnect(self, what: str, deadline: float) -> _Conn:
        try:
            conn = connect(self.uri, deadline)
        except (self._error_type, _Timeout) as e:
            with self._lock:
                self.stats.transient_errors += 1
            raise NotReadyError(f"{what}: cannot connect to {self.uri}: {e}") from None
        with self._lock:
            self.stats.connects += 1
            self.stats.reconnects += 1
        if conn.flags.size != self.size:
            conn.close()
            with self._lock:
                self.stats.transient_errors += 1
            raise NotReadyError(f"{what}: {self.uri} is now {conn.flags.size} bytes, was {self.size}")
        log.info("nbd: connected to %s again", self.uri)
        return conn

    def _lost(self, conn: _Conn, what: str, why: str) -> None:
        log.warning("nbd: %s: connection to %s lost (%s); the next command connects again", what, self.uri, why)
        conn.close()
        with self._lock:
            self.stats.transient_errors += 1

    def _give_back(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    # -- data -------------------------------------------------------------------------------------

    def read_into(self, offset: int, views: Buffers) -> None:
        if len(views) == 1 and is_byte_view(v := views[0]):
            self._call(f"read {offset}+{v.nbytes}", lambda c, d: self._pread(c, d, v, offset), writing=False)
            return
        flat = byte_views(views)
        total = sum(len(v) for v in flat)
        buf = memoryview(bytearray(total))  # one NBD read, then scattered: one command, not one per page

        self._call(f"read {offset}+{total}", lambda c, d: self._pread(c, d, buf, offset), writing=False)
        pos = 0
        for v in flat:
            v[:] = buf[pos : pos + len(v)]
            pos += len(v)

    @staticmethod
    def _pread(conn: _Conn, deadline: float, view: memoryview, offset: int) -> None:
        nbd = _libnbd()
        h = conn.h
        cookies = [h.aio_pread(nbd.Buffer.from_buffer(view[pos : pos + MAX_REQUEST]), offset + pos)
                   for pos in range(0, len(view), MAX_REQUEST)]
        conn.wait(cookies, deadline)

    def write_from(self, offset: int, views: Buffers, *, fua: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.uri} is read-only")
        if len(views) == 1 and is_byte_view(views[0]):
            data = views[0]
        else:
            data = memoryview(b"".join(byte_views(views)))  # one NBD write (one copy), not one per page
        self._call(f"write {offset}+{len(data)}", lambda c, d: self._pwrite(c, d, data, offset, fua), writing=True)

    @staticmethod
    def _pwrite(conn: _Conn, deadline: float, data: memoryview, offset: int, fua: bool) -> None:
        nbd = _libnbd()
        h, flags = conn.h, conn.flags
        flag = nbd.CMD_FLAG_FUA if fua and flags.fua else 0
        cookies = [h.aio_pwrite(data[pos : pos + MAX_REQUEST], offset + pos, flags=flag)
                   for pos in range(0, len(data), MAX_REQUEST)]
        conn.wait(cookies, deadline)
        if fua and not flags.fua and flags.flush:
            conn.wait([h.aio_flush()], deadline)

    def write_zeroes(self, offset: int, length: int, *, deallocate: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.uri} is read-only")
        self._call(f"zero {offset}+{length}", lambda c, d: self._zero(c, d, offset, length, may_trim=deallocate), writing=True)

    @staticmethod
    def _zero(conn: _Conn, deadline: float, offset: int, length: int, *, may_trim: bool) -> None:
        nbd = _libnbd()
        h = conn.h
        cookies = []
        if conn.flags.zero:
            flag = 0 if may_trim else nbd.CMD_FLAG_NO_HOLE
            for pos in range(0, length, MAX_ZERO_REQUEST):
                cookies.append(h.aio_zero(min(MAX_ZERO_REQUEST, length - pos), offset + pos, flags=flag))
                if len(cookies) >= 8:  # a whole-device erase: a bounded pipeline
                    conn.wait(cookies, deadline)
                    cookies = []
        else:
            zeros = memoryview(ZEROS)
            for pos in range(0, length, ZERO_CHUNK):
                cookies.append(h.aio_pwrite(zeros[: min(ZERO_CHUNK, length - pos)], offset + pos))
                if len(cookies) >= 8:
                    conn.wait(cookies, deadline)
                    cookies = []
        conn.wait(cookies, deadline)

    def deallocate(self, offset: int, length: int) -> None:
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.uri} is read-only")
        flags = self.flags
        if flags.zero:
            self.write_zeroes(offset, length, deallocate=True)
        elif flags.trim:
            self._call(f"trim {offset}+{length}", lambda c, d: self._trim(c, d, offset, length), writing=True)

    @staticmethod
    def _trim(conn: _Conn, deadline: float, offset: int, length: int) -> None:
        h = conn.h
        if conn.flags.trim:
            conn.wait([h.aio_trim(min(MAX_ZERO_REQUEST, length - pos), offset + pos) for pos in range(0, length, MAX_ZERO_REQUEST)], deadline)

    def flush(self) -> None:
        def flush(conn: _Conn, deadline: float) -> None:
            if conn.flags.flush:
                conn.wait([conn.h.aio_flush()], deadline)

        self._call("flush", flush, writing=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- what the control plane reports -------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The export's flags, the connections allowed, and the counters."""
        return {"uri": self.uri, "flags": dict(self.flags.__dict__), "connections": self.connections, **self.stats.__dict__}
