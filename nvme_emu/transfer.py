"""Admin data transfer: a command's PRPs to and from host memory (admin commands take PRPs
only; SGLs are for I/O, see :mod:`nvme_emu.nvm`)."""

from __future__ import annotations

from . import prp
from .spec.commands import NvmeError, Status
from .sqe import PRP1, PRP2
from .state import ControllerState


def to_host(state: ControllerState, e: tuple, data: bytes, length: int | None = None) -> None:
    """Copy ``data`` (cut or zero-padded to ``length``) into the command's PRPs."""
    n = len(data) if length is None else length
    if n == 0:
        return
    # A host-chosen length (Get Log Page NUMD: up to 16 GiB) is bounded by MDTS before
    # anything is allocated; scatter() zero-fills past the data.
    if n > state.config.max_transfer:
        raise NvmeError(Status.INVALID_FIELD, f"transfer of {n} bytes exceeds MDTS")
    views = prp.prp_views(state.host_memory(), e[PRP1], e[PRP2], n, state.page_size, write=True)
    try:
        prp.scatter(views, data[:n])
    finally:
        prp.release_views(views)


def from_host(state: ControllerState, e: tuple, length: int) -> bytes:
    """The ``length`` bytes the command's PRPs point at."""
    views = prp.prp_views(state.host_memory(), e[PRP1], e[PRP2], length, state.page_size, write=False)
    try:
        return prp.gather(views)
    finally:
        prp.release_views(views)
