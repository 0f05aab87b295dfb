"""One NBD connection driven by the event loop: libnbd's aio API on the loop's fd, no thread.

Why (bench/nbd_io.py, nbdkit's memory plugin on a Unix socket, 4 KiB, this 2-CPU machine,
while other work ran): against the blocking calls on the I/O pool, this link does 1.4x the
reads and 2.1x the writes at QD1 (28.4k vs 20.1k, 19.5k vs 9.3k IOPS) and 2.3x / 2.2x at QD16
(49.9k vs 21.9k, 52.8k vs 24.0k), at 17-26 us of server CPU per I/O instead of 34-78: the
pool's thread hand-off cost as much as the NBD round trip itself. libnbd is called through
cffi (:mod:`.libnbd_ffi`): 4.8 million aio reads left the process's RSS flat, where Debian 12's
Python binding leaks every aio read's buffer.

Buffers: a command's bytes travel in a buffer of the link's own (a read is copied into guest
memory when it completes, a write's data is copied out of guest memory when it starts), never
in guest memory itself. libnbd fills and drains buffers inside whichever later call on its
handle makes progress, so a command the device has given up on (a DMA unmap, a reset, Bus
Master Enable cleared: :meth:`nvme_emu.aio.IoPool.quiesce`) could still be written to; with
its own buffer it harmlessly is. The two copies cost ~0.3 us per 4 KiB, against ~20 us for
the round trip.

Lifetime and failures: the link connects asynchronously (``aio_connect_uri``) when first
used; commands submitted meanwhile wait for the handshake. A connection that fails (refused,
reset, the server killed: ``aio_notify_*`` fails or the handle dies) or a command older than
the timeout ends the connection: every command on it completes with
:class:`~nvme_emu.backends.nbd.NotReadyError`'s kind of failure (the ``lost`` callback the
owner gives), the handle is closed (so none of their buffers is touched again), and the next
command connects anew. Everything here runs on the loop thread.
"""

from __future__ import annotations

import enum
import errno
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import asyncio

from .libnbd_ffi import NO_COMPLETION, CmdFlag, Direction, ffi, last_error, lib

log = logging.getLogger(__name__)

#: ``complete(error)``: None when the command succeeded, else why not (an OSError with the
#: server's errno, or what ``lost`` made of a lost connection).
Complete = Callable[[BaseException | None], None]

#: Buffers are not cleared on allocation: every byte is written (by a read's reply, or the
#: write's data) before it is used. Clearing 128 KiB costs ~5 us.
_alloc = ffi.new_allocator(should_clear_after_alloc=False)


#: Direction's bits as plain ints: an IntFlag ``&`` costs ~1 us, four times per command.
_READ, _WRITE = int(Direction.READ), int(Direction.WRITE)


def buffer(size: int) -> Any:
    """A command buffer of ``size`` bytes (cffi ``char[]``, freed with its last reference)."""
    return _alloc("char[]", size)


class Op(enum.Enum):
    """The NBD commands the link issues."""

    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    TRIM = "trim"
    ZERO = "zero"


class State(enum.Enum):
    IDLE = "idle"  # no connection (never made, or lost): the next command connects
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True)
class ExportFlags:
    """What the export said of itself in the handshake (NBD transmission flags)."""

    size: int
    read_only: bool
    flush: bool
    fua: bool
    trim: bool
    zero: bool
    multi_conn: bool


class _Command:
    """One NBD command in flight (slots: made per I/O)."""

    __slots__ = ("op", "offset", "length", "buf", "flags", "complete", "started")

    def __init__(self, op: Op, offset: int, length: int, buf: Any, flags: int, complete: Complete) -> None:
        self.op = op
        self.offset = offset
        self.length = length
        self.buf = buf
        self.flags = flags
        self.complete = complete
        self.started = time.monotonic()


class NbdLink:
    """One libnbd handle on the loop (the module docstring).

    ``on_ready(flags)`` runs after each handshake (the owner checks the size did not change:
    returning a string refuses the connection, why); ``lost(why)`` makes the error the commands
    of a lost connection complete with.
    """

    def __init__(self, uri: str, loop: asyncio.AbstractEventLoop, *, timeout: float,
                 on_ready: Callable[[ExportFlags], str | None], lost: Callable[[str], BaseException]) -> None:
        self.uri = uri
        self.loop = loop
        self.timeout = timeout
        self._on_ready = on_ready
        self._lost = lost
        self._lib = lib()
        self.state = State.IDLE
        self.flags: ExportFlags | None = None
        self._h: Any = None
        self._fd = -1
        self._reading = self._writing = False
        self._reap_soon = False
        self._queued: list[_Command] = []  # waiting for the handshake
        self._running: dict[int, _Command] = {}  # cookie -> command
        self._watchdog: asyncio.TimerHandle | None = None
        self.connects = 0

    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._queued)

    # -- commands ----------------------------------------------------------------------------------

    def submit(self, op: Op, offset: int, length: int, buf: Any, complete: Complete, flags: int = 0) -> None:
        """Issue one NBD command; ``complete(error)`` later, on the loop thread (never before
        this returns). ``buf``: a :func:`buffer` for READ (filled) and WRITE (sent)."""
        cmd = _Command(op, offset, length, buf, flags, complete)
        if self.state is State.CLOSED:
            self._fail([cmd], "closed")
            return
        if self.state is not State.READY:
            self._queued.append(cmd)
            if self.state is State.IDLE:
                self._connect()
            self._arm_watchdog()
            return
        self._issue(cmd)
        self._after_kick()
        self._arm_watchdog()

    def _issue(self, cmd: _Command) -> None:
        L, h = self._lib, self._h
        op = cmd.op
        if h is None:  # lost while the handshake's queue was being issued
            self._fail([cmd], "connection lost")
            return
        if op is Op.READ:
            cookie = L.nbd_aio_pread(h, cmd.buf, cmd.length, cmd.offset, NO_COMPLETION, 0)
        elif op is Op.WRITE:
            cookie = L.nbd_aio_pwrite(h, cmd.buf, cmd.length, cmd.offset, NO_COMPLETION, cmd.flags)
        elif op is Op.FLUSH:
            cookie = L.nbd_aio_flush(h, NO_COMPLETION, 0)
        elif op is Op.TRIM:
            cookie = L.nbd_aio_trim(h, cmd.length, cmd.offset, NO_COMPLETION, 0)
        else:
            cookie = L.nbd_aio_zero(h, cmd.length, cmd.offset, NO_COMPLETION, cmd.flags)
        if cookie < 0:  # refused before it reached the wire: the handle is dead, or the call is bad
            err = last_error()
            if L.nbd_aio_is_dead(h) or L.nbd_aio_is_closed(h):
                self._fail([cmd], str(err))
                self._drop(str(err))
            else:
                self.loop.call_soon(cmd.complete, err)
            return
        self._running[cookie] = cmd

    def _after_kick(self) -> None:
        """An aio call runs libnbd's state machine as far as it goes without blocking: it may
        have found the connection dead (a write to a killed server: EPIPE), or read replies
        that no fd event will announce again. Both are seen to here, the replies on the next
        loop turn (a command never completes inside :meth:`submit`)."""
        h = self._h
        if h is None:
            return
        if self._lib.nbd_aio_peek_command_completed(h) > 0:
            if not self._reap_soon:
                self._reap_soon = True
                self.loop.call_soon(self._progress)
        else:
            self._want_write()

    # -- the handle's fd ---------------------------------------------------------------------------

    def _connect(self) -> None:
        L = self._lib
        h = L.nbd_create()
        if h == ffi.NULL:
            self._fail_all(f"nbd_create: {last_error()}")
            return
        L.nbd_set_handle_name(h, b"nvme-emu")
        if L.nbd_aio_connect_uri(h, self.uri.encode()) < 0:
            err = last_error()
            L.nbd_close(h)
            self._fail_all(f"connect: {err}")
            return
        self._h = h
        self.state = State.CONNECTING
        self._fd = L.nbd_aio_get_fd(h)
        self._want_write()

    def _readable(self) -> None:
        if self._h is not None and self._lib.nbd_aio_notify_read(self._h) < 0:
            self._drop(f"read: {last_error()}")
            return
        self._progress()

    def _writable(self) -> None:
        if self._h is not None and self._lib.nbd_aio_notify_write(self._h) < 0:
            self._drop(f"write: {last_error()}")
            return
        self._progress()

    def _progress(self) -> None:
        self._reap_soon = False
        L, h = self._lib, self._h
        if h is None:
            return
        if self.state is State.CONNECTING:
            if L.nbd_aio_is_connecting(h):
                self._want_write()
                return
            if not L.nbd_aio_is_ready(h):
                self._drop("closed during the handshake")
                return
            self._handshake_done()
            h = self._h
            if h is None:
                return
        running = self._running
        while (cookie := L.nbd_aio_peek_command_completed(h)) > 0:
            ok = L.nbd_aio_command_completed(h, cookie)
            cmd = running.pop(cookie, None)
            if cmd is not None:
                cmd.complete(None if ok == 1 else self._failure(cmd))
        self._want_write()

    def _failure(self, cmd: _Command) -> BaseException:
        """Why ``cmd`` failed: the server's answer (its errno), or, when libnbd retired it
        because the connection died (ENOTCONN, or the handle is dead), a lost connection."""
        err = last_error()
        L, h = self._lib, self._h
        if err.errno == errno.ENOTCONN or L.nbd_aio_is_dead(h) or L.nbd_aio_is_closed(h):
            return self._lost(f"{cmd.op.value} {cmd.offset}+{cmd.length}: {self.uri}: {err}")
        return err

    def _handshake_done(self) -> None:
        L, h = self._lib, self._h
        flags = ExportFlags(size=L.nbd_get_size(h), read_only=L.nbd_is_read_only(h) == 1, flush=L.nbd_can_flush(h) == 1,
                            fua=L.nbd_can_fua(h) == 1, trim=L.nbd_can_trim(h) == 1, zero=L.nbd_can_zero(h) == 1,
                            multi_conn=L.nbd_can_multi_conn(h) == 1)
        refused = self._on_ready(flags)
        if refused is not None:
            self._drop(refused)
            return
        self.flags = flags
        self.state = State.READY
        self.connects += 1
        queued, self._queued = self._queued, []
        for cmd in queued:
            self._issue(cmd)

    def _want_write(self) -> None:
        """Watch the fd for what libnbd waits for (``nbd_aio_get_direction``): writability
        only while it has something to send, readability whenever it reads (always, once
        connected; a notify in a state that does not read is refused with EINVAL)."""
        L, h = self._lib, self._h
        direction = L.nbd_aio_get_direction(h) if h is not None else 0
        if not direction and h is not None and (L.nbd_aio_is_dead(h) or L.nbd_aio_is_closed(h)):
            self._drop("connection closed")  # waits for nothing: dead (a write to a killed server's socket)
            return
        reads, writes = bool(direction & _READ), bool(direction & _WRITE)
        if reads != self._reading:
            if reads:
                self.loop.add_reader(self._fd, self._readable)
            else:
                self.loop.remove_reader(self._fd)
            self._reading = reads
        if writes != self._writing:
            if writes:
                self.loop.add_writer(self._fd, self._writable)
            else:
                self.loop.remove_writer(self._fd)
            self._writing = writes

    # -- failures -----------------------------------------------------------------------------------

    def _arm_watchdog(self) -> None:
        if self._watchdog is None and self.in_flight:
            self._watchdog = self.loop.call_later(min(1.0, self.timeout), self._check_deadlines)

    def _check_deadlines(self) -> None:
        """Once a second while commands are in flight: a command past its deadline ends the
        connection (a server that stopped answering, a handshake that never finishes)."""
        self._watchdog = None
        now = time.monotonic()
        oldest = min((c.started for c in (*self._running.values(), *self._queued)), default=now)
        if now - oldest >= self.timeout:
            self._drop(f"no answer in {self.timeout:g} s")
        self._arm_watchdog()

    def _drop(self, why: str) -> None:
        """The connection failed: close it and fail every command on it or waiting for it."""
        if self._h is not None:
            log.warning("nbd: connection to %s lost (%s); the next command connects again", self.uri, why)
        self._close_handle()
        if self.state is not State.CLOSED:
            self.state = State.IDLE
        self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        commands = [*self._running.values(), *self._queued]
        self._running.clear()
        self._queued.clear()
        self._fail(commands, why)

    def _fail(self, commands: list[_Command], why: str) -> None:
        """Complete ``commands`` with the lost-connection error, each on a later loop turn
        (a failure found inside :meth:`submit` must not complete before it returns)."""
        if self.loop.is_closed():  # closed with the loop: nobody is waiting for them any more
            return
        for cmd in commands:
            self.loop.call_soon(cmd.complete, self._lost(f"{cmd.op.value} {cmd.offset}+{cmd.length}: {self.uri}: {why}"))

    def _close_handle(self) -> None:
        h, self._h = self._h, None
        if h is None:
            return
        if not self.loop.is_closed():
            if self._reading:
                self.loop.remove_reader(self._fd)
            if self._writing:
                self.loop.remove_writer(self._fd)
        self._reading = self._writing = False
        self._fd = -1
        self._lib.nbd_close(h)  # after this libnbd touches none of the commands' buffers

    def close(self) -> None:
        """Fail what is in flight and close the connection (loop thread)."""
        self.state = State.CLOSED
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._close_handle()
        self._fail_all("closed")


__all__ = ["CmdFlag", "ExportFlags", "NbdLink", "Op", "State", "buffer"]
