"""The backend interface: byte-addressed storage behind a namespace, and what each kind of
backend declares for the registry (:mod:`nvme_emu.backends`)."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from ..inline_budget import InlineBudget
from .iov import Buffers


class BackendKind(enum.StrEnum):
    """What a namespace spec names its backend by: the ``kind`` in ``kind:[path,]key=value``."""

    RAM = "ram"
    FILE = "file"
    BLOCK = "blk"
    NBD = "nbd"
    RBD = "rbd"


@dataclass
class BackendSpec:
    """The backend's part of a namespace spec: what to open (the namespace's own part, its
    LBA format and NSID, is :class:`nvme_emu.namespace_spec.NamespaceSpec`)."""

    kind: BackendKind
    path: str | None = None
    size: int | None = None
    readonly: bool = False
    #: the kind's own keys (:attr:`Backend.spec_keys`: an ``rbd:`` image's ``conf=``, ``id=``), as given
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class StorageStats:
    """The counters of a backend that reaches its storage over connections (``nbd:``,
    ``rbd:``), as :meth:`Backend.storage_stats` shows them: a key means the same for every kind."""

    #: calls and commands started and not yet completed
    in_flight: int = 0
    #: connections made, and of those the ones after a lost connection
    connects: int = 0
    reconnects: int = 0
    #: commands completed with Namespace Not Ready (the storage unreachable, a call past its deadline)
    transient_errors: int = 0
    #: of those, calls ended at their deadline
    timeouts: int = 0
    #: commands the storage answered with an error
    errors: int = 0


class Backend(ABC):
    """Byte-addressed storage. Offsets and lengths are already range-checked by Namespace."""

    #: the registry's key: what a spec names this backend by
    kind: ClassVar[BackendKind]
    #: a spec of this kind names a path first (``kind:PATH,...``)
    spec_path: ClassVar[bool] = False
    #: the size a spec without ``size=`` gets (None: the backend knows it, or must be told)
    default_size: ClassVar[int | None] = None
    #: keys a spec of this kind may carry besides the common ones (into ``BackendSpec.options``)
    spec_keys: ClassVar[tuple[str, ...]] = ()

    #: a deallocated range reads back as zeros (lets the namespace report DLFEAT = 001b)
    deallocate_zeroes: bool = True
    #: calls may wait for a device or a disk (the controller runs them off the event loop);
    #: False: they only touch process memory, and run inline (the synchronous fast path)
    blocking: bool = False
    #: opened read-only: the namespace is write protected
    readonly: bool = False
    #: blocking backends: when one of their calls (a Read the page cache missed, a Write
    #: without FUA) may run on the loop thread instead of a worker (nvme_emu.inline_budget)
    inline_budget: InlineBudget | None = None
    #: the bytes themselves when they are plain process memory (RAM); Read and Write of one
    #: page copy straight to and from them (:meth:`Namespace.read_page <nvme_emu.namespace.Namespace.read_page>`)
    memory: memoryview | None = None
    size: int

    # -- the registry's view of a kind ---------------------------------------------------------

    @classmethod
    def check_spec(cls, spec: BackendSpec) -> None:
        """Refuse (ValueError: why) a parsed spec this kind cannot open; its keys, the path
        (:attr:`spec_path`) and :attr:`default_size` are the parser's."""
        return None  # a kind that takes whatever the parser accepts keeps this one

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        """Open the backend a checked spec describes."""

    @classmethod
    @abstractmethod
    def identity_seed(cls, spec: BackendSpec, controller_seed: str) -> str:
        """What the namespace's NGUID, EUI-64 and UUID derive from (its NSID is added later;
        the rules are in :mod:`nvme_emu.identity`), for a spec :meth:`from_spec` opened."""

    # -- data ----------------------------------------------------------------------------------

    @abstractmethod
    def read_into(self, offset: int, views: Buffers) -> None: ...

    def read_into_nowait(self, offset: int, views: Buffers) -> bool:
        """Read only if that cannot block; False: nothing promised, use :meth:`read_into`."""
        return False

    def read_page_nowait(self, offset: int, view: memoryview) -> bool:
        """:meth:`read_into_nowait` for the one flat byte view of a one-page command."""
        return self.read_into_nowait(offset, [view])

    @abstractmethod
    def write_from(self, offset: int, views: Buffers, *, fua: bool = False) -> None: ...

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, *, deallocate: bool = False) -> None: ...

    @abstractmethod
    def deallocate(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def allocated_bytes(self) -> int:
        """Bytes actually backed by storage (for NUSE); the whole size if unknown."""
        return self.size

    def storage_stats(self) -> dict[str, Any] | None:
        """What the control plane shows of the way to the storage (a network backend's
        connections, in-flight calls, errors and reconnects); None: nothing to show."""
        return None

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
