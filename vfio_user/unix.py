"""Unix-socket plumbing that both ends of vfio-user share, and nothing else.

The server's asyncio transport (:mod:`vfio_user.server`), libvfio-user's wrapper
(:mod:`vfio_user.libvfio`), the VMM-side client (:mod:`vfio_user.vmm.client`) and the control
plane's socket all need the same few socket calls: one ``sendmsg``/``recvmsg`` carrying fds
with SCM_RIGHTS, and a listening socket that never exists with wider permissions than asked
and never steals a live server's path. They live here so that no end imports another end's
transport.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import stat

log = logging.getLogger(__name__)

#: Kernel limit of fds per SCM_RIGHTS message: room for all, so none is silently dropped.
SCM_MAX_FD = 253
#: Bytes asked of one recvmsg: the largest message a client may send fits in a few.
RECV_SIZE = 256 * 1024


def send_message(sock: socket.socket, data: bytes, fds: list[int]) -> int:
    """One sendmsg with the fds attached: QEMU collects fds only with a message's header."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    return sock.sendmsg([data], anc)


def recv_chunk(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One recvmsg: the bytes and the fds that came with them (empty bytes = EOF)."""
    data, fds, _lost = recv_chunk_checked(sock)
    return data, fds


def recv_chunk_checked(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """One recvmsg: bytes, fds, and whether the kernel dropped fds (MSG_CTRUNC: the receiver
    was out of fds, or more came than fit)."""
    data, anc, flags, _addr = sock.recvmsg(RECV_SIZE, socket.CMSG_SPACE(SCM_MAX_FD * 4))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    lost = bool(flags & socket.MSG_CTRUNC)
    if lost:
        log.warning("ancillary data truncated: some fds were lost")
    return data, fds, lost


def listen_unix(path: str, mode: int, backlog: int = 4) -> socket.socket:
    """A non-blocking listening Unix socket at ``path`` that never exists with wider
    permissions than ``mode`` (umask around bind, then chmod). A stale socket file is
    replaced; one a live server answers on is refused."""
    refuse_live_socket(path)
    remove_stale_socket(path)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            lsock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        lsock.listen(backlog)
        lsock.setblocking(False)
    except BaseException:
        lsock.close()
        raise
    return lsock


def refuse_live_socket(path: str) -> None:
    """A path some server still answers on is not stale: never steal it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")


def remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket (left by a server that died); anything else stays."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
