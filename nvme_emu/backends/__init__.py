"""The storage behind a namespace, one module per kind, and the registry that picks one.

A :class:`nvme_emu.namespace.Namespace` speaks logical blocks and NVMe statuses; a backend
speaks bytes and errnos (:mod:`.base`). Backend failures become NVMe statuses in
:mod:`.errors`; the views and vectored I/O they share are in :mod:`.iov`. The kinds:

- ``ram`` (:mod:`.ram`): process memory;
- ``file`` (:mod:`.file`) and ``blk`` (:mod:`.block`): a regular file or a block device, by
  ``preadv``/``pwritev`` on a file descriptor (:mod:`.fd`);
- ``nbd`` (:mod:`.nbd`): an export of an NBD server, through libnbd (imported on first use);
- ``rbd`` (:mod:`.rbd`): a Ceph RBD image, through librbd's aio API (imported on first use),
  whose calls complete by callback (:mod:`.callback`).

Each backend class declares its :class:`BackendKind`, how a namespace spec opens it and what
its namespace's IDs derive from; :data:`BACKENDS` maps each kind to its class, so a new kind
is a module, a :class:`BackendKind` member and a line here.
"""

from __future__ import annotations

from .base import Backend, BackendKind
from .block import BlockBackend
from .file import FileBackend
from .nbd import NbdBackend
from .ram import RamBackend
from .rbd import RbdBackend

__all__ = ["BACKENDS", "BackendKind", "backend_class"]

#: Every backend a namespace spec can name, by kind.
BACKENDS: dict[BackendKind, type[Backend]] = {cls.kind: cls for cls in (RamBackend, FileBackend, BlockBackend, NbdBackend, RbdBackend)}


def backend_class(kind: str) -> type[Backend]:
    """The backend class of ``kind`` (``ram``, ``file``, ``blk``, ``nbd``, ``rbd``); ValueError for another."""
    try:
        return BACKENDS[BackendKind(kind)]
    except ValueError:
        raise ValueError(f"unknown kind {kind!r} (one of {', '.join(BACKENDS)})") from None
