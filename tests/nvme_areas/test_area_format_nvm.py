"""Format NVM (80h) in-process: field checks, the erase, the new format and its notice."""

from __future__ import annotations

import dataclasses

from .area_helpers import BUF, Area, KeptPool, make_area, sqe, status_of

from nvme_emu.format_nvm import format_nvm
from nvme_emu.nvm import NvmCommands
from nvme_emu.spec.commands import NSID_ALL, AdminOpcode, NvmOpcode, Status, status_field
from nvme_emu.outcome import DEFERRED

LBAF_4K = 1  # LBA formats: 0 = 512 bytes, 1 = 4096 bytes


def fmt(area: Area, nsid: int = 1, *, cdw10: int = 0):
    return area.run(format_nvm, opc=AdminOpcode.FORMAT_NVM, nsid=nsid, cdw10=cdw10)


def test_format_erases_and_applies_the_new_format(area: Area):
    ns = area.state.namespaces[1]
    ns.backend.write_from(0, [memoryview(b"\xaa" * 4096)])
    assert fmt(area, cdw10=LBAF_4K) == 0
    assert ns.lba_size == 4096
    out = bytearray(4096)
    ns.backend.read_into(0, [memoryview(out)])
    assert out == bytes(4096)
    assert area.state.events.changed_nsids == {1}


def test_protection_information_needs_metadata(area: Area):
    """PI on a format without metadata cannot be (Invalid Format), a reserved PI type is an
    invalid field; MSET and PIL alone on it mean nothing and are dropped (tests/pi_ns has the
    metadata formats)."""
    assert status_of(lambda: fmt(area, cdw10=1 << 5)) == Status.INVALID_FORMAT  # PI type 1, LBAF 0
    assert status_of(lambda: fmt(area, cdw10=4 << 5 | 2)) == Status.INVALID_FIELD  # PI type 4
    assert fmt(area, cdw10=1 << 4 | 1 << 8) == 0  # MSET, PIL
    ns = area.state.namespaces[1]
    assert (ns.extended, ns.pi, ns.plain_rw) == (False, None, True)


def test_secure_erase_settings(area: Area):
    assert fmt(area, cdw10=1 << 9) == 0  # user data erase
    assert status_of(lambda: fmt(area, cdw10=2 << 9)) == Status.INVALID_FIELD  # cryptographic


def test_unknown_lba_format_and_namespace(area: Area):
    assert status_of(lambda: fmt(area, cdw10=9)) == Status.INVALID_FORMAT
    assert status_of(lambda: fmt(area, nsid=7)) == Status.INVALID_NAMESPACE_OR_FORMAT


def test_all_namespaces(guest):
    area = make_area(guest, namespaces=2)
    state = area.state
    assert fmt(area, nsid=NSID_ALL, cdw10=LBAF_4K) == 0
    assert [ns.lba_size for ns in state.namespaces.values()] == [4096, 4096]
    assert state.events.changed_nsids == {1, 2}


def test_blocking_namespace_formats_off_the_loop(area: Area):
    ns = area.state.namespaces[1]
    ns.blocking = True  # as a file or block device namespace
    pool = KeptPool()
    area.hooks = dataclasses.replace(area.hooks, io_pool=lambda: pool)
    assert fmt(area, cdw10=LBAF_4K, nsid=1) is DEFERRED
    assert area.record.named("begin_request") == [(area.admin_sq,)]
    assert ns.lba_size == 512  # not before the erase is done
    pool.finish_one()
    assert ns.lba_size == 4096
    assert area.record.named("finish_request") == [(area.admin_sq, 1, Status.SUCCESS)]


def test_io_to_a_namespace_being_formatted_gets_format_in_progress(guest):
    """While the erase runs on the pool, I/O to that namespace would race it: it fails with
    Format In Progress and DNR clear (a host retries), as does a second Format of it. The
    other namespace is served, and once the format is done so is the first again."""
    area = make_area(guest, namespaces=2)
    ns = area.state.namespaces[1]
    ns.blocking = True  # as a file or block device namespace
    pool = KeptPool()
    area.hooks = dataclasses.replace(area.hooks, io_pool=lambda: pool)
    nvm = NvmCommands(area.state, area.hooks)

    def read(nsid: int) -> int:
        return nvm.execute(area.admin_sq, sqe(NvmOpcode.READ, nsid=nsid, prp1=BUF))[0]

    assert fmt(area, nsid=1) is DEFERRED
    busy = status_field(Status.FORMAT_IN_PROGRESS, dnr=False)
    assert read(1) == busy
    write = sqe(NvmOpcode.WRITE_ZEROES, nsid=1)
    assert nvm.execute(area.admin_sq, write)[0] == busy
    assert status_of(lambda: fmt(area, nsid=1)) == Status.FORMAT_IN_PROGRESS
    assert read(2) == Status.SUCCESS
    pool.finish_one()
    assert area.record.named("finish_request") == [(area.admin_sq, 1, Status.SUCCESS)]
    ns.blocking = False  # back to RAM for the read below (the kept pool runs nothing by itself)
    assert read(1) == Status.SUCCESS


def test_a_failed_format_also_ends_format_in_progress(area: Area):
    ns = area.state.namespaces[1]
    ns.blocking = True
    pool = KeptPool()
    area.hooks = dataclasses.replace(area.hooks, io_pool=lambda: pool)
    assert fmt(area, nsid=1) is DEFERRED
    assert ns.formatting
    _erase, finished = pool.jobs.pop(0)
    finished(None, OSError("the disk went away"))
    assert not ns.formatting
    assert area.record.named("finish_request") == [(area.admin_sq, 1, Status.INTERNAL_ERROR)]
