"""Backend failures as NVMe statuses.

Backend failures become :class:`BackendError` subclasses, which are :class:`spec.NvmeError`
with the status the I/O layer should report, so a command handler only needs one ``except``.
"""

from __future__ import annotations

import errno

from ..spec.commands import NvmeError, Status


class BackendError(NvmeError):
    """A backend operation failed; ``errno`` is the OS reason, ``status`` what to report."""

    def __init__(self, status: int, err: int, message: str, *, dnr: bool = True, crd: int = 0) -> None:
        super().__init__(status, message, dnr=dnr, crd=crd)
        self.errno = err


class NotReadyError(BackendError):
    """Network storage cannot be reached now (a connection refused or lost, a call past its
    deadline): Namespace Not Ready with DNR clear, the spec's "re-issuing the command at a
    later time may succeed", which a host retries; the backend connects again. CRD = 1: a
    host that enabled Advanced Command Retry waits CRDT1 before each retry
    (ControllerConfig.command_retry_delay_100ms), time for the server to return."""

    def __init__(self, message: str, err: int = errno.ENOTCONN) -> None:
        super().__init__(Status.NAMESPACE_NOT_READY, err, message, dnr=False, crd=1)


class NoSpaceError(BackendError):
    """ENOSPC/EDQUOT while writing: the (sparse) backing store could not grow."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(Status.CAPACITY_EXCEEDED, err, message)


class ReadOnlyError(BackendError):
    """The backing store refuses writes: EROFS (a read-only namespace, or a file system
    remounted read-only) -> Namespace is Write Protected, EACCES/EPERM -> Access Denied."""

    def __init__(self, err: int, message: str) -> None:
        status = Status.NAMESPACE_WRITE_PROTECTED if err == errno.EROFS else Status.ACCESS_DENIED
        super().__init__(status, err, message)


class MediumError(BackendError):
    """Any other I/O error: Write Fault on writes, Unrecovered Read Error on reads."""

    def __init__(self, err: int, message: str, *, writing: bool) -> None:
        status = Status.WRITE_FAULT if writing else Status.UNRECOVERED_READ_ERROR
        super().__init__(status, err, message)


def translate_os_error(e: OSError, what: str, *, writing: bool) -> BackendError:
    """The :class:`BackendError` an OS error of a backend call becomes (``what``: the call)."""
    err = e.errno or errno.EIO
    msg = f"{what}: {e.strerror or e}"
    if err == errno.EFAULT:  # the host's buffer, not the medium: its memory vanished (see nvm.py)
        return BackendError(Status.DATA_TRANSFER_ERROR, err, msg)
    if writing and err in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(err, msg)
    if writing and err in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnlyError(err, msg)
    return MediumError(err, msg, writing=writing)
