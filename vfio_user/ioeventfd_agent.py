"""Client of the LD_PRELOAD ioeventfd agent (``nvme_emu/agent/ioeventfd_agent.c``).

KVM accepts VM ioctls only from the process that created the VM, and QEMU's vfio-user
client never asks a server for GET_REGION_IO_FDS. The agent, preloaded into QEMU, learns
QEMU's VM fd (it interposes ``ioctl`` and watches KVM_CREATE_VM) and registers the KVM
ioeventfds that a server sends it over a Unix SOCK_SEQPACKET socket
(``NVME_EMU_AGENT_SOCKET``). This module is that protocol's client; it knows nothing of
NVMe: records are (offset in a BAR, size, eventfd, optional datamatch, optional
POST_WRITE shadow).

Wire format (little-endian, one message per datagram, fds in one SCM_RIGHTS message):

=========  ================================================  ==============================
request    body                                              reply (header op, body)
=========  ================================================  ==============================
HELLO 1    none (count 0)                                    0x81: s32 status, u32 caps
SET 2      u64 bar_gpa, u64 bar_size, count x record          0x82 count N: s32 status,
                                                             N x s32 per-record errno
CLEAR 3    none (count 0)                                    0x83: s32 status
(any)      unparseable header (short, bad magic/version)     0x80: s32 status
=========  ================================================  ==============================

Header: ``u32 magic 0x4144564e ("NVDA"), u16 version 1, u16 op, u32 count, u32 reserved``.
Record (40 bytes): ``u64 offset, u32 size, u32 flags (bit0 DATAMATCH, bit1 POST_WRITE),
u64 datamatch, s32 eventfd_index, s32 shadow_index (-1 none), u64 shadow_offset``; the
indexes refer to the fds sent with the SET. A SET replaces every earlier registration of
the agent; a record the agent refuses gets its errno (EINVAL range/size/alignment, EBADF
not an eventfd or index out of range, ENOTSUP POST_WRITE not supported by the kernel, or
the kernel's errno) and the others are registered regardless. A disconnect is a CLEAR.

The constants below are the single source of truth on the Python side; the C agent
declares the same values.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

from .unix import SCM_MAX_FD

__all__ = [
    "AGENT_MAGIC",
    "AGENT_VERSION",
    "AGENT_SOCKET_ENV",
    "OP_HELLO",
    "OP_SET",
    "OP_CLEAR",
    "OP_REPLY",
    "MAX_RECORDS",
    "MAX_FDS",
    "REC_FLAG_DATAMATCH",
    "REC_FLAG_POST_WRITE",
    "CAP_VM_KNOWN",
    "CAP_POST_WRITE",
    "CAP_IOEVENTFD",
    "HEADER",
    "SET_BODY",
    "RECORD",
    "STATUS",
    "HELLO_REPLY",
    "AgentCaps",
    "AgentRecord",
    "AgentError",
    "IoeventfdAgent",
    "pack_header",
    "pack_set",
]

# ---------------------------------------------------------------------------------------
# Protocol constants and layouts
# ---------------------------------------------------------------------------------------
#: Environment variable read by the agent at load time: the socket path to listen on.
AGENT_SOCKET_ENV = "NVME_EMU_AGENT_SOCKET"

AGENT_MAGIC = 0x4144564E  # b"NVDA" little-endian
AGENT_VERSION = 1

OP_HELLO = 1
OP_SET = 2
OP_CLEAR = 3
#: A reply's op is ``OP_REPLY | request op``; bare ``OP_REPLY`` answers an unparseable header.
OP_REPLY = 0x80

MAX_RECORDS = 256  # one NVMe doorbell per SQ and CQ: 2 x (64 I/O queues + admin) = 130
MAX_FDS = SCM_MAX_FD  # every fd of a full batch in one message

REC_FLAG_DATAMATCH = 1 << 0
REC_FLAG_POST_WRITE = 1 << 1

CAP_VM_KNOWN = 1 << 0
CAP_POST_WRITE = 1 << 1
CAP_IOEVENTFD = 1 << 2

HEADER = struct.Struct("<IHHII")           # magic, version, op, count, reserved
SET_BODY = struct.Struct("<QQ")            # bar_gpa, bar_size
RECORD = struct.Struct("<QIIQiiQ")         # offset, size, flags, datamatch, efd idx, shadow idx, shadow off
STATUS = struct.Struct("<i")
HELLO_REPLY = struct.Struct("<iI")         # status, caps

assert HEADER.size == 16 and SET_BODY.size == 16 and RECORD.size == 40

#: Largest datagram the agent accepts (a SET with MAX_RECORDS records).
MAX_MESSAGE = HEADER.size + SET_BODY.size + MAX_RECORDS * RECORD.size
#: Largest reply (SET with MAX_RECORDS per-record errnos); receive with headroom.
_REPLY_BUF = HEADER.size + STATUS.size * (1 + MAX_RECORDS) + 64


def pack_header(op: int, count: int = 0, *, magic: int = AGENT_MAGIC, version: int = AGENT_VERSION,
                reserved: int = 0) -> bytes:
    return HEADER.pack(magic, version, op, count, reserved)


# ---------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------
class AgentError(OSError):
    """The agent refused a whole request (``errno`` is its status), or the connection /
    the reply was unusable (EPROTO, ECONNRESET, ETIMEDOUT...)."""


@dataclass(frozen=True)
class AgentCaps:
    vm_known: bool      #: the agent has seen KVM_CREATE_VM in its process
    post_write: bool    #: KVM_CHECK_EXTENSION(KVM_CAP_IOEVENTFD_POST_WRITE) > 0 on the VM fd
    ioeventfd: bool     #: KVM_CHECK_EXTENSION(KVM_CAP_IOEVENTFD) > 0 on the VM fd
    raw: int = 0

    @classmethod
    def from_bits(cls, bits: int) -> "AgentCaps":
        return cls(bool(bits & CAP_VM_KNOWN), bool(bits & CAP_POST_WRITE), bool(bits & CAP_IOEVENTFD), bits)


@dataclass(frozen=True)
class AgentRecord:
    """One ioeventfd: a write of ``size`` bytes at BAR ``offset`` signals ``eventfd``.

    ``datamatch`` (not None) only matches writes of that value. ``post_write`` asks the
    kernel to store the written value at ``shadow_offset`` in the file behind ``shadow_fd``
    (a memfd or regular file, mapped shared by the agent) before signalling.
    """

    offset: int
    size: int
    eventfd: int
    shadow_fd: Optional[int] = None
    shadow_offset: int = 0
    datamatch: Optional[int] = None
    post_write: bool = False


def pack_set(bar_gpa: int, bar_size: int, records: Sequence[AgentRecord]) -> tuple[bytes, list[int]]:
    """The SET datagram and the fd list to send with it (each distinct fd once)."""
    fds: list[int] = []
    index: dict[int, int] = {}

    def idx(fd: int) -> int:
        if fd not in index:
            index[fd] = len(fds)
            fds.append(fd)
        return index[fd]

    parts = [pack_header(OP_SET, len(records)), SET_BODY.pack(bar_gpa, bar_size)]
    for r in records:
        flags = (REC_FLAG_DATAMATCH if r.datamatch is not None else 0) | \
                (REC_FLAG_POST_WRITE if r.post_write else 0)
        shadow = idx(r.shadow_fd) if r.shadow_fd is not None else -1
        parts.append(RECORD.pack(r.offset, r.size, flags, r.datamatch or 0, idx(r.eventfd), shadow,
                                 r.shadow_offset))
    return b"".join(parts), fds


# ---------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------
class IoeventfdAgent:
    """A connection to the agent at ``path``. Requests are synchronous (one reply each).

    Closing the connection makes the agent deregister everything registered through it.
    """

    def __init__(self, path: str, timeout: Optional[float] = 5.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise

    # -- raw exchange (also used by tests for malformed messages) ---------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} fds: the kernel passes at most {MAX_FDS} per message")
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def recv_reply(self) -> tuple[int, int, bytes]:
        """One reply: (op, count, body). Raises AgentError on EOF, timeout or a bad header."""
        try:
            data = self.sock.recv(_REPLY_BUF)
        except socket.timeout:
            raise AgentError(errno.ETIMEDOUT, f"agent {self.path}: no reply") from None
        except ConnectionError as e:
            raise AgentError(e.errno or errno.ECONNRESET, f"agent {self.path}: {e}") from None
        if not data:
            raise AgentError(errno.ECONNRESET, f"agent {self.path} closed the connection")
        if len(data) < HEADER.size:
            raise AgentError(errno.EPROTO, f"agent reply too short ({len(data)} bytes)")
        magic, version, op, count, _ = HEADER.unpack_from(data)
        if magic != AGENT_MAGIC or version != AGENT_VERSION:
            raise AgentError(errno.EPROTO, f"agent reply with magic {magic:#x} version {version}")
        return op, count, data[HEADER.size:]

    def transact_raw(self, data: bytes, fds: Sequence[int] = ()) -> tuple[int, int, bytes]:
        self.send_raw(data, fds)
        return self.recv_reply()

    def _status(self, op: int, count: int, body: bytes, want_op: int) -> int:
        if len(body) < STATUS.size:
            raise AgentError(errno.EPROTO, f"agent reply op {op:#x} without status")
        (status,) = STATUS.unpack_from(body)
        if op == OP_REPLY:
            raise AgentError(status or errno.EPROTO, f"agent rejected the message: {os.strerror(status)}")
        if op != want_op:
            raise AgentError(errno.EPROTO, f"agent replied op {op:#x}, expected {want_op:#x}")
        return status

    # -- requests -------------------------------------------------------------------------
    def hello(self) -> AgentCaps:
        op, count, body = self.transact_raw(pack_header(OP_HELLO))
        status = self._status(op, count, body, OP_REPLY | OP_HELLO)
        if len(body) < HELLO_REPLY.size:
            raise AgentError(errno.EPROTO, "short HELLO reply")
        if status:
            raise AgentError(status, f"HELLO: {os.strerror(status)}")
        _, caps = HELLO_REPLY.unpack_from(body)
        return AgentCaps.from_bits(caps)

    def set(self, bar_gpa: int, bar_size: int, records: Sequence[AgentRecord]) -> list[int]:
        """Replace all registrations with ``records``; the per-record errnos (0 = registered)."""
        if len(records) > MAX_RECORDS:
            raise ValueError(f"{len(records)} records: the agent takes at most {MAX_RECORDS}")
        data, fds = pack_set(bar_gpa, bar_size, records)
        op, count, body = self.transact_raw(data, fds)
        status = self._status(op, count, body, OP_REPLY | OP_SET)
        if status:
            raise AgentError(status, f"SET: {os.strerror(status)}")
        if count != len(records) or len(body) < STATUS.size * (1 + count):
            raise AgentError(errno.EPROTO, f"SET reply for {count} records, sent {len(records)}")
        return list(struct.unpack_from(f"<{count}i", body, STATUS.size))

    def clear(self) -> None:
        op, count, body = self.transact_raw(pack_header(OP_CLEAR))
        status = self._status(op, count, body, OP_REPLY | OP_CLEAR)
        if status:
            raise AgentError(status, f"CLEAR: {os.strerror(status)}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "IoeventfdAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
