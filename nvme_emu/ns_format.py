"""A namespace's format: the LBA formats every namespace offers, and the format a namespace is
in (:class:`NsFormat`: the LBA format with FLBAS bit 4, DPS and the guard), with the rules of
what can be (Format NVM, Namespace Management, the command line and a sidecar all ask them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .pi.format import GuardKind, PiLocation, ProtectionType
from .spec.commands import NvmeError, Status
from .spec.identify import ELBAF_PIF_SHIFT


@dataclass(frozen=True, slots=True)
class NsFormat:
    """A namespace's format as Format NVM (CDW10) and FLBAS/DPS give it, plus its guard.

    ``guard`` is the namespace's Protection Information Format for LBA formats whose metadata
    can hold that PI (ELBAF.PIF): a 64b Guard namespace's 8-byte-metadata formats have 16b
    Guard PI (:meth:`pif`). ``extended`` and the PI fields are normalized by the namespace:
    no metadata, no MSET; no PI type, PI last."""

    lbaf: int
    extended: bool = False
    pi_type: ProtectionType = ProtectionType.NONE
    pil: PiLocation = PiLocation.LAST
    guard: GuardKind = GuardKind.GUARD_16

    def pif(self, ms: int) -> GuardKind:
        """The guard of PI in ``ms`` bytes of metadata under this namespace's ELBAF."""
        return self.guard if ms >= self.guard.pi_size else GuardKind.GUARD_16


@dataclass(frozen=True)
class LbaFormat:
    """One supported LBA format: the data size and the metadata bytes beside each block."""

    lbads: int  # log2 of the data size
    ms: int = 0
    rp: int = 0

    @property
    def size(self) -> int:
        return 1 << self.lbads


#: The formats every namespace advertises (eight: NLBAF = 7, 0-based). Index 0 = 512 and 1 = 4096
#: bytes without metadata, as before metadata existed; the metadata formats (issue 26) come
#: after them. QEMU's hw/nvme orders by data size (512+0, 512+8, 512+16, 512+64, 4096+0, ...),
#: but here hosts, scripts and tests already say ``nvme format --lbaf=1`` for 4 KiB blocks, and
#: a sidecar records the index: appending keeps every existing index meaning what it meant.
LBA_FORMATS: tuple[LbaFormat, ...] = (
    LbaFormat(9),
    LbaFormat(12),
    LbaFormat(9, ms=8),
    LbaFormat(9, ms=16),
    LbaFormat(9, ms=64),
    LbaFormat(12, ms=8),
    LbaFormat(12, ms=16),
    LbaFormat(12, ms=64),
)
SUPPORTED_LBA_SIZES = tuple(sorted({f.size for f in LBA_FORMATS}))
#: The metadata sizes a format may have besides 0 (the spec's ``ms=`` key).
SUPPORTED_METADATA_SIZES = tuple(sorted({f.ms for f in LBA_FORMATS} - {0}))


def lba_format_index(lba_size: int, ms: int = 0) -> int:
    for i, f in enumerate(LBA_FORMATS):
        if f.size == lba_size and f.ms == ms:
            return i
    if lba_size not in SUPPORTED_LBA_SIZES:
        raise ValueError(f"unsupported LBA size {lba_size} (choose from {', '.join(map(str, SUPPORTED_LBA_SIZES))})")
    raise ValueError(f"unsupported metadata size {ms} (choose from {', '.join(map(str, SUPPORTED_METADATA_SIZES))})")


def check_ns_format(fmt: NsFormat, *, zoned: bool = False) -> NsFormat:
    """``fmt`` normalized (no metadata: no MSET; no PI: PI last), or Invalid Format for what
    cannot be: an unknown index, PI without metadata or in metadata smaller than the PI (as
    QEMU's nvme_format_check), metadata on a zoned namespace (QEMU allows it; issue 26 does
    not ask for it, and Format is refused on zoned namespaces anyway)."""
    if not 0 <= fmt.lbaf < len(LBA_FORMATS):
        raise NvmeError(Status.INVALID_FORMAT, f"LBA format {fmt.lbaf} not supported")
    ms = LBA_FORMATS[fmt.lbaf].ms
    if zoned and ms:
        raise NvmeError(Status.INVALID_FORMAT, "a zoned namespace has no metadata formats")
    if fmt.pi_type is not ProtectionType.NONE:
        if ms == 0:
            raise NvmeError(Status.INVALID_FORMAT, f"protection information needs metadata; LBA format {fmt.lbaf} has none")
        if ms < fmt.pif(ms).pi_size:
            raise NvmeError(Status.INVALID_FORMAT, f"{ms}-byte metadata cannot hold {fmt.pif(ms).pi_size}-byte PI")
    return NsFormat(
        fmt.lbaf,
        extended=fmt.extended and ms > 0,
        pi_type=fmt.pi_type,
        pil=fmt.pil if fmt.pi_type is not ProtectionType.NONE else PiLocation.LAST,
        guard=fmt.guard,
    )


def elbaf_list(guard: GuardKind) -> list[int]:
    """ELBAF of every LBA format for a namespace whose guard is ``guard`` (STS 0)."""
    return [NsFormat(i, guard=guard).pif(f.ms) << ELBAF_PIF_SHIFT if f.ms else 0 for i, f in enumerate(LBA_FORMATS)]
