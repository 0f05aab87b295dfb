"""The PI engine against the slow reference CRCs: table-driven over every protection type,
guard format, metadata size, PI position and buffer layout, plus known-answer PI bytes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from nvme_emu.pi.engine import PiEngine, PiError, PiField
from nvme_emu.pi.format import (
    GuardKind,
    PiCommand,
    PiFormat,
    PiLocation,
    Prinfo,
    ProtectionType,
)
from nvme_emu.spec.commands import Status
from nvme_emu.spec.identify import DLFEAT_GUARD_CRC, DLFEAT_READ_ONES, DLFEAT_READ_ZEROES
from tests.pi.cases import PiCase
from tests.pi.reference_crc import ReferenceGuards, crc16_t10dif, crc64_nvme

LBADS = 512
N = 4  # blocks per buffer: enough for "the first failing one" to be neither first nor last
SLBA = 0x1000

T1, T2, T3 = ProtectionType.TYPE1, ProtectionType.TYPE2, ProtectionType.TYPE3
G16, G64 = GuardKind.GUARD_16, GuardKind.GUARD_64
FIRST, LAST = PiLocation.FIRST, PiLocation.LAST

#: (field, byte offset in the PI, length) for each layout: written out here, not taken from
#: the engine's dtypes, so a wrong dtype fails these tests.
FIELD_BYTES = {
    G16: {PiField.GUARD: (0, 2), PiField.APPTAG: (2, 2), PiField.REFTAG: (4, 4)},
    G64: {PiField.GUARD: (0, 8), PiField.APPTAG: (8, 2), PiField.REFTAG: (10, 6)},
}


class Case(PiCase):

    def engine(self) -> tuple[PiEngine, ReferenceGuards]:
        guards = ReferenceGuards(self.fmt.guard)
        return PiEngine(self.fmt, guards), guards

    def buffers(self, seed: int = 1, count: int = N) -> tuple[bytearray, bytearray | None, bytes, bytes]:
        """Random data and metadata (PI bytes random too, to be overwritten), laid out.
        Returns (buf, meta or None, the data, the metadata)."""
        rng = random.Random(seed)
        data = rng.randbytes(count * LBADS)
        md = rng.randbytes(count * self.fmt.ms)
        if not self.extended:
            return bytearray(data), bytearray(md), data, md
        buf = bytearray()
        for i in range(count):
            buf += data[i * LBADS : (i + 1) * LBADS] + md[i * self.fmt.ms : (i + 1) * self.fmt.ms]
        return buf, None, data, md

    def pi_at(self, buf: bytearray, meta: bytearray | None, block: int) -> tuple[bytearray, int]:
        """(the buffer holding block's PI, the PI's offset in it)."""
        f = self.fmt
        if meta is None:
            return buf, block * f.extended_block + f.lbads + f.pi_offset
        return meta, block * f.ms + f.pi_offset

    def flip(self, buf: bytearray, meta: bytearray | None, block: int, field: PiField, xor: int = 1) -> None:
        """Flip bits of the field's least significant byte (big-endian: its last byte)."""
        where, off = self.pi_at(buf, meta, block)
        start, size = FIELD_BYTES[self.fmt.guard][field]
        where[off + start + size - 1] ^= xor

    def set_field(self, buf: bytearray, meta: bytearray | None, block: int, field: PiField, value: int) -> None:
        where, off = self.pi_at(buf, meta, block)
        start, size = FIELD_BYTES[self.fmt.guard][field]
        where[off + start : off + start + size] = value.to_bytes(size, "big")

    def get_field(self, buf: bytearray, meta: bytearray | None, block: int, field: PiField) -> int:
        where, off = self.pi_at(buf, meta, block)
        start, size = FIELD_BYTES[self.fmt.guard][field]
        return int.from_bytes(where[off + start : off + start + size], "big")


def _formats() -> list[PiFormat]:
    out = []
    for pi_type in (T1, T2, T3):
        for guard, sizes in ((G16, (8, 16, 64)), (G64, (16, 64))):
            for ms in sizes:
                for location in (FIRST, LAST):
                    out.append(PiFormat(LBADS, ms, guard, pi_type, location))
    return out


CASES = [Case(fmt, ext) for fmt in _formats() for ext in (True, False)]
assert len(CASES) == 60


def command(fmt: PiFormat, prinfo: Prinfo = Prinfo.PRCHK_ALL, slba: int = SLBA, **kw: int) -> PiCommand:
    """A well-formed command: Type 1's ILBRT is the SLBA's low bits, Type 2/3 an arbitrary one."""
    ilbrt = slba & fmt.guard.reftag_mask if fmt.pi_type is T1 else 0x5EED0
    return PiCommand(slba=slba, prinfo=prinfo, lbat=kw.get("lbat", 0x1234), lbatm=kw.get("lbatm", 0xFFFF), ilbrt=kw.get("ilbrt", ilbrt))


def inserted(case: Case, **kw: int) -> tuple[PiEngine, ReferenceGuards, bytearray, bytearray | None]:
    eng, guards = case.engine()
    buf, meta, _, _ = case.buffers()
    assert eng.insert(command(case.fmt, Prinfo.PRACT, **kw), buf, meta) is None
    return eng, guards, buf, meta


# ---------------------------------------------------------------------------------------------
# insert, check, strip: every case
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_insert_then_check_passes_and_keeps_data_and_other_metadata(case: Case) -> None:
    eng, guards = case.engine()
    buf, meta, data, md = case.buffers()
    assert eng.insert(command(case.fmt, Prinfo.PRACT), buf, meta) is None
    assert guards.calls == 1  # one bulk call for all N blocks
    assert eng.check(command(case.fmt), buf, meta) is None
    assert guards.calls == 2
    f = case.fmt
    b = eng.blocks(buf, meta)
    assert bytes(b.data.reshape(-1)) == data
    for i in range(N):  # the metadata bytes outside the PI are the host's, untouched
        want = bytearray(md[i * f.ms : (i + 1) * f.ms])
        got = bytearray(b.meta[i])
        want[f.pi_offset : f.pi_offset + f.pi_size] = got[f.pi_offset : f.pi_offset + f.pi_size] = b""
        assert got == want
    # the stored tags are the ones the rules give
    for i in range(N):
        assert case.get_field(buf, meta, i, PiField.APPTAG) == 0x1234
        ref = case.get_field(buf, meta, i, PiField.REFTAG)
        assert ref == {T1: SLBA + i, T2: 0x5EED0 + i, T3: 0x5EED0}[f.pi_type]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_guard_is_the_reference_crc_of_data_and_metadata_before_the_pi(case: Case) -> None:
    eng, _, buf, meta = inserted(case)
    b = eng.blocks(buf, meta)
    crc = crc16_t10dif if case.fmt.guard is G16 else crc64_nvme
    for i in range(N):
        covered = bytes(b.data[i]) + bytes(b.meta[i, : case.fmt.pi_offset])
        assert case.get_field(buf, meta, i, PiField.GUARD) == crc(covered)


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt.metadata_is_pi], ids=str)
def test_strip_returns_the_data_alone(case: Case) -> None:
    eng, _, buf, meta = inserted(case)
    _, _, data, _ = case.buffers()
    out = eng.strip(command(case.fmt, Prinfo.PRACT | Prinfo.PRCHK_ALL), buf, meta)
    assert isinstance(out, np.ndarray) and bytes(out) == data
    case.flip(buf, meta, 2, PiField.GUARD)
    assert eng.strip(command(case.fmt, Prinfo.PRACT | Prinfo.PRCHK_ALL), buf, meta) == PiError(SLBA + 2, Status.END_TO_END_GUARD_CHECK_ERROR)
    out = eng.strip(command(case.fmt, Prinfo.PRACT), buf, meta)  # no PRCHK: stripped unchecked
    assert isinstance(out, np.ndarray) and bytes(out) == data


@pytest.mark.parametrize("case", [c for c in CASES if not c.fmt.metadata_is_pi][:4], ids=str)
def test_strip_refuses_metadata_larger_than_the_pi(case: Case) -> None:
    eng, _, buf, meta = inserted(case)
    with pytest.raises(ValueError, match="strip needs MS == PI size"):
        eng.strip(command(case.fmt, Prinfo.PRACT), buf, meta)


# ---------------------------------------------------------------------------------------------
# each field corrupted alone: exactly its status, at exactly that block
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", list(PiField), ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_one_corrupted_field_fails_with_its_status_at_its_block(case: Case, field: PiField) -> None:
    eng, _, buf, meta = inserted(case)
    case.flip(buf, meta, 2, field)
    err = eng.check(command(case.fmt), buf, meta)
    if field is PiField.REFTAG and case.fmt.pi_type is T3:
        assert err is None  # Type 3 defines no reference tag: never checked
    else:
        assert err == PiError(SLBA + 2, field.status)
    # the other checks alone do not see it; its own check alone does
    bit = {PiField.GUARD: Prinfo.PRCHK_GUARD, PiField.APPTAG: Prinfo.PRCHK_APP, PiField.REFTAG: Prinfo.PRCHK_REF}[field]
    assert eng.check(command(case.fmt, Prinfo.PRCHK_ALL & ~bit), buf, meta) is None
    alone = eng.check(command(case.fmt, bit), buf, meta)
    assert alone == (None if field is PiField.REFTAG and case.fmt.pi_type is T3 else PiError(SLBA + 2, field.status))
    assert eng.check(command(case.fmt, Prinfo.NONE), buf, meta) is None


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt.pi_type is not T3], ids=str)
def test_the_first_failing_block_decides_and_guard_before_app_before_ref(case: Case) -> None:
    eng, _, buf, meta = inserted(case)
    case.flip(buf, meta, 3, PiField.GUARD)
    case.flip(buf, meta, 1, PiField.REFTAG)
    assert eng.check(command(case.fmt), buf, meta) == PiError(SLBA + 1, Status.END_TO_END_REFERENCE_TAG_CHECK_ERROR)
    case.flip(buf, meta, 1, PiField.APPTAG)
    assert eng.check(command(case.fmt), buf, meta) == PiError(SLBA + 1, Status.END_TO_END_APPLICATION_TAG_CHECK_ERROR)
    case.flip(buf, meta, 1, PiField.GUARD)
    assert eng.check(command(case.fmt), buf, meta) == PiError(SLBA + 1, Status.END_TO_END_GUARD_CHECK_ERROR)
    case.flip(buf, meta, 0, PiField.REFTAG)
    assert eng.check(command(case.fmt), buf, meta) == PiError(SLBA, Status.END_TO_END_REFERENCE_TAG_CHECK_ERROR)


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt.ms > c.fmt.pi_size], ids=str)
def test_metadata_before_the_pi_is_guarded_only_with_the_pi_last(case: Case) -> None:
    eng, _, buf, meta = inserted(case)
    f = case.fmt
    # a metadata byte outside the PI: before it (PI last) or after it (PI first)
    where, off = case.pi_at(buf, meta, 1)
    outside = off - 1 if f.location is LAST else off + f.pi_size
    where[outside] ^= 0x80
    want = PiError(SLBA + 1, Status.END_TO_END_GUARD_CHECK_ERROR) if f.location is LAST else None
    assert eng.check(command(f), buf, meta) == want


@pytest.mark.parametrize("case", CASES[::7], ids=str)
def test_a_data_byte_is_guarded(case: Case) -> None:
    eng, _, buf, meta = inserted(case)
    eng.blocks(buf, meta).data[3, 100] ^= 0x01
    assert eng.check(command(case.fmt), buf, meta) == PiError(SLBA + 3, Status.END_TO_END_GUARD_CHECK_ERROR)


# ---------------------------------------------------------------------------------------------
# escapes, LBAT/LBATM, reference tags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt.pi_type is not T3], ids=str)
def test_apptag_ffff_disables_every_check_of_its_block_for_types_1_and_2(case: Case) -> None:
    eng, _, buf, meta = inserted(case)
    case.set_field(buf, meta, 1, PiField.APPTAG, 0xFFFF)
    case.flip(buf, meta, 1, PiField.GUARD)
    case.flip(buf, meta, 1, PiField.REFTAG)
    assert eng.check(command(case.fmt), buf, meta) is None
    case.flip(buf, meta, 2, PiField.GUARD)  # the next block is still checked
    assert eng.check(command(case.fmt), buf, meta) == PiError(SLBA + 2, Status.END_TO_END_GUARD_CHECK_ERROR)


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt.pi_type is T3], ids=str)
def test_type3_escape_needs_apptag_ffff_and_an_all_ones_reftag(case: Case) -> None:
    eng, _, buf, meta = inserted(case)
    ones = case.fmt.guard.reftag_mask
    guard_error = PiError(SLBA + 1, Status.END_TO_END_GUARD_CHECK_ERROR)
    case.flip(buf, meta, 1, PiField.GUARD)
    case.set_field(buf, meta, 1, PiField.APPTAG, 0xFFFF)
    assert eng.check(command(case.fmt), buf, meta) == guard_error  # app tag alone: still checked
    case.set_field(buf, meta, 1, PiField.REFTAG, ones)
    assert eng.check(command(case.fmt), buf, meta) is None  # both: checks off
    case.set_field(buf, meta, 1, PiField.APPTAG, 0xFFFE)
    assert eng.check(command(case.fmt), buf, meta) == guard_error  # ref tag alone: still checked
    if case.fmt.guard is G64:  # 32 ones are not the 48-bit escape
        case.set_field(buf, meta, 1, PiField.APPTAG, 0xFFFF)
        case.set_field(buf, meta, 1, PiField.REFTAG, 0xFFFF_FFFF)
        assert eng.check(command(case.fmt), buf, meta) == guard_error


@pytest.mark.parametrize(
    ("lbat", "lbatm", "fails"),
    [
        (0x1234, 0xFFFF, False),
        (0x1235, 0xFFFF, True),
        (0x12FF, 0xFF00, False),  # only the high byte compared
        (0x13FF, 0xFF00, True),
        (0x1230, 0xFFF0, False),
        (0x1238, 0x000F, True),
        (0xABCD, 0x0000, False),  # an empty mask compares nothing
    ],
)
@pytest.mark.parametrize("case", [CASES[0], CASES[-1]], ids=str)
def test_lbat_under_lbatm(case: Case, lbat: int, lbatm: int, fails: bool) -> None:
    eng, _, buf, meta = inserted(case)  # stored application tag 1234h
    err = eng.check(command(case.fmt, Prinfo.PRCHK_APP, lbat=lbat, lbatm=lbatm), buf, meta)
    assert err == (PiError(SLBA, Status.END_TO_END_APPLICATION_TAG_CHECK_ERROR) if fails else None)


def _fmt(pi_type: ProtectionType, guard: GuardKind, ms: int | None = None) -> PiFormat:
    return PiFormat(LBADS, ms or guard.pi_size, guard, pi_type)


@pytest.mark.parametrize(
    ("pi_type", "guard", "slba", "ilbrt", "tags"),
    [
        # Type 1: the low 32/48 bits of each block's LBA, wrapping
        (T1, G16, 0xFFFF_FFFE, 0xFFFF_FFFE, [0xFFFF_FFFE, 0xFFFF_FFFF, 0, 1]),
        (T1, G16, 0x7_0000_0005, 0x5, [5, 6, 7, 8]),
        (T1, G64, 0xFFFF_FFFF_FFFE, 0xFFFF_FFFF_FFFE, [0xFFFF_FFFF_FFFE, 0xFFFF_FFFF_FFFF, 0, 1]),
        (T1, G64, 0x3_0001_0000_0000, 0x1_0000_0000, [0x1_0000_0000 + i for i in range(4)]),
        (T1, G64, 0xFFFF_FFFE, 0xFFFF_FFFE, [0xFFFF_FFFE, 0xFFFF_FFFF, 0x1_0000_0000, 0x1_0000_0001]),  # no 32-bit wrap
        # Type 2: from ILBRT, whatever the LBA, wrapping
        (T2, G16, 7, 0xFFFF_FFFF, [0xFFFF_FFFF, 0, 1, 2]),
        (T2, G64, 7, 0xFFFF_FFFF_FFFF, [0xFFFF_FFFF_FFFF, 0, 1, 2]),
        # Type 3: ILBRT as is, in every block
        (T3, G16, 7, 0xCAFE, [0xCAFE] * 4),
        (T3, G64, 7, 0xBEEF_0000_CAFE, [0xBEEF_0000_CAFE] * 4),
    ],
)
def test_reference_tags_and_their_wrap(pi_type: ProtectionType, guard: GuardKind, slba: int, ilbrt: int, tags: list[int]) -> None:
    case = Case(_fmt(pi_type, guard), extended=True)
    eng, _ = case.engine()
    buf, meta, _, _ = case.buffers()
    cmd = PiCommand(slba=slba, prinfo=Prinfo.PRACT | Prinfo.PRCHK_REF, lbat=0, ilbrt=ilbrt)
    assert eng.insert(cmd, buf, meta) is None
    assert [case.get_field(buf, meta, i, PiField.REFTAG) for i in range(N)] == tags
    assert [case.get_field(buf, meta, i, PiField.APPTAG) for i in range(N)] == [0] * N  # no carry out of the wrap
    assert eng.check(PiCommand(slba=slba, prinfo=Prinfo.PRCHK_ALL, lbat=0, ilbrt=ilbrt), buf, meta) is None
    if pi_type is T2:  # a read expecting another initial tag fails at the first block
        wrong = PiCommand(slba=slba, prinfo=Prinfo.PRCHK_REF, ilbrt=ilbrt - 1)
        assert eng.check(wrong, buf, meta) == PiError(slba, Status.END_TO_END_REFERENCE_TAG_CHECK_ERROR)


@pytest.mark.parametrize("guard", [G16, G64], ids=lambda g: g.name)
def test_type1_ilbrt_must_match_the_slba_when_reftag_is_checked(guard: GuardKind) -> None:
    case = Case(_fmt(T1, guard), extended=False)
    eng, guards = case.engine()
    buf, meta, _, _ = case.buffers()
    bad = PiCommand(slba=SLBA, prinfo=Prinfo.PRACT | Prinfo.PRCHK_REF, ilbrt=SLBA + 1)
    invalid = PiError(SLBA, Status.INVALID_PROTECTION_INFORMATION)
    assert eng.insert(bad, buf, meta) == invalid
    assert eng.check(bad, buf, meta) == invalid
    assert guards.calls == 0  # refused before any block is looked at
    # without PRCHK reference the ILBRT is not validated; Type 1 tags still come from the LBA
    lax = PiCommand(slba=SLBA, prinfo=Prinfo.PRACT, ilbrt=SLBA + 1)
    assert eng.insert(lax, buf, meta) is None
    assert case.get_field(buf, meta, 0, PiField.REFTAG) == SLBA
    # Type 2 takes any ILBRT
    t2 = PiEngine(_fmt(T2, guard), ReferenceGuards(guard))
    assert t2.validate(bad) is None


# ---------------------------------------------------------------------------------------------
# known-answer PI bytes: CRCs computed once with tests/pi/reference_crc.py, written here
# ---------------------------------------------------------------------------------------------

KA_DATA = bytes(range(256)) * 2  # one 512-byte block: 00 01 .. FF 00 01 .. FF


@pytest.mark.parametrize(
    ("fmt", "cmd", "host_meta", "want_meta"),
    [
        # 16b Guard, Type 1, MS 8: CRC-16/T10-DIF(KA_DATA) = 4F10h, LBAT BEEFh, reftag = LBA
        (
            PiFormat(512, 8, G16, T1),
            PiCommand(slba=0x12345678, lbat=0xBEEF, ilbrt=0x12345678),
            b"",
            bytes.fromhex("4f10 beef 12345678"),
        ),
        # 16b Guard, Type 2, MS 16, PI last: guard over data + A0..A7 = F9CDh
        (
            PiFormat(512, 16, G16, T2, PiLocation.LAST),
            PiCommand(slba=9, lbat=0x0102, ilbrt=0xDEADBEEF),
            bytes(range(0xA0, 0xB0)),
            bytes(range(0xA0, 0xA8)) + bytes.fromhex("f9cd 0102 deadbeef"),
        ),
        # 16b Guard, Type 3, MS 16, PI first: guard over the data only; A8..AF kept
        (
            PiFormat(512, 16, G16, T3, PiLocation.FIRST),
            PiCommand(slba=9, lbat=0x0102, ilbrt=0x01020304),
            bytes(range(0xA0, 0xB0)),
            bytes.fromhex("4f10 0102 01020304") + bytes(range(0xA8, 0xB0)),
        ),
        # 64b Guard, Type 1, MS 16: CRC-64/NVME(KA_DATA) = 65F48632094A1B07h, 48-bit reftag
        (
            PiFormat(512, 16, G64, T1),
            PiCommand(slba=0x89AB_CDEF_0123, lbat=0xBEEF, ilbrt=0x89AB_CDEF_0123),
            b"",
            bytes.fromhex("65f48632094a1b07 beef 89abcdef0123"),
        ),
        # 64b Guard, Type 2, MS 64, PI last: guard over data + 40h..6Fh = 9810FECCE69340A5h
        (
            PiFormat(512, 64, G64, T2, PiLocation.LAST),
            PiCommand(slba=1, lbat=0x7777, ilbrt=0x0000_0001_0002),
            bytes(range(0x40, 0x80)),
            bytes(range(0x40, 0x70)) + bytes.fromhex("9810fecce69340a5 7777 000000010002"),
        ),
    ],
    ids=["g16-t1-ms8", "g16-t2-ms16-last", "g16-t3-ms16-first", "g64-t1-ms16", "g64-t2-ms64-last"],
)
def test_known_answer_pi_bytes(fmt: PiFormat, cmd: PiCommand, host_meta: bytes, want_meta: bytes) -> None:
    for extended in (True, False):
        eng = PiEngine(fmt, ReferenceGuards(fmt.guard))
        meta = bytearray(host_meta or bytes(fmt.ms))
        if extended:
            buf = bytearray(KA_DATA + meta)
            assert eng.insert(cmd, buf) is None
            assert bytes(buf) == KA_DATA + want_meta
        else:
            data = bytearray(KA_DATA)
            assert eng.insert(cmd, data, meta) is None
            assert bytes(data) == KA_DATA and bytes(meta) == want_meta


# ---------------------------------------------------------------------------------------------
# deallocated blocks, fault injection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_deallocated_blocks_read_as_dlfeat_says_and_pass_every_check(case: Case) -> None:
    f = case.fmt
    eng, _ = case.engine()
    ones = f.guard.reftag_mask
    guard_ones = (1 << (8 * FIELD_BYTES[f.guard][PiField.GUARD][1])) - 1
    crc = crc16_t10dif if f.guard is G16 else crc64_nvme
    for dlfeat, fill, guard in (
        (DLFEAT_READ_ZEROES, 0x00, guard_ones),
        (0b000, 0x00, guard_ones),  # not reported: we read zeroes
        (DLFEAT_READ_ONES, 0xFF, guard_ones),
        (DLFEAT_READ_ZEROES | DLFEAT_GUARD_CRC, 0x00, crc(bytes(LBADS + f.pi_offset))),
        (DLFEAT_READ_ONES | DLFEAT_GUARD_CRC, 0xFF, crc(b"\xff" * (LBADS + f.pi_offset))),
    ):
        buf, meta, _, _ = case.buffers(seed=dlfeat + 7)
        eng.fill_deallocated(dlfeat, buf, meta)
        b = eng.blocks(buf, meta)
        assert (b.data == fill).all()
        for i in range(N):
            assert case.get_field(buf, meta, i, PiField.APPTAG) == 0xFFFF
            assert case.get_field(buf, meta, i, PiField.REFTAG) == ones
            assert case.get_field(buf, meta, i, PiField.GUARD) == guard
            outside = np.concatenate([b.meta[i, : f.pi_offset], b.meta[i, f.pi_offset + f.pi_size :]])
            assert (outside == fill).all()
        # the escape: a host checking everything reads never-written blocks fine
        assert eng.check(command(f), buf, meta) is None


@pytest.mark.parametrize("field", list(PiField), ids=lambda f: f.name)
@pytest.mark.parametrize("case", [c for c in CASES if c.fmt.pi_type is not T3][::5], ids=str)
def test_corrupt_damages_exactly_the_range(case: Case, field: PiField) -> None:
    eng, _, buf, meta = inserted(case)
    before = [[case.get_field(buf, meta, i, fld) for fld in PiField] for i in range(N)]
    eng.corrupt(field, buf, meta, first=1, count=2)
    after = [[case.get_field(buf, meta, i, fld) for fld in PiField] for i in range(N)]
    assert after[0] == before[0] and after[3] == before[3]
    for i in (1, 2):
        changed = [fld for fld, x, y in zip(PiField, before[i], after[i], strict=True) if x != y]
        assert changed == [field]
    assert eng.check(command(case.fmt), buf, meta) == PiError(SLBA + 1, field.status)
    # a check of the blocks after the range passes: only the range is damaged
    f = case.fmt
    if meta is None:
        tail, tail_meta = buf[3 * f.extended_block :], None
    else:
        tail, tail_meta = buf[3 * LBADS :], meta[3 * f.ms :]
    tail_cmd = command(f, slba=SLBA + 3) if f.pi_type is T1 else command(f, slba=SLBA + 3, ilbrt=0x5EED0 + 3)
    assert eng.check(tail_cmd, tail, tail_meta) is None


def test_corrupt_never_makes_the_apptag_escape_and_refuses_a_range_outside() -> None:
    case = Case(_fmt(T1, G16), extended=True)
    eng, _, buf, meta = inserted(case, lbat=0xFFFE)
    eng.corrupt(PiField.APPTAG, buf, meta, first=0, count=1)
    assert case.get_field(buf, meta, 0, PiField.APPTAG) == 0xFFFC  # bit 1, not bit 0 (FFFFh)
    assert eng.check(command(case.fmt, lbat=0xFFFE), buf, meta) == PiError(SLBA, Status.END_TO_END_APPLICATION_TAG_CHECK_ERROR)
    eng.corrupt(PiField.GUARD, buf, meta)  # the whole buffer by default
    assert eng.check(command(case.fmt, Prinfo.PRCHK_GUARD), buf, meta) == PiError(SLBA, Status.END_TO_END_GUARD_CHECK_ERROR)
    with pytest.raises(ValueError, match="outside"):
        eng.corrupt(PiField.GUARD, buf, meta, first=3, count=2)
    with pytest.raises(ValueError, match="outside"):
        eng.corrupt(PiField.GUARD, buf, meta, first=-1, count=1)


# ---------------------------------------------------------------------------------------------
# formats, command decoding, buffers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lbads": 1000}, "power of two"),
        ({"lbads": 256}, "at least 512"),
        ({"ms": 32}, "one of"),
        ({"ms": 8, "guard": G64}, "cannot hold 16-byte"),
        ({"pi_type": ProtectionType.NONE}, "type 1, 2 or 3"),
    ],
)
def test_format_refuses(kw: dict, match: str) -> None:
    args: dict = {"lbads": 512, "ms": 8, "guard": G16, "pi_type": T1} | kw
    with pytest.raises(ValueError, match=match):
        PiFormat(**args)


def test_format_dps_and_host_metadata() -> None:
    from nvme_emu.pi.format import dps_decode

    assert PiFormat(512, 8, G16, T1, LAST).dps == 0b0001
    assert PiFormat(512, 16, G16, T3, FIRST).dps == 0b1011
    assert dps_decode(0b1010) == (T2, FIRST)
    with pytest.raises(ValueError):
        dps_decode(0b0100)  # reserved type
    ms8, ms64 = PiFormat(512, 8, G16, T1), PiFormat(4096, 64, G16, T1)
    assert not ms8.host_transfers_metadata(Prinfo.PRACT) and ms8.host_transfers_metadata(Prinfo.PRCHK_ALL)
    assert ms64.host_transfers_metadata(Prinfo.PRACT)
    assert not PiFormat(512, 16, G64, T1).host_transfers_metadata(Prinfo.PRACT)  # 16 = 64b Guard PI size


def test_command_from_dwords() -> None:
    cdw12 = (0b1101 << 26) | 7  # PRACT | PRCHK guard | PRCHK ref, NLB 7
    cmd = PiCommand.from_dwords(G16, slba=5, cdw3=0xFFFF_ABCD, cdw12=cdw12, cdw14=0x11223344, cdw15=0xFF00_1234)
    assert cmd == PiCommand(slba=5, prinfo=Prinfo.PRACT | Prinfo.PRCHK_GUARD | Prinfo.PRCHK_REF, lbat=0x1234, lbatm=0xFF00, ilbrt=0x11223344)
    cmd64 = PiCommand.from_dwords(G64, slba=5, cdw3=0xFFFF_ABCD, cdw12=0, cdw14=0x11223344, cdw15=0)
    assert cmd64.ilbrt == 0xABCD_1122_3344 and cmd64.prinfo == Prinfo.NONE  # CDW3 bits 15:0 only


def test_engine_refuses_other_guards_and_ragged_buffers() -> None:
    with pytest.raises(ValueError, match="GUARD_16 format given GUARD_64"):
        PiEngine(_fmt(T1, G16), ReferenceGuards(G64))
    eng = PiEngine(_fmt(T1, G16), ReferenceGuards(G16))
    with pytest.raises(ValueError, match="extended blocks"):
        eng.blocks(bytearray(520 * 2 + 1))
    with pytest.raises(ValueError, match="not whole"):
        eng.blocks(bytearray(1024), bytearray(15))
    with pytest.raises(ValueError, match="contiguous uint8"):
        eng.blocks(np.zeros(260, dtype=np.uint16))
    assert eng.blocks(np.zeros(1040, dtype=np.uint8)).count == 2
    assert eng.check(command(eng.fmt), bytearray()) is None  # no blocks, nothing to fail
    with pytest.raises(ValueError, match="read-only"):
        eng.insert(command(eng.fmt, Prinfo.PRACT), bytes(520))


def test_check_without_guard_bit_computes_no_crc() -> None:
    case = Case(_fmt(T2, G64), extended=True)
    eng, guards, buf, meta = inserted(case)
    calls = guards.calls
    assert eng.check(command(case.fmt, Prinfo.PRCHK_APP | Prinfo.PRCHK_REF), buf, meta) is None
    assert guards.calls == calls
