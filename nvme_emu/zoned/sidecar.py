"""Zone state on disk: the sidecar file that lets a zoned namespace's zones survive a restart
of ``serve`` (issue 25), written crash-consistently: a SIGKILL never leaves a write pointer
behind data that was acknowledged.

How: the file is mapped ``MAP_SHARED`` and each zone is one aligned 8-byte record in it,
updated by :meth:`ZoneSidecar.zone_changed` with a single store whenever the
:class:`~nvme_emu.zoned.zone_set.ZoneSet` changes the zone (it is the set's
:class:`~nvme_emu.zoned.zone_set.ZoneStore`). The zone set moves a write pointer when it
accepts a Write or Zone Append, before the data is written and so before the completion is
posted, so the stored write pointer is never behind acknowledged data (it may be ahead of data
a killed process had not written yet: those LBAs read as zeros, as any LBA above a write
pointer does; QEMU's hw/nvme likewise moves its internal ``w_ptr`` at submission). A store
into a shared file mapping is in the page cache the moment it is made, and the page cache
outlives the process: SIGKILL cannot lose it. Power loss can, so :meth:`ZoneSidecar.sync` (``msync``) is for Flush,
FUA writes and shutdown, the points where data becomes durable too.

Why one store cannot be torn: the record packs the write pointer (as an offset into its zone),
the state and the attributes into one little-endian u64, so a zone's state and write pointer
never disagree on disk, and it is written through a ``memoryview`` cast to native ``Q``, which
CPython stores with a fixed-size 8-byte ``memcpy`` that compilers emit as one instruction
(checked: ``pack_single`` in the CPython 3.11 the tests run on stores it with one
``mov``). A signal ends a process between instructions, and an aligned 8-byte store is
single-copy atomic on both supported CPUs (x86-64, aarch64; :mod:`nvme_emu.atomics`), so a
killed process leaves the old record or the new one. A store through :mod:`nvme_emu.atomics`
(C ``__atomic_store_n``) would not lean on CPython's code generation, but its cffi call costs
~300 ns against ~30 ns; this is once per write on the zoned path. A write that closes another
zone to free an Open Resource stores the closed zone first, then the written one: a kill
between them leaves both in states a restart accepts.

Cost (timeit, Python 3.11, the shared 2-CPU test machine at its quietest):
:meth:`~ZoneSidecar.zone_changed` 0.13-0.15 us per call (the record's arithmetic and one
memoryview store; a plain memoryview store alone is ~0.03 us); ``ZoneSet.write`` 0.9 us without
a store, 1.15 us with the sidecar; ``msync`` of one changed record 0.1-0.2 ms on ext4 over
virtio (only on Flush, FUA and shutdown).

Layout: a 64-byte header, then one u64 record per zone::

    magic "NVMEZONE" | version u16 | header size u16 (64) | record size u16 (8) | reserved u16
    | zone size u64 | zone capacity u64 | zones u32 | CRC-32 of the 36 bytes before it, u32
    | zeros to 64
    record: write pointer offset (bits 47:0) | state (55:48) | attributes (63:56)

The header is written once, when the file is made (in a temporary file, fsynced, then linked
into place, so a crash while making it leaves no sidecar or a whole one) and never again.
Opening refuses, with the path and what is wrong: a torn or damaged header (CRC, magic,
version, a size that does not fit the zone count), a geometry other than the namespace's
(zone size, capacity, number of zones: state for one zone layout is never applied to another,
nor silently reset: the zones describe data), a record no transition could leave, and a
sidecar another process holds (``flock``). A missing sidecar is a fresh start: every zone
Empty (:attr:`ZoneSidecar.created` says so, for the caller to deallocate the namespace). Zones
that were open come back Closed, or Empty if nothing was written (:meth:`ZoneSet.restore`, as
QEMU does).

Where (:func:`sidecar_path`): a ``file:`` namespace's next to its image, ``IMAGE.zones`` (the
image's real path: a symlink finds the same one); a ``blk:`` namespace's cannot live next to a
device node (``/dev`` is a tmpfs), so under the state directory, ``$NVME_EMU_STATE_DIR`` or
``$XDG_STATE_HOME/nvme-emu`` or ``~/.local/state/nvme-emu``, as ``zones/blk-NAME-HASH.zones``,
HASH from the device path as given, the same rule as the namespace's IDs
(:mod:`nvme_emu.identity`): ``/dev/disk/by-id/...`` keeps its zones where ``/dev/sdb`` may
not. A RAM namespace has none: its data dies with the process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import sys
import zlib

from ..backends.base import BackendKind
from ..state_files import state_file
from ..spec.zns import ZoneAttribute, ZoneState
from .persist import ZoneImage, apply
from .zone_set import Zone, ZoneSet

MAGIC = b"NVMEZONE"
VERSION = 1
HEADER_SIZE = 64
RECORD_SIZE = 8
SUFFIX = ".zones"
_HEADER = struct.Struct("<8sHHHHQQI")
_CRC = struct.Struct("<I")

#: A record's fields: the write pointer offset below bit 48, then the state, the attributes.
WP_BITS = 48
WP_MASK = (1 << WP_BITS) - 1
STATE_SHIFT = 48
ATTRS_SHIFT = 56


def sidecar_path(kind: BackendKind | str, path: str | None) -> str | None:
    """Where a namespace of backend ``kind`` on ``path`` keeps its zones (see the module
    docstring; :mod:`nvme_emu.state_files` has the rule); None for RAM."""
    return state_file(kind, path, "zones", SUFFIX)


def record(zone: Zone) -> int:
    """A zone's 8-byte record."""
    return (zone.wp - zone.zslba) | zone.state << STATE_SHIFT | zone.attrs << ATTRS_SHIFT


def _header(zone_set: ZoneSet) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, RECORD_SIZE, 0, zone_set.zone_size, zone_set.zone_capacity, zone_set.num_zones)
    head += _CRC.pack(zlib.crc32(head))
    return head.ljust(HEADER_SIZE, b"\0")


def encode(zone_set: ZoneSet) -> bytes:
    """The whole file for ``zone_set`` as it is now."""
    zones = zone_set.zones
    return _header(zone_set) + struct.pack(f"<{len(zones)}Q", *(record(z) for z in zones))


def decode(data: bytes | mmap.mmap, where: str = "zone state") -> ZoneImage:
    """Check and decode a sidecar's bytes; ValueError, naming ``where``, says what is wrong."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"{where}: {len(data)} bytes, shorter than the header: torn or not a zone sidecar")
    magic, version, header_size, record_size, _reserved, zone_size, zone_capacity, n = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{where}: not a zone sidecar (magic {magic!r})")
    (crc,) = _CRC.unpack_from(data, _HEADER.size)
    if crc != zlib.crc32(data[: _HEADER.size]):
        raise ValueError(f"{where}: header checksum mismatch: torn or damaged")
    if version != VERSION or header_size != HEADER_SIZE or record_size != RECORD_SIZE:
        raise ValueError(f"{where}: version {version} ({header_size}-byte header, {record_size}-byte records), "
                         f"this build reads version {VERSION}")
    if len(data) != HEADER_SIZE + n * RECORD_SIZE:
        raise ValueError(f"{where}: {len(data)} bytes, {n} zones need {HEADER_SIZE + n * RECORD_SIZE}: truncated or damaged")
    zones = []
    for i, word in enumerate(struct.unpack_from(f"<{n}Q", data, HEADER_SIZE)):
        state, attrs = (word >> STATE_SHIFT) & 0xFF, word >> ATTRS_SHIFT
        try:
            zones.append((ZoneState(state), ZoneAttribute(attrs), word & WP_MASK))
        except ValueError:
            raise ValueError(f"{where}: zone {i}: record {word:#018x} holds no zone state") from None
    return ZoneImage(zone_size, zone_capacity, tuple(zones))


def _create(path: str, zone_set: ZoneSet) -> bool:
    """Write a new sidecar for ``zone_set`` at ``path`` whole or not at all: a temporary
    file, fsynced, linked into place (a link, not a rename: if another process made one
    meanwhile, that one stays and is the one both open, whose lock then decides), and the
    link fsynced with its directory. False if another process made it first."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, encode(zone_set))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


class ZoneSidecar:
    """One zone set's sidecar, mapped; the set's :class:`~nvme_emu.zoned.zone_set.ZoneStore`
    from :meth:`open` until :meth:`close`."""

    def __init__(self, path: str, fd: int, mapping: mmap.mmap, zone_set: ZoneSet, *, created: bool) -> None:
        self.path = path
        self.created = created
        self._fd = fd
        self._map = mapping
        self._records = memoryview(mapping)[HEADER_SIZE:].cast("Q")
        self._zone_set: ZoneSet | None = zone_set

    @classmethod
    def open(cls, path: str, zone_set: ZoneSet) -> ZoneSidecar:
        """Restore ``zone_set`` from the sidecar at ``path`` (made, all zones as they are,
        normally Empty, if missing) and become its store. ValueError, leaving ``zone_set``
        unchanged, for a sidecar that cannot be trusted or is in use (module docstring)."""
        if sys.byteorder != "little":  # records are stored as native words (module docstring)
            raise ValueError("zone sidecars are little-endian; this CPU is not")
        if zone_set.store is not None:
            raise ValueError("the zone set already has a store")
        if zone_set.zone_capacity > WP_MASK:
            raise ValueError(f"zone capacity {zone_set.zone_capacity} does not fit a sidecar record")
        created = False
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            created = _create(path, zone_set)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ValueError(f"{path}: zone state in use by another process") from None
                raise
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ValueError(f"{path}: {size} bytes, shorter than the header: torn or not a zone sidecar")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            image = decode(mapping, path)
        except BaseException:
            mapping.close()
            os.close(fd)
            raise
        sidecar = cls(path, fd, mapping, zone_set, created=created)
        try:
            zone_set.store = sidecar
            try:
                apply(zone_set, image)  # restores, storing the restored zones (none open)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        except BaseException:
            sidecar.close(sync=False)
            raise
        return sidecar

    def zone_changed(self, zone: Zone) -> None:
        """Store ``zone``'s record: one aligned 8-byte store (module docstring)."""
        self._records[zone.index] = record(zone)

    def sync(self) -> None:
        """Make the stored zones durable (``msync``): for Flush, FUA writes and shutdown."""
        self._map.flush()

    def close(self, *, sync: bool = True) -> None:
        """Sync, stop being the zone set's store, unmap and unlock. Idempotent."""
        if self._zone_set is None:
            return
        if self._zone_set.store is self:
            self._zone_set.store = None
        self._zone_set = None
        try:
            if sync:
                self._map.flush()
        finally:
            self._records.release()
            self._map.close()
            os.close(self._fd)

    def __enter__(self) -> ZoneSidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
