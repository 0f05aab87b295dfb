"""Protection information: its formats, the command fields that steer it, and the guard seam.

The numbers and layouts of End-to-end Data Protection (NVM Command Set 1.0, "End-to-end Data
Protection"; the 64b Guard format is the NVM Command Set 1.0's "enhanced" PI): what a
namespace is formatted with (:class:`PiFormat`: LBA data size, metadata size, the guard
format, the protection type, the position of the PI in the metadata), what a command asks
for (:class:`PiCommand`: PRINFO, LBAT/LBATM, ILBRT/EILBRT) and the structured numpy dtypes
of the two PI layouts, which :mod:`nvme_emu.pi.engine` views a buffer of blocks through.

The guard CRCs are not computed here: the engine is handed a :class:`Guards` (the fast
implementation lives in :mod:`nvme_emu.pi.crc`; tests pass a bitwise reference), so the PI
rules and the CRC speed are two separate problems with one narrow seam between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..spec.commands import RwCdw12

# ---------------------------------------------------------------------------------------------
# The format: Identify Namespace DPS, ELBAF.PIF
# ---------------------------------------------------------------------------------------------


class GuardKind(IntEnum):
    """Protection Information Format (PIF, ELBAF bits 8:7 in the NVM command set Identify
    Namespace): which guard, and so which PI layout. The values are the field's.

    32b Guard (01b) is left out: no Linux host generates it and the issue does not ask for it.
    """

    GUARD_16 = 0b00  # CRC-16/T10-DIF, 8-byte PI
    GUARD_64 = 0b10  # CRC-64/NVME, 16-byte PI

    @property
    def pi_size(self) -> int:
        """Bytes of protection information per block: 8 (16b Guard) or 16 (64b Guard)."""
        return 8 if self is GuardKind.GUARD_16 else 16

    @property
    def reftag_bits(self) -> int:
        """Width of the reference tag: 32, or 48 for 64b Guard with STS = 0 (the whole
        Storage and Reference Space is reference tag when the storage tag is zero-sized)."""
        return 32 if self is GuardKind.GUARD_16 else 48

    @property
    def reftag_mask(self) -> int:
        return (1 << self.reftag_bits) - 1

    @property
    def guard_dtype(self) -> np.dtype[np.unsignedinteger]:
        """Native-endian dtype of computed guards (what :meth:`Guards.compute` fills)."""
        return np.dtype(np.uint16) if self is GuardKind.GUARD_16 else np.dtype(np.uint64)


class ProtectionType(IntEnum):
    """Protection Information Type, DPS bits 2:0 (and Format NVM's PI field)."""

    NONE = 0
    TYPE1 = 1  # reference tag = low bits of the LBA
    TYPE2 = 2  # reference tag from the command (ILBRT), +1 per block
    TYPE3 = 3  # reference tag not defined: never checked


class PiLocation(IntEnum):
    """Protection Information Position, DPS bit 3: where in the metadata the PI sits."""

    LAST = 0  # the last pi_size bytes of the metadata; the guard also covers the bytes before it
    FIRST = 1  # the first pi_size bytes; the guard covers the data only


DPS_PIT_MASK = 0b111  #: DPS bits 2:0, Protection Information Type
DPS_PIP_SHIFT = 3  #: DPS bit 3, Protection Information Position (1: first bytes of metadata)

#: Metadata sizes a PI format may have (LBA format MS): the issue's 8, 16 and 64 bytes.
METADATA_SIZES = (8, 16, 64)

#: The escape values that turn checking off (NVM CS 1.0, "Protection Information Checking"):
#: an application tag of FFFFh for Types 1 and 2; for Type 3 that AND a reference tag with
#: every bit set (32 bits for 16b Guard, all 48 for 64b Guard with STS = 0).
APPTAG_ESCAPE = 0xFFFF


# ---------------------------------------------------------------------------------------------
# The PI layouts on the medium and in host buffers: big-endian, as the spec draws them
# ---------------------------------------------------------------------------------------------

#: 16b Guard PI: Guard (2 B), Application Tag (2 B), Reference Tag (4 B).
PI16_DTYPE = np.dtype([("guard", ">u2"), ("apptag", ">u2"), ("reftag", ">u4")])
#: 64b Guard PI: Guard (8 B), Application Tag (2 B), Storage and Reference Space (6 B). With
#: STS = 0 the 6 bytes are one 48-bit reference tag; numpy has no 48-bit integer, so it is
#: split into its high 16 and low 32 bits (two whole-array operations to join or split).
PI64_DTYPE = np.dtype([("guard", ">u8"), ("apptag", ">u2"), ("reftag_hi", ">u2"), ("reftag_lo", ">u4")])
assert PI16_DTYPE.itemsize == GuardKind.GUARD_16.pi_size and PI64_DTYPE.itemsize == GuardKind.GUARD_64.pi_size

PI_DTYPES = {GuardKind.GUARD_16: PI16_DTYPE, GuardKind.GUARD_64: PI64_DTYPE}


@dataclass(frozen=True, slots=True)
class PiFormat:
    """A namespace's LBA format with protection information enabled.

    ``lbads`` is the data size in bytes (512, 4096, ...), ``ms`` the metadata size. The
    layout of a buffer (extended: data and metadata interleaved per block, FLBAS bit 4; or
    separate: a data buffer and a metadata buffer) is not part of it: the same namespace's
    blocks are in one layout in the host's buffer and maybe another on the medium, so each
    engine operation is told by its arguments.
    """

    lbads: int
    ms: int
    guard: GuardKind
    pi_type: ProtectionType
    location: PiLocation = PiLocation.LAST

    def __post_init__(self) -> None:
        if self.lbads < 512 or self.lbads & (self.lbads - 1):
            raise ValueError(f"LBA data size {self.lbads}: a power of two, at least 512")
        if self.ms not in METADATA_SIZES:
            raise ValueError(f"metadata size {self.ms}: one of {METADATA_SIZES}")
        if self.ms < self.guard.pi_size:
            raise ValueError(f"metadata size {self.ms} cannot hold {self.guard.pi_size}-byte {self.guard.name} PI")
        if self.pi_type is ProtectionType.NONE:
            raise ValueError("a PI format needs protection type 1, 2 or 3")

    @property
    def pi_size(self) -> int:
        return self.guard.pi_size

    @property
    def pi_offset(self) -> int:
        """Offset of the PI in a block's metadata. With PI last it is also how many metadata
        bytes the guard covers after the data (none with PI first)."""
        return 0 if self.location is PiLocation.FIRST else self.ms - self.pi_size

    @property
    def extended_block(self) -> int:
        """Bytes per block in the extended layout (data then metadata)."""
        return self.lbads + self.ms

    @property
    def metadata_is_pi(self) -> bool:
        """MS equals the PI size: with PRACT = 1 the host transfers no metadata at all, the
        controller inserts the PI on a write and strips it on a read."""
        return self.ms == self.pi_size

    @property
    def dps(self) -> int:
        """The Identify Namespace DPS byte for this format."""
        return int(self.pi_type) | (int(self.location) << DPS_PIP_SHIFT)

    def host_transfers_metadata(self, prinfo: Prinfo) -> bool:
        """Whether a Read/Write with this PRINFO moves metadata across the host buffers."""
        return not (prinfo & Prinfo.PRACT and self.metadata_is_pi)


def dps_decode(dps: int) -> tuple[ProtectionType, PiLocation]:
    """DPS byte -> (protection type, PI position). Raises ValueError on a reserved type."""
    return ProtectionType(dps & DPS_PIT_MASK), PiLocation((dps >> DPS_PIP_SHIFT) & 1)


# ---------------------------------------------------------------------------------------------
# What a command asks for: CDW12 PRINFO, CDW14 (+ CDW3) reference tag, CDW15 LBAT/LBATM
# ---------------------------------------------------------------------------------------------


class Prinfo(IntFlag):
    """Protection Information Field (PRINFO), CDW12 bits 29:26 of Read, Write, Compare,
    Verify, Write Zeroes and Copy."""

    PRCHK_REF = 1 << 0  # check the reference tag
    PRCHK_APP = 1 << 1  # check the application tag (under LBATM)
    PRCHK_GUARD = 1 << 2  # check the guard
    PRACT = 1 << 3  # the controller inserts (write) or strips (read) the PI

    NONE = 0
    PRCHK_ALL = PRCHK_REF | PRCHK_APP | PRCHK_GUARD


@dataclass(frozen=True, slots=True)
class PiCommand:
    """The protection fields of one command, decoded.

    ``ilbrt`` is ILBRT on a write and EILBRT on a read/compare/verify (the expected initial
    reference tag): one field, one meaning per direction, so one name here. For 64b Guard
    it is 48 bits: CDW14 is its low 32 bits and CDW3 bits 15:0 its high 16.
    """

    slba: int
    prinfo: Prinfo = Prinfo.NONE
    lbat: int = 0  # Logical Block Application Tag (LBAT / ELBAT)
    lbatm: int = 0xFFFF  # Logical Block Application Tag Mask (LBATM / ELBATM)
    ilbrt: int = 0

    @classmethod
    def from_dwords(cls, guard: GuardKind, slba: int, cdw3: int, cdw12: int, cdw14: int, cdw15: int) -> PiCommand:
        """Decode from the SQE's dwords (Read/Write layout; :mod:`nvme_emu.sqe` names them)."""
        ilbrt = cdw14
        if guard is GuardKind.GUARD_64:
            ilbrt |= (cdw3 & 0xFFFF) << 32
        return cls(
            slba=slba,
            prinfo=Prinfo((cdw12 >> RwCdw12.PRINFO_SHIFT) & RwCdw12.PRINFO_MASK),
            lbat=cdw15 & 0xFFFF,
            lbatm=cdw15 >> 16,
            ilbrt=ilbrt,
        )


# ---------------------------------------------------------------------------------------------
# The guard seam
# ---------------------------------------------------------------------------------------------


class Guards(Protocol):
    """Computes guard CRCs over many equally spaced byte runs in one call.

    ``compute`` fills ``out[i]`` with the guard of ``data[i * stride : i * stride + block]``
    for ``i < count``: the standard CRC of that run, CRC-16/T10-DIF (poly 8BB7h, init 0, no
    reflection, no final XOR) or CRC-64/NVME (reflected poly 9A6C9329AC4BC9B5h, init and
    final XOR all ones), as a native-endian ``kind.guard_dtype`` value. One call per command,
    not per block: the per-call cost of crossing into C is paid once for all the blocks.
    """

    @property
    def kind(self) -> GuardKind: ...

    def compute(self, data: memoryview, block: int, count: int, stride: int, out: npt.NDArray[np.unsignedinteger]) -> None: ...
