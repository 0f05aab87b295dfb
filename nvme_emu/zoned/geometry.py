"""A zoned namespace's geometry as the operator gives it (bytes, counts, flags), its checks, and
the :class:`~nvme_emu.zoned.zone_set.ZoneSet` it makes for a namespace of a given size and
LBA size.

Choices (issue 25: QEMU's hw/nvme where the specification leaves one, said where not):

- the zone size must be a power of two. ZNS 1.1 allows any size, but Linux refuses a zoned
  namespace whose zone size is not a power of two number of sectors ("invalid zone size",
  nvme_query_zone_info), so such a namespace would be a device the guest cannot use; QEMU
  accepts it and leaves the guest to fail. The LBA size is a power of two too, so the zone
  size in LBAs is one as well;
- the zone capacity defaults to the zone size and may be any whole number of LBAs up to it
  (QEMU: ``zoned.zone_capacity``, "may not exceed zone size");
- the namespace is whole zones: LBAs past the last whole zone are not exposed (NSZE is a
  multiple of the zone size), as QEMU drops the remainder;
- Namespace Management picks QEMU's default zone size, 128 MiB, for a zoned namespace the
  host creates (the Create data structure has no zone fields); a namespace smaller than that
  gets the largest power of two zone it holds, so it has one zone rather than failing. No
  resource limits (MOR and MAR FFFFFFFFh), as QEMU's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .zone_set import ZoneSet

#: QEMU's NVME_DEFAULT_ZONE_SIZE: the zone size when the operator names none, and of a zoned
#: namespace Namespace Management creates.
DEFAULT_ZONE_SIZE = 128 << 20


@dataclass(frozen=True)
class ZoneGeometry:
    """Zone size and capacity in bytes, Max Open and Max Active Resources (0: no limit), and
    Read Across Zone Boundaries (OZCS.RAZB)."""

    zone_size: int = DEFAULT_ZONE_SIZE
    zone_capacity: int | None = None  # None: the zone size
    max_open: int = 0
    max_active: int = 0
    cross_read: bool = False

    @property
    def capacity(self) -> int:
        return self.zone_size if self.zone_capacity is None else self.zone_capacity

    def check(self, lba_size: int, namespace_bytes: int | None = None) -> None:
        """ValueError saying what is wrong with this geometry for ``lba_size``-byte blocks
        (and a namespace of ``namespace_bytes``, if known)."""
        zs, cap = self.zone_size, self.capacity
        if zs <= 0 or zs & (zs - 1):
            raise ValueError(f"zone_size {zs} is not a power of two (Linux needs one)")
        if zs < lba_size:
            raise ValueError(f"zone_size {zs} is smaller than one {lba_size}-byte block")
        if cap <= 0 or cap > zs:
            raise ValueError(f"zone_cap {cap} must be in 1..zone_size {zs} bytes")
        if cap % lba_size:
            raise ValueError(f"zone_cap {cap} is not a multiple of lba={lba_size}")
        if self.max_open < 0 or self.max_active < 0:
            raise ValueError("max_open and max_active are counts (0: no limit)")
        if self.max_open and self.max_active and self.max_open > self.max_active:
            # every open zone is active: more open than active zones could never be used
            raise ValueError(f"max_open {self.max_open} exceeds max_active {self.max_active}")
        if namespace_bytes is not None and namespace_bytes < zs:
            raise ValueError(f"the namespace ({namespace_bytes} bytes) holds no zone of {zs} bytes")

    def zone_set(self, namespace_bytes: int, lba_shift: int, on_descriptor_changed: Callable[[], None] | None = None) -> ZoneSet:
        """The zones of a namespace of ``namespace_bytes`` bytes in ``1 << lba_shift``-byte
        blocks: whole zones only (the remainder is dropped, as QEMU does)."""
        self.check(1 << lba_shift, namespace_bytes)
        return ZoneSet(
            namespace_bytes >> lba_shift,
            self.zone_size >> lba_shift,
            self.capacity >> lba_shift,
            max_open=self.max_open,
            max_active=self.max_active,
            cross_zone_read=self.cross_read,
            on_descriptor_changed=on_descriptor_changed,
        )


def created_geometry(namespace_bytes: int, lba_size: int) -> ZoneGeometry:
    """The geometry of a zoned namespace Namespace Management creates (module docstring):
    QEMU's default zone size, or the largest power of two the namespace holds."""
    zone = DEFAULT_ZONE_SIZE
    while zone > namespace_bytes and zone > lba_size:
        zone >>= 1
    return ZoneGeometry(zone_size=zone)
