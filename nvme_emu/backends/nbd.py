"""The NBD backend: a namespace on an export of a Network Block Device server (issue 27).

Two ways to the server, both libnbd, neither opened by nvme_emu itself (a connection is the
backend's way to its storage, not an NVMe transport):

- **Plain I/O on the loop** (Read, Write, Write Zeroes, Deallocate, and the FUA and Flush they
  need): this is a :class:`~.callback.CallbackBackend`, and its ``start_*`` methods put each
  command on one connection the event loop drives (:mod:`.nbd_link`: libnbd's C aio API through
  cffi, requests pipelined, no thread per command). On a quiet machine against nbdkit's memory
  plugin that does 2.2-2.4x the IOPS of the blocking design below at 0.4-0.45x of its CPU per
  I/O (bench/README.md, "nbd_io"). The bytes travel in the link's own buffers (a read is copied
  into guest memory on the loop thread, only for a command no quiesce cancelled).
- **Blocking calls on the I/O pool** for everything else (Compare, Verify, Copy, namespaces
  with metadata or zones, Format, and any caller off a loop): libnbd's Python binding, Debian's
  ``python3-libnbd`` (``./dev`` links its two files into the venv, whose Python shares the ABI
  tag: README, "Namespaces on NBD"; imported when an ``nbd:`` namespace opens, so nvme-emu
  without it serves every other kind). Each call takes a connection from a small pool, one per
  worker (:data:`CONNECTIONS`) when the server offers multi-conn, else one the workers take in
  turn, under a watchdog thread that shuts down the socket of a call past
  :data:`COMMAND_TIMEOUT_S`. Its synchronous ``pread``/``pwrite`` leak nothing; its aio does
  (``aio_pread`` leaks every buffer in libnbd 1.14.2: +80 MiB per 20,000 reads), which is why
  the loop's connection goes through the C API instead.

An NVM Flush (run by a worker) flushes both: with multi-conn either flush covers every
connection's acknowledged writes; without it each covers its own.

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
five times, then an I/O error), CRDT1 apart where it enabled Advanced Command Retry (CRD =
1). The broken connection is closed, and the next command connects again; a blocking
connection that sat idle while its server restarted is replaced on its first use. An error the server answers a command with is the command's, as a file's
errno is (:func:`~nvme_emu.backends.errors.translate_os_error`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import socket
import threading
import time
import urllib.parse
import asyncio
from functools import partial
from typing import Any, Callable, Self, TypeVar

from .base import BackendKind, BackendSpec, StorageStats
from .callback import CallbackBackend, Complete, all_of
from .errors import NotReadyError, ReadOnlyError, translate_os_error
from .iov import ZERO_CHUNK, ZEROS, Buffers, byte_views, is_byte_view
from .libnbd_ffi import ffi
from .nbd_link import CmdFlag, ExportFlags, NbdLink, Op, State as LinkState, buffer

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


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """This thread runs ``loop`` now."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


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


#: What an export said of itself in the handshake; read once per connection (a restarted
#: server may say something else).
NbdFlags = ExportFlags


def flags_of(h: Any) -> NbdFlags:
    """The flags of a connected handle of the Python binding."""
    return NbdFlags(size=h.get_size(), read_only=bool(h.is_read_only()), flush=bool(h.can_flush()), fua=bool(h.can_fua()),
                    trim=bool(h.can_trim()), zero=bool(h.can_zero()), multi_conn=bool(h.can_multi_conn()))


class _Timeout(Exception):
    """A call passed its deadline; its connection must go."""


class _Conn:
    """One libnbd handle, the flags its export gave it, and a duplicate of its socket for the
    watchdog: shutting that down ends a call blocked in the handle (whose lock the call holds)."""

    __slots__ = ("h", "flags", "sock", "deadline", "expired")

    def __init__(self, h: Any, flags: NbdFlags) -> None:
        self.h = h
        self.flags = flags
        self.sock: socket.socket | None = None
        #: when the call running on it must have ended (0: no call)
        self.deadline = 0.0
        #: the watchdog shut it down: the call's failure is a timeout, the connection must go
        self.expired = False

    def usable(self) -> bool:
        """Connected, handshake done, no failure on the wire."""
        h = self.h
        return not self.expired and bool(h.aio_is_ready() or h.aio_is_processing())

    def cut(self) -> None:
        """The watchdog's: end the call blocked on this connection (it sees EOF)."""
        self.expired = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the handle now; the binding only closes in ``__del__``, which a traceback
        may postpone."""
        h, self.h = self.h, None
        if h is not None and hasattr(h, "_o"):
            h.__del__()
            del h._o
        if self.sock is not None:
            self.sock.close()
            self.sock = None


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
        conn.flags = flags_of(h)
        conn.sock = socket.socket(fileno=os.dup(h.aio_get_fd()))
    except BaseException:
        conn.close()
        raise
    return conn


# -- the backend ----------------------------------------------------------------------------------


class _Watchdog:
    """One thread per backend that ends calls past their deadline (:meth:`_Conn.cut`).

    It costs nothing per call but a dict store and delete: it sleeps one timeout when no call
    is running and until the earliest deadline otherwise, and a call's deadline is always at
    least one timeout after it started, so it is never woken to learn of a new call and still
    cuts each one at its deadline."""

    def __init__(self, timeout: float, on_cut: Callable[[], None]) -> None:
        self.timeout = timeout
        self.running: dict[_Conn, None] = {}
        self._on_cut = on_cut
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nvme-nbd-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                nearest = now + self.timeout
                for conn in list(self.running):
                    if conn.deadline <= now:
                        del self.running[conn]
                        conn.cut()
                        self._on_cut()
                    else:
                        nearest = min(nearest, conn.deadline)
                self._cond.wait(nearest - now)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


class NbdBackend(CallbackBackend):
    """An NBD export: plain I/O on a connection the event loop drives, everything else through
    a few blocking libnbd connections (the module docstring)."""

    kind = BackendKind.NBD
    spec_path = True
    blocking = True

    def __init__(self, uri: str, *, readonly: bool = False, timeout: float = COMMAND_TIMEOUT_S) -> None:
        self.path = self.uri = normalise_uri(uri)
        self.timeout = timeout
        self.stats = StorageStats()
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
        self._watchdog = _Watchdog(timeout, self._count_timeout)
        #: the connection the loop drives (:meth:`_loop_link`), made on first use on a loop
        self._link: NbdLink | None = None

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

    def _call(self, what: str, op: Callable[[_Conn], T], *, writing: bool) -> T:
        """Run ``op(conn)`` on a pooled connection (a new one when none is idle), under the
        watchdog; failures become the command's status (the module docstring).

        A connection that sat idle may have died unnoticed (the server restarted while the
        loop's connection carried the I/O): if one fails on its first use, the call runs
        again, once, on a new connection (every NBD command may be repeated)."""
        self._slots.acquire()  # held by at most :attr:`connections` calls, each bounded by its deadline
        try:
            deadline = time.monotonic() + self.timeout
            with self._lock:
                if self._closed:
                    raise NotReadyError(f"{what}: {self.uri} is closed")
                conn = self._idle.pop() if self._idle else None
                self.stats.in_flight += 1
            try:
                while True:
                    stale_ok = conn is not None  # an idle one: it may have died meanwhile
                    if conn is None:
                        conn = self._reconnect(what, deadline)
                    watched = self._watchdog.running
                    conn.deadline = deadline
                    watched[conn] = None  # a dict store: atomic under the GIL
                    try:
                        result = op(conn)
                    except self._error_type as e:
                        if not conn.usable():
                            if stale_ok and not conn.expired:
                                log.info("nbd: %s: an idle connection to %s had died (%s); once more on a new one", what, self.uri, e)
                                self._drop_idle(conn)
                                conn = None
                                continue
                            self._lost(conn, what, f"no answer in {self.timeout:g} s" if conn.expired else str(e))
                            raise NotReadyError(f"{what}: {self.uri}: {e}") from None
                        self._give_back(conn)
                        with self._lock:
                            self.stats.errors += 1
                        err: Any = e
                        raise translate_os_error(OSError(err.errnum or errno.EIO, err.string), f"{what} {self.uri}", writing=writing) from None
                    finally:
                        if conn is not None:
                            watched.pop(conn, None)
                    if conn.expired:  # answered, but the watchdog cut it meanwhile
                        self._lost(conn, what, "cut at its deadline")
                    else:
                        self._give_back(conn)
                    return result
            finally:
                with self._lock:
                    self.stats.in_flight -= 1
        finally:
            self._slots.release()

    def _count_timeout(self) -> None:
        with self._lock:
            self.stats.timeouts += 1

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

    def _drop_idle(self, conn: _Conn) -> None:
        """``conn`` and the other idle connections go: opened to the same server, which
        most likely restarted since (each would fail one more call)."""
        watched = self._watchdog.running
        watched.pop(conn, None)
        with self._lock:
            idle, self._idle = self._idle, []
        for c in (conn, *idle):
            c.close()

    def _lost(self, conn: _Conn, what: str, why: str) -> None:
        """One connection failed: it goes, and so do the idle ones. They were opened to the
        same server, which most likely went away with it (killed, restarted, the network
        down): each would fail one more command, even after the server is back."""
        log.warning("nbd: %s: connection to %s lost (%s); the next command connects again", what, self.uri, why)
        with self._lock:
            self.stats.transient_errors += 1
        self._drop_idle(conn)

    def _give_back(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    # -- data -------------------------------------------------------------------------------------

    def read_into(self, offset: int, views: Buffers) -> None:
        if len(views) == 1 and is_byte_view(v := views[0]):
            flat = [v]
            total = v.nbytes
        else:
            flat = byte_views(views)
            total = sum(len(v) for v in flat)
        data = self._call(f"read {offset}+{total}", lambda c: self._pread(c, total, offset), writing=False)
        if len(flat) == 1:
            flat[0][:] = data
            return
        pos = 0
        src = memoryview(data)
        for v in flat:  # one NBD read, scattered: one command, not one per page
            v[:] = src[pos : pos + len(v)]
            pos += len(v)

    @staticmethod
    def _pread(conn: _Conn, total: int, offset: int) -> bytes:
        h = conn.h
        if total <= MAX_REQUEST:
            return bytes(h.pread(total, offset))
        return b"".join(h.pread(min(MAX_REQUEST, total - pos), offset + pos) for pos in range(0, total, MAX_REQUEST))

    def write_from(self, offset: int, views: Buffers, *, fua: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.uri} is read-only")
        if len(views) == 1 and is_byte_view(views[0]):
            data = views[0]
        else:
            data = memoryview(b"".join(byte_views(views)))  # one NBD write (one copy), not one per page
        self._call(f"write {offset}+{len(data)}", lambda c: self._pwrite(c, data, offset, fua), writing=True)

    @staticmethod
    def _pwrite(conn: _Conn, data: memoryview, offset: int, fua: bool) -> None:
        nbd = _libnbd()
        h, flags = conn.h, conn.flags
        flag = nbd.CMD_FLAG_FUA if fua and flags.fua else 0
        for pos in range(0, len(data), MAX_REQUEST):
            h.pwrite(data[pos : pos + MAX_REQUEST], offset + pos, flag)
        if fua and not flags.fua and flags.flush:
            h.flush()

    def write_zeroes(self, offset: int, length: int, *, deallocate: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.uri} is read-only")
        self._call(f"zero {offset}+{length}", lambda c: self._zero(c, offset, length, may_trim=deallocate), writing=True)

    @staticmethod
    def _zero(conn: _Conn, offset: int, length: int, *, may_trim: bool) -> None:
        nbd = _libnbd()
        h = conn.h
        if conn.flags.zero:
            flag = 0 if may_trim else nbd.CMD_FLAG_NO_HOLE
            for pos in range(0, length, MAX_ZERO_REQUEST):
                h.zero(min(MAX_ZERO_REQUEST, length - pos), offset + pos, flag)
            return
        zeros = memoryview(ZEROS)
        for pos in range(0, length, ZERO_CHUNK):
            h.pwrite(zeros[: min(ZERO_CHUNK, length - pos)], offset + pos)

    def deallocate(self, offset: int, length: int) -> None:
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.uri} is read-only")
        flags = self.flags
        if flags.zero:
            self.write_zeroes(offset, length, deallocate=True)
        elif flags.trim:
            self._call(f"trim {offset}+{length}", lambda c: self._trim(c, offset, length), writing=True)

    @staticmethod
    def _trim(conn: _Conn, offset: int, length: int) -> None:
        if conn.flags.trim:
            for pos in range(0, length, MAX_ZERO_REQUEST):
                conn.h.trim(min(MAX_ZERO_REQUEST, length - pos), offset + pos)

    def flush(self) -> None:
        """Flush every connection that may hold acknowledged writes: a blocking one, and the
        loop's (from a worker thread, handed to the loop and waited for; the NVM Flush command
        comes here). With multi-conn either flush covers both; without it, each covers its own."""
        def flush(conn: _Conn) -> None:
            if conn.flags.flush:
                conn.h.flush()

        self._call("flush", flush, writing=True)
        link = self._link
        if link is not None and link.state is LinkState.READY and not _on_loop(link.loop) and not link.loop.is_closed():
            done = concurrent.futures.Future[None]()

            def start() -> None:
                self.start_flush(lambda _r, err: done.set_exception(err) if err else done.set_result(None))

            link.loop.call_soon_threadsafe(start)
            done.result(self.timeout + 5)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        self._watchdog.close()
        link, self._link = self._link, None
        if link is None:
            return
        if _on_loop(link.loop) or link.loop.is_closed() or not link.loop.is_running():
            link.close()
        else:  # the link is the loop's: closed there
            link.loop.call_soon_threadsafe(link.close)

    # -- on the loop: plain I/O as callbacks (CallbackBackend) ---------------------------------------

    def _loop_link(self) -> NbdLink | None:
        """The connection the running loop drives; None off a loop (the caller then blocks)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        link = self._link
        if link is None or link.loop is not loop:  # first use, or the controller moved to another loop
            if link is not None:
                link.close()
            link = self._link = NbdLink(self.uri, loop, timeout=self.timeout, on_ready=self._link_ready, lost=NotReadyError)
        return link

    def _link_ready(self, flags: ExportFlags) -> str | None:
        """A handshake on the loop's connection: refuse an export that changed size."""
        if flags.size != self.size:
            return f"the export is now {flags.size} bytes, was {self.size}"
        with self._lock:
            self.stats.connects += 1
            if self._link is not None and self._link.connects:
                self.stats.reconnects += 1
        return None

    def _submit(self, op: Op, offset: int, length: int, buf: Any, complete: Complete, flags: int = 0) -> bool:
        """One command on the loop's connection; False off a loop (nothing done). Errors are
        counted and made statuses here: a lost connection's are Namespace Not Ready already.
        The counters are shared with the workers' blocking calls, hence the (uncontended) lock."""
        link = self._loop_link()
        if link is None:
            return False
        stats, lock = self.stats, self._lock
        with lock:
            stats.in_flight += 1

        def completed(err: BaseException | None) -> None:
            with lock:
                stats.in_flight -= 1
                if err is not None:
                    if isinstance(err, NotReadyError):
                        stats.transient_errors += 1
                    else:
                        stats.errors += 1
            if err is None or isinstance(err, NotReadyError):
                complete(None, err)
                return
            complete(None, translate_os_error(err if isinstance(err, OSError) else OSError(errno.EIO, str(err)),
                                              f"{op.value} {self.uri}", writing=op is not Op.READ))

        link.submit(op, offset, length, buf, completed, flags)
        return True

    @staticmethod
    def _blocking(call: Callable[[], Any], complete: Complete) -> None:
        """Off a loop (a test, a tool, a namespace's set-up): the blocking form, completed here."""
        try:
            result = call()
        except BaseException as e:
            complete(None, e)
            return
        complete(result, None)

    def _pieces(self, offset: int, length: int, limit: int, start: Callable[[int, int, Complete], None], complete: Complete) -> None:
        """A range longer than one NBD request allows, in pieces at once (``all_of``)."""
        if length <= limit:
            start(offset, length, complete)
            return
        all_of([partial(start, offset + pos, min(limit, length - pos)) for pos in range(0, length, limit)], complete)

    def start_read(self, offset: int, length: int, complete: Complete) -> None:
        """Into a buffer of the link's own; the namespace copies it into the host's buffers on
        the loop thread (callback_work.read), only for a command no quiesce cancelled."""
        buf = buffer(length)
        whole = ffi.buffer(buf, length)

        def piece(off: int, n: int, done: Complete) -> None:
            self._submit(Op.READ, off, n, buf + (off - offset), done)

        if self._loop_link() is None:
            self._blocking(lambda: self._read_bytes(offset, length), complete)
            return
        self._pieces(offset, length, MAX_REQUEST, piece, lambda _r, err: complete(None if err else whole, err))

    def _read_bytes(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.read_into(offset, [memoryview(out)])
        return bytes(out)

    def start_write(self, offset: int, data: bytes, fua: bool, complete: Complete) -> None:
        """``data`` as it is (libnbd reads the bytes object's own memory; the closure keeps it
        alive until the command completes); FUA as the export allows, else the write then a
        flush."""
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.uri} is read-only")
        link = self._loop_link()
        if link is None:
            self._blocking(lambda: self.write_from(offset, [memoryview(data)], fua=fua), complete)
            return
        ptr = ffi.from_buffer(data)
        flags = link.flags or self.flags
        native_fua = fua and flags.fua

        def piece(off: int, n: int, done: Complete) -> None:
            self._submit(Op.WRITE, off, n, ptr + (off - offset), done, CmdFlag.FUA if native_fua else 0)

        self._pieces(offset, len(data), MAX_REQUEST, piece, self._then_flush(fua and not native_fua, complete, keep=data))

    def _then_flush(self, flush: bool, complete: Complete, keep: Any = None) -> Complete:
        """``complete``, after a Flush when ``flush`` (FUA emulated). ``keep``: what libnbd
        reads from until the write completes (held by this closure until then)."""

        def finished(_r: Any, err: BaseException | None, _keep: Any = keep) -> None:
            if err is not None or not flush:
                complete(None, err)
            else:
                self.start_flush(complete)

        return finished

    def start_write_zeroes(self, offset: int, length: int, deallocate: bool, fua: bool, complete: Complete) -> None:
        """NBD_CMD_WRITE_ZEROES (NO_HOLE unless DEAC) where the export offers it, else writes
        of zeros; FUA as for a write."""
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.uri} is read-only")
        link = self._loop_link()
        if link is None:
            self._blocking(lambda: self._zero_blocking(offset, length, deallocate, fua), complete)
            return
        flags = link.flags or self.flags
        native_fua = fua and flags.fua
        if flags.zero:
            zflags = (0 if deallocate else CmdFlag.NO_HOLE) | (CmdFlag.FUA if native_fua else 0)

            def piece(off: int, n: int, done: Complete) -> None:
                self._submit(Op.ZERO, off, n, None, done, zflags)

            self._pieces(offset, length, MAX_ZERO_REQUEST, piece, self._then_flush(fua and not native_fua, complete))
            return
        zeros = ffi.from_buffer(ZEROS)

        def written(off: int, n: int, done: Complete) -> None:
            self._submit(Op.WRITE, off, n, zeros, done, CmdFlag.FUA if native_fua else 0)

        self._pieces(offset, length, ZERO_CHUNK, written, self._then_flush(fua and not native_fua, complete))

    def _zero_blocking(self, offset: int, length: int, deallocate: bool, fua: bool) -> None:
        self.write_zeroes(offset, length, deallocate=deallocate)
        if fua:
            self.flush()

    def start_deallocate(self, offset: int, length: int, complete: Complete) -> None:
        """Write Zeroes without NO_HOLE where the export zeroes (DLFEAT: reads zeros), else
        NBD_CMD_TRIM where it trims, else nothing (the blocks keep their data, as DLFEAT says)."""
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.uri} is read-only")
        link = self._loop_link()
        if link is None:
            self._blocking(lambda: self.deallocate(offset, length), complete)
            return
        flags = self.flags  # what DLFEAT promised when the namespace opened
        if flags.zero:
            self.start_write_zeroes(offset, length, True, False, complete)
        elif flags.trim:
            def trim(off: int, n: int, done: Complete) -> None:
                self._submit(Op.TRIM, off, n, None, done)

            self._pieces(offset, length, MAX_ZERO_REQUEST, trim, lambda _r, err: complete(None, err))
        else:
            complete(None, None)

    def start_flush(self, complete: Complete) -> None:
        link = self._loop_link()
        if link is None:
            self._blocking(self.flush, complete)
        elif (link.flags or self.flags).flush:
            self._submit(Op.FLUSH, 0, 0, None, complete)
        else:
            complete(None, None)  # the server has nothing volatile to flush

    # -- what the control plane reports -------------------------------------------------------------

    def storage_stats(self) -> dict[str, Any]:
        """The export's URI and flags, the connections allowed, the loop's connection's state,
        and the counters (``in_flight``: blocking calls and the loop's commands)."""
        link = self._link
        return {"uri": self.uri, "flags": dict(self.flags.__dict__), "connections": self.connections,
                "loop_connection": link.state.value if link is not None else None, **self.stats.__dict__}
