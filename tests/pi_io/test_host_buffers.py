"""The host side of a metadata command: its decoded PI fields, how many bytes go through the
data pointer and through MPTR, and MPTR mapped into real guest memory (PSDT 00b/01b: one
contiguous buffer; 10b: an SGL), with every bad pointer's status."""

from __future__ import annotations

import struct

import pytest

from nvme_emu import metadata_io as mio
from nvme_emu.pi.format import GuardKind, PiFormat, Prinfo, ProtectionType
from nvme_emu.prp import SglDescriptor, release_views
from nvme_emu.spec.commands import NvmeError, Psdt, RwCdw12, SglSubtype, SglType, Status
from tests.nvme.test_prp import BASE, HOLE, Guest
from tests.pi_io.fake_namespace import FakeNamespace
from tests.pi_io.helpers import sqe

PSDT_SHIFT = 6  # in the flags byte (CDW0 bits 15:14)


@pytest.fixture
def guest():
    g = Guest()
    try:
        yield g
    finally:
        g.close()


def pi_ns(guard: GuardKind = GuardKind.GUARD_16, ms: int = 8, *, extended: bool = False) -> FakeNamespace:
    return FakeNamespace(ms=ms, pi=PiFormat(512, ms, guard, ProtectionType.TYPE1), extended=extended)


def test_pi_command_decodes_read_write_fields() -> None:
    e = sqe(slba=0x1_0000_0010, cdw12=0x3 | 0b1101 << RwCdw12.PRINFO_SHIFT, cdw3=0xABCD, cdw14=0x1234_5678, cdw15=0xF0F0 << 16 | 0xBEEF)
    cmd = mio.pi_command(pi_ns(), e)
    prinfo = Prinfo.PRACT | Prinfo.PRCHK_GUARD | Prinfo.PRCHK_REF
    assert (cmd.slba, cmd.prinfo, cmd.lbat, cmd.lbatm, cmd.ilbrt) == (0x1_0000_0010, prinfo, 0xBEEF, 0xF0F0, 0x1234_5678)
    assert mio.pi_command(pi_ns(GuardKind.GUARD_64, 16), e).ilbrt == 0xABCD_1234_5678  # 48 bits: CDW3 15:0 above CDW14
    assert mio.pi_command(FakeNamespace(ms=8, pi=None), e).prinfo == Prinfo.NONE  # ignored without PI


def test_copy_write_command_takes_prinfow() -> None:
    e = sqe(slba=5, cdw12=0b0111 << 12 | 0b1000 << 26, cdw14=5)
    assert mio.copy_write_command(pi_ns(), e).prinfo == Prinfo.PRACT


@pytest.mark.parametrize(
    "ms, pi, extended, prinfo, expect",
    [
        (0, False, False, Prinfo.PRACT, (2048, 0, False)),
        (8, False, False, Prinfo.PRACT, (2048, 32, False)),  # PRACT means nothing without PI
        (8, False, True, Prinfo.PRACT, (2080, 0, True)),
        (8, True, False, Prinfo.NONE, (2048, 32, False)),
        (8, True, True, Prinfo.NONE, (2080, 0, True)),
        (8, True, True, Prinfo.PRACT, (2048, 0, False)),  # inserted/stripped: no metadata moves
        (8, True, False, Prinfo.PRACT, (2048, 0, False)),
        (16, True, True, Prinfo.PRACT, (2112, 0, True)),  # larger than the PI: the host's bytes move
        (16, True, False, Prinfo.PRACT, (2048, 64, False)),
    ],
)
def test_host_layout(ms: int, pi: bool, extended: bool, prinfo: Prinfo, expect: tuple[int, int, bool]) -> None:
    ns = pi_ns(ms=ms, extended=extended) if pi else FakeNamespace(ms=ms, pi=None, extended=extended)
    layout = mio.host_layout(ns, 4, prinfo if pi else Prinfo.NONE)
    assert (layout.data_len, layout.meta_len, layout.extended) == expect


def test_interleave_round_trip() -> None:
    data, meta = bytes(range(256)) * 4, bytes(range(32))
    ext = mio.interleave(data, meta, 2, 512, 16)
    assert ext[512:528] == meta[:16] and ext[528:1040] == data[512:]
    assert mio.deinterleave(ext, 2, 512, 16) == (bytearray(data), bytearray(meta))


def test_mptr_contiguous(guest) -> None:
    addr = BASE + 0x3000 - 8  # across a page: one contiguous buffer all the same
    guest.poke(addr, bytes(range(32)))
    for psdt in (Psdt.PRP, Psdt.SGL_MPTR_CONTIGUOUS):
        views = mio.metadata_views(guest.mem, sqe(flags=psdt << PSDT_SHIFT, mptr=addr), 32, to_host=False)
        assert b"".join(views) == bytes(range(32))
        release_views(views)
    views = mio.metadata_views(guest.mem, sqe(mptr=addr), 32, to_host=True)
    views[0][:4] = b"\xAA\xBB\xCC\xDD"
    release_views(views)
    assert guest.peek(addr, 4) == b"\xAA\xBB\xCC\xDD"


def test_mptr_sgl(guest) -> None:
    desc_at, seg_at, a, b = BASE + 0x1000, BASE + 0x2000, BASE + 0x4000, BASE + 0x5000
    guest.poke(a, b"A" * 24)
    guest.poke(b, b"B" * 8)
    # MPTR -> a Last Segment of two Data Blocks
    guest.poke(seg_at, SglDescriptor(a, 24, SglType.DATA_BLOCK, SglSubtype.ADDRESS).pack()
               + SglDescriptor(b, 8, SglType.DATA_BLOCK, SglSubtype.ADDRESS).pack())
    guest.poke(desc_at, SglDescriptor(seg_at, 32, SglType.LAST_SEGMENT, SglSubtype.ADDRESS).pack())
    e = sqe(flags=Psdt.SGL_MPTR_SGL << PSDT_SHIFT, mptr=desc_at)
    views = mio.metadata_views(guest.mem, e, 32, to_host=False)
    assert b"".join(views) == b"A" * 24 + b"B" * 8
    release_views(views)
    # Describing less metadata than the command moves: Metadata SGL Length Invalid.
    with pytest.raises(NvmeError) as info:
        mio.metadata_views(guest.mem, e, 40, to_host=False)
    assert info.value.status is Status.METADATA_SGL_LENGTH_INVALID


@pytest.mark.parametrize(
    "flags, mptr, status",
    [
        (Psdt.PRP << PSDT_SHIFT, HOLE, Status.DATA_TRANSFER_ERROR),  # the buffer is not guest memory
        (Psdt.SGL_MPTR_SGL << PSDT_SHIFT, HOLE, Status.DATA_TRANSFER_ERROR),  # nor the descriptor
        (3 << PSDT_SHIFT, BASE, Status.INVALID_FIELD),  # reserved PSDT
    ],
)
def test_mptr_errors(guest, flags: int, mptr: int, status: Status) -> None:
    with pytest.raises(NvmeError) as info:
        mio.metadata_views(guest.mem, sqe(flags=flags, mptr=mptr), 16, to_host=True)
    assert info.value.status is status


def test_mptr_sgl_bad_descriptor_type(guest) -> None:
    guest.poke(BASE, struct.pack("<QI3xB", BASE + 0x1000, 16, 0x5 << 4))  # a reserved descriptor type
    with pytest.raises(NvmeError) as info:
        mio.metadata_views(guest.mem, sqe(flags=Psdt.SGL_MPTR_SGL << PSDT_SHIFT, mptr=BASE), 16, to_host=True)
    assert info.value.status is Status.SGL_DESCRIPTOR_TYPE_INVALID


def test_no_metadata_maps_nothing(guest) -> None:
    assert mio.metadata_views(guest.mem, sqe(mptr=HOLE), 0, to_host=True) == []
