"""The subsystem model: distinct controllers, per-controller attachment, which notices each
operation owes to which controller, change counts, and each controller's ANA log."""

from __future__ import annotations

import pytest

from nvme_emu.ana.log import AnaLog, ana_log_size_limit
from nvme_emu.ana.states import ALL_STATES
from nvme_emu.ana.subsystem import ControllerNotice, Subsystem
from nvme_emu.spec.commands import NvmeError, Status
from nvme_emu.spec.events import AsyncEventNotice
from nvme_emu.spec.identify import Anacap
from nvme_emu.spec.log_pages import AnaState, LogPageId

OPT, NOP, INA, CHG = AnaState.OPTIMIZED, AnaState.NON_OPTIMIZED, AnaState.INACCESSIBLE, AnaState.CHANGE
NQN = "nqn.2026-12.io.nvme-emu:subsys"


def ana(cntlid: int) -> ControllerNotice:
    return ControllerNotice(cntlid, AsyncEventNotice.ASYMMETRIC_NAMESPACE_ACCESS_CHANGE, LogPageId.ASYMMETRIC_NAMESPACE_ACCESS)


def attr(cntlid: int, nsid: int) -> ControllerNotice:
    return ControllerNotice(cntlid, AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED, LogPageId.CHANGED_NAMESPACE_LIST, nsid)


def subsystem(**kw: object) -> Subsystem:
    """Controllers 1 and 2; namespaces 1, 2 in group 1 and 3 in group 2, none attached."""
    sub = Subsystem(NQN, anagrpmax=4, mnan=8, **kw)  # type: ignore[arg-type]
    sub.add_controller(1)
    sub.add_controller(2)
    sub.add_namespace(1, 1)
    sub.add_namespace(2, 1)
    sub.add_namespace(3, 2)
    return sub


def log(sub: Subsystem, cntlid: int, rgo: bool = False) -> tuple[int, list[tuple[int, int, list[int], int]]]:
    parsed = AnaLog.parse(sub.ana_log(cntlid, rgo=rgo))
    return parsed.header.chgcnt, [(g.anagrpid, g.state, list(g.nsids), g.chgcnt) for g in parsed.groups]


def test_controllers_have_distinct_cntlids() -> None:
    sub = subsystem()
    assert sub.controllers == [1, 2] and sub.subnqn == NQN
    for bad in (1, 2, -1, 0xFFF0, 0xFFFF):
        with pytest.raises(ValueError):
            sub.add_controller(bad)
    sub.add_controller(0)
    sub.add_controller(0xFFEF)
    assert sub.controllers == [0, 1, 2, 0xFFEF]


def test_attachment_is_per_controller() -> None:
    sub = subsystem()
    assert sub.attach(1, [1]) == [attr(1, 1), ana(1)]  # controller 2 is told nothing
    assert sub.active_nsids(1) == [1] and sub.active_nsids(2) == []
    assert sub.attach(1, [2]) == [attr(2, 1), ana(2)]
    assert sub.attached_controllers(1) == [1, 2]
    assert sub.detach(1, [1]) == [attr(1, 1), ana(1)]
    assert sub.active_nsids(1) == [] and sub.active_nsids(2) == [1]
    assert log(sub, 1) == (2, [])  # group 1 left controller 1's log: a change, no descriptor to count


@pytest.mark.parametrize(
    ("op", "nsid", "cntlids", "status"),
    [
        ("attach", 1, [2, 1], Status.NAMESPACE_ALREADY_ATTACHED),  # 1 is attached already: 2 is not attached either
        ("attach", 1, [3], Status.CONTROLLER_LIST_INVALID),  # no such controller
        ("attach", 2, [2, 2], Status.CONTROLLER_LIST_INVALID),  # named twice
        ("attach", 2, [], Status.CONTROLLER_LIST_INVALID),
        ("attach", 7, [1], Status.INVALID_NAMESPACE_OR_FORMAT),  # not allocated
        ("detach", 1, [1, 2], Status.NAMESPACE_NOT_ATTACHED),  # 2 is not attached: 1 stays
        ("detach", 3, [1], Status.NAMESPACE_NOT_ATTACHED),
    ],
)
def test_attachment_errors_change_nothing(op: str, nsid: int, cntlids: list[int], status: Status) -> None:
    sub = subsystem()
    sub.attach(1, [1])
    before = (sub.active_nsids(1), sub.active_nsids(2), sub.ana_log(1), sub.ana_log(2))
    with pytest.raises(NvmeError) as e:
        getattr(sub, op)(nsid, cntlids)
    assert e.value.status == status
    assert (sub.active_nsids(1), sub.active_nsids(2), sub.ana_log(1), sub.ana_log(2)) == before


def test_namespace_allocation_errors() -> None:
    sub = subsystem()
    for nsid, grpid, status in [(4, 5, Status.ANA_GROUP_IDENTIFIER_INVALID), (4, 0, Status.ANA_GROUP_IDENTIFIER_INVALID),
                                (1, 1, Status.NAMESPACE_ID_UNAVAILABLE), (9, 1, Status.INVALID_NAMESPACE_OR_FORMAT)]:
        with pytest.raises(NvmeError) as e:
            sub.add_namespace(nsid, grpid)
        assert e.value.status == status
    assert sub.namespaces == {1: 1, 2: 1, 3: 2}


def test_a_state_change_tells_only_the_controller_whose_log_changed() -> None:
    sub = subsystem()
    sub.attach(1, [1, 2])
    sub.attach(3, [2])
    assert sub.set_ana_state(1, 1, INA, now=0.0) == [ana(1)]
    assert sub.ana_state(1, 1) == INA and sub.ana_state(2, 1) == OPT
    # group 2 holds nothing attached to controller 1: its log does not change
    assert sub.set_ana_state(1, 2, INA, now=0.0) == []
    assert log(sub, 1) == (2, [(1, INA, [1], 2)])
    # setting the state a pair already has changes nothing
    assert sub.set_ana_state(1, 1, INA, now=0.0) == []
    # once namespace 3 is attached to controller 1, group 2 is in its log, Inaccessible
    assert sub.attach(3, [1]) == [attr(1, 3), ana(1)]
    assert log(sub, 1) == (3, [(1, INA, [1], 2), (2, INA, [3], 1)])


def test_timed_transition_owes_two_notices_and_counts_both() -> None:
    sub = subsystem()
    sub.attach(1, [1, 2])
    assert sub.set_ana_state(2, 1, NOP, now=10.0, change_ms=250) == [ana(2)]
    assert sub.ana_state(2, 1) == CHG and sub.next_due() == 10.25
    assert log(sub, 2) == (2, [(1, CHG, [1], 2)])
    assert sub.advance(10.2) == []
    assert sub.advance(10.25) == [ana(2)]
    assert log(sub, 2) == (3, [(1, NOP, [1], 3)])
    assert log(sub, 1) == (1, [(1, OPT, [1], 1)])  # controller 1 saw only the attach
    assert sub.next_due() is None and sub.advance(11.0) == []


def test_change_counts_count_only_the_descriptor_that_changed() -> None:
    sub = subsystem()
    sub.attach(1, [1])
    sub.attach(3, [1])
    sub.set_ana_state(1, 2, NOP, now=0.0)
    assert log(sub, 1) == (3, [(1, OPT, [1], 1), (2, NOP, [3], 2)])
    assert log(sub, 1, rgo=True) == (3, [(1, OPT, [], 1), (2, NOP, [], 2)])


def test_removing_a_namespace_detaches_it_everywhere() -> None:
    sub = subsystem()
    sub.attach(2, [1, 2])
    assert sub.remove_namespace(2) == [attr(1, 2), attr(2, 2), ana(1), ana(2)]
    assert sub.namespaces == {1: 1, 3: 2}
    assert log(sub, 1)[1] == [] and log(sub, 2)[1] == []


def test_refused_ana_requests_change_nothing_and_owe_nothing() -> None:
    sub = subsystem(anacap=ALL_STATES & ~Anacap.PERSISTENT_LOSS, anatt=1)
    sub.attach(1, [1])
    before = sub.ana_log(1)
    with pytest.raises(ValueError):
        sub.set_ana_state(1, 1, AnaState.PERSISTENT_LOSS, now=0.0)
    with pytest.raises(ValueError):
        sub.set_ana_state(1, 1, INA, now=0.0, change_ms=1001)
    with pytest.raises(KeyError):
        sub.set_ana_state(3, 1, INA, now=0.0)
    assert sub.ana_log(1) == before and sub.advance(5.0) == []


def test_the_log_fits_what_nanagrpid_and_mnan_promise() -> None:
    sub = Subsystem(NQN, anagrpmax=4, mnan=8)
    sub.add_controller(1)
    for nsid in range(1, 9):
        sub.add_namespace(nsid, 1 + nsid % 4)
        sub.attach(nsid, [1])
    assert len(sub.ana_log(1)) == ana_log_size_limit(nanagrpid=4, mnan=8)


def test_unreachable_nsids_follow_the_controllers_states() -> None:
    sub = subsystem()
    sub.attach(1, [1, 2])
    sub.attach(3, [1])
    assert sub.unreachable_nsids(1) == {} and sub.unreachable_nsids(2) == {}
    sub.set_ana_state(1, 1, INA, now=0.0)
    sub.set_ana_state(1, 2, NOP, now=0.0, change_ms=100)
    assert sub.unreachable_nsids(1) == {1: INA, 3: CHG}
    assert sub.unreachable_nsids(2) == {}  # the same namespace, the other path
    sub.advance(0.1)
    assert sub.unreachable_nsids(1) == {1: INA}
    sub.set_ana_state(2, 1, AnaState.PERSISTENT_LOSS, now=0.0)
    assert sub.unreachable_nsids(2) == {1: AnaState.PERSISTENT_LOSS}
