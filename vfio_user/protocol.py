"""The sans-IO core of vfio-user: framing, message ids and reply shapes, no sockets.

A :class:`Connection` is fed the bytes and file descriptors that arrived on a stream and
returns whole messages; it builds the bytes to send. Both the server and the client run on
it, and the fuzz tests drive it without any I/O at all.

File descriptors: each peer sends a message (header, payload and fds) with one ``sendmsg``,
so the fds ride on the first byte of that message. Linux stops a ``recvmsg`` right after a
segment that carried fds, so the fds returned with a chunk belong to the *last* message that
starts inside that chunk, or, when no message starts in it, to the message in progress.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from .constants import (
    DEFAULT_MAX_DATA_XFER,
    DEFAULT_MAX_MSG_FDS,
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_MASK,
    HEADER_SIZE,
    MESSAGE_OVERHEAD,
    MsgType,
)
from .messages import HEADER


class FatalProtocolError(Exception):
    """The stream can no longer be trusted (bad header): the connection must be dropped."""


@dataclass(eq=False)
class Message:
    """One complete message. ``fds`` are owned by whoever consumes the message."""

    msg_id: int
    command: int
    flags: int
    error_no: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def type(self) -> int:
        return self.flags & FLAG_TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.type == MsgType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def close_fds(self) -> None:
        close_fds(self.fds)
        self.fds = []

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds


@dataclass(eq=False)
class Rejected:
    """A message whose header parsed but which must be refused with ``errno``.

    Its body (if any) has been skipped and its fds closed; the stream is still in sync.
    """

    msg_id: int
    command: int
    flags: int
    errno: int
    reason: str

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_reply(self) -> bool:
        return self.flags & FLAG_TYPE_MASK == MsgType.REPLY


Event = Message | Rejected


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def encode(msg_id: int, command: int, flags: int, payload: bytes | bytearray | memoryview = b"", error_no: int = 0) -> bytes:
    """Header plus payload as one bytes object, ready for a single sendmsg."""
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error_no) + bytes(payload)


class Connection:
    """Framing and id bookkeeping for one vfio-user stream, either side."""

    def __init__(
        self,
        *,
        max_data_xfer: int = DEFAULT_MAX_DATA_XFER,
        max_msg_fds: int = DEFAULT_MAX_MSG_FDS,
    ) -> None:
        self.max_msg_size = max_data_xfer + MESSAGE_OVERHEAD
        self.max_msg_fds = max_msg_fds
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._msg_start = 0  # stream offset of the message being assembled
        self._hdr: tuple[int, int, int, int, int] | None = None
        self._discard = 0  # bytes of a rejected message still to skip
        self._discarded: Rejected | None = None
        self._fds_by_start: dict[int, list[int]] = {}
        #: Starts of messages some of whose fds the kernel dropped (MSG_CTRUNC): refused.
        self._fds_lost: set[int] = set()
        self._next_id = 0
        self.outstanding: set[int] = set()

    def set_limits(self, *, max_data_xfer: int | None = None, max_msg_fds: int | None = None) -> None:
        if max_data_xfer is not None:
            self.max_msg_size = max_data_xfer + MESSAGE_OVERHEAD
        if max_msg_fds is not None:
            self.max_msg_fds = max_msg_fds

    # -- receiving -------------------------------------------------------------------

    @property
    def partial(self) -> bool:
        """A message is partly received (header or body incomplete, or still being skipped):
        the transport may time out a peer that stops there."""
        return bool(self._buf) or self._hdr is not None or self._discard > 0

    def receive(self, data: bytes | memoryview, fds: list[int] | None = None, *, fds_lost: bool = False) -> list[Event]:
        """Feed bytes (and the fds that came with them); returns the completed events.

        ``fds_lost``: the kernel dropped some fds of this chunk (MSG_CTRUNC, e.g. the
        receiver was out of fds); the message that owns them is refused with EMFILE rather
        than handled as if it had been sent without them.

        Raises :class:`FatalProtocolError` when the header itself is nonsense; the caller
        then drops the connection (the other side can never resynchronise either).
        """
        chunk_start = self._base + len(self._buf)
        self._buf += data
        if fds or fds_lost:
            owner = self._owner_of_chunk(chunk_start, chunk_start + len(data))
            if fds:
                self._fds_by_start.setdefault(owner, []).extend(fds)
            if fds_lost:
                self._fds_lost.add(owner)
        events: list[Event] = []
        while True:
            if self._discard:
                n = min(self._discard, len(self._buf))
                self._consume(n)
                self._discard -= n
                if self._discard:
                    break
                assert self._discarded is not None
                events.append(self._discarded)
                self._discarded = None
                self._msg_start = self._base
                continue
            if self._hdr is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                try:
                    self._start_message()
                except FatalProtocolError:
                    for event in events:  # completed but never handed out: release their fds
                        if isinstance(event, Message):
                            event.close_fds()
                    raise
                continue
            size = self._hdr[2]
            if len(self._buf) < size:
                break
            events.append(self._finish_message(size))
        return events

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._base += n

    def _peek_size(self, pos: int) -> int | None:
        off = pos - self._base
        if off < 0 or off + HEADER_SIZE > len(self._buf):
            return None
        return HEADER.unpack_from(self._buf, off)[2]

    def _owner_of_chunk(self, chunk_start: int, chunk_end: int) -> int:
        """Stream offset of the message that owns fds received with this chunk."""
        pos = self._msg_start
        if self._discard:
            size: int | None = self._base + self._discard - pos
        elif self._hdr is not None:
            size = self._hdr[2]
        else:
            size = None
        last = None
        while pos < chunk_end:
            if pos >= chunk_start:
                last = pos
            if size is None:
                size = self._peek_size(pos)
            if size is None or size < HEADER_SIZE:
                break
            pos += size
            size = None
        return last if last is not None else self._msg_start

    def _start_message(self) -> None:
        msg_id, command, size, flags, error_no = HEADER.unpack_from(self._buf)
        if size < HEADER_SIZE:
            raise FatalProtocolError(f"bad header size {size}")
        if flags & FLAG_TYPE_MASK not in (MsgType.REQUEST, MsgType.REPLY):
            raise FatalProtocolError(f"unknown message type {flags & FLAG_TYPE_MASK}")
        # fds owned by messages that already ended can have no owner any more
        for start in [s for s in self._fds_by_start if s < self._msg_start]:
            close_fds(self._fds_by_start.pop(start))
        self._fds_lost = {s for s in self._fds_lost if s >= self._msg_start}
        fds = self._fds_by_start.get(self._msg_start, [])
        if size > self.max_msg_size:
            self._reject_and_skip(msg_id, command, flags, size, errno.E2BIG, f"message of {size} bytes exceeds {self.max_msg_size}")
            return
        if len(fds) > self.max_msg_fds:
            self._reject_and_skip(msg_id, command, flags, size, errno.EINVAL, f"{len(fds)} fds exceed {self.max_msg_fds}")
            return
        self._hdr = (msg_id, command, size, flags, error_no)

    def _reject_and_skip(self, msg_id: int, command: int, flags: int, size: int, err: int, reason: str) -> None:
        close_fds(self._fds_by_start.pop(self._msg_start, []))
        self._fds_lost.discard(self._msg_start)
        self._discard = size
        self._discarded = Rejected(msg_id, command, flags, err, reason)

    def _finish_message(self, size: int) -> Event:
        assert self._hdr is not None
        msg_id, command, _size, flags, error_no = self._hdr
        payload = bytes(self._buf[HEADER_SIZE:size])
        self._consume(size)
        self._hdr = None
        fds = self._fds_by_start.pop(self._msg_start, [])
        lost = self._msg_start in self._fds_lost
        self._fds_lost.discard(self._msg_start)
        self._msg_start = self._base
        if lost:
            close_fds(fds)
            return Rejected(msg_id, command, flags, errno.EMFILE, "the kernel dropped fds of this message (receiver out of fds)")
        msg = Message(msg_id, command, flags, error_no, payload, fds)
        if msg.is_reply:
            if msg_id not in self.outstanding:
                msg.close_fds()
                return Rejected(msg_id, command, flags, errno.EINVAL, f"unexpected reply id {msg_id}")
            self.outstanding.discard(msg_id)
        return msg

    def close(self) -> None:
        """Release fds still held by a partial message."""
        for fds in self._fds_by_start.values():
            close_fds(fds)
        self._fds_by_start.clear()
        self._fds_lost.clear()
        self._buf.clear()
        self._hdr = None

    # -- sending ---------------------------------------------------------------------

    def request(self, command: int, payload: bytes | bytearray | memoryview = b"", *, no_reply: bool = False) -> tuple[int, bytes]:
        """A new request: returns its id and bytes; a reply to it will be accepted later."""
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        flags = MsgType.REQUEST | (FLAG_NO_REPLY if no_reply else 0)
        if not no_reply:
            self.outstanding.add(msg_id)
        return msg_id, encode(msg_id, command, flags, payload)

    def forget(self, msg_id: int) -> None:
        """Stop waiting for a reply (timed out): a late reply is then rejected."""
        self.outstanding.discard(msg_id)

    @staticmethod
    def reply(request: Message | Rejected, payload: bytes | bytearray | memoryview = b"") -> bytes:
        return encode(request.msg_id, request.command, MsgType.REPLY, payload)

    @staticmethod
    def error_reply(request: Message | Rejected, err: int) -> bytes:
        """Header-only error reply, as the spec and QEMU expect."""
        return encode(request.msg_id, request.command, MsgType.REPLY | FLAG_ERROR, b"", err)
