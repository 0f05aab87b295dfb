"""Data pointers: turn a command's PRPs or SGL into memoryviews of guest memory.

The result is a list of memoryviews, in transfer order, whose lengths add up to the transfer
length; nothing is copied. A command's data is then moved by the namespace backend directly
into or out of those views. Every way a host can get a pointer wrong maps to the status the
Base specification names for it, raised as :class:`spec.NvmeError`.

Direction: ``write=True`` means *the device writes guest memory* (controller-to-host: Read,
Identify, Get Log Page); the views are then writable and read-only mappings are refused.
``write=False`` means the device only reads guest memory (Write, Compare, Set Features data).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from vfio_user.dma import DmaError, GuestMemory

from .spec.commands import PRP_ENTRY_SIZE, SGL_DESCRIPTOR_SIZE, NvmeError, SglSubtype, SglType, Status
from .spec.registers import MEMORY_PAGE_SHIFT_MIN

if TYPE_CHECKING:
    from .outcome import Work

#: The smallest memory page (CC.MPS = 0): a range inside one is inside a page of any size.
SMALLEST_PAGE = 1 << MEMORY_PAGE_SHIFT_MIN

# ---------------------------------------------------------------------------------------------
# Guest memory ranges -> views
# ---------------------------------------------------------------------------------------------


def _views_for_range(mem: GuestMemory, iova: int, length: int, write: bool, out: list[memoryview]) -> None:
    """Append views covering ``[iova, iova+length)``, one per DMA mapping it crosses.

    Any part that is unmapped, fd-less or (for device writes) read-only is a Data Transfer
    Error: the host gave us an address we cannot move data to or from.
    """
    end = iova + length
    if end > 1 << 64:
        raise NvmeError(Status.DATA_TRANSFER_ERROR, f"data range {iova:#x}+{length:#x} wraps the address space")
    try:
        while iova < end:
            m = mem.table.lookup(iova, 1)
            n = min(end, m.end) - iova
            out.append(mem.view(iova, n, write=write))
            iova += n
    except DmaError as e:
        raise NvmeError(Status.DATA_TRANSFER_ERROR, str(e)) from None


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge physically adjacent ranges so contiguous guest buffers become one iovec."""
    out: list[tuple[int, int]] = []
    for addr, n in ranges:
        if out and out[-1][0] + out[-1][1] == addr:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((addr, n))
    return out


def release_views(views: Sequence[memoryview]) -> None:
    """Release views now rather than at garbage collection: a live view pins its DMA mapping
    (the transport cannot munmap it), so error paths and completions should call this."""
    for v in views:
        v.release()


def done_or_owned(call: Callable[[], Work | None], views: Sequence[memoryview]) -> int | Work:
    """Run a storage call on ``views``: they are released here when it is done (0) or failed,
    or owned by the Work it handed back (released when that Work ends). The one copy of this
    rule; ``NvmCommands.read``/``write`` inline it on their hot path."""
    try:
        work = call()
    except BaseException:
        release_views(views)
        raise
    if work is None:
        release_views(views)
        return 0
    return work


def _map_ranges(mem: GuestMemory, ranges: list[tuple[int, int]], write: bool, views: list[memoryview]) -> None:
    """Append views for ``ranges`` to ``views``; on failure release everything in ``views``."""
    try:
        for addr, n in _coalesce(ranges):
            _views_for_range(mem, addr, n, write, views)
    except BaseException:
        release_views(views)
        views.clear()
        raise


def _read_guest(mem: GuestMemory, iova: int, length: int) -> bytes:
    """Fetch a PRP list or SGL segment; unreadable -> Data Transfer Error."""
    try:
        return mem.read(iova, length)
    except DmaError as e:
        raise NvmeError(Status.DATA_TRANSFER_ERROR, f"cannot fetch descriptor memory: {e}") from None


# ---------------------------------------------------------------------------------------------
# PRP
# ---------------------------------------------------------------------------------------------

#: Default cap on PRP entries one command may use: 2 GiB of 4 KiB pages. MDTS limits real
#: transfers long before; this only bounds work for a hostile length.
DEFAULT_MAX_PRP_ENTRIES = 1 << 19


def prp_ranges(
    mem: GuestMemory, prp1: int, prp2: int, length: int, page_size: int, *, max_list_entries: int = DEFAULT_MAX_PRP_ENTRIES
) -> list[tuple[int, int]]:
    """The (iova, length) pieces a PRP pair describes (Base 2.0, "Physical Region Page Entry").

    - PRP1 may carry a page offset, which must be dword aligned (bits 1:0 clear).
    - If the rest fits one page, PRP2 is that page's address and must have offset 0.
    - Otherwise PRP2 points at a PRP list (qword aligned, any offset). Every list entry is a
      page address with offset 0; when more entries are needed than fit before the end of the
      list page, the last slot instead points at the next list page (offset 0 as well).

    The walk reads exactly as many entries as the length needs, so a list that loops back on
    itself just yields repeated pages and can never run forever.
    """
    if length <= 0:
        return []
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"memory page size {page_size} is not a power of two")
    mask = page_size - 1
    if prp1 & 0x3:
        raise NvmeError(Status.PRP_OFFSET_INVALID, f"PRP1 {prp1:#x} not dword aligned")
    first = min(length, page_size - (prp1 & mask))
    ranges = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return ranges
    if remaining <= page_size:
        if prp2 & mask:
            raise NvmeError(Status.PRP_OFFSET_INVALID, f"PRP2 {prp2:#x} has a page offset")
        ranges.append((prp2, remaining))
        return ranges
    needed = -(-remaining // page_size)
    if needed > max_list_entries:
        raise NvmeError(Status.INVALID_FIELD, f"transfer needs {needed} PRP entries (limit {max_list_entries})")
    if prp2 & 0x7:
        raise NvmeError(Status.PRP_OFFSET_INVALID, f"PRP list pointer {prp2:#x} not qword aligned")
    for entry in _prp_list_entries(mem, prp2, needed, page_size):
        if entry & mask:
            raise NvmeError(Status.PRP_OFFSET_INVALID, f"PRP list entry {entry:#x} has a page offset")
        n = min(remaining, page_size)
        ranges.append((entry, n))
        remaining -= n
    return ranges


def _prp_list_entries(mem: GuestMemory, list_addr: int, needed: int, page_size: int):
    """Yield ``needed`` data-page entries, following list-page chain pointers."""
    mask = page_size - 1
    while needed:
        slots = (page_size - (list_addr & mask)) // PRP_ENTRY_SIZE
        take = needed if needed <= slots else slots - 1  # last slot chains to the next page
        raw = _read_guest(mem, list_addr, (take + (take < needed)) * PRP_ENTRY_SIZE)
        entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
        yield from entries[:take]
        needed -= take
        if needed:
            list_addr = entries[take]
            if list_addr & mask:
                raise NvmeError(Status.PRP_OFFSET_INVALID, f"chained PRP list pointer {list_addr:#x} has a page offset")


def single_page_view(mem: GuestMemory, prp1: int, length: int, page_size: int = SMALLEST_PAGE, *, write: bool) -> memoryview | None:
    """The data of a PRP-described transfer as one view when it lies in PRP1's page, the
    common case of small I/O. None: anything else, including anything wrong (unmapped,
    read-only, a page across two mappings, bad alignment), which :func:`prp_views`'s
    general path then reports exactly. The default page, the smallest memory page size,
    lies within any CC.MPS page and within any MDTS."""
    if 0 < length <= page_size - (prp1 & (page_size - 1)) and not prp1 & 0x3 and page_size > 0 and not page_size & (page_size - 1):
        try:
            return mem.view(prp1, length, write=write)
        except DmaError:
            return None
    return None


def prp_views(
    mem: GuestMemory,
    prp1: int,
    prp2: int,
    length: int,
    page_size: int,
    *,
    write: bool,
    max_list_entries: int = DEFAULT_MAX_PRP_ENTRIES,
) -> list[memoryview]:
    """Memoryviews for a PRP-described transfer of ``length`` bytes (see module docstring)."""
    view = single_page_view(mem, prp1, length, page_size, write=write)
    if view is not None:
        return [view]
    ranges = prp_ranges(mem, prp1, prp2, length, page_size, max_list_entries=max_list_entries)
    views: list[memoryview] = []
    _map_ranges(mem, ranges, write, views)
    return views


# ---------------------------------------------------------------------------------------------
# SGL
# ---------------------------------------------------------------------------------------------

_BIT_BUCKET_SIZE = 1 << 20
_BIT_BUCKET = bytearray(_BIT_BUCKET_SIZE)
#: Default bounds on an SGL walk: the descriptors and segments one command may use.
DEFAULT_MAX_SGL_DESCRIPTORS = 4096
DEFAULT_MAX_SGL_SEGMENTS = 256


def is_bit_bucket(view: memoryview) -> bool:
    """True for the throw-away views standing in for SGL Bit Bucket descriptors."""
    return view.obj is _BIT_BUCKET


def _bit_bucket_views(length: int, out: list[memoryview]) -> None:
    while length:
        n = min(length, _BIT_BUCKET_SIZE)
        out.append(memoryview(_BIT_BUCKET)[:n])
        length -= n


@dataclass(frozen=True)
class SglDescriptor:
    """One 16-byte SGL descriptor: address u64, length u32, 3 reserved bytes, identifier."""

    address: int
    length: int
    type: int
    subtype: int

    @classmethod
    def parse(cls, raw: bytes | memoryview, offset: int = 0) -> "SglDescriptor":
        address, length, ident = struct.unpack_from("<QI3xB", raw, offset)
        return cls(address, length, ident >> 4, ident & 0xF)

    def pack(self) -> bytes:
        return struct.pack("<QI3xB", self.address, self.length, (self.type << 4) | self.subtype)


def sgl_ranges(
    mem: GuestMemory,
    sgl1: bytes | memoryview | SglDescriptor,
    length: int,
    *,
    write: bool,
    allow_excess: bool = False,
    max_descriptors: int = DEFAULT_MAX_SGL_DESCRIPTORS,
    max_segments: int = DEFAULT_MAX_SGL_SEGMENTS,
) -> list[tuple[int | None, int]]:
    """The (iova, length) pieces an SGL describes; ``iova`` None marks a bit bucket.

    Checks, with the statuses used (Base 2.0, "Scatter Gather List"):

    - descriptor types other than Data Block/Bit Bucket/Segment/Last Segment, or a sub type
      other than Address, -> SGL Descriptor Type Invalid; so is a Bit Bucket when the device
      reads host memory (bit buckets only discard controller-to-host data);
    - a Segment/Last Segment descriptor anywhere but the last slot of a segment -> Invalid
      Number of SGL Descriptors; a segment length of zero, not a multiple of 16 or a segment
      not qword aligned -> Invalid SGL Segment Descriptor; a Segment or Last Segment
      descriptor inside the last segment -> Invalid SGL Segment Descriptor;
    - more descriptors or segments than the bounds (a looping chain ends here) -> Invalid
      Number of SGL Descriptors;
    - data descriptors adding up to less than ``length``, or to more unless ``allow_excess``
      (SGLS bit 18) -> Data SGL Length Invalid.
    """
    if length <= 0:
        return []
    d = sgl1 if isinstance(sgl1, SglDescriptor) else SglDescriptor.parse(bytes(sgl1[: SGL_DESCRIPTOR_SIZE]))
    pieces: list[tuple[int | None, int]] = []
    state = _SglWalk(length, write, allow_excess)
    segments = 0
    descriptors = 1
    in_last = False  # the descriptors being walked come from a Last Segment
    while True:
        if d.type not in (SglType.SEGMENT, SglType.LAST_SEGMENT):
            state.data(d, pieces)
            break
        if in_last:
            raise NvmeError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, "Last Segment holds a segment descriptor")
        _check_segment_descriptor(d)
        segments += 1
        count = d.length // SGL_DESCRIPTOR_SIZE
        descriptors += count
        if segments > max_segments or descriptors > max_descriptors:
            raise NvmeError(Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS, "SGL chain too long (loop?)")
        in_last = d.type == SglType.LAST_SEGMENT
        raw = _read_guest(mem, d.address, d.length)
        descs = [SglDescriptor.parse(raw, i * SGL_DESCRIPTOR_SIZE) for i in range(count)]
        for inner in descs[:-1]:
            if inner.type in (SglType.SEGMENT, SglType.LAST_SEGMENT):
                raise NvmeError(Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS, "segment descriptor before the end of a segment")
            state.data(inner, pieces)
        d = descs[-1]
    state.finish()
    return pieces


def _check_segment_descriptor(d: SglDescriptor) -> None:
    if d.subtype != SglSubtype.ADDRESS:
        raise NvmeError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"segment descriptor sub type {d.subtype:#x}")
    if d.length == 0 or d.length % SGL_DESCRIPTOR_SIZE:
        raise NvmeError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, f"segment length {d.length} not a non-zero multiple of 16")
    if d.address & 0x7:
        raise NvmeError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, f"segment at {d.address:#x} not qword aligned")


class _SglWalk:
    """Running total of data described so far, trimming or refusing what exceeds ``length``."""

    def __init__(self, length: int, write: bool, allow_excess: bool) -> None:
        self.left = length
        self.write = write
        self.allow_excess = allow_excess

    def data(self, d: SglDescriptor, pieces: list[tuple[int | None, int]]) -> None:
        if d.type == SglType.DATA_BLOCK:
            addr: int | None = d.address
        elif d.type == SglType.BIT_BUCKET:
            if not self.write:
                raise NvmeError(Status.SGL_DESCRIPTOR_TYPE_INVALID, "Bit Bucket in a host-to-controller transfer")
            addr = None
        else:
            raise NvmeError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"SGL descriptor type {d.type:#x} not supported")
        if d.subtype != SglSubtype.ADDRESS:
            raise NvmeError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"SGL descriptor sub type {d.subtype:#x}")
        if d.length == 0:
            return
        if self.left == 0 or d.length > self.left:
            if not self.allow_excess:
                raise NvmeError(Status.DATA_SGL_LENGTH_INVALID, "SGL describes more data than the command transfers")
        n = min(d.length, self.left)
        if n:
            pieces.append((addr, n))
            self.left -= n

    def finish(self) -> None:
        if self.left:
            raise NvmeError(Status.DATA_SGL_LENGTH_INVALID, f"SGL is {self.left} bytes short of the transfer")


def sgl_views(
    mem: GuestMemory,
    sgl1: bytes | memoryview | SglDescriptor,
    length: int,
    *,
    write: bool,
    allow_excess: bool = False,
    max_descriptors: int = DEFAULT_MAX_SGL_DESCRIPTORS,
    max_segments: int = DEFAULT_MAX_SGL_SEGMENTS,
) -> list[memoryview]:
    """Memoryviews for an SGL-described transfer; bit buckets become throw-away views
    (see :func:`is_bit_bucket`), so callers can treat the list uniformly."""
    pieces = sgl_ranges(
        mem, sgl1, length, write=write, allow_excess=allow_excess, max_descriptors=max_descriptors, max_segments=max_segments
    )
    views: list[memoryview] = []
    run: list[tuple[int, int]] = []
    for addr, n in pieces:
        if addr is None:
            _map_ranges(mem, run, write, views)
            run = []
            _bit_bucket_views(n, views)
        else:
            run.append((addr, n))
    _map_ranges(mem, run, write, views)
    return views


# ---------------------------------------------------------------------------------------------
# Copy helpers
# ---------------------------------------------------------------------------------------------


def gather(views: Sequence[memoryview]) -> bytes:
    """Concatenate the data the views hold (bit buckets included; they only occur on
    device-to-host transfers, where nobody gathers)."""
    return b"".join(views)


def scatter(views: Sequence[memoryview], data: bytes | bytearray | memoryview) -> int:
    """Copy ``data`` into the views in order; bytes of the views beyond ``data`` are zeroed
    (a short log page reads as zeros, never stale memory). Returns bytes of ``data`` copied;
    ``data`` longer than the views is truncated, as a host asking for less than a page gets."""
    src = memoryview(data).cast("B")
    pos = 0
    for v in views:
        n = len(v)
        if is_bit_bucket(v):
            pos += n
            continue
        chunk = src[pos : pos + n]
        v[: len(chunk)] = chunk
        if len(chunk) < n:
            v[len(chunk) :] = bytes(n - len(chunk))
        pos += n
    return min(pos, len(src))
