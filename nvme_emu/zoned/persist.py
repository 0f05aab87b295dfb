"""Zone state as bytes, for the sidecar that lets zones survive a restart of ``serve``
(issue 25): bytes in, bytes out; where and when they are written (crash-consistently, after
the data they describe) is the caller's.

Layout, little-endian::

    magic "NEZS" | version u16 | reserved u16 | zone size u64 | zone capacity u64 | zones u32
    state u8 x zones | attributes u8 x zones | write pointer offset u64 x zones
    CRC-32 of everything before it, u32

The geometry is stored so state saved for one zone layout is never applied to another; the
write pointers are offsets into their zones, which also catches a shifted namespace. Columns
rather than records keep it one ``struct`` call each way.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ..spec.zns import ZoneAttribute, ZoneState
from .zone_set import ZoneSet

MAGIC = b"NEZS"
VERSION = 1
_HEADER = struct.Struct("<4sHHQQI")
_CRC = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class ZoneImage:
    """Decoded zone state: the geometry and each zone's (state, attributes, WP offset)."""

    zone_size: int
    zone_capacity: int
    zones: tuple[tuple[ZoneState, ZoneAttribute, int], ...]


def _columns(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}B{n}B{n}Q")


def encode(zone_set: ZoneSet) -> bytes:
    """The zone state of ``zone_set``: every zone's state, attributes and write pointer."""
    zones = zone_set.zones
    n = len(zones)
    body = _HEADER.pack(MAGIC, VERSION, 0, zone_set.zone_size, zone_set.zone_capacity, n)
    body += _columns(n).pack(*(z.state for z in zones), *(z.attrs for z in zones), *(z.wp - z.zslba for z in zones))
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes) -> ZoneImage:
    """Check and decode :func:`encode`'s bytes; ValueError says what is wrong with them."""
    if len(data) < _HEADER.size + _CRC.size:
        raise ValueError(f"zone state too short: {len(data)} bytes")
    magic, version, _reserved, zone_size, zone_capacity, n = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not zone state: magic {magic!r}")
    if version != VERSION:
        raise ValueError(f"zone state version {version}, this build reads {VERSION}")
    columns = _columns(n)
    if len(data) != _HEADER.size + columns.size + _CRC.size:
        raise ValueError(f"zone state of {n} zones is {len(data)} bytes, not {_HEADER.size + columns.size + _CRC.size}")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if crc != zlib.crc32(data[: -_CRC.size]):
        raise ValueError("zone state checksum mismatch")
    values = columns.unpack_from(data, _HEADER.size)
    try:
        states = [ZoneState(s) for s in values[:n]]
    except ValueError as e:
        raise ValueError(f"zone state: {e}") from None
    attrs = [ZoneAttribute(a) for a in values[n : 2 * n]]
    return ZoneImage(zone_size, zone_capacity, tuple(zip(states, attrs, values[2 * n :], strict=True)))


def load(zone_set: ZoneSet, data: bytes) -> None:
    """Restore ``zone_set`` from :func:`encode`'s bytes (see :func:`apply`). ValueError,
    leaving ``zone_set`` as it was, if the bytes are damaged or describe another zone layout."""
    apply(zone_set, decode(data))


def apply(zone_set: ZoneSet, image: ZoneImage) -> None:
    """Restore ``zone_set`` from decoded zone state, whichever store it came from (these bytes
    or :mod:`~nvme_emu.zoned.sidecar`'s file): see :meth:`ZoneSet.restore`, no zone stays
    open. ValueError, leaving ``zone_set`` as it was, if the image describes another zone
    layout or a zone no transition could leave (an Empty zone with data, a Full one short of
    its capacity)."""
    geometry = (image.zone_size, image.zone_capacity, len(image.zones))
    if geometry != (zone_set.zone_size, zone_set.zone_capacity, zone_set.num_zones):
        raise ValueError(
            f"zone state for {geometry[2]} zones of {geometry[0]} LBAs (capacity {geometry[1]}), "
            f"the namespace has {zone_set.num_zones} of {zone_set.zone_size} (capacity {zone_set.zone_capacity})"
        )
    for zone, (state, _attrs, offset) in zip(zone_set.zones, image.zones, strict=True):
        if offset > zone.zcap:
            raise ValueError(f"zone {zone.index}: write pointer offset {offset} past its capacity {zone.zcap}")
        if (state == ZoneState.EMPTY and offset) or (state == ZoneState.FULL and offset != zone.zcap):
            raise ValueError(f"zone {zone.index}: {state.name} with write pointer offset {offset}")
    zone_set.restore((state, attrs, zone.zslba + offset) for zone, (state, attrs, offset) in zip(zone_set.zones, image.zones, strict=True))
