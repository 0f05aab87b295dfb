"""The NVM Command Set in-process: data through PRPs into a RAM namespace, the statuses and
Error Information entries of failures, and requests that go in flight on a file namespace."""

from __future__ import annotations

import dataclasses
import os
import random
import struct

import pytest

from .area_helpers import BUF, GUEST_BASE, GUEST_SIZE, Area, Guest, KeptPool, make_area, sqe, status_of

from nvme_emu import structures as st
from nvme_emu.backends.file import FileBackend
from nvme_emu.backends.ram import RamBackend
from nvme_emu.health import smart_log
from nvme_emu.identify import identify_controller
from nvme_emu.namespace import Namespace
from nvme_emu.nvm import NvmCommands
from nvme_emu.spec.commands import NSID_ALL, NvmOpcode, RwCdw12, Status
from nvme_emu.spec.identify import Oncs
from nvme_emu.spec.log_pages import CriticalWarning
from nvme_emu.outcome import DEFERRED


def rw(opc: int, slba: int, nlb: int, *, nsid: int = 1, cid: int = 1, cdw12: int = 0) -> tuple:
    return sqe(opc, cid=cid, nsid=nsid, prp1=BUF, prp2=BUF + 4096, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=(nlb - 1) | cdw12)


def test_write_then_read_moves_data_through_guest_memory(area: Area):
    nvm = NvmCommands(area.state, area.hooks)
    data = os.urandom(8 * 512)
    area.guest.write(BUF, data)
    assert nvm.execute(area.admin_sq, rw(NvmOpcode.WRITE, 16, 8)) == (Status.SUCCESS, 0)
    area.guest.write(BUF, bytes(len(data)))
    assert nvm.execute(area.admin_sq, rw(NvmOpcode.READ, 16, 8)) == (Status.SUCCESS, 0)
    assert area.guest.read(BUF, len(data)) == data
    assert area.record.calls == []  # RAM: done in place, no request in flight


def test_out_of_range_records_the_lba(area: Area):
    nvm = NvmCommands(area.state, area.hooks)
    last = area.state.namespaces[1].nsze
    status, _ = nvm.execute(area.admin_sq, rw(NvmOpcode.READ, last, 1, cid=3))
    assert status & 0x7FF == Status.LBA_OUT_OF_RANGE
    entry = area.state.error_log.entries[0]
    assert (entry["cid"], entry["nsid"], entry["lba"]) == (3, 1, last)


def test_unknown_namespace_and_opcode(area: Area):
    nvm = NvmCommands(area.state, area.hooks)
    assert nvm.execute(area.admin_sq, rw(NvmOpcode.READ, 0, 1, nsid=9))[0] & 0x7FF == Status.INVALID_NAMESPACE_OR_FORMAT
    assert nvm.execute(area.admin_sq, sqe(0x7F, nsid=1))[0] & 0x7FF == Status.INVALID_OPCODE
    assert nvm.execute(area.admin_sq, sqe(NvmOpcode.FLUSH, nsid=NSID_ALL)) == (Status.SUCCESS, 0)


def test_compare_failure(area: Area):
    nvm = NvmCommands(area.state, area.hooks)
    area.guest.write(BUF, b"\x01" * 512)
    assert nvm.execute(area.admin_sq, rw(NvmOpcode.COMPARE, 0, 1))[0] & 0x7FF == Status.COMPARE_FAILURE


def test_opcodes_name_every_dispatched_command(area: Area):
    ops = NvmCommands(area.state, area.hooks).opcodes
    assert {NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.FLUSH, NvmOpcode.COPY} <= ops


def test_file_namespace_write_is_a_request_in_flight(area: Area, tmp_path):
    ns = Namespace(2, FileBackend(str(tmp_path / "disk"), 1 << 20))
    area.state.namespaces[2] = ns
    pool = KeptPool()
    nvm = NvmCommands(area.state, dataclasses.replace(area.hooks, io_pool=lambda: pool))
    area.guest.write(BUF, b"\x5a" * 512)
    assert nvm.execute(area.admin_sq, rw(NvmOpcode.WRITE, 0, 1, nsid=2, cid=8, cdw12=RwCdw12.FUA)) is DEFERRED
    assert area.record.named("begin_request") == [(area.admin_sq,)]
    pool.finish_one()
    [(sq, cid, status, dw0, stamps)] = area.record.named("finish_request")
    assert (sq, cid, status, dw0) == (area.admin_sq, 8, Status.SUCCESS, 0)
    # the hand-off's latency stamps (nvme_emu.latency): submitted, worker start, worker done,
    # back on the loop, in that order
    assert len(stamps) == 4 and stamps == sorted(stamps)
    assert (tmp_path / "disk").read_bytes()[:512] == b"\x5a" * 512
    ns.close()


def test_without_a_loop_blocking_work_runs_in_place(area: Area, tmp_path):
    ns = Namespace(2, FileBackend(str(tmp_path / "disk"), 1 << 20))
    area.state.namespaces[2] = ns
    nvm = NvmCommands(area.state, area.hooks)  # the recording io_pool answers None
    area.guest.write(BUF, b"\x33" * 512)
    assert nvm.execute(area.admin_sq, rw(NvmOpcode.WRITE, 1, 1, nsid=2)) == (Status.SUCCESS, 0)
    assert area.record.named("begin_request") == []
    ns.close()


def copy_sqe(sdlba: int, ranges: list[tuple[int, int]], area: Area) -> tuple:
    """A Copy (format 0) of ``ranges`` (slba, blocks) to ``sdlba``, descriptors at BUF."""
    raw = b"".join(struct.pack("<8xQH14x", slba, nlb - 1) for slba, nlb in ranges)
    area.guest.write(BUF, raw)
    return sqe(NvmOpcode.COPY, nsid=1, prp1=BUF, cdw10=sdlba & 0xFFFFFFFF, cdw11=sdlba >> 32, cdw12=len(ranges) - 1)


def test_copy_enforces_the_limits_identify_namespace_advertises(area: Area):
    ns = area.state.namespaces[1] = Namespace(1, RamBackend(64 << 20))  # 131072 blocks
    ident = st.IdentifyNamespace.parse(ns.identify_namespace())
    ctrl = st.IdentifyController.parse(identify_controller(area.state))
    assert ctrl.oncs & Oncs.COPY and ctrl.ocfs & 1  # descriptor format 0
    assert ident.mssrl > 0 and ident.mcl >= ident.mssrl and ident.msrc > 0
    nvm = NvmCommands(area.state, area.hooks)

    def status(sdlba: int, ranges: list[tuple[int, int]]) -> int:
        return nvm.execute(area.admin_sq, copy_sqe(sdlba, ranges, area))[0] & 0x7FF

    assert status(1 << 16, [(0, ident.mssrl)]) == Status.SUCCESS
    assert status(1 << 16, [(0, ident.mssrl + 1)]) == Status.COMMAND_SIZE_LIMIT_EXCEEDED
    half = ident.mcl // 2
    assert status(0, [(0, half), (half, ident.mcl - half)]) == Status.SUCCESS
    assert status(0, [(0, half), (half, ident.mcl - half + 1)]) == Status.COMMAND_SIZE_LIMIT_EXCEEDED
    assert status(1 << 16, [(i, 1) for i in range(ident.msrc + 1)]) == Status.SUCCESS
    assert status(1 << 16, [(i, 1) for i in range(ident.msrc + 2)]) == Status.COMMAND_SIZE_LIMIT_EXCEEDED


def test_read_only_namespace_is_write_protected(area: Area, tmp_path):
    """NSATTR bit 0 (Linux marks the disk read-only), Namespace is Write Protected for every
    command that changes blocks, and no controller-wide SMART read-only warning."""
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x42" * (1 << 20))
    ns = area.state.namespaces[2] = Namespace(2, FileBackend(str(path), readonly=True))
    assert st.IdentifyNamespace.parse(ns.identify_namespace()).nsattr & 1
    assert st.IdentifyNamespaceIndependent.parse(ns.identify_namespace_independent()).nsattr & 1
    assert not st.IdentifyNamespace.parse(area.state.namespaces[1].identify_namespace()).nsattr & 1
    nvm = NvmCommands(area.state, area.hooks)
    for opc in (NvmOpcode.WRITE, NvmOpcode.WRITE_ZEROES, NvmOpcode.DATASET_MANAGEMENT, NvmOpcode.COPY):
        status, _ = nvm.execute(area.admin_sq, rw(opc, 0, 1, nsid=2, cdw12=0))
        assert status & 0x7FF == Status.NAMESPACE_WRITE_PROTECTED, opc
    assert nvm.execute(area.admin_sq, rw(NvmOpcode.READ, 0, 1, nsid=2)) == (Status.SUCCESS, 0)
    assert area.guest.read(BUF, 512) == b"\x42" * 512
    assert status_of(lambda: ns.check_format(0)) == Status.NAMESPACE_WRITE_PROTECTED
    assert not st.SmartLog.parse(smart_log(area.state)).critical_warning & CriticalWarning.READ_ONLY
    assert path.read_bytes() == b"\x42" * (1 << 20)
    ns.close()


BLOCKS = random.Random(13).randbytes(16 << 10)


def _run_both_ways(cmd: tuple, data: bytes, backend_factory) -> list[tuple]:
    """Run ``cmd`` on a fresh namespace by the one-page fast path and by the general data
    pointer path; per way: status, guest buffer, namespace bytes, counters, error entries,
    whether the general path mapped views."""
    results = []
    for fast in (True, False):
        guest = Guest()
        try:
            area = make_area(guest)
            area.state.namespaces[1].close()
            ns = area.state.namespaces[1] = Namespace(1, backend_factory())
            ns.backend.write_from(0, [memoryview(BLOCKS)])  # 16 KiB, every block different
            guest.write(BUF, data)
            nvm = NvmCommands(area.state, area.hooks)
            general: list[int] = []

            def counted(*a, _views=nvm.views, _general=general, **k):
                _general.append(1)
                return _views(*a, **k)

            nvm.views = counted  # type: ignore[method-assign]
            if not fast:
                nvm._page_view = lambda *a, **k: None  # type: ignore[method-assign]
            status, _ = nvm.execute(area.admin_sq, cmd)
            blocks = bytearray(len(BLOCKS))
            ns.backend.read_into(0, [memoryview(blocks)])
            errors = [e["status_field"] for e in area.state.error_log.entries]
            results.append((status, guest.read(BUF, 3 * 4096), bytes(blocks), dataclasses.asdict(ns.stats), errors, bool(general)))
            ns.close()
        finally:
            guest.close()
    return results


@pytest.mark.parametrize("kind", ["ram", "file"])
def test_page_fast_path_agrees_with_the_general_path(kind: str, tmp_path):
    """Read and Write whose data lies in PRP1's page skip the data pointer walk
    (nvm._page_view, then Namespace.read_page/write_page: on RAM a copy, on a file the buffer
    checks before preadv/pwritev). Everything else, and every fault, goes the general way:
    both ways must give the same status, data, counters and error entries, and the fast
    one must really be taken where it applies."""
    def backend():
        if kind == "ram":
            return RamBackend(1 << 20)
        path = tmp_path / "disk"
        path.unlink(missing_ok=True)
        return FileBackend(str(path), 1 << 20)

    data = os.urandom(3 * 4096)
    R, W = NvmOpcode.READ, NvmOpcode.WRITE

    def cmd(opc: int, slba: int, nlb: int, prp1: int, prp2: int = 0, flags: int = 0) -> tuple:
        return sqe(opc, flags=flags, nsid=1, prp1=prp1, prp2=prp2, cdw10=slba, cdw12=nlb - 1)

    cases = {  # name: (command, takes the fast path)
        "read one page": (cmd(R, 8, 8, BUF), True),
        "read inside a page": (cmd(R, 3, 2, BUF + 1024), True),
        "write one page": (cmd(W, 16, 8, BUF), True),
        "write a block at a page's end": (cmd(W, 1, 1, BUF + 3584), True),
        "read across a page (PRP2)": (cmd(R, 0, 8, BUF + 2048, BUF + 4096), False),
        "write two pages (PRP2)": (cmd(W, 4, 16, BUF, BUF + 4096), False),
        "read past PRP1's page without PRP2": (cmd(R, 0, 8, BUF + 512, 0), False),
        "read to an unmapped address": (cmd(R, 0, 1, GUEST_BASE + GUEST_SIZE), False),
        "write from an unmapped address": (cmd(W, 0, 1, GUEST_BASE - 4096), False),
        "read to a misaligned PRP1": (cmd(R, 0, 1, BUF + 2), False),
        "read by SGL": (cmd(R, 0, 1, BUF, 0, flags=1 << 6), False),
        "read out of range": (cmd(R, (1 << 20) // 512, 1, BUF), None),
    }
    for name, (command, fast) in cases.items():
        by_fast, by_general = _run_both_ways(command, data, backend)
        assert by_fast[:5] == by_general[:5], name
        assert by_general[5] is (fast is not None), name  # the general way maps views (unless refused before)
        if fast is not None:
            assert by_fast[5] is (not fast), name
    # the fast path moved the right bytes (not merely the same as the general one)
    by_fast, _ = _run_both_ways(cases["read inside a page"][0], data, backend)
    assert by_fast[1][1024 : 1024 + 1024] == BLOCKS[3 * 512 : 5 * 512]
    assert by_fast[0] == Status.SUCCESS and by_fast[3]["read_commands"] == 1 and by_fast[3]["bytes_read"] == 1024


class _NotPlain(Namespace):
    """A namespace whose format makes Read and Write more than a copy (as metadata or zones
    will): its rule answers False, and nothing else changes."""

    def rw_is_plain(self) -> bool:
        return False


def test_plain_rw_is_decided_by_the_format_and_gates_the_one_page_path(area: Area):
    """plain_rw is computed when the format is decided (creation, Format NVM), by the
    namespace's rule; a namespace that clears it takes the general path for one page too,
    with the same data and counters."""
    ns = area.state.namespaces[1]
    assert ns.plain_rw
    ns.apply_format(1)
    assert ns.plain_rw and ns.lba_shift == 12
    ns.apply_format(0)
    area.state.namespaces[1] = odd = _NotPlain(1, RamBackend(1 << 20))
    assert not odd.plain_rw

    def not_here(*a: object) -> None:
        raise AssertionError("the one-page path ran on a namespace that is not plain")

    odd.read_page = odd.write_page = not_here  # type: ignore[method-assign,assignment]
    nvm = NvmCommands(area.state, area.hooks)
    general: list[int] = []
    views = nvm.views
    nvm.views = lambda *a, **k: general.append(1) or views(*a, **k)  # type: ignore[method-assign]
    data = os.urandom(4096)
    area.guest.write(BUF, data)
    assert nvm.execute(area.admin_sq, rw(NvmOpcode.WRITE, 8, 8)) == (Status.SUCCESS, 0)
    area.guest.write(BUF, bytes(4096))
    assert nvm.execute(area.admin_sq, rw(NvmOpcode.READ, 8, 8)) == (Status.SUCCESS, 0)
    assert area.guest.read(BUF, 4096) == data
    assert general == [], "one page: the view is PRP1's, the general path reuses it"
    assert (odd.stats.read_commands, odd.stats.bytes_read, odd.stats.write_commands) == (1, 4096, 1)
    status, _ = nvm.execute(area.admin_sq, rw(NvmOpcode.READ, odd.nsze, 1))
    assert status & 0x7FF == Status.LBA_OUT_OF_RANGE
    odd.close()
