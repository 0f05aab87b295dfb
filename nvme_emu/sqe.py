"""The Submission Queue Entry: its layout, written out once, and decoders of its packed fields.

A 64-byte SQE (Base 2.0, "Common Command Format") is unpacked by :data:`SQE` into a tuple,
one element per field of :data:`FIELDS`; handlers index that tuple with the positions named
here (``e[OPC]``, ``e[CDW10]``). The queue loop unpacks straight out of the guest's ring with
a local binding of ``SQE.unpack_from``; the host driver packs with :data:`SQE` and the
benchmarks build rings of entries with :data:`SQE_DTYPE`, so all three agree by construction.

Fields that share a dword are read with the decoders below: :func:`psdt` and :func:`fuse`
from the flags byte (CDW0 bits 15:8), and :func:`lba_range` / :func:`starting_lba` for the
commands that carry an SLBA in CDW10/11 and a 0-based NLB in CDW12. The per-command fast
paths (``NvmCommands.execute``, ``read``, ``write``) inline them, saying which.
"""

from __future__ import annotations

import struct

import numpy as np

from .spec.commands import CDW0_FUSE_MASK, CDW0_FUSE_SHIFT, CDW0_PSDT_MASK, CDW0_PSDT_SHIFT, SQE_SIZE, Fuse, Psdt, RwCdw12

#: The SQE's fields in order, with their little-endian struct codes: the layout.
FIELDS = (
    ("opc", "B"), ("flags", "B"), ("cid", "H"), ("nsid", "I"), ("cdw2", "I"), ("cdw3", "I"), ("mptr", "Q"),
    ("prp1", "Q"), ("prp2", "Q"), ("cdw10", "I"), ("cdw11", "I"), ("cdw12", "I"), ("cdw13", "I"), ("cdw14", "I"), ("cdw15", "I"),
)
#: Positions in the decoded tuple (PRP1 and PRP2 are the two halves of DPTR, an SGL descriptor with PSDT 01b/10b).
OPC, FLAGS, CID, NSID, CDW2, CDW3, MPTR, PRP1, PRP2, CDW10, CDW11, CDW12, CDW13, CDW14, CDW15 = range(len(FIELDS))

#: One SQE as a tuple: ``SQE.unpack_from(ring, index * SQE_SIZE)``, ``SQE.pack(*fields)``.
SQE = struct.Struct("<" + "".join(code for _, code in FIELDS))
#: The same layout as a numpy record, for rings of entries built at once (benchmarks).
SQE_DTYPE = np.dtype([(name, "<" + code) for name, code in FIELDS])
assert SQE.size == SQE_DTYPE.itemsize == SQE_SIZE

#: The flags byte is CDW0 bits 15:8: FUSE is its bits 1:0, PSDT its bits 7:6.
FLAGS_FUSE_SHIFT = CDW0_FUSE_SHIFT - 8
FLAGS_PSDT_SHIFT = CDW0_PSDT_SHIFT - 8
#: By field value; None is the reserved 11b of each.
_FUSE = (Fuse.NORMAL, Fuse.FIRST, Fuse.SECOND, None)
_PSDT = (Psdt.PRP, Psdt.SGL_MPTR_CONTIGUOUS, Psdt.SGL_MPTR_SGL, None)

_NLB_MASK = RwCdw12.NLB_MASK


def fuse(e: tuple) -> Fuse | None:
    """Fused Operation (CDW0 bits 9:8); None for the reserved 11b."""
    return _FUSE[(e[FLAGS] >> FLAGS_FUSE_SHIFT) & CDW0_FUSE_MASK]


def psdt(e: tuple) -> Psdt | None:
    """PRP or SGL for Data Transfer (CDW0 bits 15:14); None for the reserved 11b."""
    return _PSDT[(e[FLAGS] >> FLAGS_PSDT_SHIFT) & CDW0_PSDT_MASK]


def starting_lba(e: tuple) -> int:
    """The 64-bit LBA in CDW10 (low) and CDW11 (high): SLBA, or Copy's SDLBA."""
    return e[CDW11] << 32 | e[CDW10]


def lba_range(e: tuple) -> tuple[int, int]:
    """(SLBA, NLB) of Read, Write, Compare, Verify, Write Zeroes and Write Uncorrectable:
    NLB is CDW12 bits 15:0, 0-based, returned as the count of blocks."""
    return e[CDW11] << 32 | e[CDW10], (e[CDW12] & _NLB_MASK) + 1
