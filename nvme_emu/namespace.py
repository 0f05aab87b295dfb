"""Namespaces: logical blocks over the storage behind them; no socket, PCI or queue knowledge.

A :class:`Namespace` speaks logical blocks and NVMe statuses; a backend
(:mod:`nvme_emu.backends`) speaks bytes and errnos. Data moves between a backend and guest
memory through lists of memoryviews (as produced by :mod:`nvme_emu.prp`) without intermediate
copies.

The namespace is the command handlers' one door to storage: they never touch its backend, so
range checks, byte offsets and counters are here once each. A blocking backend's call comes
back as a :class:`~nvme_emu.outcome.Work` for the I/O pool rather than being made here.

Backend failures are :class:`nvme_emu.backends.errors.BackendError` subclasses, which are
:class:`spec.NvmeError` with the status the I/O layer should report, so a command handler only
needs one ``except``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid as _uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import callback_work, identity, structures
from .backends.base import Backend
from .backends.callback import CallbackBackend
from .backends.file import FileBackend
from .backends.iov import ZERO_CHUNK, Buffers, byte_views, total_bytes
from .backends.ram import RamBackend
from .identity import derive_ids
from .lba_ranges import LbaRanges
from .metadata_store import SUFFIX as META_SUFFIX, FileMetadataStore, MetadataStore, StoredFormat
from .ns_format import LBA_FORMATS, SUPPORTED_LBA_SIZES, SUPPORTED_METADATA_SIZES, LbaFormat, NsFormat, check_ns_format, elbaf_list, lba_format_index
from .outcome import Work
from .pi.engine import PiEngine
from .pi.format import GuardKind, PiFormat, PiLocation, ProtectionType
from .pi.guards import native_guards
from .spec.commands import COPY_MAX_LBAS, COPY_MAX_RANGES, COPY_MAX_RANGE_LBAS, NSID_ALL, NvmeError, Status
from .spec.identify import DLFEAT_READ_ZEROES, DLFEAT_WRITE_ZEROES_DEAC, FLBAS_EXTENDED_METADATA, NSATTR_WRITE_PROTECTED, Csi, Dpc, Mc, flbas_encode
from .zoned.geometry import ZoneGeometry
from .zoned.sidecar import ZoneSidecar
from .zoned.zone_set import ZoneSet


# ---------------------------------------------------------------------------------------------
# Namespace
# ---------------------------------------------------------------------------------------------


log = logging.getLogger(__name__)

__all__ = ["LBA_FORMATS", "SUPPORTED_LBA_SIZES", "SUPPORTED_METADATA_SIZES", "LbaFormat", "Namespace", "NsFormat", "lba_format_index"]


@dataclass
class NamespaceStats:
    """Per-namespace counters the SMART log sums (bytes, not data units)."""

    bytes_read: int = 0
    bytes_written: int = 0
    read_commands: int = 0
    write_commands: int = 0


class Namespace:
    """One NVM namespace: LBA arithmetic and range checks over a backend.

    It is the one door to storage: command handlers never touch :attr:`backend`, so range
    checks, byte offsets and counters live here, once each. ``nlb`` arguments are block
    counts (1-based); converting the 0-based NLB of a command is the I/O layer's job. Each
    public I/O method corresponds to one command, so counters are updated here once per
    command.
    """

    def __init__(
        self,
        nsid: int,
        backend: Backend,
        *,
        lba_size: int = 512,
        id_seed: str = "",
        nguid: bytes | None = None,
        eui64: bytes | None = None,
        uuid: _uuid.UUID | None = None,
        csi: Csi = Csi.NVM,
        zoned: ZoneGeometry | None = None,
        ms: int = 0,
        extended: bool = False,
        pi_type: ProtectionType = ProtectionType.NONE,
        pil: PiLocation = PiLocation.LAST,
        guard: GuardKind = GuardKind.GUARD_16,
    ) -> None:
        if not 0 < nsid < NSID_ALL:
            raise ValueError(f"invalid NSID {nsid}")
        self.nsid = nsid
        self.backend = backend
        lbaf_index = lba_format_index(lba_size, ms)
        if backend.size < lba_size:
            raise ValueError(f"backend of {backend.size} bytes is smaller than one {lba_size}-byte block")
        d_nguid, d_eui, d_uuid = derive_ids(id_seed, nsid)
        self.nguid = nguid if nguid is not None else d_nguid
        self.eui64 = eui64 if eui64 is not None else d_eui
        self.uuid = uuid if uuid is not None else d_uuid
        self.stats = NamespaceStats()
        if zoned is not None:
            csi = Csi.ZONED
        elif csi == Csi.ZONED:
            raise ValueError("a zoned namespace needs its zone geometry")
        #: Its I/O command set (:mod:`nvme_emu.command_set`): which opcodes its I/O commands
        #: may use, its Identify pages, its NIDT CSI descriptor (a plain attribute: the I/O
        #: dispatch reads it per command).
        self.csi = csi
        #: The zone geometry it was made with (None: not zoned), kept for describing it.
        self.zone_geometry = zoned
        #: Its zones (Zoned Namespace Command Set), None on a namespace of another set. Made
        #: once, here: Format NVM is refused on a zoned namespace (:meth:`check_format`), so
        #: the LBA size and so the zones never change. The namespace is whole zones (NSZE).
        self.zones: ZoneSet | None = None if zoned is None else zoned.zone_set(backend.size, LBA_FORMATS[lbaf_index].lbads)
        #: Where the zones outlive the process (a file or block namespace): :meth:`keep_zones_in`.
        self._zone_sidecar: ZoneSidecar | None = None
        #: Its I/O may wait on a device: the controller runs it off the event loop (a plain
        #: attribute: every Read and Write looks at it).
        self.blocking = backend.blocking
        #: NSATTR bit 0: commands that change blocks fail with Namespace is Write Protected.
        self.write_protected = backend.readonly
        #: A Format NVM is erasing it (off the loop): its I/O commands fail with Format In
        #: Progress, which a host retries, rather than race the erase.
        self.formatting = False
        #: The blocks themselves when they are process memory (:attr:`Backend.memory`, RAM):
        #: the one-page paths copy straight to and from them.
        self._memory = backend.memory
        #: LBAs Write Uncorrectable marked: reads fail until they are written again. In memory
        #: only (a restart forgets them), as the fault injector's faults are.
        self.uncorrectable = LbaRanges()
        #: The metadata of every block (:mod:`nvme_emu.metadata_store`): in memory until
        #: :meth:`keep_meta_in` gives it a sidecar; replaced by every Format.
        self._meta: MetadataStore | None = None
        #: Where a file or block namespace keeps its metadata and format (None: RAM).
        self._meta_path: str | None = None
        try:
            fmt = check_ns_format(NsFormat(lbaf_index, extended, pi_type, pil, guard), zoned=zoned is not None)
        except NvmeError as e:
            raise ValueError(str(e)) from None
        self.apply_format(fmt)

    # -- geometry ------------------------------------------------------------------------------

    @property
    def lbaf_index(self) -> int:
        return self._lbaf_index

    @property
    def lba_format(self) -> LbaFormat:
        return LBA_FORMATS[self._lbaf_index]

    @property
    def lba_size(self) -> int:
        return 1 << self.lba_shift

    @property
    def nsze(self) -> int:
        """Namespace size in LBAs (a tail smaller than one block is not exposed; on a zoned
        namespace, a tail smaller than one zone)."""
        return self._nlbas

    @property
    def ncap(self) -> int:
        return self.nsze  # no thin provisioning: capacity equals size

    @property
    def nuse(self) -> int:
        return min(self.nsze, -(-self.backend.allocated_bytes() >> self.lba_shift))

    @property
    def size_bytes(self) -> int:
        return self.nsze << self.lba_shift

    # -- the format, and the one fast-path flag it decides --------------------------------------

    def apply_format(self, fmt: NsFormat | int) -> None:
        """Format ``fmt`` applies from now on (at creation, and when a Format NVM is done);
        an index alone is that LBA format with this namespace's guard, no MSET and no PI.
        ``fmt`` is checked (:func:`check_ns_format`) by the caller.

        Everything a format decides is computed here, once, into plain attributes, because
        the I/O path reads them on every command: the shift, the byte end of the exposed
        blocks, :attr:`plain_rw`, and the metadata and protection information of the format."""
        if isinstance(fmt, int):
            fmt = NsFormat(fmt, guard=self.ns_format.guard)
        index = fmt.lbaf
        #: the whole format (FLBAS, DPS and the guard), as a sidecar records it
        self.ns_format: NsFormat = fmt
        self._lbaf_index = index
        #: log2 of the LBA size: read several times per I/O command, so a plain attribute
        self.lba_shift = shift = LBA_FORMATS[index].lbads
        #: NSZE: every block of the backend, or its whole zones (zones past the last whole one
        #: are not exposed, as QEMU drops them)
        self._nlbas = self.backend.size >> shift if self.zones is None else self.zones.nlbas
        #: the exposed blocks in bytes (NSZE << shift): the one-page paths' range check
        self._end = self._nlbas << shift
        #: MS: metadata bytes per block (0: none; then everything below is off)
        self.ms = ms = LBA_FORMATS[index].ms
        #: FLBAS bit 4 (MSET): the host moves metadata inside extended LBAs, else through MPTR
        self.extended = fmt.extended
        #: the protection information format, None without PI (DPS type 0, or no metadata)
        self.pi: PiFormat | None = None
        #: the engine that inserts, checks and strips :attr:`pi` (native guard CRCs), built
        #: once per format
        self.pi_engine: PiEngine | None = None
        if ms and fmt.pi_type is not ProtectionType.NONE:
            self.pi = PiFormat(1 << shift, ms, fmt.pif(ms), fmt.pi_type, fmt.pil)
            self.pi_engine = PiEngine(self.pi, native_guards(self.pi.guard))
        store = self._meta
        if store is None:
            self._meta = MetadataStore(ms, self._nlbas, self._meta_template(fmt))
        elif (store.ms, store.nlbas, store.template) != (ms, self._nlbas, self._meta_template(fmt).tobytes()):
            # not the store :meth:`erase` or :meth:`keep_meta_in` made for this format (a
            # format applied without an erase, as tests do): a fresh one, all deallocated
            self._replace_meta(fmt, replace=True)
        #: A Read or Write is only a range check and a byte copy: no metadata beside the data,
        #: no protection information to generate or check, no zone rules (a write pointer).
        #: It gates the one-page fast paths (:meth:`read_page`, :meth:`write_page`), which do
        #: nothing else; a namespace kind that needs more (metadata and PI, issue 26; zoned,
        #: issue 25) answers False in :meth:`rw_is_plain` and takes the general path.
        self.plain_rw = self.rw_is_plain()
        #: The backend if its calls complete by callback (rbd, nbd) and I/O is plain (:mod:`.callback_work`)
        self._callbacks = self.backend if self.plain_rw and isinstance(self.backend, CallbackBackend) else None

    def _meta_template(self, fmt: NsFormat) -> np.ndarray:
        """What a deallocated block's metadata reads as under ``fmt`` (DLFEAT; with PI, the
        escape values: :meth:`PiEngine.fill_deallocated`): the store's XOR template."""
        lbaf = LBA_FORMATS[fmt.lbaf]
        meta = np.zeros(lbaf.ms, dtype=np.uint8)
        if lbaf.ms and fmt.pi_type is not ProtectionType.NONE:
            pi = PiFormat(lbaf.size, lbaf.ms, fmt.pif(lbaf.ms), fmt.pi_type, fmt.pil)
            PiEngine(pi, native_guards(pi.guard)).fill_deallocated(self.dlfeat, np.zeros(lbaf.size, np.uint8), meta)
        return meta

    @property
    def dlfeat(self) -> int:
        """DLFEAT: deallocated blocks read as zeroes (where the backend's do), PI Guard all
        ones (bit 4 clear, as QEMU's hw/nvme), and Write Zeroes honours DEAC."""
        return (DLFEAT_READ_ZEROES if self.backend.deallocate_zeroes else 0) | DLFEAT_WRITE_ZEROES_DEAC

    def rw_is_plain(self) -> bool:
        """The rule behind :attr:`plain_rw`, for the current format: no metadata (and so no
        protection information, which lives in it), and no zones (a write pointer to check)."""
        return self.lba_format.ms == 0 and self.zones is None

    # -- the door: range checks, byte offsets and counters ---------------------------------------
    #
    # Command handlers reach storage only through the methods below. Each checks its LBA range
    # (LBA Out of Range), turns LBAs into byte offsets, and counts what the SMART log reports,
    # once per command. A method returns None when the command is done (on the loop thread,
    # counted), or the Work that finishes it on the I/O pool (blocking backends: run() does the
    # backend call, done() counts on the loop thread, since counters are not shared with
    # workers). The caller keeps the views it passed, except those a Work took: the NVM command
    # set releases those when the Work is finished.

    def check_range(self, slba: int, nlb: int) -> None:
        """LBA Out of Range unless [slba, slba + nlb) lies inside the namespace."""
        if slba < 0 or nlb < 0 or slba >= 1 << 64 or slba + nlb > self._nlbas:
            raise self._out_of_range(slba, nlb)

    def _out_of_range(self, slba: int, nlb: int) -> NvmeError:
        return NvmeError(Status.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} outside namespace {self.nsid} ({self.nsze} LBAs)")

    def _byte_range(self, slba: int, nlb: int) -> tuple[int, int]:
        self.check_range(slba, nlb)
        shift = self.lba_shift
        return slba << shift, nlb << shift

    def _check_views(self, views: Buffers, length: int) -> None:
        if len(views) == 1 and type(v := views[0]) is memoryview and v.nbytes == length:
            return  # the hot case, without building a generator
        total = total_bytes(views)
        if total != length:
            raise ValueError(f"data buffers hold {total} bytes, the command moves {length}")

    def count_read(self, length: int) -> None:
        """One Read done (on the loop thread: counters are not shared with workers)."""
        self.stats.read_commands += 1
        self.stats.bytes_read += length

    def count_write(self, length: int) -> None:
        self.stats.write_commands += 1
        self.stats.bytes_written += length

    def count_verified(self, length: int) -> None:
        """Verify reads the media but moves no data to the host: bytes, not a Read command."""
        self.stats.bytes_read += length

    def _now_or_work(self, run: Callable[[], Any], done: Callable[[Any], None] | None = None, views: Buffers = ()) -> Work | None:
        """``run`` and then ``done`` here and now, or as the Work of a blocking namespace."""
        if self.blocking:
            return Work(run, views, done)
        result = run()
        if done is not None:
            done(result)
        return None

    # The one-page fast paths: one flat byte view (in one guest page), only while plain_rw.
    # They are the hottest code of the project (a whole 4 KiB RAM Read is about 1 us), so the
    # steps of check_range, _byte_range and count_* are written out in them, and the range
    # check is one comparison against the byte end the format computed (an SQE's SLBA is
    # never negative nor past 64 bits; a huge one ends past _end all the same).

    def read_page(self, slba: int, view: memoryview) -> Work | None:
        """Read into one flat byte view: from memory (RAM), from the page cache when that
        needs no wait (file, block device: ``RWF_NOWAIT``), else the Work that reads it."""
        n = view.nbytes
        off = slba << self.lba_shift
        if off < 0 or off + n > self._end:
            raise self._out_of_range(slba, n >> self.lba_shift)
        memory = self._memory
        if memory is not None:
            view[:] = memory[off : off + n]
        elif not self.blocking:
            self.backend.read_into(off, (view,))
        elif not self.backend.read_page_nowait(off, view):
            return self._read_work(off, n, [view])
        stats = self.stats
        stats.read_commands += 1
        stats.bytes_read += n
        return None

    def write_page(self, slba: int, view: memoryview) -> bool:
        """Write one flat byte view into memory (RAM: process memory is as durable as it gets,
        so FUA asks nothing more); False, nothing done, when the blocks are not process
        memory: such a write waits for the pool, FUA as the command says (:meth:`write`)."""
        memory = self._memory
        if memory is None:
            return False
        n = view.nbytes
        off = slba << self.lba_shift
        if off < 0 or off + n > self._end:
            raise self._out_of_range(slba, n >> self.lba_shift)
        memory[off : off + n] = view
        stats = self.stats
        stats.write_commands += 1
        stats.bytes_written += n
        return True

    # read and write (the general path: several views, SGLs, PRP lists) are hot too at high
    # queue depths: the steps of _byte_range and count_* are written out in them (method
    # calls fewer per command, measurable at QD32).

    def read(self, slba: int, nlb: int, views: Buffers) -> Work | None:
        """Read: the blocks -> ``views`` (writable guest memory). A blocking namespace reads
        at once when the page cache holds the blocks, else hands back the Work."""
        self.check_range(slba, nlb)
        shift = self.lba_shift
        off, length = slba << shift, nlb << shift
        self._check_views(views, length)
        if not self.blocking:
            self.backend.read_into(off, views)
        elif not self.backend.read_into_nowait(off, views):
            return self._read_work(off, length, views)
        stats = self.stats
        stats.read_commands += 1
        stats.bytes_read += length
        return None

    def _read_work(self, off: int, length: int, views: Buffers) -> Work:
        """A Read for the pool (the page cache did not hold it): it owns ``views`` from now on."""
        if self._callbacks is not None:  # lands in the backend's buffer; copied in on the loop thread
            return callback_work.read(self._callbacks, off, length, views, self.count_read)
        return Work(partial(self.backend.read_into, off, views), views, lambda _r: self.count_read(length), self.backend.inline_budget)

    def write(self, slba: int, nlb: int, views: Buffers, *, fua: bool = False) -> Work | None:
        """Write: ``views`` -> the blocks; ``fua`` makes it durable before it is done."""
        self.check_range(slba, nlb)
        shift = self.lba_shift
        off, length = slba << shift, nlb << shift
        self._check_views(views, length)
        if self.blocking:
            if self._callbacks is not None:  # copied out of guest memory as it starts, on the loop thread
                return callback_work.write(self._callbacks, off, views, fua, self.count_write)
            # FUA: pwritev then fdatasync in the same worker call, so the completion (posted
            # only after run() returned) means durable, as when it ran on the loop; a zoned
            # namespace's sidecar follows the data (its write pointer must not be lost either).
            write = self._write_durable if fua and self._zone_sidecar is not None else self.backend.write_from
            return Work(partial(write, off, views, fua=fua), views, lambda _r: self.count_write(length),
                        None if fua else self.backend.inline_budget)
        self.backend.write_from(off, views, fua=fua)
        stats = self.stats
        stats.write_commands += 1
        stats.bytes_written += length
        return None

    def write_zeroes(self, slba: int, nlb: int, *, deallocate: bool = False, fua: bool = False) -> Work | None:
        off, length = self._byte_range(slba, nlb)
        if self._callbacks is not None:
            return callback_work.write_zeroes(self._callbacks, off, length, deallocate, fua)

        def zero() -> None:
            self.backend.write_zeroes(off, length, deallocate=deallocate)
            if fua:
                self.backend.flush()
                self._sync_zones()

        return self._now_or_work(zero)

    def deallocate(self, ranges: Iterable[tuple[int, int]]) -> Work | None:
        """Dataset Management AD: (slba, nlb) ranges; all are checked before any is touched."""
        ranges = [(s, n) for s, n in ranges if n]
        extents = [self._byte_range(s, n) for s, n in ranges]
        meta = self._meta if self.ms else None  # a deallocated block's metadata reads as DLFEAT says, PI escaped
        if self._callbacks is not None:
            return callback_work.deallocate(self._callbacks, extents)

        def deallocate() -> None:
            for (slba, nlb), (off, length) in zip(ranges, extents, strict=True):
                self.backend.deallocate(off, length)
                if meta is not None:
                    meta.deallocate(slba, nlb)

        return self._now_or_work(deallocate)

    def compare(self, slba: int, nlb: int, views: Buffers) -> Work | None:
        """Compare the blocks with ``views``: Compare Failure when they differ (counted as a
        Read either way: the media was read)."""
        off, length = self._byte_range(slba, nlb)
        self._check_views(views, length)

        def compare() -> bool:
            buf = bytearray(length)
            self.backend.read_into(off, [memoryview(buf)])
            pos = 0
            for v in byte_views(views):
                if buf[pos : pos + len(v)] != v:
                    return False
                pos += len(v)
            return True

        def compared(same: bool) -> None:
            self.count_read(length)
            if not same:
                raise NvmeError(Status.COMPARE_FAILURE, f"LBAs {slba}+{nlb} differ")

        return self._now_or_work(compare, compared, views)

    def verify(self, slba: int, nlb: int) -> Work | None:
        """Read the blocks and discard them: a failure surfaces as Unrecovered Read Error."""
        off, length = self._byte_range(slba, nlb)

        def verify() -> None:
            chunk = bytearray(min(length, ZERO_CHUNK))
            pos = 0
            while pos < length:
                n = min(len(chunk), length - pos)
                self.backend.read_into(off + pos, [memoryview(chunk)[:n]])
                pos += n

        return self._now_or_work(verify, lambda _r: self.count_verified(length))

    def copy(self, ranges: Sequence[tuple[int, int]], sdlba: int, *, fua: bool = False) -> Work | None:
        """Copy source (slba, nlb) ranges, concatenated, to ``sdlba``; all ranges checked first.

        Sources are read in full before writing, so overlapping source and destination behave
        as if the copy were atomic.
        """
        sources = [self._byte_range(s, n) for s, n in ranges]
        total = sum(length for _off, length in sources)
        dest, _ = self._byte_range(sdlba, total >> self.lba_shift)

        def copy() -> None:
            mv = memoryview(bytearray(total))
            pos = 0
            for off, length in sources:
                self.backend.read_into(off, [mv[pos : pos + length]])
                pos += length
            self.backend.write_from(dest, [mv], fua=fua)
            if fua:
                self._sync_zones()

        return self._now_or_work(copy, lambda _r: self.count_write(total))

    def flush(self) -> None:
        self.backend.flush()
        self._sync_zones()
        if self._meta is not None:
            self._meta.sync()

    # -- metadata: the one door to it -------------------------------------------------------------
    #
    # The data methods above move data only. On a namespace with metadata (ms > 0) the command
    # set moves each command's metadata through these three, in the same Work as its data (a
    # file namespace's are stores into a mapped sidecar, which may wait for the disk: call them
    # from the Work's run on a blocking namespace), so metadata is stored before the command
    # completes. Write Zeroes and Copy destinations are the command set's to follow with
    # zero_meta/write_meta too; of the data methods only deallocate touches metadata.

    def read_meta(self, slba: int, nlb: int) -> memoryview:
        """The metadata of blocks ``slba .. slba + nlb``: ``nlb * ms`` bytes, a writable copy
        (the caller's: the PI engine may check or strip in place). Deallocated blocks' read
        as DLFEAT says, with PI escape values (:mod:`nvme_emu.metadata_store`)."""
        self.check_range(slba, nlb)
        assert self._meta is not None
        return self._meta.read(slba, nlb)

    def write_meta(self, slba: int, data: Any, *, fua: bool = False) -> None:
        """Store whole blocks of metadata (``data``: any bytes-like, ``nlb * ms`` bytes) from
        ``slba`` on; ``fua``: durable before it returns (``msync`` of its pages)."""
        ms = self.ms
        nbytes = memoryview(data).nbytes if not isinstance(data, np.ndarray) else data.nbytes
        if not ms or nbytes % ms:
            raise ValueError(f"{nbytes} bytes are not whole blocks of {ms}-byte metadata")
        nlb = nbytes // ms
        self.check_range(slba, nlb)
        assert self._meta is not None
        self._meta.write(slba, data)
        if fua:
            self._meta.sync(slba, nlb)

    def zero_meta(self, slba: int, nlb: int, *, fua: bool = False) -> None:
        """Blocks ``slba ..``'s metadata reads as a deallocated block's from now on (Write
        Zeroes without PRACT, Deallocate): what DLFEAT says, PI with every check escaped."""
        self.check_range(slba, nlb)
        assert self._meta is not None
        self._meta.deallocate(slba, nlb)
        if fua:
            self._meta.sync(slba, nlb)

    def keep_meta_in(self, path: str | None) -> None:
        """Keep this namespace's metadata and format in the sidecar at ``path`` (None: RAM,
        in memory). A sidecar there wins over the format the namespace was opened with (the
        command line): a drive keeps the format its host last chose; the difference is
        logged. Without one, it is made now if the format has metadata, else at the first
        Format that chooses metadata. ValueError for a sidecar that cannot be trusted, does
        not fit the image, or belongs to a zoned namespace."""
        if path is None:
            return
        opened = FileMetadataStore.read_format(path)
        if opened is None:
            self._meta_path = path
            if self.ms:
                self._replace_meta(self.ns_format, replace=False)
            return
        fd, stored = opened
        try:
            fmt = self._check_stored(path, stored)
        except BaseException:
            os.close(fd)
            raise
        if fmt != self.ns_format:
            log.warning("namespace %d: %s holds format %s, which wins over the one asked for (%s)", self.nsid, path, fmt, self.ns_format)
        store = FileMetadataStore.attach(path, fd, stored, self._meta_template(fmt))
        old, self._meta, self._meta_path = self._meta, store, path
        if old is not None:
            old.close()
        self.apply_format(fmt)

    def _check_stored(self, path: str, stored: StoredFormat) -> NsFormat:
        """The format a sidecar records, if this namespace can be in it."""
        if self.zones is not None:
            raise ValueError(f"{path}: metadata of a zoned namespace (zoned namespaces have none: delete it)")
        try:
            fmt = check_ns_format(stored.fmt)
        except NvmeError as e:
            raise ValueError(f"{path}: {e}") from None
        lbaf = LBA_FORMATS[fmt.lbaf]
        if (stored.lbads, stored.ms) != (lbaf.lbads, lbaf.ms) or fmt != stored.fmt:
            raise ValueError(f"{path}: LBA format {fmt.lbaf} recorded as {1 << stored.lbads}+{stored.ms}, "
                             f"this build's is {lbaf.size}+{lbaf.ms}")
        if stored.nlbas != self.backend.size >> lbaf.lbads:
            raise ValueError(f"{path}: made for {stored.nlbas} blocks, the image holds {self.backend.size >> lbaf.lbads} "
                             "(resized? delete the sidecar to start with every block's metadata deallocated)")
        return fmt

    def _replace_meta(self, fmt: NsFormat, *, replace: bool) -> None:
        """A fresh store for ``fmt``, every block deallocated: in memory, or a new sidecar
        (where there is a path and either metadata to keep or a sidecar already recording
        the format)."""
        lbaf = LBA_FORMATS[fmt.lbaf]
        nlbas = self.backend.size >> lbaf.lbads if self.zones is None else self.zones.nlbas
        template = self._meta_template(fmt)
        old = self._meta
        store: MetadataStore
        if self._meta_path is not None and (lbaf.ms or isinstance(old, FileMetadataStore)):
            stored = StoredFormat(fmt, lbaf.lbads, lbaf.ms, nlbas)
            store = FileMetadataStore.create(self._meta_path, stored, template, replace=replace and isinstance(old, FileMetadataStore))
        else:
            store = MetadataStore(lbaf.ms, nlbas, template)
        self._meta = store
        if old is not None:
            old.close(sync=False)  # its blocks are erased: nothing of it needs to be durable

    # -- zone state that outlives the process ----------------------------------------------------

    def keep_zones_in(self, path: str | None) -> None:
        """Keep this zoned namespace's zones in the sidecar at ``path`` (None: in memory, as a
        RAM namespace's: they need not outlive the process). Restores them from it; a new
        sidecar means every zone is Empty, so the blocks are deallocated to match (an Empty
        zone reads zeros; an image that held data under another geometry would otherwise show
        it). ValueError for a sidecar that cannot be trusted (:class:`ZoneSidecar`)."""
        if path is None or self.zones is None:
            return
        sidecar = ZoneSidecar.open(path, self.zones)
        try:
            if sidecar.created:
                self.backend.write_zeroes(0, self.backend.size, deallocate=True)
                self.backend.flush()
        except BaseException:
            sidecar.close(sync=False)
            raise
        self._zone_sidecar = sidecar

    def _sync_zones(self) -> None:
        """Make the sidecar durable (msync) once the data it describes is: Flush and FUA."""
        if self._zone_sidecar is not None:
            self._zone_sidecar.sync()

    def _write_durable(self, off: int, views: Buffers, *, fua: bool) -> None:
        """A FUA write of a zoned namespace with a sidecar: the data, then the zones."""
        self.backend.write_from(off, views, fua=fua)
        self._sync_zones()

    def format(self, lbaf_index: int, secure_erase: int = 0, *, mset: bool = False,
               pi_type: ProtectionType = ProtectionType.NONE, pil: PiLocation = PiLocation.LAST) -> None:
        """Format NVM: switch LBA format (byte capacity kept), metadata and protection
        information, and zero all user data and metadata.

        Every Secure Erase Setting (0 none, 1 user data, 2 cryptographic) zeroes the media:
        with no encryption that is the strongest erase we have and the cheapest to reason about.
        """
        fmt = self.check_format(lbaf_index, secure_erase, mset=mset, pi_type=pi_type, pil=pil)
        self.erase(fmt)
        self.apply_format(fmt)

    def check_format(self, lbaf_index: int, secure_erase: int = 0, *, mset: bool = False,
                     pi_type: ProtectionType = ProtectionType.NONE, pil: PiLocation = PiLocation.LAST) -> NsFormat:
        """The checks of :meth:`format`, alone (they run on the loop, :meth:`erase` may not):
        the format to erase into and apply."""
        if not 0 <= lbaf_index < len(LBA_FORMATS):
            raise NvmeError(Status.INVALID_FORMAT, f"LBA format {lbaf_index} not supported")
        if self.zones is not None:
            # As QEMU's hw/nvme (nvme_format_check): zone sizes are in LBAs, and a new LBA
            # size would need a new zone layout under the host's feet.
            raise NvmeError(Status.INVALID_FORMAT, f"namespace {self.nsid} is zoned: Format NVM is not supported")
        if secure_erase not in (0, 1, 2):
            raise NvmeError(Status.INVALID_FIELD, f"secure erase setting {secure_erase}")
        if self.backend.size < LBA_FORMATS[lbaf_index].size:
            raise NvmeError(Status.INVALID_FORMAT, "namespace smaller than one block of that format")
        fmt = check_ns_format(NsFormat(lbaf_index, mset, pi_type, pil, self.ns_format.guard))
        if self.write_protected:
            raise NvmeError(Status.NAMESPACE_WRITE_PROTECTED, f"namespace {self.nsid} is write protected")
        return fmt

    def erase(self, fmt: NsFormat | None = None) -> None:
        """Zero (deallocate) all user data and metadata and make that durable: the slow part
        of Format. ``fmt`` (default: the current one) is the format the metadata is made for;
        on a file or block namespace its sidecar now records it (data first: a crash between
        the two leaves the old format over erased data, never the new one over old data)."""
        self.backend.write_zeroes(0, self.backend.size, deallocate=True)
        self.backend.flush()
        self._replace_meta(self.ns_format if fmt is None else fmt, replace=True)

    def close(self) -> None:
        sidecar, self._zone_sidecar = self._zone_sidecar, None
        if sidecar is not None and self.zones is not None:
            self.zones.shutdown()  # open zones are stored Closed (or Empty), as QEMU does
            sidecar.close()
        meta, self._meta = self._meta, None
        if meta is not None:
            meta.close()
        self.backend.close()

    def __enter__(self) -> "Namespace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Identify ------------------------------------------------------------------------------

    def identify_fields(self) -> dict:
        """Identify Namespace (NVM) fields, for callers that need to tweak some before build."""
        return dict(
            nsze=self.nsze,
            ncap=self.ncap,
            nuse=self.nuse,
            nsfeat=0,
            flbas=flbas_encode(self.lbaf_index) | (FLBAS_EXTENDED_METADATA if self.extended else 0),
            # a zoned namespace has no metadata formats to choose (check_ns_format)
            mc=0 if self.zones is not None else Mc.EXTENDED | Mc.SEPARATE,
            dpc=0 if self.zones is not None else Dpc.ALL,
            dps=0 if self.pi is None else self.pi.dps,
            dlfeat=self.dlfeat,
            nvmcap=self.size_bytes,
            nsattr=NSATTR_WRITE_PROTECTED if self.write_protected else 0,
            nguid=self.nguid,
            eui64=self.eui64,
            mssrl=COPY_MAX_RANGE_LBAS,
            mcl=COPY_MAX_LBAS,
            msrc=COPY_MAX_RANGES - 1,
            lbaf=[(f.ms, f.lbads, f.rp) for f in LBA_FORMATS],
        )

    def identify_namespace(self, **overrides) -> bytes:
        """CNS 00h for this namespace."""
        return structures.build_identify_namespace(**{**self.identify_fields(), **overrides})

    def identify_ns_descriptors(self) -> bytes:
        """CNS 03h for this namespace (EUI64, NGUID, UUID, and its command set's CSI)."""
        return structures.build_ns_id_descriptors(eui64=self.eui64, nguid=self.nguid, uuid=self.uuid, csi=self.csi)

    def identify_namespace_independent(self) -> bytes:
        """CNS 08h for this namespace."""
        return structures.build_identify_namespace_independent(nsattr=NSATTR_WRITE_PROTECTED if self.write_protected else 0)

    def identify_namespace_nvm(self) -> bytes:
        """CNS 05h / CSI 00h for this namespace: no storage tag (LBSTM 0, PIC 0: its bits are
        storage tag capabilities; the guards are told per format), and each LBA format's PI
        format in ELBAF (STS 0, PIF: the namespace's guard where its metadata can hold it,
        16b Guard elsewhere). All zeros for a 16b Guard namespace, as before."""
        return structures.build_identify_namespace_nvm(elbaf=elbaf_list(self.ns_format.guard))

    # -- what the control plane reports ----------------------------------------------------------

    def describe_storage(self) -> dict[str, Any]:
        """The storage behind it: the backend's class and its path (None in memory), the
        format's metadata and protection information with where the metadata is kept, and the
        backend's way to its storage where it has one (``storage``: an NBD namespace's
        connections, in-flight calls, errors and reconnects, :meth:`Backend.storage_stats`)."""
        pi, stats = self.pi, self.backend.storage_stats()
        return {"backend": type(self.backend).__name__, "path": getattr(self.backend, "path", None),
                "ms": self.ms, "extended": self.extended, "pi": 0 if pi is None else int(pi.pi_type),
                "pil": None if pi is None else pi.location.name.lower(), "guard": 16 if self.ns_format.guard is GuardKind.GUARD_16 else 64,
                "meta_path": None if self._meta is None else self._meta.path, **({"storage": stats} if stats is not None else {})}

    def inline_stats(self) -> dict[str, int] | None:
        """How its blocking calls ran inline or on the pool (:mod:`nvme_emu.inline_budget`);
        None when it has no inline budget (RAM: every call is inline)."""
        budget = self.backend.inline_budget
        return None if budget is None else dict(budget.stats.__dict__)

    def __repr__(self) -> str:
        zones = "" if self.zones is None else f", zoned {self.zones.num_zones}x{self.zones.zone_size}"
        return f"Namespace(nsid={self.nsid}, {type(self.backend).__name__}, {self.nsze}x{self.lba_size}{zones})"


# ---------------------------------------------------------------------------------------------
# Namespace Management
# ---------------------------------------------------------------------------------------------


def new_namespace_path(directory: str, nsid: int) -> str:
    """Where Namespace Management keeps namespace ``nsid`` when a directory is configured."""
    return os.path.join(directory, f"ns{nsid}.img")


def create_namespace(nsid: int, size: int, lba_size: int, *, directory: str | None = None, csi: Csi = Csi.NVM,
                     zoned: ZoneGeometry | None = None, fmt: NsFormat | None = None) -> Namespace:
    """A fresh, zeroed namespace for Namespace Management: RAM, or a new sparse file in
    ``directory`` (an existing file of that name, and its metadata sidecar, are stale ones
    from a deleted namespace of an earlier run: they are replaced, since a new namespace must
    read as zeroes). ``fmt``: its metadata and protection information (``lba_size`` must be
    its LBA format's). It is a new namespace, so it gets new IDs
    (:func:`nvme_emu.identity.created_namespace_seed`)."""
    backend: Backend
    path = None
    if directory is None:
        backend = RamBackend(size)
    else:
        path = new_namespace_path(directory, nsid)
        for stale in (path, path + META_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        backend = FileBackend(path, size)
    f = NsFormat(lba_format_index(lba_size)) if fmt is None else fmt
    ms = LBA_FORMATS[f.lbaf].ms
    try:
        ns = Namespace(nsid, backend, lba_size=lba_size, id_seed=identity.created_namespace_seed(), csi=csi, zoned=zoned, ms=ms,
                       extended=f.extended, pi_type=f.pi_type, pil=f.pil, guard=f.guard)
    except BaseException:
        backend.close()
        raise
    if path is not None:
        try:
            ns.keep_meta_in(path + META_SUFFIX)
        except BaseException:
            ns.close()
            raise
    return ns


def destroy_namespace(ns: Namespace, *, directory: str | None = None) -> None:
    """Namespace Management's delete: close it; a file it created in ``directory`` goes too."""
    path = getattr(ns.backend, "path", None)
    ns.close()
    if directory is not None and path == new_namespace_path(directory, ns.nsid):
        for created in (path, path + META_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(created)
