"""Format NVM between formats with and without metadata and PI, and back, with what Identify
says after each; the refused formats with their status; Namespace Management's FLBAS and DPS."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import pytest

from nvme_emu import structures as st
from nvme_emu.backends.ram import RamBackend
from nvme_emu.format_nvm import format_nvm
from nvme_emu.namespace import Namespace
from nvme_emu.namespace_management import namespace_management
from nvme_emu.outcome import DEFERRED
from nvme_emu.pi.format import GuardKind, ProtectionType
from nvme_emu.spec.commands import AdminOpcode, Status
from nvme_emu.spec.identify import flbas_encode
from nvme_emu.zoned.geometry import ZoneGeometry

from ..nvme_areas.area_helpers import BUF, Area, Guest, KeptPool, RecordingHooks, compose_opcodes, make_state, status_of
from .helpers import ns_view


def cdw10(lbaf: int, *, mset: int = 0, pi: int = 0, pil: int = 0, ses: int = 0) -> int:
    """Format NVM CDW10: LBAF bits 3:0 (and 13:12), MSET 4, PI 7:5, PIL 8, SES 11:9."""
    return (lbaf & 0xF) | (lbaf >> 4) << 12 | mset << 4 | pi << 5 | pil << 8 | ses << 9


@pytest.fixture
def area() -> Iterator[Area]:
    guest = Guest()
    record = RecordingHooks()
    state = make_state(guest.memory)
    compose_opcodes(state)
    a = Area(state, record.hooks(), record, guest, state.sqs[0])
    yield a
    for ns in a.state.allocated.values():
        ns.close()
    guest.close()


def fmt(area: Area, dw10: int, nsid: int = 1):
    return area.run(format_nvm, opc=AdminOpcode.FORMAT_NVM, nsid=nsid, cdw10=dw10)


def test_plain_to_pi_and_back(area: Area):
    ns = area.state.namespaces[1]
    assert ns_view(area.state, 1).lbaf == 0 and ns.plain_rw

    assert fmt(area, cdw10(2, pi=1)) == 0  # 512+8, Type 1, PI last, separate
    v = ns_view(area.state, 1)
    assert (v.lbaf, v.ms, v.mset, v.pi_type, v.pi_first) == (2, 8, False, 1, False)
    assert not ns.plain_rw and ns.pi is not None and ns.pi_engine is not None

    assert fmt(area, cdw10(7, mset=1, pi=3, pil=1)) == 0  # 4096+64, Type 3, first, extended
    v = ns_view(area.state, 1)
    assert (v.lbaf, v.ms, v.mset, v.pi_type, v.pi_first) == (7, 64, True, 3, True)
    assert ns.lba_size == 4096 and ns.nsze == (1 << 20) // 4096 and ns.extended

    assert fmt(area, cdw10(3)) == 0  # metadata without PI
    v = ns_view(area.state, 1)
    assert (v.lbaf, v.ms, v.pi_type) == (3, 16, 0) and ns.pi is None and not ns.plain_rw

    assert fmt(area, cdw10(0)) == 0  # and back to plain
    v = ns_view(area.state, 1)
    assert (v.lbaf, v.ms, v.mset, v.pi_type, v.pi_first) == (0, 0, False, 0, False)
    assert ns.plain_rw and ns.pi is None and ns.pi_engine is None and ns.ms == 0
    assert area.state.events.changed_nsids == {1}


def test_format_erases_metadata(area: Area):
    ns = area.state.namespaces[1]
    assert fmt(area, cdw10(2, pi=1)) == 0
    dealloc = bytes(ns.read_meta(0, 1))
    assert dealloc == b"\xff" * 8  # PI escape: guard, application and reference tag all ones
    ns.write_meta(0, b"\x12" * 16)
    assert bytes(ns.read_meta(0, 2)) == b"\x12" * 16
    assert fmt(area, cdw10(2, pi=1)) == 0  # the same format again: still an erase
    assert bytes(ns.read_meta(0, 2)) == dealloc * 2


@pytest.mark.parametrize("dw10, status", [
    (cdw10(0, pi=1), Status.INVALID_FORMAT),  # PI without metadata
    (cdw10(1, pi=2, pil=1), Status.INVALID_FORMAT),
    (cdw10(8), Status.INVALID_FORMAT),  # past the last LBA format
    (cdw10(2, pi=4), Status.INVALID_FIELD),  # a reserved PI type
    (cdw10(2, pi=7), Status.INVALID_FIELD),
    (cdw10(2, ses=3), Status.INVALID_FIELD),
])
def test_refused_formats(area: Area, dw10: int, status: Status):
    ns = area.state.namespaces[1]
    assert status_of(lambda: fmt(area, dw10)) == status
    assert ns.lbaf_index == 0 and ns.plain_rw  # nothing changed


def test_pi_larger_than_the_metadata_is_refused():
    """A 64b Guard namespace's 8-byte formats list 16b Guard PI (ELBAF), so Type 1 in 8 bytes
    is 8-byte PI; the namespace-level check still refuses 16-byte PI in 8 bytes."""
    t1 = ProtectionType.TYPE1
    ns = Namespace(1, RamBackend(1 << 20), ms=16, pi_type=t1, guard=GuardKind.GUARD_64)
    try:
        f = ns.check_format(2, pi_type=t1)
        assert f.pif(8) is GuardKind.GUARD_16
        ns.format(2, pi_type=t1)
        assert ns.pi is not None and ns.pi.guard is GuardKind.GUARD_16 and ns.pi.ms == 8
        ns.format(3, pi_type=t1)
        assert ns.pi is not None and ns.pi.guard is GuardKind.GUARD_64
    finally:
        ns.close()


def test_zoned_is_refused(area: Area):
    zoned = Namespace(2, RamBackend(4 << 20), zoned=ZoneGeometry(zone_size=1 << 20))
    area.state.namespaces[2] = area.state.allocated[2] = zoned
    assert status_of(lambda: fmt(area, cdw10(2, pi=1), nsid=2)) == Status.INVALID_FORMAT


def test_blocking_format_applies_pi_after_the_erase(area: Area):
    ns = area.state.namespaces[1]
    ns.blocking = True
    pool = KeptPool()
    area.hooks = dataclasses.replace(area.hooks, io_pool=lambda: pool)
    assert fmt(area, cdw10(5, pi=2)) is DEFERRED
    assert ns.pi is None  # not before the erase is done
    pool.finish_one()
    assert ns.pi is not None and ns.lbaf_index == 5 and ns_view(area.state, 1).pi_type == 2


def create(area: Area, nsze: int, lbaf: int, *, mset: bool = False, dps: int = 0, csi: int = 0):
    flbas = flbas_encode(lbaf) | (0x10 if mset else 0)
    area.guest.write(BUF, st.build_identify_namespace(nsze=nsze, ncap=nsze, flbas=flbas, dps=dps))
    return area.run(namespace_management, opc=AdminOpcode.NAMESPACE_MANAGEMENT, cdw10=0, cdw11=csi << 24, prp1=BUF)


def test_namespace_management_honours_flbas_and_dps(area: Area):
    nsid = create(area, 64, 5, mset=True, dps=1 | 1 << 3)  # 4096+8, extended, Type 1, PI first
    ns = area.state.allocated[nsid]
    assert (ns.lbaf_index, ns.ms, ns.extended) == (5, 8, True)
    assert ns.pi is not None and ns.pi.dps == 0b1001 and not ns.plain_rw
    ns2 = area.state.allocated[create(area, 64, 3)]
    assert (ns2.ms, ns2.pi, ns2.extended) == (16, None, False)


@pytest.mark.parametrize("lbaf, dps, csi, status", [
    (0, 1, 0, Status.INVALID_FORMAT),  # PI without metadata
    (2, 5, 0, Status.INVALID_FIELD),  # reserved PI type
    (2, 0, 2, Status.INVALID_FORMAT),  # zoned with metadata
    (8, 0, 0, Status.INVALID_FORMAT),
])
def test_namespace_management_refusals(area: Area, lbaf: int, dps: int, csi: int, status: Status):
    assert status_of(lambda: create(area, 64, lbaf, dps=dps, csi=csi)) == status
    assert len(area.state.allocated) == 1
