"""Metadata beside the data: each logical block's MS bytes of metadata (and so its protection
information), and the namespace format they were written under (issue 26).

The namespace's backend holds the data only, at the same byte offsets whatever the format (a
Format NVM changes nothing in the image but its meaning); the metadata lives here, block after
block, ``nlbas x ms`` bytes. A host's extended LBAs (FLBAS bit 4) are split and joined on the
way through the command set: how metadata crosses the host interface is no business of storage.

**What a block nobody wrote holds.** A deallocated block's metadata reads as DLFEAT says, with
PI that turns checking off (:meth:`nvme_emu.pi.engine.PiEngine.fill_deallocated`: all bytes 0h
and the PI all FFh, as QEMU's hw/nvme returns for a zeroed block). So that a fresh store, a
Format and a Deallocate cost nothing (no pattern written over gigabytes, a sparse sidecar stays
sparse), the store keeps every block's metadata XORed with that *template*: zero bytes mean
"as deallocated". :meth:`MetadataStore.read` therefore returns a copy (the XOR is applied on
the way out, one numpy operation for all blocks; the caller may change it in place, as the PI
engine's strip and insert do), and :meth:`MetadataStore.write` XORs on the way in. The
template depends only on the format, and every format change erases all metadata, so stored
bytes are never read under another template.

**Where.** RAM: a numpy array (calloc'd, so untouched pages cost nothing). ``file:`` and ``blk:``
namespaces: a sidecar file mapped ``MAP_SHARED`` (:class:`FileMetadataStore`), placed as the
zone sidecar is (:mod:`nvme_emu.zoned.sidecar`): ``IMAGE.meta`` next to a file image, and for
a device ``meta/blk-NAME-HASH.meta`` under the state directory (``$NVME_EMU_STATE_DIR``).
A store into the mapping is in the page cache before the command completes, so a SIGKILL never
loses acknowledged metadata; Flush, FUA and shutdown ``msync`` it, as the data is fsynced.

**The format outlives the process.** The sidecar's 4 KiB header records the format the
guest last chose (LBA format index, MSET, PI type, PI position, the namespace's guard), with
the data and metadata sizes and the block count to refuse a sidecar that does not fit the image.
A Format writes a new sidecar (temporary file, fsynced, renamed over the old one: a crash leaves
the old format or the new, never a mix). Layout::

    magic "NVMEMETA" | version u16 | header size u16 (4096) | lbaf u8 | mset u8 | pi type u8
    | pil u8 | guard (PIF) u8 | lbads (log2) u8 | ms u16 | nlbas u64 | CRC-32 of the above u32
    | zeros to 4096, then nlbas x ms bytes of metadata (XORed with the template)

A 4 KiB header keeps the metadata page aligned, so an ``msync`` of a block range covers only
the pages it touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .backends.base import BackendKind
from .ns_format import NsFormat
from .pi.format import GuardKind, PiLocation, ProtectionType
from .state_files import state_file

MAGIC = b"NVMEMETA"
VERSION = 1
HEADER_SIZE = 4096
SUFFIX = ".meta"
_HEADER = struct.Struct("<8sHHBBBBBBHQ")
_CRC = struct.Struct("<I")

U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class StoredFormat:
    """What a sidecar's header says: the format, and the geometry it was made for."""

    fmt: NsFormat
    lbads: int  # log2 of the data size
    ms: int
    nlbas: int


def meta_path(kind: BackendKind | str, path: str | None) -> str | None:
    """Where a namespace of backend ``kind`` on ``path`` keeps its metadata (module
    docstring; :mod:`nvme_emu.state_files` has the rule); None for RAM, whose metadata dies
    with its data."""
    return state_file(kind, path, "meta", SUFFIX)


def encode_header(stored: StoredFormat) -> bytes:
    f = stored.fmt
    head = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, f.lbaf, int(f.extended), int(f.pi_type), int(f.pil), int(f.guard),
                        stored.lbads, stored.ms, stored.nlbas)
    return (head + _CRC.pack(zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")


def decode_header(data: bytes | mmap.mmap, size: int, where: str) -> StoredFormat:
    """Check a sidecar's header (and that the file is as long as it says); ValueError, naming
    ``where``, says what is wrong."""
    if size < HEADER_SIZE:
        raise ValueError(f"{where}: {size} bytes, shorter than the header: torn or not a metadata sidecar")
    magic, version, header_size, lbaf, mset, pi, pil, guard, lbads, ms, nlbas = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{where}: not a metadata sidecar (magic {magic!r})")
    (crc,) = _CRC.unpack_from(data, _HEADER.size)
    if crc != zlib.crc32(data[: _HEADER.size]):
        raise ValueError(f"{where}: header checksum mismatch: torn or damaged")
    if version != VERSION or header_size != HEADER_SIZE:
        raise ValueError(f"{where}: version {version} ({header_size}-byte header), this build reads version {VERSION}")
    if size != HEADER_SIZE + nlbas * ms:
        raise ValueError(f"{where}: {size} bytes, {nlbas} blocks of {ms} bytes need {HEADER_SIZE + nlbas * ms}")
    try:
        fmt = NsFormat(lbaf, bool(mset), ProtectionType(pi), PiLocation(pil), GuardKind(guard))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return StoredFormat(fmt, lbads, ms, nlbas)


class MetadataStore:
    """``nlbas`` blocks of ``ms`` metadata bytes in memory, XORed with ``template`` (module
    docstring). Block numbers are range-checked by the namespace."""

    def __init__(self, ms: int, nlbas: int, template: U8, blocks: U8 | None = None) -> None:
        if template.size != ms:
            raise ValueError(f"template of {template.size} bytes for {ms}-byte metadata")
        self.ms = ms
        self.nlbas = nlbas
        #: the template's bytes (a namespace compares them to know the store is its format's)
        self.template = template.tobytes()
        self._template = template.reshape(1, ms) if ms else template
        #: a template of zeros (metadata without PI): plain copies, no XOR
        self._plain = not template.any()
        self._blocks: U8 = np.zeros(nlbas * ms, dtype=np.uint8) if blocks is None else blocks

    def read(self, first: int, count: int) -> memoryview:
        """A copy of blocks ``first .. first + count``'s metadata (writable, the caller's)."""
        ms = self.ms
        stored = self._blocks[first * ms : (first + count) * ms]
        if self._plain:
            return stored.copy().data
        return np.bitwise_xor(stored.reshape(count, ms), self._template).reshape(-1).data

    def write(self, first: int, data: Any) -> int:
        """Store ``data`` (whole blocks of metadata, any bytes-like object) from block
        ``first`` on; how many blocks it held."""
        ms = self.ms
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
        count, rest = divmod(src.size, ms) if ms else (0, src.size)
        if rest:
            raise ValueError(f"{src.size} metadata bytes are not whole {ms}-byte blocks")
        dest = self._blocks[first * ms : (first + count) * ms]
        if self._plain:
            dest[:] = src
        else:
            np.bitwise_xor(src.reshape(count, ms), self._template, out=dest.reshape(count, ms))
        return count

    def deallocate(self, first: int, count: int) -> None:
        """Blocks ``first ..`` read as deallocated from now on."""
        self._blocks[first * self.ms : (first + count) * self.ms] = 0

    def sync(self, first: int = 0, count: int | None = None) -> None:
        """Make blocks durable (nothing to do in memory)."""

    def close(self, *, sync: bool = True) -> None:
        """Release the blocks."""

    @property
    def path(self) -> str | None:
        return None


class FileMetadataStore(MetadataStore):
    """A sidecar file's metadata, mapped; locked against a second ``serve`` (``flock``)."""

    def __init__(self, path: str, fd: int, mapping: mmap.mmap, stored: StoredFormat, template: U8) -> None:
        blocks = np.frombuffer(mapping, dtype=np.uint8, offset=HEADER_SIZE) if stored.ms else np.zeros(0, np.uint8)
        super().__init__(stored.ms, stored.nlbas, template, blocks)
        self._path = path
        self._fd = fd
        self._map: mmap.mmap | None = mapping
        self.stored = stored

    @property
    def path(self) -> str | None:
        return self._path

    @staticmethod
    def read_format(path: str) -> tuple[int, StoredFormat] | None:
        """Open, lock and check the sidecar at ``path``: its fd and what its header says;
        None if there is none. ValueError for one that cannot be trusted or is in use."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            _lock(fd, path)
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEADER_SIZE, 0)
            return fd, decode_header(head, size, path)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, path: str, fd: int, stored: StoredFormat, template: U8) -> FileMetadataStore:
        """Map the sidecar :meth:`read_format` opened (the caller checked its format)."""
        try:
            mapping = mmap.mmap(fd, HEADER_SIZE + stored.nlbas * stored.ms, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mapping, stored, template)

    @classmethod
    def create(cls, path: str, stored: StoredFormat, template: U8, *, replace: bool) -> FileMetadataStore:
        """A new sidecar for ``stored``, every block deallocated, put in place whole or not at
        all: a temporary file (locked, sized sparse, fsynced) renamed over the old one
        (``replace``, a Format: the caller holds the old one) or linked into place (a first
        store: if another process made one meanwhile, FileExistsError)."""
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            try:
                _lock(fd, tmp)
                os.write(fd, encode_header(stored))
                os.ftruncate(fd, HEADER_SIZE + stored.nlbas * stored.ms)
                os.fsync(fd)
                if replace:
                    os.rename(tmp, path)
                else:
                    os.link(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _fsync_dir(directory)
        except BaseException:
            os.close(fd)
            raise
        return cls.attach(path, fd, stored, template)

    def sync(self, first: int = 0, count: int | None = None) -> None:
        """``msync`` the pages holding blocks ``first ..`` (all: ``count`` None)."""
        if self._map is None or not self.ms:
            return
        start = HEADER_SIZE + first * self.ms
        end = HEADER_SIZE + (self.nlbas if count is None else first + count) * self.ms
        start -= start % mmap.PAGESIZE
        if end > start:
            self._map.flush(start, end - start)

    def close(self, *, sync: bool = True) -> None:
        """Sync, unmap and unlock. Idempotent."""
        mapping, self._map = self._map, None
        if mapping is None:
            return
        try:
            if sync:
                mapping.flush()
        finally:
            self._blocks = np.zeros(0, np.uint8)  # drop the export before unmapping
            mapping.close()
            os.close(self._fd)


def _lock(fd: int, path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ValueError(f"{path}: metadata in use by another process") from None
        raise


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
