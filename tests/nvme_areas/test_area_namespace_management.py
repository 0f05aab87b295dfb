"""Namespace Management (0Dh) and Namespace Attachment (15h) in-process: allocation,
attachment, deletion, the Changed Namespace List and the notice, and the refusals."""

from __future__ import annotations

from .area_helpers import BUF, Area, status_of

from nvme_emu import structures as st
from nvme_emu.backends.ram import RamBackend
from nvme_emu.identify import identify_controller
from nvme_emu.namespace import Namespace
from nvme_emu.namespace_management import add, namespace_attachment, namespace_management
from nvme_emu.spec.commands import NSID_ALL, AdminOpcode, Status
from nvme_emu.spec.events import AsyncEventConfig
from nvme_emu.spec.identify import flbas_encode
from nvme_emu.state import DEFAULT_NVM_CAPACITY, ControllerConfig

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
    assert status_of(lambda: create(area, 8, lbaf=8)) == Status.INVALID_FORMAT  # past the last of eight
    assert status_of(lambda: create(area, 8, csi=1)) == Status.IO_COMMAND_SET_NOT_SUPPORTED
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


def _capacities(area: Area) -> tuple[int, int]:
    idc = st.IdentifyController.parse(identify_controller(area.state))
    return idc.tnvmcap, idc.unvmcap


def test_capacity_is_the_hosts_budget_plus_the_namespaces_given(area: Area):
    """TNVMCAP: what Namespace Management may allocate (``nvm_capacity``) plus the namespaces
    the operator gave; UNVMCAP: what is left of the budget. Beyond it, Namespace
    Insufficient Capacity; a deletion gives its bytes back."""
    budget = 1 << 20
    area.state.config = ControllerConfig(nvm_capacity=budget)
    given = area.state.allocated[1].size_bytes
    assert _capacities(area) == (given + budget, budget)
    first = create(area, 1024)  # 512 KiB of 512-byte blocks
    assert _capacities(area) == (given + budget, budget // 2)
    assert status_of(lambda: create(area, 1025)) == Status.NAMESPACE_INSUFFICIENT_CAPACITY
    second = create(area, 128, lbaf=1)  # 512 KiB of 4 KiB blocks: the budget is used up
    assert _capacities(area) == (given + budget, 0)
    assert status_of(lambda: create(area, 1)) == Status.NAMESPACE_INSUFFICIENT_CAPACITY
    assert delete(area, first) == 0
    assert _capacities(area) == (given + budget, budget // 2)
    assert create(area, 1024) == first  # the same NSID and bytes again
    assert _capacities(area) == (given + budget, 0)
    # the control plane's namespace brings its own capacity: the host's budget is unchanged
    add(area.state, area.hooks, Namespace(9, RamBackend(1 << 16)))
    assert _capacities(area) == (given + budget + (1 << 16), 0)
    # deleting a given namespace takes its capacity away and gives the host nothing more
    assert delete(area, 1) == 0
    assert _capacities(area) == (budget + (1 << 16), 0)
    assert status_of(lambda: create(area, 1)) == Status.NAMESPACE_INSUFFICIENT_CAPACITY
    assert delete(area, second) == 0
    assert _capacities(area) == (budget + (1 << 16), budget // 2)


def test_default_budget_is_modest():
    """What a guest may make the server allocate without a --nvm-capacity: 4 GiB, not 64."""
    assert ControllerConfig().nvm_capacity == DEFAULT_NVM_CAPACITY == 4 << 30
