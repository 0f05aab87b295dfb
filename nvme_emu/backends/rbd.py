"""The RBD backend: a namespace on a Ceph RBD image (issue 27), ``rbd:POOL/IMAGE[,conf=PATH]
[,id=NAME][,timeout=SECONDS]``.

The client is librbd through its Python binding, Debian's ``python3-rbd`` (with
``python3-rados``; ``./dev`` links both into the venv). They are imported when an ``rbd:``
namespace is opened, so nvme-emu without them serves every other kind. ``conf`` is the
cluster's ``ceph.conf`` (default: librados' search, ``/etc/ceph/ceph.conf`` first), ``id`` the
cephx user without ``client.`` (default ``admin``), whose keyring the conf names.

Design: **asynchronous on the loop** (:class:`~.callback.CallbackBackend`). Each command is one
librbd aio call started on the loop thread; librbd calls its completion on one of its own
threads, which hands the result to the loop through the I/O pool's inbox
(:meth:`nvme_emu.aio.IoPool.start`); no worker thread, no thread hand-off per command. What
each command becomes:

- Read: ``aio_read`` into librbd's buffer (``bytes``), copied into the host's buffers on the
  loop thread only if no quiesce cancelled the command meanwhile;
- Write: ``aio_write`` of the host's bytes, copied out as it starts (the binding takes
  ``bytes``, not a memoryview: one copy, ~0.3 us per 4 KiB);
- FUA: the write, then ``aio_flush`` from its completion, before the CQE (librbd has no FUA;
  with the cache off the write alone is durable, and the flush costs a few microseconds);
- Flush: ``aio_flush``.

  librbd's cache (``rbd_cache``, on by default, writeback after the first flush) is turned
  off: with it, a write completes when it is in this process's memory, and a flush that
  fails (a timeout: the OSD paused) leaves no dirty data behind, so the *next* flush
  succeeds at once (measured: ``-ETIMEDOUT`` after 2.0 s, then ``0`` in 0.0 s) and so would a
  flush on the new connection after a reconnect, while the writes it should cover were lost
  with the old one. Off, a write completes once the OSD has it, as QEMU's ``cache=none``, and
  a completed Flush or FUA write never lies;
- Write Zeroes: ``aio_write_zeroes`` (zero flags 0: librbd discards whole objects and writes
  zeros into partial ones, so the range reads zeros, DEAC or not). Debian 12's binding (Ceph
  16.2.15) offers both ``write_zeroes`` and ``aio_write_zeroes``; the aio one keeps the loop
  free, as every other command;
- Deallocate: ``aio_discard``. DLFEAT promises nothing: librbd skips discards that do not
  cover its discard granularity (``rbd_discard_granularity_bytes``, 64 KiB), so a discarded
  extent may read its old data (measured: a 1 KiB discard inside written data read it back
  unchanged); whole objects discarded read zeros, which nothing in the command lets a host
  count on.

Identity: the cluster's fsid, the pool's id and the image's id: the same image has the same
NGUID, EUI-64 and UUID on every host and across restarts (all three are the cluster's, not
this host's); a renamed image or pool keeps them, and an image deleted and made again under
the same name is a new disk with new IDs, as a copied ``file:`` image is.

Failures: librados' ``rados_osd_op_timeout``, ``rados_mon_op_timeout`` and
``client_mount_timeout`` are set to ``timeout`` (default :data:`TIMEOUT_S`), so a dead
cluster fails a command (ETIMEDOUT) instead of leaving it in flight forever (librados' default
for OSD ops). A command that fails so, or on a connection error, completes with Namespace Not
Ready, DNR clear (:class:`~.errors.NotReadyError`), as an ``nbd:`` namespace's; the connection
is dropped (closed on a thread of its own once its last call completes), and the next command
connects again (a new rados connection, on a thread: commands arriving meanwhile wait for it
and then start, or fail with Namespace Not Ready if it fails). Other namespaces are not
affected: nothing here blocks the loop. Any other error is the command's
(:func:`~.errors.translate_os_error`). librados' timeouts do not bound librbd's own waits (the
image's exclusive lock), so every command also has a deadline, ``timeout`` + 2 s
(:class:`_Deadlines`), at which it completes with Namespace Not Ready whatever librbd does.
A new connection breaks the exclusive lock a dropped one of this backend still holds
(:meth:`RbdBackend._fence`): that blocklists the old client, so none of its writes lands
after the host was told they failed, and the new connection's writes need not wait for the
OSD's 30 s watch timeout (measured after an OSD restart: writes waited more than 30 s).

Measured (``./dev bench rbd_io``: the tests' cluster, one memstore OSD on 127.0.0.1, a 256 MiB
image written in full, 4 KiB random I/O, closed loop on the server's event loop, three runs of
3 rounds each, best round; this 2-CPU machine shared with other jobs, load average 5-6), IOPS
through this design (the namespace's Work started on the loop) and, for comparison, the same
calls blocking on the I/O pool's four workers (what a blocking backend does):

========  ===  =====================  ===================  ==================
I/O       QD   loop (this design)     pool (workers)       CPU us/IO loop/pool
========  ===  =====================  ===================  ==================
read      1    5,400-8,300            2,900-4,300          65-105 / 145-275
read      32   11,000-13,600          5,800-7,200          47-54 / 95-125
write     1    1,900-2,700            1,800-2,600          148-183 / 190-240
write     32   4,000-8,500            3,300-4,300          71-85 / 120-150
========  ===  =====================  ===================  ==================

At QD32 the loop design does 1.5-2.2x the IOPS of the pool at about half the CPU per I/O
(no thread hand-off; the pool's four workers cap what is in flight at 4); at QD1 a write is
the OSD's commit (~350 us p50), whichever thread waits for it. librbd's aio leaks nothing
(unlike Debian 12's libnbd, nbd.py): 20,000 4 KiB ``aio_read`` and as many ``aio_write``,
QD32, left the RSS at 90.7 MiB.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Any, Callable, Self

from .base import BackendKind, BackendSpec, StorageStats
from .callback import CallbackBackend, Complete
from .errors import BackendError, NotReadyError, ReadOnlyError, translate_os_error

log = logging.getLogger(__name__)

#: librados' timeouts (s): below Linux's 30 s I/O timeout, so a host sees a retryable error
#: rather than aborting the command and resetting the controller (as nbd.py's deadline).
TIMEOUT_S = 20
#: A command's deadline past ``timeout`` (:class:`_Deadlines`): librados' own timeout fires
#: first when it applies; 20 + 2 s stays below Linux's 30 s I/O timeout.
DEADLINE_GRACE_S = 2.0
#: The cephx user when ``id=`` is not given (librados' own default).
DEFAULT_ID = "admin"
#: Errnos that mean the cluster, not the command: the connection is dropped and the command
#: completes with Namespace Not Ready. ETIMEDOUT: an op past rados_osd_op_timeout;
#: ESHUTDOWN: this client was blocklisted (Ceph's EBLOCKLISTED); the others: the network.
CONNECTION_ERRNOS = frozenset({errno.ETIMEDOUT, errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET,
                               errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECANCELED})


def _bindings() -> tuple[Any, Any]:
    """The ``rados`` and ``rbd`` modules, or ValueError saying how to get them."""
    try:
        import rados
        import rbd
    except ImportError as e:
        raise ValueError(f"rbd: namespaces need Ceph's Python bindings (Debian's python3-rados and python3-rbd; "
                         f"./dev links them into the venv): {e}") from None
    return rados, rbd


def parse_path(path: str) -> tuple[str, str]:
    """``POOL/IMAGE`` -> (pool, image); ValueError for anything else."""
    pool, sep, image = path.partition("/")
    if not sep or not pool or not image or "/" in image or "@" in image:
        raise ValueError(f"{path!r} is not POOL/IMAGE")
    return pool, image


class _Conn:
    """One rados connection, the pool's I/O context and the image opened on it."""

    __slots__ = ("cluster", "ioctx", "image", "addrs", "in_flight", "dropped")

    def __init__(self, cluster: Any, ioctx: Any, image: Any) -> None:
        self.cluster = cluster
        self.ioctx = ioctx
        self.image = image
        #: this client's address: what the image's exclusive lock names as its owner
        self.addrs: str = cluster.get_addrs()
        #: its calls not completed (under the backend's lock)
        self.in_flight = 0
        #: no longer the backend's: closed once ``in_flight`` is 0
        self.dropped = False

    def close(self) -> None:
        """Close image, context and connection (blocks: the image flushes its cache)."""
        for step in (self.image.close, self.ioctx.close, self.cluster.shutdown):
            try:
                step()
            except Exception as e:  # a dead cluster: nothing more to do for it
                log.debug("rbd: closing a connection: %s", e)


class _Deadlines:
    """One thread per backend that completes a command past its deadline with Namespace Not
    Ready, whatever librbd is waiting for: librados' timeouts bound each OSD and monitor op,
    not librbd's own waits (measured: after an OSD restart, a write on a new connection waited
    more than 30 s for the image's exclusive lock, still held by the old connection, until the
    OSD's watch timeout). It costs a dict store and a pop per command: it sleeps one limit when
    nothing runs and until the earliest deadline otherwise, and every deadline is one limit
    after its command started, so it never needs waking for a new one (as nbd.py's watchdog)."""

    def __init__(self, limit: float, expired: Callable[[Complete, str], None]) -> None:
        self.limit = limit
        #: token -> (deadline, complete, what), for every command running
        self.running: dict[object, tuple[float, Complete, str]] = {}
        self._expired = expired
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nvme-rbd-deadlines", daemon=True)
        self._thread.start()

    def guard(self, what: str, complete: Complete) -> Complete:
        """``complete``, called once: by the command's completion or at its deadline."""
        token = object()
        running = self.running
        running[token] = (time.monotonic() + self.limit, complete, what)  # atomic under the GIL

        def once(result: Any, error: BaseException | None) -> None:
            if running.pop(token, None) is not None:  # else the deadline completed it
                complete(result, error)

        return once

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                nearest = now + self.limit
                late = []
                for token, entry in list(self.running.items()):
                    if entry[0] > now:
                        nearest = min(nearest, entry[0])
                    elif self.running.pop(token, None) is not None:
                        late.append(entry)
                if not late:
                    self._cond.wait(nearest - now)
                    continue
            for _deadline, complete, what in late:
                try:
                    self._expired(complete, what)
                except Exception:
                    log.exception("rbd: %s: completing it at its deadline failed", what)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


#: The identity seed of each image opened, by (conf, id, pool, image): :meth:`RbdBackend.
#: identity_seed` is asked right after :meth:`RbdBackend.from_spec` opened it, and answers
#: without a second connection.
_SEEDS: dict[tuple[str | None, str, str, str], str] = {}


class RbdBackend(CallbackBackend):
    """An RBD image through librbd's aio API (the module docstring)."""

    kind = BackendKind.RBD
    spec_path = True
    spec_keys = ("conf", "id", "timeout")
    #: Deallocate is a discard, which may leave data (the module docstring)
    deallocate_zeroes = False

    def __init__(self, pool: str, image: str, *, conf: str | None = None, client_id: str = DEFAULT_ID,
                 readonly: bool = False, timeout: int = TIMEOUT_S) -> None:
        self._rados, self._rbd = _bindings()
        self.pool, self.image_name, self.conf, self.client_id = pool, image, conf, client_id
        self.path = f"{pool}/{image}"
        self.readonly = readonly
        self.timeout = timeout
        self.stats = StorageStats()
        self._lock = threading.Lock()
        #: commands waiting for the connection being made: each gets it, or the error
        self._parked: list[Callable[[_Conn | None, BaseException | None], None]] = []
        self._connecting = False
        self._closed = False
        #: addresses of connections dropped: a new connection breaks their exclusive lock
        self._stale: set[str] = set()
        try:
            conn = self._open()
        except (self._rados.Error, self._rbd.Error) as e:
            raise ValueError(f"rbd: cannot open {self.path}: {e}") from None
        self.stats.connects = 1
        self._conn: _Conn | None = conn
        self.size = conn.image.size()
        self.fsid = conn.cluster.get_fsid()
        self.image_id = conn.image.id()
        self.pool_id = conn.cluster.pool_lookup(pool)
        _SEEDS[self._key(conf, client_id, pool, image)] = f"{self.kind}:{self.fsid}:{self.pool_id}:{self.image_id}"
        self._deadlines = _Deadlines(timeout + DEADLINE_GRACE_S, self._expired)

    @staticmethod
    def _key(conf: str | None, client_id: str, pool: str, image: str) -> tuple[str | None, str, str, str]:
        return conf, client_id, pool, image

    def _open(self) -> _Conn:
        """A new connection with the image open (blocks: at most about three timeouts)."""
        rados, rbd = self._rados, self._rbd
        cluster = rados.Rados(rados_id=self.client_id)
        try:
            cluster.conf_read_file(self.conf)
            for option in ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout"):
                cluster.conf_set(option, str(self.timeout))
            cluster.conf_set("rbd_cache", "false")  # writes complete on the OSD (the module docstring)
            cluster.connect(timeout=self.timeout)
            ioctx = cluster.open_ioctx(self.pool)
            try:
                image = rbd.Image(ioctx, self.image_name, read_only=self.readonly)
            except BaseException:
                ioctx.close()
                raise
        except BaseException:
            cluster.shutdown()
            raise
        return _Conn(cluster, ioctx, image)

    # -- the registry's view ----------------------------------------------------------------------

    @classmethod
    def check_spec(cls, spec: BackendSpec) -> None:
        if spec.size is not None:
            raise ValueError("an RBD namespace's size comes from the image")
        assert spec.path is not None
        parse_path(spec.path)
        timeout = spec.options.get("timeout", "1")
        if not timeout.isdigit() or int(timeout) <= 0:  # librados takes whole seconds
            raise ValueError("timeout must be a whole number of seconds, 1 or more")

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        assert spec.path is not None
        pool, image = parse_path(spec.path)
        o = spec.options
        return cls(pool, image, conf=o.get("conf"), client_id=o.get("id", DEFAULT_ID), readonly=spec.readonly,
                   timeout=int(o.get("timeout", TIMEOUT_S)))

    @classmethod
    def identity_seed(cls, spec: BackendSpec, controller_seed: str) -> str:
        """The cluster's fsid, the pool's id and the image's id (the module docstring)."""
        assert spec.path is not None
        pool, image = parse_path(spec.path)
        key = cls._key(spec.options.get("conf"), spec.options.get("id", DEFAULT_ID), pool, image)
        if key not in _SEEDS:  # not opened by this process yet: open it to ask
            cls.from_spec(spec).close()
        return _SEEDS[key]

    # -- starting a call --------------------------------------------------------------------------

    def _start(self, what: str, issue: Callable[[Any, Callable[[int, Any], None]], None], complete: Complete,
               *, writing: bool) -> None:
        """Start ``issue(image, done)`` on the connection (once there is one): ``done(ret, data)``
        comes on librbd's thread and becomes ``complete(result, error)``."""
        conn = self._conn
        if conn is None:
            self._park(what, issue, complete, writing=writing)
            return
        self._issue(conn, what, issue, complete, writing)

    def _issue(self, conn: _Conn, what: str, issue: Callable[[Any, Callable[[int, Any], None]], None], complete: Complete,
               writing: bool) -> None:
        with self._lock:
            conn.in_flight += 1
            self.stats.in_flight += 1

        def done(ret: int, data: Any) -> None:  # on librbd's thread
            try:
                self._ended(conn)
                if ret < 0:
                    complete(None, self._failed(conn, what, -ret, writing))
                else:
                    complete(data, None)
            except Exception:  # never into librbd's thread
                log.exception("rbd: %s: completion failed", what)

        try:
            issue(conn.image, done)
        except Exception as e:  # refused as it was started (the connection is shut down, ...)
            self._ended(conn)
            complete(None, self._failed(conn, what, getattr(e, "errno", None) or errno.EIO, writing))

    def _ended(self, conn: _Conn) -> None:
        with self._lock:
            conn.in_flight -= 1
            self.stats.in_flight -= 1
            close = conn.dropped and not conn.in_flight
        if close:
            self._close_later(conn)

    def _failed(self, conn: _Conn, what: str, err: int, writing: bool) -> BackendError:
        """The error a call's failure becomes; a connection error drops the connection."""
        if err in CONNECTION_ERRNOS:
            with self._lock:
                self.stats.transient_errors += 1
                if err == errno.ETIMEDOUT:
                    self.stats.timeouts += 1
            self._drop(conn, f"{what}: {errno.errorcode.get(err, err)}")
            return NotReadyError(f"{what}: rbd {self.path}: {errno.errorcode.get(err, err)}", err)
        with self._lock:
            self.stats.errors += 1
        return translate_os_error(OSError(err, os.strerror(err)), f"{what} rbd {self.path}", writing=writing)

    def _drop(self, conn: _Conn, why: str) -> None:
        """The connection failed: the next command connects again; it is closed when idle."""
        with self._lock:
            if conn.dropped:
                return
            conn.dropped = True
            self._stale.add(conn.addrs)
            if self._conn is conn:
                self._conn = None
            close = not conn.in_flight
        log.warning("rbd: %s: connection to %s dropped (%s); the next command connects again", self.path, self.path, why)
        if close:
            self._close_later(conn)

    @staticmethod
    def _close_later(conn: _Conn) -> None:
        """Close a dropped connection on a thread of its own: never on librbd's (the image's
        close waits for its threads) nor the loop's (it may wait for a timeout)."""
        threading.Thread(target=conn.close, name="nvme-rbd-close", daemon=True).start()

    def _park(self, what: str, issue: Callable[[Any, Callable[[int, Any], None]], None], complete: Complete, *,
              writing: bool) -> None:
        """No connection: wait for the one being made (start making it if nobody is)."""

        def resume(conn: _Conn | None, error: BaseException | None) -> None:
            if conn is None:
                complete(None, error)
            else:
                self._issue(conn, what, issue, complete, writing)

        with self._lock:
            if self._closed:
                error: BaseException | None = NotReadyError(f"{what}: rbd {self.path} is closed")
            else:
                error = None
                conn = self._conn
                if conn is None:
                    self._parked.append(resume)
                    if not self._connecting:
                        self._connecting = True
                        threading.Thread(target=self._reconnect, name="nvme-rbd-connect", daemon=True).start()
                    return
        if error is not None:
            complete(None, error)
        else:
            resume(conn, None)

    def _reconnect(self) -> None:
        """Make a new connection (its own thread), then start or fail the parked commands."""
        conn: _Conn | None = None
        error: BaseException | None = None
        try:
            conn = self._open()
            if conn.image.size() != self.size:
                raise NotReadyError(f"rbd {self.path} is now {conn.image.size()} bytes, was {self.size}")
            self._fence(conn)
        except Exception as e:
            if conn is not None:
                conn.close()
                conn = None
            error = e if isinstance(e, NotReadyError) else NotReadyError(f"rbd {self.path}: cannot connect: {e}")
        with self._lock:
            parked, self._parked = self._parked, []
            self._connecting = False
            late, closed = conn, self._closed
            if closed:
                error, conn = NotReadyError(f"rbd {self.path} is closed"), None
            if conn is not None:
                self._conn = conn
                self.stats.connects += 1
                self.stats.reconnects += 1
            else:
                self.stats.transient_errors += len(parked)
        if closed and late is not None:  # closed while it connected
            late.close()
        if conn is not None:
            log.info("rbd: connected to %s again", self.path)
        else:
            log.warning("rbd: %s: %s", self.path, error)
        for resume in parked:
            resume(conn, error)

    def _fence(self, conn: _Conn) -> None:
        """Break the image's exclusive lock where a connection this backend dropped still holds
        it: the new one's writes need the lock, which the old one (its OSD restarted, its
        release failed) would otherwise keep until the OSD's watch timeout (30 s). Breaking it
        blocklists the old client, so none of its writes can land later (measured: 17 ms; the
        old client's next write fails with ESHUTDOWN). Needs the ``osd blocklist`` monitor cap
        (``profile rbd`` has it); without it, logged, and the lock waits for the timeout."""
        with self._lock:
            stale, self._stale = self._stale, set()
        if not stale or self.readonly:
            return
        try:
            for owner in conn.image.lock_get_owners():
                if owner["owner"] in stale:
                    conn.image.lock_break(owner["mode"], owner["owner"])
                    log.info("rbd: %s: broke the exclusive lock of the dropped connection %s", self.path, owner["owner"])
        except Exception as e:
            log.warning("rbd: %s: could not break the dropped connection's lock (%s); writes wait for it", self.path, e)

    def _expired(self, complete: Complete, what: str) -> None:
        """A command reached its deadline (:class:`_Deadlines`): Namespace Not Ready, and the
        connection goes."""
        with self._lock:
            self.stats.transient_errors += 1
            self.stats.timeouts += 1
            conn = self._conn
        why = f"no answer in {self._deadlines.limit:g} s"
        if conn is not None:
            self._drop(conn, f"{what}: {why}")
        complete(None, NotReadyError(f"{what}: rbd {self.path}: {why}", errno.ETIMEDOUT))

    # -- the operations (CallbackBackend) ---------------------------------------------------------

    def start_read(self, offset: int, length: int, complete: Complete) -> None:
        complete = self._deadlines.guard(what := f"read {offset}+{length}", complete)
        self._start(what,
                    lambda image, done: image.aio_read(offset, length, lambda c, data: done(c.get_return_value(), data)),
                    complete, writing=False)

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"rbd {self.path} is read-only")

    def start_write(self, offset: int, data: bytes, fua: bool, complete: Complete) -> None:
        self._check_writable()
        complete = self._deadlines.guard(what := f"write {offset}+{len(data)}", complete)
        if fua:  # the write, then a flush from its completion, before the CQE
            complete = self._then_flush(complete)
        self._start(what,
                    lambda image, done: image.aio_write(data, offset, lambda c: done(c.get_return_value(), None)),
                    complete, writing=True)

    def _then_flush(self, complete: Complete) -> Complete:
        def written(result: Any, error: BaseException | None) -> None:
            if error is not None:
                complete(None, error)
            else:
                self.start_flush(complete)

        return written

    def start_write_zeroes(self, offset: int, length: int, deallocate: bool, fua: bool, complete: Complete) -> None:
        self._check_writable()
        complete = self._deadlines.guard(what := f"write zeroes {offset}+{length}", complete)
        if fua:
            complete = self._then_flush(complete)
        self._start(what,
                    lambda image, done: image.aio_write_zeroes(offset, length, lambda c: done(c.get_return_value(), None)),
                    complete, writing=True)

    def start_deallocate(self, offset: int, length: int, complete: Complete) -> None:
        self._check_writable()
        complete = self._deadlines.guard(what := f"discard {offset}+{length}", complete)
        self._start(what,
                    lambda image, done: image.aio_discard(offset, length, lambda c: done(c.get_return_value(), None)),
                    complete, writing=True)

    def start_flush(self, complete: Complete) -> None:
        complete = self._deadlines.guard("flush", complete)
        self._start("flush", lambda image, done: image.aio_flush(lambda c: done(c.get_return_value(), None)),
                    complete, writing=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        self._deadlines.close()
        if conn is not None:
            conn.close()

    # -- what the control plane reports -------------------------------------------------------------

    def storage_stats(self) -> dict[str, Any]:
        """The image, its cluster, whether a connection is up, and the counters."""
        return {"pool": self.pool, "image": self.image_name, "fsid": self.fsid, "image_id": self.image_id,
                "connected": self._conn is not None, "timeout_s": self.timeout, **self.stats.__dict__}
