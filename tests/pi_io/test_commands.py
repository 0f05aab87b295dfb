"""Write Zeroes, Compare, Verify and Copy through nvme_emu.metadata_io, over the same table
of formats: what is stored, what a later Read gets, and each outcome's status and LBA."""

from __future__ import annotations

import struct

import pytest

from nvme_emu import metadata_io as mio
from nvme_emu.pi.format import PiCommand, Prinfo
from nvme_emu.spec.commands import CopyCdw12, NvmeError, Status
from tests.pi_io.fake_namespace import FakeNamespace
from tests.pi_io.helpers import (
    CASES,
    CHK,
    FIELDS_AT,
    G16,
    G64,
    LBAT,
    NLB,
    PRACT,
    SLBA,
    T1,
    T2,
    Case,
    blocks,
    expected_pi,
    finish,
    host_area,
    pi_of,
    read,
    reftag,
    sqe,
    views_of,
    write,
)

ids = [str(c) for c in CASES]


def written(case: Case, ns: FakeNamespace, seed: int, slba: int = SLBA, nlb: int = NLB) -> tuple[list[bytes], list[bytes]]:
    """Blocks written with PRACT = 1; returns (data, stored metadata)."""
    data, meta = blocks(case, seed, nlb)
    cmd = case.cmd(PRACT, slba=slba)
    write(ns, cmd, nlb, *host_area(case, mio.host_layout(ns, nlb, cmd.prinfo), data, meta))
    return data, [ns.block_meta(slba + i) for i in range(nlb)]


def flip(ns: FakeNamespace, case: Case, lba: int, field: str = "guard") -> None:
    start, size = FIELDS_AT[case.fmt.guard][field]
    ns.meta[lba * ns.ms + case.fmt.pi_offset + start + size - 1] ^= 1


# -- Write Zeroes -------------------------------------------------------------------------------


@pytest.mark.parametrize("blocking", [False, True], ids=["ram", "blocking"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_write_zeroes_with_pract_generates_pi(case: Case, blocking: bool) -> None:
    f = case.fmt
    ns = case.ns(blocking=blocking)
    written(case, ns, seed=6)
    cmd = case.cmd(PRACT)
    finish(mio.write_zeroes(ns, cmd, NLB, deallocate=True))
    assert ("write_zeroes", SLBA, NLB, False, False) in ns.calls  # PRACT: written, not deallocated (as QEMU)
    for i in range(NLB):
        m = ns.block_meta(SLBA + i)
        assert ns.block_data(SLBA + i) == bytes(f.lbads)
        assert pi_of(f, m) == expected_pi(f, bytes(f.lbads), bytes(f.ms), LBAT, reftag(f, cmd, i))
        assert m[: f.pi_offset] + m[f.pi_offset + f.pi_size :] == bytes(f.ms - f.pi_size)
    read(ns, case.cmd(CHK), NLB)  # every check passes: it is real PI, not the escape
    assert pi_of(f, ns.block_meta(SLBA))[FIELDS_AT[f.guard]["apptag"][0] :][:2] == LBAT.to_bytes(2, "big")


@pytest.mark.parametrize("deallocate", [False, True], ids=["zero", "deac"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_write_zeroes_without_pract_reads_as_deallocated(case: Case, deallocate: bool) -> None:
    ns = case.ns()
    written(case, ns, seed=7)
    finish(mio.write_zeroes(ns, case.cmd(Prinfo.NONE), NLB, deallocate=deallocate))
    assert ("write_zeroes", SLBA, NLB, deallocate, False) in ns.calls and ("zero_meta", SLBA, NLB) in ns.calls
    data, _meta = read(ns, case.cmd(PRACT | CHK), NLB)  # the escape: every check passes
    step = case.fmt.lbads if case.fmt.metadata_is_pi or not case.extended else case.fmt.extended_block
    assert all(data[i * step : i * step + case.fmt.lbads] == bytes(case.fmt.lbads) for i in range(NLB))


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_write_zeroes_with_prchk_is_invalid_protection_information(case: Case) -> None:
    ns = case.ns()
    with pytest.raises(NvmeError) as info:
        mio.write_zeroes(ns, case.cmd(PRACT | Prinfo.PRCHK_GUARD), NLB)
    assert info.value.status is Status.INVALID_PROTECTION_INFORMATION
    assert ns.calls == []


def test_write_zeroes_without_pi_zeroes_metadata() -> None:
    ns = FakeNamespace(ms=16, pi=None)
    ns.meta[:] = b"\x55" * len(ns.meta)
    finish(mio.write_zeroes(ns, PiCommand(slba=SLBA), NLB, deallocate=True))
    assert ns.block_meta(SLBA) == bytes(16) and ns.block_meta(SLBA + NLB) == b"\x55" * 16


# -- Compare and Verify -------------------------------------------------------------------------


def compare(case: Case, ns: FakeNamespace, cmd: PiCommand, data: list[bytes], meta: list[bytes]) -> None:
    layout = mio.host_layout(ns, NLB, cmd.prinfo)
    area, marea = host_area(case, layout, data, meta)
    finish(mio.compare(ns, cmd, NLB, layout, views_of(bytearray(area)), views_of(bytearray(marea or b""))))


@pytest.mark.parametrize("blocking", [False, True], ids=["ram", "blocking"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_compare_outcomes(case: Case, blocking: bool) -> None:
    f = case.fmt
    ns = case.ns(blocking=blocking)
    data, meta = written(case, ns, seed=8)
    cmd = case.cmd(CHK)
    compare(case, ns, cmd, data, meta)  # the same: success
    # Data differing in one byte of block 1: Compare Failure (before any PI check, as QEMU).
    other = data[:1] + [bytes([data[1][0] ^ 1]) + data[1][1:]] + data[2:]
    with pytest.raises(NvmeError) as info:
        compare(case, ns, cmd, other, meta)
    assert info.value.status is Status.COMPARE_FAILURE
    # The host's PI bytes are not compared; its other metadata bytes are.
    compare(case, ns, cmd, data, [with_flipped_pi(case, m) for m in meta])
    if not f.metadata_is_pi:
        m1 = bytearray(meta[1])
        m1[0 if f.pi_offset else f.ms - 1] ^= 1
        with pytest.raises(NvmeError) as info:
            compare(case, ns, cmd, data, meta[:1] + [bytes(m1)] + meta[2:])
        assert info.value.status is Status.COMPARE_FAILURE
    # The stored PI is checked as PRCHK asks.
    flip(ns, case, SLBA + 2)
    with pytest.raises(mio.PiCheckError) as info:
        compare(case, ns, cmd, data, meta)
    assert (info.value.status, info.value.lba) == (Status.END_TO_END_GUARD_CHECK_ERROR, SLBA + 2)
    compare(case, ns, case.cmd(Prinfo.PRCHK_APP), data, meta)
    # PRACT: Invalid Protection Information, as QEMU's hw/nvme.
    with pytest.raises(NvmeError) as info:
        compare(case, ns, case.cmd(PRACT), data, meta)
    assert info.value.status is Status.INVALID_PROTECTION_INFORMATION


def with_flipped_pi(case: Case, m: bytes) -> bytes:
    b = bytearray(m)
    b[case.fmt.pi_offset] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("blocking", [False, True], ids=["ram", "blocking"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_verify_outcomes(case: Case, blocking: bool) -> None:
    ns = case.ns(blocking=blocking)
    written(case, ns, seed=9)
    finish(mio.verify(ns, case.cmd(CHK), NLB))
    assert ("read_meta", SLBA, NLB) in ns.calls
    flip(ns, case, SLBA + 1, "apptag")
    with pytest.raises(mio.PiCheckError) as info:
        finish(mio.verify(ns, case.cmd(CHK), NLB))
    assert (info.value.status, info.value.lba) == (Status.END_TO_END_APPLICATION_TAG_CHECK_ERROR, SLBA + 1)
    # Without PRCHK there is nothing to check: the namespace's own Verify.
    ns.calls.clear()
    finish(mio.verify(ns, case.cmd(Prinfo.NONE), NLB))
    assert ns.calls == [("verify", SLBA, NLB)]
    with pytest.raises(NvmeError) as info:
        mio.verify(ns, case.cmd(PRACT | CHK), NLB)
    assert info.value.status is Status.INVALID_PROTECTION_INFORMATION


# -- Copy ---------------------------------------------------------------------------------------

DEST = 40


def copy_sqe(case: Case, prinfor: Prinfo, prinfow: Prinfo, nr: int, *, desfmt: int | None = None, ilbrt: int = 0) -> tuple:
    if desfmt is None:
        desfmt = 1 if case.fmt.guard is G64 else 0
    cdw12 = (nr - 1) | desfmt << CopyCdw12.DESFMT_SHIFT | int(prinfor) << CopyCdw12.PRINFOR_SHIFT | int(prinfow) << CopyCdw12.PRINFOW_SHIFT
    return sqe(slba=DEST, cdw12=cdw12, cdw3=ilbrt >> 32, cdw14=ilbrt & 0xFFFF_FFFF, cdw15=0xFFFF << 16 | 0x7777)


def descriptor(case: Case, slba: int, nlb: int, eilbrt: int, elbat: int = LBAT, elbatm: int = 0xFFFF) -> bytes:
    if case.fmt.guard is G16:
        return struct.pack("<8xQH6xIHH", slba, nlb - 1, eilbrt, elbat, elbatm)
    return struct.pack("<8xQH8x", slba, nlb - 1) + (eilbrt & (1 << 48) - 1).to_bytes(10, "big") + struct.pack("<HH", elbat, elbatm)


def source_tag(case: Case, slba: int) -> int:
    """The EILBRT of blocks written at ``slba`` with case.cmd (Type 1: the LBA)."""
    return case.cmd(PRACT, slba=slba).ilbrt


@pytest.mark.parametrize("blocking", [False, True], ids=["ram", "blocking"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_copy_regenerates_destination_pi_and_catches_a_corrupted_source(case: Case, blocking: bool) -> None:
    f = case.fmt
    ns = case.ns(blocking=blocking)
    a_data, a_meta = written(case, ns, seed=10, slba=SLBA, nlb=2)
    b_data, b_meta = written(case, ns, seed=11, slba=SLBA + 20, nlb=3)
    raw = descriptor(case, SLBA, 2, source_tag(case, SLBA)) + descriptor(case, SLBA + 20, 3, source_tag(case, SLBA + 20))
    ilbrt = DEST if f.pi_type is T1 else 0xABCD
    e = copy_sqe(case, PRACT | CHK, PRACT | CHK, 2, ilbrt=ilbrt)
    sources = mio.copy_sources(ns, e, raw, 2)
    assert [(s.slba, s.nlb) for s in sources] == [(SLBA, 2), (SLBA + 20, 3)]
    dest = mio.copy_write_command(ns, e)
    assert (dest.slba, dest.ilbrt, dest.lbat, dest.prinfo) == (DEST, ilbrt, 0x7777, PRACT | CHK)
    finish(mio.copy(ns, sources, dest))
    data = a_data + b_data
    metas = a_meta + b_meta
    for i in range(5):
        m = ns.block_meta(DEST + i)
        assert ns.block_data(DEST + i) == data[i]
        assert pi_of(f, m) == expected_pi(f, data[i], metas[i], 0x7777, reftag(f, dest, i))
        assert m[: f.pi_offset] == metas[i][: f.pi_offset]
    read(ns, PiCommand(slba=DEST, prinfo=CHK, lbat=0x7777, ilbrt=ilbrt), 5)

    # A corrupted source block: the source's check fails with its LBA, nothing is written.
    flip(ns, case, SLBA + 21)
    before = (bytes(ns.data), bytes(ns.meta))
    with pytest.raises(mio.PiCheckError) as info:
        finish(mio.copy(ns, mio.copy_sources(ns, e, raw, 2), dest))
    assert (info.value.status, info.value.lba) == (Status.END_TO_END_GUARD_CHECK_ERROR, SLBA + 21)
    assert (bytes(ns.data), bytes(ns.meta)) == before
    # Not checking the guard on the source, the copy goes through; PRACT regenerates a good guard.
    e2 = copy_sqe(case, PRACT | Prinfo.PRCHK_APP, PRACT, 2, ilbrt=ilbrt)
    finish(mio.copy(ns, mio.copy_sources(ns, e2, raw, 2), mio.copy_write_command(ns, e2)))


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt.pi_type is T2], ids=str)
def test_copy_without_pract_keeps_the_source_pi(case: Case) -> None:
    ns = case.ns()
    data, meta = written(case, ns, seed=12)
    raw = descriptor(case, SLBA, NLB, source_tag(case, SLBA))
    # Type 2 tags follow ILBRT: the destination checks against the same run.
    e = copy_sqe(case, CHK, CHK, 1, ilbrt=source_tag(case, SLBA))
    e = e[:-1] + (0xFFFF << 16 | LBAT,)
    finish(mio.copy(ns, mio.copy_sources(ns, e, raw, 1), mio.copy_write_command(ns, e)))
    assert [ns.block_meta(DEST + i) for i in range(NLB)] == meta
    assert [ns.block_data(DEST + i) for i in range(NLB)] == data
    # A destination check against another ILBRT fails on its first block.
    e = copy_sqe(case, CHK, CHK, 1, ilbrt=source_tag(case, SLBA) + 1)
    e = e[:-1] + (0xFFFF << 16 | LBAT,)
    with pytest.raises(mio.PiCheckError) as info:
        finish(mio.copy(ns, mio.copy_sources(ns, e, raw, 1), mio.copy_write_command(ns, e)))
    assert (info.value.status, info.value.lba) == (Status.END_TO_END_REFERENCE_TAG_CHECK_ERROR, DEST)


@pytest.mark.parametrize("case", [CASES[0], next(c for c in CASES if c.fmt.guard is G64)], ids=str)
def test_copy_field_errors(case: Case) -> None:
    ns = case.ns()
    raw = descriptor(case, SLBA, 1, source_tag(case, SLBA))
    # PRACT differs between PRINFOR and PRINFOW: Invalid Field (as QEMU, one namespace).
    e = copy_sqe(case, PRACT, Prinfo.NONE, 1)
    with pytest.raises(NvmeError) as info:
        mio.copy(ns, mio.copy_sources(ns, e, raw, 1), mio.copy_write_command(ns, e))
    assert info.value.status is Status.INVALID_FIELD
    # The other descriptor format: Invalid Format; a reserved one: Invalid Field.
    wrong = 0 if case.fmt.guard is G64 else 1
    with pytest.raises(NvmeError) as info:
        mio.copy_sources(ns, copy_sqe(case, PRACT, PRACT, 1, desfmt=wrong), raw, 1)
    assert info.value.status is Status.INVALID_FORMAT
    with pytest.raises(NvmeError) as info:
        mio.copy_sources(ns, copy_sqe(case, PRACT, PRACT, 1, desfmt=2), raw, 1)
    assert info.value.status is Status.INVALID_FIELD


def test_copy_descriptor_format1_reads_the_48_bit_eilbrt() -> None:
    case = next(c for c in CASES if c.fmt.guard is G64 and c.fmt.pi_type is T2)
    ns = case.ns()
    raw = descriptor(case, 7, 3, 0x1234_5678_9ABC, elbat=0x4321, elbatm=0x0F0F)
    (src,) = mio.copy_sources(ns, copy_sqe(case, CHK, CHK, 1), raw, 1)
    assert (src.slba, src.nlb, src.cmd.ilbrt, src.cmd.lbat, src.cmd.lbatm, src.cmd.prinfo) == (7, 3, 0x1234_5678_9ABC, 0x4321, 0x0F0F, CHK)


def test_copy_without_pi_moves_metadata() -> None:
    ns = FakeNamespace(ms=16, pi=None)
    ns.meta[SLBA * 16 : (SLBA + 2) * 16] = b"\x42" * 32
    ns.data[SLBA * 512 : (SLBA + 2) * 512] = b"\x99" * 1024
    e = sqe(slba=DEST, cdw12=0 | (0xF << CopyCdw12.PRINFOR_SHIFT))
    sources = mio.copy_sources(ns, e, struct.pack("<8xQH6xIHH", SLBA, 1, 0, 0, 0), 1)
    assert sources[0].cmd.prinfo == Prinfo.NONE  # PRINFO ignored without PI
    finish(mio.copy(ns, sources, mio.copy_write_command(ns, e)))
    assert ns.block_meta(DEST) + ns.block_meta(DEST + 1) == b"\x42" * 32
    assert ns.block_data(DEST) == b"\x99" * 512



def test_blocking_work_keeps_the_inline_budget_of_one_call() -> None:
    """A Read's or Write's Work may run inline at QD1 as the plain one may; a Copy (several
    calls) and Write Zeroes (none admitted) always go to the pool."""
    case = CASES[0]
    ns = case.ns(blocking=True)
    data, meta = blocks(case, 13)
    layout = mio.host_layout(ns, NLB, PRACT)
    area = bytearray(host_area(case, layout, data, meta)[0])
    work = mio.write(ns, case.cmd(PRACT), NLB, layout, views_of(area))
    assert work is not None and work.inline is ns.inline_budget
    assert ns.calls == [("write", SLBA, NLB, False)]  # the data is stored only when the Work runs
    finish(work)
    assert ("write_meta", SLBA, NLB) in ns.calls and ns.counted == ["write"]
    out = bytearray(layout.data_len)
    work = mio.read(ns, case.cmd(PRACT | CHK), NLB, layout, views_of(out))
    assert work is not None and work.inline is ns.inline_budget and bytes(out) == bytes(len(out))
    finish(work)
    assert bytes(out) == b"".join(data)
    raw = descriptor(case, SLBA, 1, source_tag(case, SLBA)) + descriptor(case, SLBA + 1, 1, source_tag(case, SLBA + 1))
    e = copy_sqe(case, PRACT, PRACT, 2, ilbrt=DEST)
    work = mio.copy(ns, mio.copy_sources(ns, e, raw, 2), mio.copy_write_command(ns, e))
    assert work is not None and work.inline is None
