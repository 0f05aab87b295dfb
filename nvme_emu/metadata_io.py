"""The command side of metadata and end-to-end data protection: what Read, Write, Compare,
Verify, Write Zeroes and Copy do with a namespace's metadata and its protection information.

Four layers, each usable alone (NVM Command Set 1.0, "End-to-end Data Protection" and each
command's section; where the spec leaves a choice, what QEMU's hw/nvme does, said where):

1. **The host's buffers** (:func:`host_layout`, :func:`metadata_views`): how many bytes a
   command moves through its data pointer and through MPTR. Extended (FLBAS bit 4): data and
   metadata interleaved per block, all through the data pointer. Separate: the data through
   the data pointer, the metadata through MPTR, a contiguous buffer when PSDT is 00b/01b, an
   SGL when PSDT is 10b. With PRACT = 1 and metadata that is only the PI, the host moves no
   metadata at all, extended or not: the controller inserts it on a write and strips it on a
   read.
2. **The blocks, sans-IO** (:func:`write_blocks`, :func:`read_blocks`, :func:`compare_blocks`,
   :func:`verify_blocks`, :func:`write_zeroes_metadata`, :func:`copy_blocks`): given the
   namespace's format and the command's fields (:class:`~nvme_emu.pi.format.PiCommand`) and
   private copies of the bytes, they return what to store or what the host gets, or raise
   :class:`PiCheckError` / :class:`~nvme_emu.spec.commands.NvmeError` with the status the
   spec names. Every buffer here is a private copy: a check of guest memory followed by a
   store from guest memory would let the guest change the data in between.
3. **The door** (:func:`read`, :func:`write`, :func:`compare`, :func:`verify`,
   :func:`write_zeroes`, :func:`copy`): the NVM handlers' calls for a namespace with metadata.
   They move bytes through the namespace's methods (``read``/``write`` for the data,
   ``read_meta``/``write_meta``/``zero_meta`` for the metadata) and return None (done) or the
   :class:`~nvme_emu.outcome.Work` of a blocking namespace. The PI checks run where both
   buffers are: after the reads, in the Work's ``run`` on the I/O pool, which also copies to
   the host (the dispatcher releases the host's views before ``done`` runs).
4. **The handlers' side** (:class:`MetadataHandlers`): decodes the SQE, maps the data
   pointer and MPTR, calls the door; :class:`~nvme_emu.nvm.NvmCommands` reaches it only where
   ``plain_rw`` is False and :func:`has_metadata` says yes.

The choices taken from QEMU's hw/nvme (dif.c, ctrl.c), where the spec leaves one: Compare and
Verify with PRACT = 1 fail with Invalid Protection Information; Write Zeroes with a PRCHK bit
fails the same way, and with PRACT = 1 writes its blocks (no deallocation) with generated PI;
the End-to-end check errors complete without DNR; a Copy within one namespace needs the same
PRACT in PRINFOR and PRINFOW (Invalid Field); descriptor format 0h goes with no PI or 16b
Guard, 1h with 64b Guard (Invalid Format otherwise), its 80-bit tag field read big-endian.

PRINFO on a namespace without PI is ignored, not Invalid Field: the field's actions and checks
are defined on protection information, and QEMU's hw/nvme looks at PRINFO only when DPS names
a type (nvme_read, nvme_do_write). So PRACT there does not drop the metadata from the host's
buffers either: metadata without PI always travels, extended in the data buffer, else via MPTR.

The namespace is duck-typed (:class:`MetadataNamespace`), so that this module does not
import :mod:`nvme_emu.namespace` and its tests use a small fake.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from . import prp
from .outcome import Work
from .pi.engine import PiEngine, PiError
from .pi.format import GuardKind, PiCommand, PiFormat, Prinfo
from .spec.commands import (
    COPY_DESCRIPTOR_FORMAT0_SIZE,
    COPY_DESCRIPTOR_FORMAT1_SIZE,
    COPY_MAX_LBAS,
    COPY_MAX_RANGE_LBAS,
    COPY_MAX_RANGES,
    CopyCdw12,
    NvmeError,
    Psdt,
    RwCdw12,
    SglSubtype,
    SglType,
    Status,
)
from .sqe import CDW3, CDW12, CDW14, CDW15, MPTR, lba_range, psdt, starting_lba
from vfio_user.dma import DmaError, GuestMemory

if TYPE_CHECKING:
    from .state import ControllerState

_PRACT = int(Prinfo.PRACT)
_PRCHK = int(Prinfo.PRCHK_ALL)
_PRINFO_MASK = RwCdw12.PRINFO_MASK

#: The End-to-end check statuses: completed without DNR, as QEMU's hw/nvme does (a host may
#: retry: Linux does, up to its retry limit, then reports the integrity error).
_E2E_CHECKS = frozenset(
    {Status.END_TO_END_GUARD_CHECK_ERROR, Status.END_TO_END_APPLICATION_TAG_CHECK_ERROR, Status.END_TO_END_REFERENCE_TAG_CHECK_ERROR}
)


class MetadataNamespace(Protocol):
    """What this module uses of a namespace (:class:`nvme_emu.namespace.Namespace` once it
    has metadata; the tests' fake)."""

    ms: int  # metadata bytes per block of the current format (0: none)
    extended: bool  # FLBAS bit 4: metadata interleaved with the data in the host's buffer

    @property
    def lba_size(self) -> int: ...

    pi: PiFormat | None
    pi_engine: PiEngine | None
    blocking: bool  # its calls hand back Work for the I/O pool

    def read(self, slba: int, nlb: int, views: Sequence[memoryview]) -> Work | None: ...

    def write(self, slba: int, nlb: int, views: Sequence[memoryview], *, fua: bool = False) -> Work | None: ...

    def write_zeroes(self, slba: int, nlb: int, *, deallocate: bool = False, fua: bool = False) -> Work | None: ...

    def read_meta(self, slba: int, nlb: int) -> memoryview: ...

    def write_meta(self, slba: int, data: bytes | bytearray | memoryview) -> Any: ...

    def zero_meta(self, slba: int, nlb: int) -> Any: ...

    def verify(self, slba: int, nlb: int) -> Work | None: ...

    def check_range(self, slba: int, nlb: int) -> None: ...


class PiCheckError(NvmeError):
    """A command failed a PI rule: the status the engine named, and the LBA of the first
    failing block for the Error Information log entry (the SLBA for a command-level failure,
    Invalid Protection Information)."""

    def __init__(self, err: PiError, what: str) -> None:
        super().__init__(err.status, f"{what}: {err.status.name} at LBA {err.lba}", dnr=err.status not in _E2E_CHECKS)
        self.lba = err.lba


def _raise_if(err: PiError | None, what: str) -> None:
    if err is not None:
        raise PiCheckError(err, what)


# ---------------------------------------------------------------------------------------------
# 1. The host's buffers
# ---------------------------------------------------------------------------------------------


def pi_command(ns: MetadataNamespace, e: tuple, *, slba: int | None = None, prinfo_shift: int = RwCdw12.PRINFO_SHIFT) -> PiCommand:
    """The command's protection fields (Read/Write layout: PRINFO, CDW14 + CDW3 reference
    tag, CDW15 LBAT/LBATM). PRINFO reads as none on a namespace without PI (ignored, see
    the module's docstring). ``prinfo_shift``: where this command keeps its PRINFO (Copy's
    PRINFOW sits where Read/Write have PRINFO)."""
    start = starting_lba(e) if slba is None else slba
    if ns.pi is None:
        return PiCommand(slba=start)
    cdw12 = (e[CDW12] & ~(_PRINFO_MASK << RwCdw12.PRINFO_SHIFT)) | (((e[CDW12] >> prinfo_shift) & _PRINFO_MASK) << RwCdw12.PRINFO_SHIFT)
    return PiCommand.from_dwords(ns.pi.guard, start, e[CDW3], cdw12, e[CDW14], e[CDW15])


@dataclass(frozen=True, slots=True)
class HostLayout:
    """How one command's blocks lie in the host's buffers."""

    data_len: int  # bytes through the data pointer (PRP/SGL)
    meta_len: int  # bytes through MPTR (0: none)
    extended: bool  # the data pointer's bytes interleave metadata (lbads + ms per block)


def host_layout(ns: MetadataNamespace, nlb: int, prinfo: int) -> HostLayout:
    """The host buffers of a Read, Write or Compare of ``nlb`` blocks (``prinfo`` as
    :func:`pi_command` decoded it: none on a namespace without PI)."""
    ms = ns.ms
    data = nlb * ns.lba_size
    if ms == 0 or (prinfo & _PRACT and ns.pi is not None and ns.pi.metadata_is_pi):
        return HostLayout(data, 0, False)  # no metadata, or PRACT inserts/strips all of it
    if ns.extended:
        return HostLayout(data + nlb * ms, 0, True)
    return HostLayout(data, nlb * ms, False)


def metadata_views(mem: GuestMemory, e: tuple, length: int, *, to_host: bool) -> list[memoryview]:
    """The command's separate metadata buffer (MPTR) as views of guest memory.

    PSDT 00b/01b: MPTR is the address of one contiguous buffer; it is mapped as an SGL Data
    Block descriptor of that address and length would be, so a buffer across DMA mappings or
    outside them gets the data path's Data Transfer Error. PSDT 10b: MPTR is the address of
    one SGL descriptor (Data Block or Segment/Last Segment), walked as the data SGL is; its
    length errors are Metadata SGL Length Invalid. PSDT 11b is reserved (Invalid Field).
    """
    if length == 0:
        return []
    pointer = psdt(e)
    if pointer is None:
        raise NvmeError(Status.INVALID_FIELD, "reserved PSDT")
    mptr = e[MPTR]
    if pointer is not Psdt.SGL_MPTR_SGL:
        return prp.sgl_views(mem, prp.SglDescriptor(mptr, length, SglType.DATA_BLOCK, SglSubtype.ADDRESS), length, write=to_host)
    try:
        raw = mem.read(mptr, 16)
    except DmaError as err:
        raise NvmeError(Status.DATA_TRANSFER_ERROR, f"metadata SGL descriptor at {mptr:#x}: {err}") from None
    try:
        return prp.sgl_views(mem, raw, length, write=to_host)
    except NvmeError as err:
        if err.status is Status.DATA_SGL_LENGTH_INVALID:
            raise NvmeError(Status.METADATA_SGL_LENGTH_INVALID, str(err)) from None
        raise


def _rows(buf: bytes | bytearray | memoryview, nlb: int, width: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8).reshape(nlb, width)


def deinterleave(buf: bytes | bytearray | memoryview, nlb: int, lbads: int, ms: int) -> tuple[bytearray, bytearray]:
    """Extended blocks -> (data, metadata), new private buffers."""
    rows = _rows(buf, nlb, lbads + ms)
    data, meta = bytearray(nlb * lbads), bytearray(nlb * ms)
    _rows(data, nlb, lbads)[...] = rows[:, :lbads]
    _rows(meta, nlb, ms)[...] = rows[:, lbads:]
    return data, meta


def interleave(data: bytes | bytearray | memoryview, meta: bytes | bytearray | memoryview, nlb: int, lbads: int, ms: int) -> bytearray:
    """(data, metadata) -> extended blocks, a new buffer."""
    out = bytearray(nlb * (lbads + ms))
    rows = _rows(out, nlb, lbads + ms)
    rows[:, :lbads] = _rows(data, nlb, lbads)
    rows[:, lbads:] = _rows(meta, nlb, ms)
    return out


def from_host(ns: MetadataNamespace, layout: HostLayout, nlb: int, data: bytes | bytearray | memoryview,
              meta: bytes | bytearray | memoryview | None) -> tuple[bytearray, bytearray | None]:
    """What the host sent, as private (data, metadata) in the separate layout; metadata None
    when the host sent none (PRACT with metadata that is only the PI, or no metadata)."""
    if layout.extended:
        return deinterleave(data, nlb, ns.lba_size, ns.ms)
    return bytearray(data), (bytearray(meta) if layout.meta_len and meta is not None else None)


def to_host(ns: MetadataNamespace, layout: HostLayout, nlb: int, data: bytes | bytearray | memoryview,
            meta: bytes | bytearray | memoryview) -> tuple[bytes | bytearray | memoryview, bytes | bytearray | memoryview]:
    """Stored (data, metadata) -> what goes through (the data pointer, MPTR)."""
    if layout.extended:
        return interleave(data, meta, nlb, ns.lba_size, ns.ms), b""
    return data, (meta if layout.meta_len else b"")


# ---------------------------------------------------------------------------------------------
# 2. The blocks, sans-IO
# ---------------------------------------------------------------------------------------------


def _engine(ns: MetadataNamespace) -> PiEngine:
    if ns.pi_engine is None:
        raise ValueError(f"namespace formatted with PI {ns.pi} has no PI engine")
    return ns.pi_engine


def write_blocks(ns: MetadataNamespace, cmd: PiCommand, nlb: int, data: bytearray, meta: bytearray | None) -> bytearray | None:
    """A Write's metadata to store, given the host's data and metadata (private copies,
    separate layout; ``meta`` None when the host sent none). PRACT = 1: PI generated into
    the metadata (into the host's own metadata bytes when MS is larger than the PI: its other
    bytes are kept, and with the PI last covered by the guard). PRACT = 0: checked as PRCHK
    asks and stored as given. Raises :class:`PiCheckError`."""
    if ns.pi is None:
        return meta
    engine = _engine(ns)
    if cmd.prinfo & _PRACT:
        if meta is None:
            meta = bytearray(nlb * ns.ms)
        _raise_if(engine.insert(cmd, data, meta), "write")
        return meta
    if meta is None:  # cannot happen through host_layout: PRACT = 0 always moves the metadata
        raise ValueError("a write without PRACT needs the host's metadata")
    _raise_if(engine.check(cmd, data, meta), "write")
    return meta


def read_blocks(ns: MetadataNamespace, cmd: PiCommand, data: bytes | bytearray | memoryview,
                meta: bytes | bytearray | memoryview) -> None:
    """A Read's checks of the stored blocks, as PRCHK asks (PRACT = 1 also strips, which is
    the host layout's business: :func:`host_layout` moves no metadata then). Raises
    :class:`PiCheckError`."""
    if ns.pi is not None:
        _raise_if(_engine(ns).check(cmd, data, meta), "read")


def _no_pract(ns: MetadataNamespace, cmd: PiCommand, what: str) -> None:
    """Compare and Verify with PRACT = 1 on a namespace with PI: Invalid Protection
    Information, as QEMU's hw/nvme (nvme_compare, nvme_verify) answers; the PI is checked
    as PRCHK asks, never inserted or stripped by these commands."""
    if ns.pi is not None and cmd.prinfo & _PRACT:
        raise PiCheckError(PiError(cmd.slba, Status.INVALID_PROTECTION_INFORMATION), f"{what} with PRACT")


def verify_blocks(ns: MetadataNamespace, cmd: PiCommand, data: bytes | bytearray | memoryview,
                  meta: bytes | bytearray | memoryview) -> None:
    """Verify: the stored blocks' PI checked as PRCHK asks; nothing moves to the host."""
    _no_pract(ns, cmd, "verify")
    read_blocks(ns, cmd, data, meta)


def compare_blocks(ns: MetadataNamespace, cmd: PiCommand, nlb: int, stored: bytes | bytearray | memoryview,
                   stored_meta: bytes | bytearray | memoryview, host: bytes | bytearray | memoryview,
                   host_meta: bytes | bytearray | memoryview | None) -> None:
    """Compare, in QEMU's order: the data (Compare Failure), then the stored PI as PRCHK
    asks, then the metadata the host sent. With PI the PI bytes are not compared (they were
    checked): QEMU's comment says the same, though its loop compares only the PI bytes when
    the PI is last; we compare every other metadata byte."""
    _no_pract(ns, cmd, "compare")
    if bytes(stored) != bytes(host):
        raise NvmeError(Status.COMPARE_FAILURE, f"LBAs {cmd.slba}+{nlb}: data differ")
    read_blocks(ns, cmd, stored, stored_meta)
    if host_meta is None or ns.ms == 0:
        return
    a, b = _rows(stored_meta, nlb, ns.ms), _rows(host_meta, nlb, ns.ms)
    if ns.pi is not None:
        keep = np.ones(ns.ms, dtype=bool)
        keep[ns.pi.pi_offset : ns.pi.pi_offset + ns.pi.pi_size] = False
        a, b = a[:, keep], b[:, keep]
    if not np.array_equal(a, b):
        raise NvmeError(Status.COMPARE_FAILURE, f"LBAs {cmd.slba}+{nlb}: metadata differ")


def write_zeroes_metadata(ns: MetadataNamespace, cmd: PiCommand, nlb: int) -> bytearray | None:
    """Write Zeroes: the metadata to store for the zeroed blocks, or None for "zeroed" (the
    namespace's zero_meta; deallocated blocks read as DLFEAT says, the namespace's part).

    With PI, PRCHK must be 000b: Invalid Protection Information otherwise, as QEMU. PRACT = 1:
    PI generated for the zeroed data (guard of the zeros, LBAT, the type's reference tags),
    the other metadata bytes zero; the blocks are then written, not deallocated (QEMU drops
    its "may unmap" then, and so does :func:`write_zeroes`)."""
    if ns.pi is None or not cmd.prinfo & (_PRACT | _PRCHK):
        return None
    if cmd.prinfo & _PRCHK:
        raise PiCheckError(PiError(cmd.slba, Status.INVALID_PROTECTION_INFORMATION), "write zeroes with PRCHK")
    meta = bytearray(nlb * ns.ms)
    _raise_if(_engine(ns).insert(cmd, bytearray(nlb * ns.lba_size), meta), "write zeroes")
    return meta


# -- Copy ---------------------------------------------------------------------------------

#: Source Range Entries Descriptor Format 0h: SLBA @8, NLB (0-based) @16, EILBRT @24 (32
#: bits), ELBAT @28, ELBATM @30.
_COPY_FORMAT0 = struct.Struct("<8xQH6xIHH")
#: Format 1h: SLBA @8, NLB @16, ELBST/EILBRT bytes 35:26, ELBAT @36, ELBATM @38. The 80-bit
#: ELBST/EILBRT field is read big-endian, its last 48 bits the reference tag (STS = 0), as
#: QEMU's hw/nvme and libnvme (nvme_init_copy_range_f1) lay it out.
_COPY_FORMAT1 = struct.Struct("<8xQH8x10sHH")
assert _COPY_FORMAT0.size == COPY_DESCRIPTOR_FORMAT0_SIZE and _COPY_FORMAT1.size == COPY_DESCRIPTOR_FORMAT1_SIZE


@dataclass(frozen=True, slots=True)
class CopySource:
    """One source range and the PI fields its blocks are read (checked) with."""

    slba: int
    nlb: int
    cmd: PiCommand  # PRINFOR, and the range's EILBRT / ELBAT / ELBATM


def copy_descriptor_format(ns: MetadataNamespace, e: tuple) -> tuple[int, int]:
    """(descriptor format, descriptor size) of a Copy to ``ns``: format 0h for a namespace
    without PI or with 16b Guard PI, 1h for 64b Guard; the other one is Invalid Format, as
    QEMU answers (formats 2h/3h, other namespaces as sources, are not supported: Invalid Field)."""
    desfmt = (e[CDW12] >> CopyCdw12.DESFMT_SHIFT) & CopyCdw12.DESFMT_MASK
    if desfmt not in (0, 1):
        raise NvmeError(Status.INVALID_FIELD, f"copy descriptor format {desfmt}")
    wanted = 1 if ns.pi is not None and ns.pi.guard is GuardKind.GUARD_64 else 0
    if desfmt != wanted:
        raise NvmeError(Status.INVALID_FORMAT, f"copy descriptor format {desfmt} on a namespace that takes {wanted}")
    return desfmt, (COPY_DESCRIPTOR_FORMAT1_SIZE if desfmt else COPY_DESCRIPTOR_FORMAT0_SIZE)


def copy_sources(ns: MetadataNamespace, e: tuple, raw: bytes, nr: int) -> list[CopySource]:
    """Parse ``nr`` source range descriptors of the command's format (range checks and
    limits stay with the caller, as for the plain Copy)."""
    desfmt, size = copy_descriptor_format(ns, e)
    prinfor = Prinfo((e[CDW12] >> CopyCdw12.PRINFOR_SHIFT) & _PRINFO_MASK) if ns.pi is not None else Prinfo.NONE
    out = []
    for i in range(nr):
        if desfmt == 0:
            slba, nlb0, eilbrt, elbat, elbatm = _COPY_FORMAT0.unpack_from(raw, i * size)
        else:
            slba, nlb0, sr, elbat, elbatm = _COPY_FORMAT1.unpack_from(raw, i * size)
            eilbrt = int.from_bytes(sr[4:], "big")
        out.append(CopySource(slba, nlb0 + 1, PiCommand(slba=slba, prinfo=prinfor, lbat=elbat, lbatm=elbatm, ilbrt=eilbrt)))
    return out


def copy_write_command(ns: MetadataNamespace, e: tuple) -> PiCommand:
    """The destination's PI fields: PRINFOW, the command's ILBRT (CDW14, + CDW3 for 64b
    Guard) and LBAT/LBATM (CDW15), starting at SDLBA."""
    return pi_command(ns, e, prinfo_shift=CopyCdw12.PRINFOW_SHIFT)


def copy_blocks(ns: MetadataNamespace, sources: Sequence[CopySource], dest: PiCommand,
                blocks: Sequence[tuple[bytes | bytearray | memoryview, bytes | bytearray | memoryview]]) -> tuple[bytearray, bytearray]:
    """Copy within one namespace: each source range's stored (data, metadata) checked as its
    PRINFOR asks, then the destination's PI generated (PRINFOW PRACT = 1: a new reference tag
    run from ILBRT, LBAT) or checked as PRINFOW asks (PRACT = 0: the source PI is copied as
    it is, so a Type 1 reference tag check fails unless the blocks stay at their LBAs).
    Returns the (data, metadata) to store at the destination.

    PRACT must be the same in PRINFOR and PRINFOW (Invalid Field otherwise, as QEMU: a
    namespace cannot strip the PI of a copy it also keeps). The destination is one run of
    blocks, so one insert or check covers all ranges: the reference tags continue across
    them as QEMU's per-range loop continues them."""
    for src, (data, meta) in zip(sources, blocks, strict=True):
        if ns.pi is not None:
            if (src.cmd.prinfo ^ dest.prinfo) & _PRACT:
                raise NvmeError(Status.INVALID_FIELD, "copy: PRACT differs between PRINFOR and PRINFOW")
            _raise_if(_engine(ns).check(src.cmd, data, meta), "copy source")
    data = bytearray(b"".join(bytes(d) for d, _m in blocks))
    meta = bytearray(b"".join(bytes(m) for _d, m in blocks))
    if ns.pi is not None:
        engine = _engine(ns)
        _raise_if(engine.insert(dest, data, meta) if dest.prinfo & _PRACT else engine.check(dest, data, meta), "copy destination")
    return data, meta


# ---------------------------------------------------------------------------------------------
# 3. The door: the namespace's calls, now or as the Work of a blocking namespace
# ---------------------------------------------------------------------------------------------
#
# Every function takes the host's views (the caller maps them: the data pointer as for a plain
# command with HostLayout.data_len, MPTR with metadata_views) and follows the NVM handlers'
# rule for them: when it returns None the command is done and the views are the caller's to
# release; a Work it returns owns them (its ``views``), and the dispatcher releases them when
# the Work is finished. Bytes go to the host in the Work's ``run``, before that release.


class _Steps:
    """The namespace calls of one command run in order; the ``done`` parts of the Work they
    handed back (counters, on the loop thread) are kept for the command's own ``done``."""

    def __init__(self) -> None:
        self._dones: list[Callable[[], None]] = []

    def run(self, result: Any) -> None:
        """Finish one namespace call's result here: nothing (done), or its Work's ``run``."""
        if isinstance(result, Work):
            value = result.run()
            done = result.done
            if done is not None:
                self._dones.append(lambda: done(value))

    def done(self, _result: Any = None) -> None:
        for done in self._dones:
            done()


def _then(ns: MetadataNamespace, started: Sequence[Work | None], after: Callable[[_Steps], None],
          views: Sequence[memoryview]) -> Work | None:
    """Finish the namespace calls ``started`` on the loop thread (they began there: a Read
    may have been served from the page cache), then ``after``: here and now on a namespace
    that does not block, else as one Work for the I/O pool."""
    steps = _Steps()
    if not ns.blocking and all(w is None for w in started):
        after(steps)
        return None

    def run() -> None:
        for w in started:
            steps.run(w)
        after(steps)

    # One blocking call (a Read or Write) keeps its inline budget: at QD1 the dispatcher may
    # run the whole command on the loop, the metadata and PI part included, as it would the
    # plain one; the budget times it all.
    inline = started[0].inline if len(started) == 1 and isinstance(started[0], Work) else None
    return Work(run, tuple(views), steps.done, inline)


def read(ns: MetadataNamespace, cmd: PiCommand, nlb: int, layout: HostLayout,
         data_views: Sequence[memoryview], meta_views: Sequence[memoryview] = ()) -> Work | None:
    """Read: the data and metadata of ``nlb`` blocks at ``cmd.slba``, checked as PRCHK asks,
    to the host as its layout says (stripped of the PI when PRACT = 1 and MS is the PI)."""
    slba = cmd.slba
    data = bytearray(nlb * ns.lba_size)
    started = ns.read(slba, nlb, [memoryview(data)])

    def after(_steps: _Steps) -> None:
        meta = ns.read_meta(slba, nlb)
        read_blocks(ns, cmd, data, meta)
        host_data, host_meta = to_host(ns, layout, nlb, data, meta)
        prp.scatter(data_views, host_data)
        if layout.meta_len:
            prp.scatter(meta_views, host_meta)

    return _then(ns, [started], after, (*data_views, *meta_views))


def write(ns: MetadataNamespace, cmd: PiCommand, nlb: int, layout: HostLayout, data_views: Sequence[memoryview],
          meta_views: Sequence[memoryview] = (), *, fua: bool = False) -> Work | None:
    """Write: the host's blocks copied out of guest memory once, their PI inserted or
    checked (:func:`write_blocks`) before anything is stored, then the data and the metadata."""
    data, meta = from_host(ns, layout, nlb, prp.gather(data_views), prp.gather(meta_views) if layout.meta_len else None)
    store = write_blocks(ns, cmd, nlb, data, meta)
    started = ns.write(cmd.slba, nlb, [memoryview(data)], fua=fua)

    def after(steps: _Steps) -> None:
        if store is not None:
            steps.run(ns.write_meta(cmd.slba, store))

    return _then(ns, [started], after, (*data_views, *meta_views))


def compare(ns: MetadataNamespace, cmd: PiCommand, nlb: int, layout: HostLayout, data_views: Sequence[memoryview],
            meta_views: Sequence[memoryview] = ()) -> Work | None:
    """Compare the stored blocks with the host's (:func:`compare_blocks`)."""
    _no_pract(ns, cmd, "compare")
    host, host_meta = from_host(ns, layout, nlb, prp.gather(data_views), prp.gather(meta_views) if layout.meta_len else None)
    data = bytearray(nlb * ns.lba_size)
    started = ns.read(cmd.slba, nlb, [memoryview(data)])

    def after(_steps: _Steps) -> None:
        compare_blocks(ns, cmd, nlb, data, ns.read_meta(cmd.slba, nlb), host, host_meta)

    return _then(ns, [started], after, (*data_views, *meta_views))


def verify(ns: MetadataNamespace, cmd: PiCommand, nlb: int) -> Work | None:
    """Verify: with PI and a PRCHK bit set, the blocks are read and checked; otherwise there
    is nothing to check beyond the namespace's own Verify (its media errors)."""
    _no_pract(ns, cmd, "verify")
    if ns.pi is None or not cmd.prinfo & _PRCHK:
        return ns.verify(cmd.slba, nlb)
    data = bytearray(nlb * ns.lba_size)
    started = ns.read(cmd.slba, nlb, [memoryview(data)])

    def after(_steps: _Steps) -> None:
        verify_blocks(ns, cmd, data, ns.read_meta(cmd.slba, nlb))

    return _then(ns, [started], after, ())


def write_zeroes(ns: MetadataNamespace, cmd: PiCommand, nlb: int, *, deallocate: bool = False, fua: bool = False) -> Work | None:
    """Write Zeroes: the data zeroed (deallocated if asked and no PI is generated), then the
    metadata: the PI :func:`write_zeroes_metadata` generated, or zeroed by the namespace
    (whose ``zero_meta`` makes them read as DLFEAT says, the PI escape included, as QEMU's
    hw/nvme reads zeroed metadata: nvme_dif_mangle_mdata)."""
    meta = write_zeroes_metadata(ns, cmd, nlb)
    started = ns.write_zeroes(cmd.slba, nlb, deallocate=deallocate and meta is None, fua=fua)

    def after(steps: _Steps) -> None:
        steps.run(ns.zero_meta(cmd.slba, nlb) if meta is None else ns.write_meta(cmd.slba, meta))

    return _then(ns, [started], after, ())


def copy(ns: MetadataNamespace, sources: Sequence[CopySource], dest: PiCommand, *, fua: bool = False) -> Work | None:
    """Copy within one namespace (:func:`copy_blocks`): every source is read before the
    destination is written, so overlapping ranges behave as one atomic copy."""
    datas = [bytearray(s.nlb * ns.lba_size) for s in sources]
    started = [ns.read(s.slba, s.nlb, [memoryview(d)]) for s, d in zip(sources, datas, strict=True)]

    def after(steps: _Steps) -> None:
        metas = [ns.read_meta(s.slba, s.nlb) for s in sources]
        data, meta = copy_blocks(ns, sources, dest, list(zip(datas, metas, strict=True)))
        total = sum(s.nlb for s in sources)
        steps.run(ns.write(dest.slba, total, [memoryview(data)], fua=fua))
        steps.run(ns.write_meta(dest.slba, meta))

    return _then(ns, started, after, ())


# ---------------------------------------------------------------------------------------------
# 4. The NVM handlers' side: decode the SQE, map the host's buffers, call the door
# ---------------------------------------------------------------------------------------------


#: What the NVM handlers pass: a :class:`~nvme_emu.namespace.Namespace`, which is a
#: :class:`MetadataNamespace` once the namespace side of issue 26 gives it ``ms``, ``pi``,
#: ``read_meta``...; typed loosely here so that both sides can land in either order.
AnyNamespace = Any


def has_metadata(ns: MetadataNamespace) -> bool:
    """Whether a namespace's current format has metadata, so that its commands come here.
    The NVM handlers ask only once ``plain_rw`` said no, so a plain namespace never pays."""
    return ns.ms != 0


class MetadataHandlers:
    """Read, Write, Compare, Verify, Write Zeroes and Copy of a namespace with metadata, for
    :class:`~nvme_emu.nvm.NvmCommands`: each returns DW0 (0, done) or the Work that finishes
    it, raising NvmeError (PiCheckError with its LBA) as the plain handlers do.

    Given the controller's state and two of the NVM handlers' own hooks, never the handlers:
    ``data_views(e, length, to_host=...)`` maps the data pointer (PRP or SGL, MDTS checked),
    ``read_buffer(e, length)`` copies a small host buffer (Copy's descriptors)."""

    def __init__(self, state: ControllerState, data_views: Callable[..., list[memoryview]],
                 read_buffer: Callable[[tuple, int], bytes]) -> None:
        self.state = state
        self.data_views = data_views
        self.read_buffer = read_buffer

    def _host(self, ns: AnyNamespace, e: tuple, layout: HostLayout, *, to_host: bool) -> tuple[list[memoryview], list[memoryview]]:
        data = self.data_views(e, layout.data_len, to_host=to_host)
        if not layout.meta_len:
            return data, []
        try:
            return data, metadata_views(self.state.host_memory(), e, layout.meta_len, to_host=to_host)
        except BaseException:
            prp.release_views(data)
            raise

    def _transfer(self, ns: AnyNamespace, e: tuple, *, to_host: bool) -> tuple[PiCommand, int, HostLayout, list[memoryview], list[memoryview]]:
        slba, nlb = lba_range(e)
        ns.check_range(slba, nlb)  # LBA Out of Range before any walk of the host's pointers
        cmd = pi_command(ns, e)
        layout = host_layout(ns, nlb, cmd.prinfo)
        data, meta = self._host(ns, e, layout, to_host=to_host)
        return cmd, nlb, layout, data, meta

    def read(self, ns: AnyNamespace, e: tuple) -> int | Work:
        cmd, nlb, layout, data, meta = self._transfer(ns, e, to_host=True)
        return prp.done_or_owned(lambda: read(ns, cmd, nlb, layout, data, meta), [*data, *meta])

    def write(self, ns: AnyNamespace, e: tuple) -> int | Work:
        cmd, nlb, layout, data, meta = self._transfer(ns, e, to_host=False)
        fua = bool(e[CDW12] & RwCdw12.FUA) or not self.state.features.write_cache
        return prp.done_or_owned(lambda: write(ns, cmd, nlb, layout, data, meta, fua=fua), [*data, *meta])

    def compare(self, ns: AnyNamespace, e: tuple) -> int | Work:
        _no_pract(ns, pi_command(ns, e), "compare")  # before the host's buffers are mapped
        cmd, nlb, layout, data, meta = self._transfer(ns, e, to_host=False)
        return prp.done_or_owned(lambda: compare(ns, cmd, nlb, layout, data, meta), [*data, *meta])

    def verify(self, ns: AnyNamespace, e: tuple) -> int | Work:
        slba, nlb = lba_range(e)
        ns.check_range(slba, nlb)
        return verify(ns, pi_command(ns, e), nlb) or 0

    def write_zeroes(self, ns: AnyNamespace, e: tuple) -> int | Work:
        slba, nlb = lba_range(e)
        ns.check_range(slba, nlb)
        cdw12 = e[CDW12]
        return write_zeroes(ns, pi_command(ns, e), nlb, deallocate=bool(cdw12 & RwCdw12.DEAC), fua=bool(cdw12 & RwCdw12.FUA)) or 0

    def copy_command(self, ns: AnyNamespace, e: tuple) -> tuple[list[CopySource], PiCommand, int]:
        """A Copy's source ranges, its destination's PI fields and its total of blocks, every
        field and range checked as the plain Copy checks them (NvmCommands.copy_ranges)."""
        nr = (e[CDW12] & CopyCdw12.NR_MASK) + 1
        _desfmt, size = copy_descriptor_format(ns, e)
        if nr > COPY_MAX_RANGES:
            raise NvmeError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"{nr} source ranges")
        sources = copy_sources(ns, e, self.read_buffer(e, nr * size), nr)
        total = 0
        for src in sources:
            if src.nlb > COPY_MAX_RANGE_LBAS:
                raise NvmeError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"copy source range of {src.nlb} blocks")
            ns.check_range(src.slba, src.nlb)
            total += src.nlb
        if total > COPY_MAX_LBAS:
            raise NvmeError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"copy of {total} blocks")
        dest = copy_write_command(ns, e)
        ns.check_range(dest.slba, total)
        return sources, dest, total

    def copy(self, ns: AnyNamespace, sources: Sequence[CopySource], dest: PiCommand, e: tuple) -> int | Work:
        return copy(ns, sources, dest, fua=bool(e[CDW12] & RwCdw12.FUA)) or 0
