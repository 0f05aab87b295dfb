"""What both server backends watch in their one client: who it is, and that it keeps talking.

A server serves one client at a time (:mod:`vfio_user.server`, :mod:`vfio_user.libvfio`), so
a client that stops in the middle of a message would hold the one client slot forever. Each
backend notices differently that part of a message is waiting (the Python backend's sans-IO
``Connection.partial``, libvfio-user's peek at the socket), but the clock that drops such a
client, the timeouts both take, and the peer credentials they log are the same and live here.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Callable

#: A client must finish VERSION within this many seconds of connecting, and may not stop for
#: longer in the middle of a message: otherwise it could hold the one client slot forever.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
#: Seconds a client may take to answer the device's DMA_READ/DMA_WRITE before it is dropped.
DEFAULT_DMA_TIMEOUT = 5.0
#: After a failed accept() (out of fds), wait this long before the next one.
ACCEPT_RETRY = 0.1

#: (pid, uid, gid) of the process at the other end of a Unix socket (``SO_PEERCRED``).
PeerCredentials = tuple[int, int, int]


def peer_credentials(fd: int) -> PeerCredentials | None:
    """Who connected on the Unix socket ``fd`` (it stays open, and ours to close), for the
    logs; None if the kernel does not say."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
    except OSError:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        sock.detach()
    return struct.unpack("3i", raw)


def client_timeout(seconds: float | None) -> float | None:
    """A handshake/stall timeout as a caller gives it: None or <= 0 is never."""
    return seconds if seconds and seconds > 0 else None


class StallTimer:
    """Drops a client that stops for ``timeout`` seconds in the middle of a message.

    Bytes that arrive while a message is incomplete are progress (:meth:`progress`): a slow
    client is kept, a stopped one is dropped ``timeout`` after its last progress. One timer at
    most, re-armed lazily, so a stream of whole messages costs nothing here.
    ``in_message``: is part of a message still waiting (checked when the timer fires; False
    stops the clock until the next progress). ``held_by_us``: has the server itself stopped
    reading (backpressure), so the rest may be waiting on us; then the clock does not run.
    ``on_stall(reason)`` drops the client.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float | None,
        *,
        in_message: Callable[[], bool],
        on_stall: Callable[[str], None],
        held_by_us: Callable[[], bool] = lambda: False,
    ) -> None:
        self.loop = loop
        self.timeout = timeout
        self._in_message = in_message
        self._on_stall = on_stall
        self._held_by_us = held_by_us
        self._timer: asyncio.TimerHandle | None = None
        self.last_progress = 0.0  # loop time of the last bytes received while a message was partial

    def progress(self) -> None:
        """Bytes arrived and a message is still incomplete: that is progress; make sure a
        check comes ``timeout`` after the last such progress."""
        self.last_progress = self.loop.time()
        self.arm()

    def arm(self) -> None:
        """Make sure a check comes (no new progress: the clock keeps running from the last)."""
        if self._timer is None and self.timeout is not None:
            self._timer = self.loop.call_later(self.timeout, self._check)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        timeout = self.timeout
        if timeout is None or not self._in_message():
            return
        if self._held_by_us():  # we stopped reading (backpressure): the rest may be waiting on us
            self.last_progress = self.loop.time()
        idle = self.loop.time() - self.last_progress
        if idle >= timeout:
            self._on_stall(f"stalled mid-message for {idle:.1f} s")
            return
        self._timer = self.loop.call_later(timeout - idle, self._check)
