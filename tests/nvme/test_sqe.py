"""The SQE layout and its decoders (nvme_emu.sqe): one layout for struct and numpy, and the
packed fields (FUSE, PSDT, the LBA range) read as the spec defines them."""

from __future__ import annotations

import numpy as np

from nvme_emu.spec.commands import Fuse, Psdt
from nvme_emu.sqe import CDW12, CID, FLAGS, PRP2, SQE, SQE_DTYPE, fuse, lba_range, psdt, starting_lba


def entry(flags: int = 0, cdw10: int = 0, cdw11: int = 0, cdw12: int = 0) -> tuple:
    return SQE.unpack(SQE.pack(0x02, flags, 7, 1, 0, 0, 0, 0x1000, 0x2000, cdw10, cdw11, cdw12, 0, 0, 0))


def test_struct_and_dtype_are_one_layout():
    a = np.zeros(1, dtype=SQE_DTYPE)
    a["flags"], a["cid"], a["prp2"], a["cdw12"] = 0x41, 0xBEEF, 1 << 40, 0xFFFF_FFFF
    e = SQE.unpack(a.tobytes())
    assert (e[FLAGS], e[CID], e[PRP2], e[CDW12]) == (0x41, 0xBEEF, 1 << 40, 0xFFFF_FFFF)


def test_flags_byte_decoders():
    assert [fuse(entry(flags=f)) for f in range(4)] == [Fuse.NORMAL, Fuse.FIRST, Fuse.SECOND, None]
    assert [psdt(entry(flags=p << 6)) for p in range(4)] == [Psdt.PRP, Psdt.SGL_MPTR_CONTIGUOUS, Psdt.SGL_MPTR_SGL, None]
    both = entry(flags=0b1000_0001)  # each field ignores the other (and bits 5:2)
    assert (fuse(both), psdt(both)) == (Fuse.FIRST, Psdt.SGL_MPTR_SGL)
    assert (fuse(entry(flags=0b0011_1100)), psdt(entry(flags=0b0011_1100))) == (Fuse.NORMAL, Psdt.PRP)


def test_lba_range_is_64_bit_slba_and_1_based_nlb():
    e = entry(cdw10=0x89AB_CDEF, cdw11=0x0123_4567, cdw12=0x4000_0007)  # FUA and NLB 7 (8 blocks)
    assert starting_lba(e) == 0x0123_4567_89AB_CDEF
    assert lba_range(e) == (0x0123_4567_89AB_CDEF, 8)
    assert lba_range(entry(cdw12=0xFFFF)) == (0, 0x10000)
