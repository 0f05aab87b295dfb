"""The libvfio-user server object: one device on a Unix socket path, one client at a time.

It owns the context and its connection: listening, accept + VERSION and the DMA exchanges in
a worker thread (both block on the client), and feeding ``vfu_run_ctx`` only whole requests
that passed :func:`~vfio_user.libvfio.screen.screen`. What the context does with the device
is :class:`~vfio_user.libvfio.glue.ContextGlue`'s; the package's docstring has the whole picture.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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

from .. import dma_guard
from ..client_watch import (
    ACCEPT_RETRY,
    DEFAULT_DMA_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    PeerCredentials,
    StallTimer,
    client_timeout,
    peer_credentials,
)
from ..constants import (
    DEFAULT_MAX_DMA_MAPS,
    HEADER_SIZE,
    IO_FDS_HEADER_SIZE,
    IO_FD_RECORD_SIZE,
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
from ..device import Device, DeviceContext
from ..dma import DmaError, GuestMemory
from ..irq import IrqRouting, UnmaskCallback
from ..messages import HEADER
from ..resources import dma_map_budget
from ..server_api import ServerBackend
from ..unix import refuse_live_socket, remove_stale_socket
from .glue import ContextGlue
from .library import (
    LIB_MAX_MSG_SIZE,
    LIBVFIO_USER_FLAG_ATTACH_NB,
    LOG_WARNING,
    MSG_DONTWAIT,
    MSG_PEEK,
    PROT_READ,
    PROT_WRITE,
    SHUT_RDWR,
    VFU_DEV_TYPE_PCI,
    VFU_TRANS_SOCK,
    load_library,
)
from .screen import PEEK_ANCILLARY, PEEK_SIZE, command_name, fds_of, recv_closing_fds, screen

log = logging.getLogger(__name__)

#: Requests served per readable event before other fds get their turn.
RUN_BUDGET = 64
#: accept/attach failures that pass once fds or memory are free again
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_DISCONNECT_ERRNOS = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN}
_NOTHING = object()
_PARTIAL = object()
_SCREENED = object()


# -- guest memory ---------------------------------------------------------------------------


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
            m = self.server._glue.table.lookup(iova, 1) if self.server._glue.table is not None else None
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
        self._library = lib
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
        self._glue = ContextGlue(lib, device, lost_connection=self._lost_conn, irq_state=self._irq_state)
        self._vfu = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen_fd = -1
        self._conn_fd = -1
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

    @property
    def attached(self) -> bool:
        return self.client is not None and not self.client.closed.done()

    # -- set-up ---------------------------------------------------------------------------

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
            self._glue.setup(vfu, max_dma_maps=self.max_dma_maps, library_log_level=self.library_log_level)
            self._library.check(lib.vfu_realize_ctx(vfu), "vfu_realize_ctx")
        except BaseException:
            self._destroy()
            raise
        self.device.config.write_hooks.append(self._glue.config_hook)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="libvfio-user")
        self._listen_fd = lib.vfu_get_poll_fd(vfu)
        self._loop.add_reader(self._listen_fd, self._try_attach)
        log.info("libvfio-user (%s) listening on %s (mode %o)", self.library_path, self.path, self.mode)

    # -- what the glue hears from libvfio-user about the client -----------------------------

    def _irq_state(self, index: IrqIndex, start: int, count: int, mask: bool) -> None:
        try:
            if self.client is not None:
                self.client.irqs.state_changed(index, start, count, bool(mask))
        except Exception:
            log.exception("interrupt state change failed in the device")

    def _lost_conn(self) -> None:
        """libvfio-user reset the context for a lost connection (LOST_CONN, through the glue)."""
        self._lost_connection(self._drop_reason or "client disconnected")

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
        table = self._glue.attach_table(self.max_dma_maps)
        irqs = LibvfioIrqs(self, self.device.irq_counts, self.device.irq_unmasked)
        memory = GuestMemory(table, remote=_SglRemote(self))
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
        self._glue.worker_thread = threading.get_ident()
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
                self._glue.run_deferred()
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
        we consumed the message ourselves (see :func:`.screen.screen`), None when vfu_run_ctx should look
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
        fds = fds_of(ancillary)  # a peek installs copies of the message's fds: ours to close
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
                refusal = screen(command, flags, raw[HEADER_SIZE:], fds, unsealed_ok=self.dma_unsealed)
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
            while recv_closing_fds(sock, PEEK_SIZE):
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
                got = recv_closing_fds(sock, left)
                if not got:
                    return
                left -= got
            if refusal:
                log.warning("refused %s with %s before libvfio-user saw it", command_name(command), errno.errorcode.get(refusal, refusal))
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
            offered = self._glue.offered_ioeventfds.get(index, 0)
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
        if self._glue.table is not None:
            self._glue.table.remove_all()  # libvfio-user unregistered them already; belt and braces
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
            self._glue.run_deferred()
            self._destroy()
        else:
            self._vfu = None  # a call still inside the library: leak the context, do not race it
        if self.client is not None and not self.client.closed.done():
            self._lost_connection("server shutting down")
        if self._glue.config_hook in self.device.config.write_hooks:
            self.device.config.write_hooks.remove(self._glue.config_hook)
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
        if self._glue.table is not None:
            self._glue.table.remove_all()
