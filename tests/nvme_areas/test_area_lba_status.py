"""Write Uncorrectable (NVM opcode 04h), Get LBA Status (admin 86h) and the LBA Status
Information log (0Eh) in-process: the marks Write Uncorrectable and the fault injector's media
errors leave, what reads them (statuses, Error Information, SMART), what clears them, and
every field of the two reports with their limits (MNDW, RL, ATYPE, NSID)."""

from __future__ import annotations

import struct

import pytest

from .area_helpers import BUF, Area, sqe

from nvme_emu.admin import AdminCommands
from nvme_emu.backends.file import FileBackend
from nvme_emu.faults import FaultInjector, FaultKind
from nvme_emu.health import smart_log
from nvme_emu.identify import identify_controller
from nvme_emu.log_page import log_page
from nvme_emu.namespace import Namespace
from nvme_emu.nvm import NvmCommands
from nvme_emu.spec.commands import NSID_ALL, AdminOpcode, DsmAttr, NvmOpcode, Status
from nvme_emu.spec.events import AsyncEventConfig, AsyncEventNotice, AsyncEventType
from nvme_emu.spec.identify import Oacs, Oaes, Oncs
from nvme_emu.spec.log_pages import CommandEffects, LogPageId

ATYPE_SCAN, ATYPE_TRACKED = 0x10, 0x11
SMART_MEDIA_ERRORS = 160  # SMART / Health log: Media and Data Integrity Errors, 16 bytes
FILL = 0xA5


def io(opc: int, slba: int, nlb: int, *, nsid: int = 1, cid: int = 1, cdw12: int = 0) -> tuple:
    return sqe(opc, cid=cid, nsid=nsid, prp1=BUF, prp2=BUF + 4096, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=(nlb - 1) | cdw12)


def status(result: tuple[int, int]) -> int:
    """The 11-bit status of an (status field, dw0) result."""
    return result[0] & 0x7FF


def dnr(result: tuple[int, int]) -> bool:
    return bool(result[0] & (1 << 14))


def media_errors(area: Area) -> int:
    return int.from_bytes(smart_log(area.state)[SMART_MEDIA_ERRORS : SMART_MEDIA_ERRORS + 16], "little")


def get_lba_status(area: Area, slba: int, *, mndw: int = 1023, atype: int = ATYPE_TRACKED, rl: int = 0xFFFF, nsid: int = 1, cid: int = 7):
    """(status, NLSD, CMPC, [(DSLBA, NLB, Status)], raw bytes) of one Get LBA Status."""
    area.guest.write(BUF, bytes([FILL]) * 8192)
    cmd = sqe(AdminOpcode.GET_LBA_STATUS, cid=cid, nsid=nsid, prp1=BUF, prp2=BUF + 4096,
              cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=mndw, cdw13=atype << 24 | rl)
    result = AdminCommands(area.state, area.hooks).execute(area.admin_sq, cmd)
    raw = area.guest.read(BUF, 8192)
    nlsd, cmpc = struct.unpack_from("<IB", raw)
    descs = [struct.unpack_from("<QIxB2x", raw, 8 + 16 * i) for i in range(min(nlsd, 500))]
    return status(result), nlsd, cmpc, descs, raw


@pytest.fixture
def nvm(area: Area) -> NvmCommands:
    return NvmCommands(area.state, area.hooks)


def write(nvm: NvmCommands, area: Area, slba: int, nlb: int, nsid: int = 1) -> tuple[int, int]:
    area.guest.write(BUF, bytes([slba & 0xFF]) * (nlb * 512))
    return nvm.execute(area.admin_sq, io(NvmOpcode.WRITE, slba, nlb, nsid=nsid))


# -- Write Uncorrectable ---------------------------------------------------------------------


def test_write_uncorrectable_fails_reads_until_written(area: Area, nvm: NvmCommands):
    assert write(nvm, area, 0, 16) == (Status.SUCCESS, 0)
    assert nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, 4, 4)) == (Status.SUCCESS, 0)
    assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 0, 4)) == (Status.SUCCESS, 0)  # next to the marks
    before = media_errors(area)
    result = nvm.execute(area.admin_sq, io(NvmOpcode.READ, 2, 4, cid=9))
    assert status(result) == Status.UNRECOVERED_READ_ERROR and dnr(result)
    entry = area.state.error_log.entries[0]
    assert (entry["cid"], entry["nsid"], entry["lba"], entry["status_field"] & 0x7FF) == (9, 1, 4, Status.UNRECOVERED_READ_ERROR)
    assert media_errors(area) == before + 1
    # Compare, Verify and a Copy reading a marked source fail the same way
    for cmd in (io(NvmOpcode.COMPARE, 7, 1), io(NvmOpcode.VERIFY, 6, 2)):
        assert status(nvm.execute(area.admin_sq, cmd)) == Status.UNRECOVERED_READ_ERROR
    area.guest.write(BUF, struct.pack("<8xQH14x", 5, 0))  # one source range: LBA 5
    copy = sqe(NvmOpcode.COPY, nsid=1, prp1=BUF, cdw10=100)
    assert status(nvm.execute(area.admin_sq, copy)) == Status.UNRECOVERED_READ_ERROR
    assert media_errors(area) == before + 4
    # a Write clears what it covers, Write Zeroes the rest
    assert write(nvm, area, 4, 2) == (Status.SUCCESS, 0)
    assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 4, 2)) == (Status.SUCCESS, 0)
    assert area.guest.read(BUF, 1024) == bytes([4]) * 1024
    assert status(nvm.execute(area.admin_sq, io(NvmOpcode.READ, 6, 1))) == Status.UNRECOVERED_READ_ERROR
    assert nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_ZEROES, 6, 2)) == (Status.SUCCESS, 0)
    assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 0, 16)) == (Status.SUCCESS, 0)


def test_deallocate_format_and_copy_destination_clear_marks(area: Area, nvm: NvmCommands):
    for slba in (10, 20, 30):
        assert nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, slba, 2)) == (Status.SUCCESS, 0)
    area.guest.write(BUF, struct.pack("<IIQ", 0, 2, 10))
    dsm = sqe(NvmOpcode.DATASET_MANAGEMENT, nsid=1, prp1=BUF, cdw10=0, cdw11=DsmAttr.AD)
    assert nvm.execute(area.admin_sq, dsm) == (Status.SUCCESS, 0)
    assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 10, 2)) == (Status.SUCCESS, 0)
    area.guest.write(BUF, struct.pack("<8xQH14x", 0, 1))  # LBAs 0-1 -> 20-21
    assert nvm.execute(area.admin_sq, sqe(NvmOpcode.COPY, nsid=1, prp1=BUF, cdw10=20)) == (Status.SUCCESS, 0)
    assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 20, 2)) == (Status.SUCCESS, 0)
    assert status(nvm.execute(area.admin_sq, io(NvmOpcode.READ, 30, 2))) == Status.UNRECOVERED_READ_ERROR
    format_nvm = sqe(AdminOpcode.FORMAT_NVM, nsid=1)
    assert AdminCommands(area.state, area.hooks).execute(area.admin_sq, format_nvm) == (Status.SUCCESS, 0)
    assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 30, 2)) == (Status.SUCCESS, 0)


def test_write_uncorrectable_statuses_and_identify(area: Area, nvm: NvmCommands):
    last = area.state.namespaces[1].nsze
    assert status(nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, last - 1, 2))) == Status.LBA_OUT_OF_RANGE
    assert status(nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, 0, 1, nsid=9))) == Status.INVALID_NAMESPACE_OR_FORMAT
    assert status(nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, 0, 1, nsid=NSID_ALL))) == Status.INVALID_NAMESPACE_OR_FORMAT
    assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 0, 8)) == (Status.SUCCESS, 0)  # nothing marked by the failures
    area.state.namespaces[1].write_protected = True
    assert status(nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, 0, 1))) == Status.NAMESPACE_WRITE_PROTECTED
    ident = identify_controller(area.state)
    oncs, = struct.unpack_from("<H", ident, 520)
    oacs, = struct.unpack_from("<H", ident, 256)
    oaes, = struct.unpack_from("<I", ident, 92)
    assert oncs & Oncs.WRITE_UNCORRECTABLE and oacs & Oacs.GET_LBA_STATUS and oaes & Oaes.LBA_STATUS
    effects = log_page(area.state, LogPageId.COMMANDS_SUPPORTED_EFFECTS, 0, 0, 0)
    io_wu, = struct.unpack_from("<I", effects, 1024 + 4 * NvmOpcode.WRITE_UNCORRECTABLE)
    admin_gls, = struct.unpack_from("<I", effects, 4 * AdminOpcode.GET_LBA_STATUS)
    assert io_wu & (CommandEffects.CSUPP | CommandEffects.LBCC) == CommandEffects.CSUPP | CommandEffects.LBCC
    assert admin_gls & CommandEffects.CSUPP
    supported = log_page(area.state, LogPageId.SUPPORTED_LOG_PAGES, 0, 0, 0)
    assert struct.unpack_from("<I", supported, 4 * LogPageId.LBA_STATUS_INFORMATION)[0] & 1


def test_write_uncorrectable_on_a_file_namespace(area: Area, nvm: NvmCommands, tmp_path):
    area.state.namespaces[2] = Namespace(2, FileBackend(str(tmp_path / "disk"), 1 << 20))
    try:
        assert write(nvm, area, 8, 8, nsid=2) == (Status.SUCCESS, 0)
        assert nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, 8, 1, nsid=2)) == (Status.SUCCESS, 0)
        assert status(nvm.execute(area.admin_sq, io(NvmOpcode.READ, 8, 8, nsid=2))) == Status.UNRECOVERED_READ_ERROR
        assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 8, 8)) == (Status.SUCCESS, 0)  # namespace 1: unmarked
        assert write(nvm, area, 8, 1, nsid=2) == (Status.SUCCESS, 0)
        assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 8, 8, nsid=2)) == (Status.SUCCESS, 0)
    finally:
        area.state.namespaces.pop(2).close()


# -- Get LBA Status --------------------------------------------------------------------------


def mark(nvm: NvmCommands, area: Area, *ranges: tuple[int, int]) -> None:
    for slba, nlb in ranges:
        assert nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, slba, nlb)) == (Status.SUCCESS, 0)


def test_get_lba_status_reports_marks_and_media_faults(area: Area, nvm: NvmCommands):
    mark(nvm, area, (10, 5), (100, 3))
    faults = FaultInjector(area.state, nvm, call_later=lambda s, fn: None)
    fault = faults.add({"kind": FaultKind.MEDIA, "nsid": 1, "slba": 200, "nlb": 8, "op": "read"})
    faults.add({"kind": FaultKind.MEDIA, "nsid": 1, "slba": 400, "nlb": 8, "op": "write"})  # reads are fine there
    for atype in (ATYPE_TRACKED, ATYPE_SCAN):
        st, nlsd, cmpc, descs, raw = get_lba_status(area, 0, atype=atype, rl=1000)
        assert (st, nlsd, cmpc) == (Status.SUCCESS, 3, 2)
        assert descs == [(10, 5, 0), (100, 3, 0), (200, 8, 0)]
        assert raw[5:8] == bytes(3) and raw[8 + 3 * 16 : 8 + 4 * 16] == bytes([FILL]) * 16  # reserved; no more written
    faults.remove(fault.id)
    assert get_lba_status(area, 0, rl=1000)[1:4] == (2, 2, [(10, 5, 0), (100, 3, 0)])


def test_get_lba_status_limits(area: Area, nvm: NvmCommands):
    mark(nvm, area, (10, 5), (100, 3), (300, 1))
    # MNDW (0's based): the header and one descriptor are 6 dwords; more remain (CMPC 1h)
    st, nlsd, cmpc, descs, raw = get_lba_status(area, 0, mndw=5)
    assert (st, nlsd, cmpc, descs) == (Status.SUCCESS, 1, 1, [(10, 5, 0)])
    assert raw[24:32] == bytes([FILL]) * 8  # not a byte past MNDW
    st, nlsd, cmpc, _, raw = get_lba_status(area, 0, mndw=1)  # header only (nvme-cli's own test)
    assert (st, nlsd, cmpc) == (Status.SUCCESS, 0, 1) and raw[8:12] == bytes([FILL]) * 4
    # RL: the range ends inside the second mark, which is reported clipped to it
    assert get_lba_status(area, 0, rl=102)[:4] == (Status.SUCCESS, 2, 2, [(10, 5, 0), (100, 2, 0)])
    assert get_lba_status(area, 12, rl=1)[:4] == (Status.SUCCESS, 1, 2, [(12, 1, 0)])
    # a range with no marks
    assert get_lba_status(area, 20, rl=80)[:4] == (Status.SUCCESS, 0, 2, [])
    # RL 0h: to the end of the namespace
    assert get_lba_status(area, 101, rl=0)[:4] == (Status.SUCCESS, 2, 2, [(101, 2, 0), (300, 1, 0)])


def test_get_lba_status_refusals(area: Area, nvm: NvmCommands):
    mark(nvm, area, (10, 5))
    for nsid in (0, 9, NSID_ALL):
        assert get_lba_status(area, 0, nsid=nsid)[0] == Status.INVALID_NAMESPACE_OR_FORMAT
    assert get_lba_status(area, area.state.namespaces[1].nsze)[0] == Status.LBA_OUT_OF_RANGE
    for atype in (0x00, 0x02, 0x12, 0xFF):  # 02h needs allocated-LBA tracking (Track Send): not supported
        assert get_lba_status(area, 0, atype=atype)[0] == Status.INVALID_FIELD
    assert area.state.error_log.entries[0]["cid"] == 7


# -- LBA Status Information log and its alert ----------------------------------------------


def lba_status_log(area: Area) -> tuple[tuple[int, int, int, int], list[tuple[int, int, int, list[tuple[int, int]]]]]:
    page = log_page(area.state, LogPageId.LBA_STATUS_INFORMATION, NSID_ALL, 0, 0)
    lslplen, nlslne, estulb, lsgc = struct.unpack_from("<III2xH", page)
    assert len(page) == lslplen
    elements, off = [], 16
    for _ in range(nlslne):
        neid, nrld, ratype = struct.unpack_from("<IIB", page, off)
        ranges = [struct.unpack_from("<QI", page, off + 16 + 16 * i) for i in range(nrld)]
        elements.append((neid, nrld, ratype, ranges))
        off += 16 + 16 * nrld
    assert off == lslplen
    return (lslplen, nlslne, estulb, lsgc), elements


def test_lba_status_log_lists_tracked_ranges_per_namespace(guest):
    from .area_helpers import make_area

    area = make_area(guest, namespaces=2)
    nvm = NvmCommands(area.state, area.hooks)
    try:
        (length, n, estulb, gen0), elements = lba_status_log(area)
        assert (length, n, estulb, elements) == (16, 0, 0, [])
        mark(nvm, area, (10, 5), (100, 3))
        assert nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, 7, 1, nsid=2)) == (Status.SUCCESS, 0)
        (length, n, estulb, gen1), elements = lba_status_log(area)
        assert (length, n, estulb) == (16 + 2 * 16 + 3 * 16, 2, 0) and gen1 != gen0
        assert elements == [(1, 2, ATYPE_TRACKED, [(10, 5), (100, 3)]), (2, 1, ATYPE_TRACKED, [(7, 1)])]
        write(nvm, area, 7, 1, nsid=2)
        (_, n, _, gen2), elements = lba_status_log(area)
        assert n == 1 and gen2 != gen1 and elements[0][0] == 1
    finally:
        for ns in area.state.namespaces.values():
            ns.close()


def test_lba_status_alert_when_enabled(area: Area, nvm: NvmCommands):
    mark(nvm, area, (1, 1))
    assert area.record.named("async_event") == []  # not enabled: no event
    area.state.features.async_event_config = AsyncEventConfig.LBA_STATUS
    mark(nvm, area, (2, 1))
    assert area.record.named("async_event") == [(AsyncEventType.NOTICE, AsyncEventNotice.LBA_STATUS_INFORMATION_ALERT, LogPageId.LBA_STATUS_INFORMATION)]


# -- the range set both share ----------------------------------------------------------------


def test_lba_ranges_match_a_set_of_lbas():
    """Random marks and unmarks against a plain set of LBAs: merging, splitting, lookups."""
    import random

    from nvme_emu.lba_ranges import LbaRanges

    rng = random.Random(22)
    for _ in range(200):
        ranges, model = LbaRanges(), set()
        for _ in range(30):
            slba, nlb = rng.randrange(0, 120), rng.randrange(1, 20)
            span = set(range(slba, slba + nlb))
            if rng.random() < 0.6:
                assert ranges.add(slba, nlb) == bool(span - model)
                model |= span
            else:
                assert ranges.remove(slba, nlb) == bool(span & model)
                model -= span
            listed = list(ranges)
            assert sorted(lba for s, n in listed for lba in range(s, s + n)) == sorted(model)
            assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in zip(listed, listed[1:], strict=False))  # disjoint, not adjacent
            q, qn = rng.randrange(0, 140), rng.randrange(1, 30)
            inside = sorted(model & set(range(q, q + qn)))
            assert ranges.first_in(q, qn) == (inside[0] if inside else None)
            assert sorted(lba for s, n in ranges.within(q, qn) for lba in range(s, s + n)) == inside
            assert bool(ranges) == bool(model)


def test_marks_of_a_detached_namespace_hold_when_it_is_attached_again(guest):
    """The Read handler that looks at marks stays while a detached namespace has some."""
    from .area_helpers import make_area

    area = make_area(guest, namespaces=2)
    nvm = NvmCommands(area.state, area.hooks)
    try:
        assert nvm.execute(area.admin_sq, io(NvmOpcode.WRITE_UNCORRECTABLE, 5, 1, nsid=2)) == (Status.SUCCESS, 0)
        ns2 = area.state.namespaces.pop(2)  # detached (still allocated)
        mark(nvm, area, (9, 1))
        assert write(nvm, area, 9, 1) == (Status.SUCCESS, 0)  # namespace 1 has no marks left
        area.state.namespaces[2] = ns2  # attached again
        assert status(nvm.execute(area.admin_sq, io(NvmOpcode.READ, 5, 1, nsid=2))) == Status.UNRECOVERED_READ_ERROR
    finally:
        for ns in area.state.allocated.values():
            ns.close()
