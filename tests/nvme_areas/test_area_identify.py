"""Identify (06h) in-process: the data structures each CNS returns, and its failures."""

from __future__ import annotations

import struct

import pytest

from .area_helpers import BUF, Area, make_area, status_of

from nvme_emu import structures as st
from nvme_emu.backends.ram import RamBackend
from nvme_emu.identify import identify
from nvme_emu.spec.commands import NSID_ALL, AdminOpcode, Status
from nvme_emu.spec.identify import Cns, Csi, Oacs
from nvme_emu.namespace import Namespace
from nvme_emu.state import ControllerConfig, ControllerState


def run_identify(area: Area, cns: int, nsid: int = 0, csi: int = 0) -> bytes:
    area.run(identify, opc=AdminOpcode.IDENTIFY, nsid=nsid, prp1=BUF, cdw10=cns, cdw11=csi << 24)
    return area.guest.read(BUF, 4096)


def test_controller_reports_configuration(area: Area):
    ident = st.IdentifyController.parse(run_identify(area, Cns.CONTROLLER))
    c = area.state.config
    assert ident.sn.rstrip() == c.serial and ident.mn.rstrip() == c.model
    assert ident.nn == c.max_namespaces and ident.mdts == c.mdts
    assert ident.sqes == 0x66 and ident.cqes == 0x44
    assert ident.oacs & Oacs.DOORBELL_BUFFER_CONFIG and ident.oacs & Oacs.FORMAT_NVM
    assert ident.elpe == c.error_log_entries - 1
    assert area.record.calls == []  # Identify causes nothing outside the state


def test_controller_without_shadow_doorbells_hides_dbbc(area: Area):
    area.state.config = ControllerConfig(shadow_doorbells=False, volatile_write_cache=False)
    ident = st.IdentifyController.parse(run_identify(area, Cns.CONTROLLER))
    assert not ident.oacs & Oacs.DOORBELL_BUFFER_CONFIG
    assert ident.vwc == 0


def test_namespace_size_and_inactive_ids(area: Area):
    ns = st.IdentifyNamespace.parse(run_identify(area, Cns.NAMESPACE, nsid=1))
    assert ns.nsze == (1 << 20) // 512 and ns.ncap == ns.nsze
    assert run_identify(area, Cns.NAMESPACE, nsid=2) == bytes(4096)  # allocated, not active
    assert status_of(lambda: run_identify(area, Cns.NAMESPACE, nsid=area.state.config.max_namespaces + 1)) == Status.INVALID_NAMESPACE_OR_FORMAT


def test_namespace_all_describes_the_common_format(area: Area):
    ns = st.IdentifyNamespace.parse(run_identify(area, Cns.NAMESPACE, nsid=NSID_ALL))
    assert ns.nsze == 0 and ns.flbas == 0


def test_active_nsid_list_is_ascending_and_above_nsid(guest):
    area = make_area(guest, namespaces=3)
    ids = struct.unpack("<1024I", run_identify(area, Cns.ACTIVE_NSID_LIST, nsid=1))
    assert ids[:3] == (2, 3, 0)
    assert status_of(lambda: run_identify(area, Cns.ACTIVE_NSID_LIST, nsid=NSID_ALL)) == Status.INVALID_NAMESPACE_OR_FORMAT


def test_io_command_set_structures_need_nvm_csi(area: Area):
    assert status_of(lambda: run_identify(area, Cns.IOCS_CONTROLLER, csi=Csi.KEY_VALUE)) == Status.INVALID_FIELD
    # an NVM namespace has no Zoned page (the Zoned set is implemented: tests/zoned)
    assert status_of(lambda: run_identify(area, Cns.IOCS_NAMESPACE, nsid=1, csi=Csi.ZONED)) == Status.INVALID_FIELD
    assert status_of(lambda: run_identify(area, Cns.IOCS_NAMESPACE, nsid=1, csi=Csi.NVM)) == Status.SUCCESS
    # a command set the controller does not support is an Invalid Field, not an empty list
    for csi in (Csi.KEY_VALUE, 0x03, 0xFF):
        assert status_of(lambda csi=csi: run_identify(area, Cns.IOCS_ACTIVE_NSID_LIST, csi=csi)) == Status.INVALID_FIELD
    assert status_of(lambda: run_identify(area, Cns.IOCS_ACTIVE_NSID_LIST, csi=Csi.NVM)) == Status.SUCCESS


def test_descriptors_need_an_active_namespace(area: Area):
    assert status_of(lambda: run_identify(area, Cns.NS_ID_DESCRIPTOR_LIST, nsid=1)) == Status.SUCCESS
    assert st.parse_ns_id_descriptors(area.guest.read(BUF, 4096))
    assert status_of(lambda: run_identify(area, Cns.NS_ID_DESCRIPTOR_LIST, nsid=5)) == Status.INVALID_NAMESPACE_OR_FORMAT


def test_unsupported_cns_is_invalid_field(area: Area):
    assert status_of(lambda: run_identify(area, Cns.SECONDARY_CONTROLLER_LIST)) == Status.INVALID_FIELD


def test_buffer_outside_guest_memory_is_a_transfer_error(area: Area):
    def run():
        area.run(identify, opc=AdminOpcode.IDENTIFY, prp1=0x10_0000_0000, cdw10=Cns.CONTROLLER)

    status = status_of(run)
    assert status == Status.DATA_TRANSFER_ERROR


def test_nsids_above_nn_or_twice_are_refused():
    """Identify Controller NN bounds every NSID: a namespace above it would be invisible to a
    host that scans 1..NN, and two with one NSID would shadow each other."""
    config = ControllerConfig(max_namespaces=4)
    ControllerState.of([Namespace(4, RamBackend(1 << 20))], config)
    with pytest.raises(ValueError, match="NN"):
        ControllerState.of([Namespace(5, RamBackend(1 << 20))], config)
    with pytest.raises(ValueError, match="twice"):
        ControllerState.of([Namespace(1, RamBackend(1 << 20)), Namespace(1, RamBackend(1 << 20))], config)
