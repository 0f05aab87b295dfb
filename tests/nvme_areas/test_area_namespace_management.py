"""Namespace Management (0Dh) and Namespace Attachment (15h) in-process: allocation,
attachment, deletion, the Changed Namespace List and the notice, and the refusals."""

from __future__ import annotations

from .area_helpers import BUF, Area, status_of

from nvme_emu import structures as st
from nvme_emu.namespace import Namespace, RamBackend
from nvme_emu.namespace_management import add, namespace_attachment, namespace_management
from nvme_emu.spec import NSID_ALL, AdminOpcode, AsyncEventConfig, Status, flbas_encode
from nvme_emu.state import ControllerConfig

CREATE, DELETE = 0, 1
ATTACH, DETACH = 0, 1


def create(area: Area, nsze: int, *, ncap: int | None = None, lbaf: int = 0, csi: int = 0):
    area.guest.write(BUF, st.build_identify_namespace(nsze=nsze, ncap=nsze if ncap is None else ncap, flbas=flbas_encode(lbaf)))
    return area.run(namespace_management, opc=AdminOpcode.NAMESPACE_MANAGEMENT, prp1=BUF, cdw10=CREATE, cdw11=csi << 24)


def attachment(area: Area, nsid: int, sel: int, cntlids=None):
    own = (area.state.config.controller_id,)
    area.guest.write(BUF, st.build_controller_list(own if cntlids is None else cntlids))
    return area.run(namespace_attachment, opc=AdminOpcode.NAMESPACE_ATTACHMENT, nsid=nsid, prp1=BUF, cdw10=sel)


def delete(area: Area, nsid: int):
    return area.run(namespace_management, opc=AdminOpcode.NAMESPACE_MANAGEMENT, nsid=nsid, cdw10=DELETE)


def test_create_attach_detach_delete(area: Area):
    area.state.features.async_event_config = AsyncEventConfig.NAMESPACE_ATTRIBUTE
    nsid = create(area, 64, lbaf=1)
    ns = area.state.allocated[nsid]
    assert nsid == 2 and ns.lba_size == 4096 and ns.nsze == 64 and nsid not in area.state.namespaces
    assert not area.record.named("async_event")  # allocation alone changes nothing active
    assert attachment(area, nsid, ATTACH) == 0
    assert area.state.namespaces[nsid] is ns and area.state.events.changed_nsids == {nsid}
    assert len(area.record.named("async_event")) == 1
    assert attachment(area, nsid, DETACH) == 0
    assert nsid not in area.state.namespaces and nsid in area.state.allocated
    assert attachment(area, nsid, ATTACH) == 0
    assert delete(area, nsid) == 0  # detaches first
    assert nsid not in area.state.allocated and nsid not in area.state.namespaces
    assert ns.backend._mv is None  # closed (RAM: at once)


def test_refusals(area: Area):
    assert status_of(lambda: create(area, 0)) == Status.INVALID_FIELD
    assert status_of(lambda: create(area, 8, ncap=4)) == Status.THIN_PROVISIONING_NOT_SUPPORTED
    assert status_of(lambda: create(area, 8, lbaf=2)) == Status.INVALID_FORMAT
    assert status_of(lambda: create(area, 8, csi=2)) == Status.INVALID_FIELD
    assert status_of(lambda: create(area, 1 << 40)) == Status.NAMESPACE_INSUFFICIENT_CAPACITY
    assert status_of(lambda: attachment(area, 1, ATTACH)) == Status.NAMESPACE_ALREADY_ATTACHED
    assert status_of(lambda: attachment(area, 1, DETACH, cntlids=(area.state.config.controller_id, 0xFFEF))) == Status.CONTROLLER_LIST_INVALID
    assert status_of(lambda: attachment(area, 1, DETACH, cntlids=())) == Status.CONTROLLER_LIST_INVALID
    assert status_of(lambda: attachment(area, 9, ATTACH)) == Status.INVALID_NAMESPACE_OR_FORMAT
    assert status_of(lambda: attachment(area, NSID_ALL, ATTACH)) == Status.INVALID_FIELD
    assert status_of(lambda: delete(area, 9)) == Status.INVALID_NAMESPACE_OR_FORMAT
    assert status_of(lambda: area.run(namespace_management, cdw10=7)) == Status.INVALID_FIELD


def test_nsids_run_out(area: Area):
    area.state.config = ControllerConfig(max_namespaces=2)
    assert create(area, 8) == 2
    assert status_of(lambda: create(area, 8)) == Status.NAMESPACE_ID_UNAVAILABLE


def test_delete_all_and_runtime_add(area: Area):
    add(area.state, area.hooks, Namespace(5, RamBackend(1 << 16)))
    assert sorted(area.state.namespaces) == [1, 5] and area.state.events.changed_nsids == {5}
    assert delete(area, NSID_ALL) == 0
    assert area.state.allocated == {} and area.state.namespaces == {}
    assert area.state.events.changed_nsids == {1, 5}
