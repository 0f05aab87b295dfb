"""Write then Read through nvme_emu.metadata_io, table-driven over every PI type, guard,
metadata size and position and both host layouts, with PRACT 0 and 1: what is stored, and
what the host gets back, byte for byte; every check error with its status and LBA."""

from __future__ import annotations

import pytest

from nvme_emu import metadata_io as mio
from nvme_emu.pi.format import PiCommand, Prinfo
from nvme_emu.spec.commands import NvmeError, Status
from tests.pi_io.helpers import (
    CASES,
    CHK,
    FIELDS_AT,
    LBAT,
    NLB,
    PRACT,
    SLBA,
    T1,
    T3,
    Case,
    blocks,
    expected_pi,
    host_area,
    pi_of,
    read,
    reftag,
    valid_meta,
    write,
)
from tests.pi_io.fake_namespace import FakeNamespace

ids = [str(c) for c in CASES]


def stored(ns: FakeNamespace, i: int) -> tuple[bytes, bytes]:
    return ns.block_data(SLBA + i), ns.block_meta(SLBA + i)


@pytest.mark.parametrize("blocking", [False, True], ids=["ram", "blocking"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_pract_write_inserts_pi_and_reads_back(case: Case, blocking: bool) -> None:
    f = case.fmt
    ns = case.ns(blocking=blocking)
    data, meta = blocks(case, seed=1)
    cmd = case.cmd(PRACT | CHK)
    layout = mio.host_layout(ns, NLB, cmd.prinfo)
    # With PRACT the host moves no metadata when it is only the PI, even extended.
    assert (layout.data_len, layout.meta_len, layout.extended) == (
        (NLB * f.lbads, 0, False) if f.metadata_is_pi else
        (NLB * f.extended_block, 0, True) if case.extended else (NLB * f.lbads, NLB * f.ms, False)
    )
    write(ns, cmd, NLB, *host_area(case, layout, data, meta))
    for i in range(NLB):
        d, m = stored(ns, i)
        assert d == data[i]
        host_m = bytes(f.ms) if f.metadata_is_pi else meta[i]
        assert pi_of(f, m) == expected_pi(f, data[i], host_m, LBAT, reftag(f, cmd, i))
        if not f.metadata_is_pi:  # the host's other metadata bytes are kept
            assert m[: f.pi_offset] + m[f.pi_offset + f.pi_size :] == meta[i][: f.pi_offset] + meta[i][f.pi_offset + f.pi_size :]
    if blocking:
        assert ns.counted == ["write"]

    # Read with PRACT = 0: the host gets data and metadata as stored, in its layout.
    stored_meta = [stored(ns, i)[1] for i in range(NLB)]
    rcmd = case.cmd(CHK)
    host_data, host_meta = read(ns, rcmd, NLB)
    expect = host_area(case, mio.host_layout(ns, NLB, rcmd.prinfo), data, stored_meta)
    assert (host_data, host_meta) == (expect[0], expect[1] or b"")

    # Read with PRACT = 1: stripped when the metadata is only the PI, else as above.
    host_data, host_meta = read(ns, case.cmd(PRACT | CHK), NLB)
    if f.metadata_is_pi:
        assert (host_data, host_meta) == (b"".join(data), b"")
    else:
        assert (host_data, host_meta) == (expect[0], expect[1] or b"")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_host_pi_checked_and_stored_as_given(case: Case) -> None:
    ns = case.ns()
    data, meta = blocks(case, seed=2)
    cmd = case.cmd(CHK)
    meta = valid_meta(case, cmd, data, meta)
    write(ns, cmd, NLB, *host_area(case, mio.host_layout(ns, NLB, cmd.prinfo), data, meta))
    assert [stored(ns, i) for i in range(NLB)] == list(zip(data, meta, strict=True))


def corrupt(case: Case, meta: list[bytes], block: int, field: str) -> list[bytes]:
    """Flip the lowest bit of one PI field of one block."""
    start, size = FIELDS_AT[case.fmt.guard][field]
    m = bytearray(meta[block])
    m[case.fmt.pi_offset + start + size - 1] ^= 1
    return meta[:block] + [bytes(m)] + meta[block + 1 :]


FIELD_STATUS = {
    "guard": Status.END_TO_END_GUARD_CHECK_ERROR,
    "apptag": Status.END_TO_END_APPLICATION_TAG_CHECK_ERROR,
    "reftag": Status.END_TO_END_REFERENCE_TAG_CHECK_ERROR,
}


@pytest.mark.parametrize("field", FIELD_STATUS)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_write_check_error_status_and_lba_stores_nothing(case: Case, field: str) -> None:
    ns = case.ns()
    before = (bytes(ns.data), bytes(ns.meta))
    data, meta = blocks(case, seed=3)
    cmd = case.cmd(CHK)
    meta = corrupt(case, valid_meta(case, cmd, data, meta), 2, field)
    area = host_area(case, mio.host_layout(ns, NLB, cmd.prinfo), data, meta)
    if field == "reftag" and case.fmt.pi_type is T3:  # Type 3 reference tags are never checked
        write(ns, cmd, NLB, *area)
        return
    with pytest.raises(mio.PiCheckError) as info:
        write(ns, cmd, NLB, *area)
    assert (info.value.status, info.value.lba) == (FIELD_STATUS[field], SLBA + 2)
    assert not info.value.dnr  # as QEMU: End-to-end errors complete without DNR
    assert (bytes(ns.data), bytes(ns.meta)) == before
    # Only the bit of PRCHK that covers the field catches it.
    others = {"guard": Prinfo.PRCHK_APP | Prinfo.PRCHK_REF, "apptag": Prinfo.PRCHK_GUARD | Prinfo.PRCHK_REF,
              "reftag": Prinfo.PRCHK_GUARD | Prinfo.PRCHK_APP}[field]
    write(ns, case.cmd(others), NLB, *area)


@pytest.mark.parametrize("blocking", [False, True], ids=["ram", "blocking"])
@pytest.mark.parametrize("field", FIELD_STATUS)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_read_check_error_status_and_lba(case: Case, field: str, blocking: bool) -> None:
    ns = case.ns(blocking=blocking)
    data, meta = blocks(case, seed=4)
    write(ns, case.cmd(PRACT), NLB, *host_area(case, mio.host_layout(ns, NLB, PRACT), data, meta))
    lba = SLBA + 3
    ns.meta[lba * ns.ms : (lba + 1) * ns.ms] = corrupt(case, [ns.block_meta(lba)], 0, field)[0]
    for prinfo in (CHK, PRACT | CHK):
        cmd = case.cmd(prinfo)
        if field == "reftag" and case.fmt.pi_type is T3:
            read(ns, cmd, NLB)
            continue
        with pytest.raises(mio.PiCheckError) as info:
            read(ns, cmd, NLB)
        assert (info.value.status, info.value.lba) == (FIELD_STATUS[field], lba)
    read(ns, case.cmd(Prinfo.NONE), NLB)  # nothing checked: nothing fails


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt.pi_type is T1], ids=str)
def test_type1_ilbrt_mismatch_is_invalid_protection_information(case: Case) -> None:
    ns = case.ns()
    data, meta = blocks(case, seed=5)
    bad = PiCommand(slba=SLBA, prinfo=PRACT | Prinfo.PRCHK_REF, lbat=LBAT, ilbrt=SLBA + 1)
    area = host_area(case, mio.host_layout(ns, NLB, bad.prinfo), data, meta)
    with pytest.raises(mio.PiCheckError) as info:
        write(ns, bad, NLB, *area)
    assert (info.value.status, info.value.lba, info.value.dnr) == (Status.INVALID_PROTECTION_INFORMATION, SLBA, True)
    assert ns.calls == []  # refused before anything was stored
    with pytest.raises(NvmeError) as info:
        read(ns, bad, NLB)
    assert info.value.status is Status.INVALID_PROTECTION_INFORMATION


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_never_written_blocks_read_with_every_check(case: Case) -> None:
    """Unwritten metadata reads as deallocated (the PI escape): every check passes."""
    ns = case.ns()
    data, meta = read(ns, case.cmd(CHK), NLB)
    step = case.fmt.extended_block if case.extended else case.fmt.lbads
    assert all(data[i * step : i * step + case.fmt.lbads] == bytes(case.fmt.lbads) for i in range(NLB))


@pytest.mark.parametrize("extended", [False, True], ids=["sep", "ext"])
def test_metadata_without_pi_ignores_prinfo(extended: bool) -> None:
    """No PI: PRINFO is ignored (no Invalid Field, no insert, no strip); metadata travels."""
    ns = FakeNamespace(ms=8, pi=None, extended=extended)
    case_data = [bytes([i]) * 512 for i in range(NLB)]
    case_meta = [bytes([0xA0 + i]) * 8 for i in range(NLB)]
    cmd = mio.PiCommand(slba=SLBA)  # what pi_command decodes for any PRINFO here
    layout = mio.host_layout(ns, NLB, Prinfo.PRACT)
    assert layout.meta_len + layout.data_len == NLB * (512 + 8)
    area = (b"".join(d + m for d, m in zip(case_data, case_meta, strict=True)), None) if extended else (b"".join(case_data), b"".join(case_meta))
    write(ns, cmd, NLB, *area)
    assert read(ns, cmd, NLB) == (area[0], area[1] or b"")
    assert ns.block_meta(SLBA + 2) == case_meta[2]
