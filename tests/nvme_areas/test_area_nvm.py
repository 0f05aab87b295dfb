"""The NVM Command Set in-process: data through PRPs into a RAM namespace, the statuses and
Error Information entries of failures, and requests that go in flight on a file namespace."""

from __future__ import annotations

import dataclasses
import os

from area_helpers import BUF, Area, KeptPool, sqe

from nvme_emu.namespace import FileBackend, Namespace
from nvme_emu.nvm import NvmCommands
from nvme_emu.spec import NSID_ALL, NvmOpcode, RwCdw12, Status
from nvme_emu.state import DEFERRED


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
    assert area.record.named("finish_request") == [(area.admin_sq, 8, Status.SUCCESS)]
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
