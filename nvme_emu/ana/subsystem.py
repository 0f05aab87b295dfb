"""An NVM subsystem of several controllers sharing namespaces, with ANA, as a sans-IO model.

The controllers share one SUBNQN and have distinct CNTLIDs; every namespace belongs to one
ANA group and may be attached to any subset of the controllers (Namespace Attachment is per
controller). Each controller reports its own ANA log page: the groups holding a namespace
attached to it, each with that controller's state for the group.

Every operation that can change what a controller reports returns the notices owed, as
:class:`ControllerNotice` values, instead of raising them: the caller owns the controllers
and delivers each notice through that controller's asynchronous event path (and its
Asynchronous Event Configuration). Change counts and ANA Change notices are not kept by hand
at each mutation: after each one the model compares every controller's log content with what
it reported before, so a descriptor that changed is counted once, and only the controllers
whose log really changed are told.

Choices where the specification leaves room:

- Groups are static: IDs 1..ANAGRPMAX all exist (NANAGRPID = ANAGRPMAX), and a namespace's
  group does not change while it is attached (ANACAP bit 6).
- A group with no namespace attached to a controller is not in that controller's log, with
  or without RGO (the log describes the groups of the namespaces attached to it).
- Attaching or detaching posts Namespace Attribute Changed to every controller whose set of
  attached namespaces changed, the one that processed the command included (as the single
  controller does today), and ANA Change to those whose ANA log content changed with it.
- Change counts roll over from FFFFFFFF_FFFFFFFFh to 0h.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec.commands import NvmeError, Status
from ..spec.events import AsyncEventNotice
from ..spec.identify import CNTLID_MAX, Anacap
from ..spec.log_pages import AnaState, LogPageId
from .log import AnaGroupView, build_ana_log
from .states import ALL_STATES, AnaStates

_COUNT_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class ControllerNotice:
    """An asynchronous event (type Notice) owed to one controller. ``nsid``: the namespace
    to add to that controller's Changed Namespace List (Namespace Attribute Changed only)."""

    cntlid: int
    notice: AsyncEventNotice
    log_page: LogPageId
    nsid: int = 0


def _ana_change(cntlid: int) -> ControllerNotice:
    return ControllerNotice(cntlid, AsyncEventNotice.ASYMMETRIC_NAMESPACE_ACCESS_CHANGE, LogPageId.ASYMMETRIC_NAMESPACE_ACCESS)


def _attribute_changed(cntlid: int, nsid: int) -> ControllerNotice:
    return ControllerNotice(cntlid, AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED, LogPageId.CHANGED_NAMESPACE_LIST, nsid)


class Subsystem:
    """Controllers, namespaces, attachments and ANA states of one NVM subsystem.

    ``mnan``: the highest NSID (and MNAN); ``anatt``: ANATT in seconds, the longest timed
    transition; ``anacap``: the states that may be reported (Optimized is required)."""

    def __init__(self, subnqn: str, *, anagrpmax: int = 16, anacap: Anacap = ALL_STATES | Anacap.GRPID_STATIC,
                 anatt: int = 10, mnan: int = 256) -> None:
        self.subnqn = subnqn
        self.mnan = mnan
        self.states = AnaStates(anagrpmax, anacap, anatt)
        self._controllers: set[int] = set()
        self._group_of: dict[int, int] = {}  # nsid -> ANAGRPID
        self._attached: dict[int, set[int]] = {}  # nsid -> CNTLIDs
        self._views: dict[int, dict[int, AnaGroupView]] = {}  # cntlid -> grpid -> as last reported
        self._group_chgcnt: dict[tuple[int, int], int] = {}
        self._log_chgcnt: dict[int, int] = {}

    # -- what the subsystem is -----------------------------------------------------------

    @property
    def controllers(self) -> list[int]:
        return sorted(self._controllers)

    @property
    def namespaces(self) -> dict[int, int]:
        """NSID -> ANAGRPID of every allocated namespace."""
        return dict(self._group_of)

    def attached_controllers(self, nsid: int) -> list[int]:
        """The controllers ``nsid`` is attached to, ascending (Identify CNS 12h)."""
        return sorted(self._attached[self._known(nsid)])

    def active_nsids(self, cntlid: int) -> list[int]:
        """The namespaces attached to ``cntlid``, ascending (its active NSID list)."""
        self._controller(cntlid)
        return sorted(nsid for nsid, ctrls in self._attached.items() if cntlid in ctrls)

    def ana_state(self, cntlid: int, nsid: int) -> AnaState:
        """The state a command from ``cntlid`` to ``nsid`` meets (for the dispatch)."""
        return self.states.state(self._controller(cntlid), self._group_of[self._known(nsid)])

    def unreachable_nsids(self, cntlid: int) -> dict[int, AnaState]:
        """The namespaces attached to ``cntlid`` whose group it cannot serve now (neither
        Optimized nor Non-Optimized), with their state. The controller keeps this small dict
        and refreshes it after every notice, so the I/O path pays one empty-dict test while
        every path is healthy (see :func:`nvme_emu.ana.commands.ana_refusal`)."""
        return {
            nsid: state
            for nsid in self.active_nsids(cntlid)
            if (state := self.states.state(cntlid, self._group_of[nsid])) not in (AnaState.OPTIMIZED, AnaState.NON_OPTIMIZED)
        }

    # -- configuration and Namespace Management / Attachment ------------------------------

    def add_controller(self, cntlid: int) -> None:
        """A controller joins with nothing attached (its log is empty, so no notice)."""
        if not 0 <= cntlid <= CNTLID_MAX:
            raise ValueError(f"CNTLID {cntlid:#x} is outside 0..{CNTLID_MAX:#x}")
        if cntlid in self._controllers:
            raise ValueError(f"CNTLID {cntlid:#x} is taken: controllers of a subsystem have distinct CNTLIDs")
        self._controllers.add(cntlid)
        self.states.add_controller(cntlid)
        self._views[cntlid] = {}
        self._log_chgcnt[cntlid] = 0
        for grpid in range(1, self.states.anagrpmax + 1):
            self._group_chgcnt[cntlid, grpid] = 0

    def add_namespace(self, nsid: int, anagrpid: int = 1) -> None:
        """Allocate ``nsid`` in group ``anagrpid``, attached to no controller."""
        if not 1 <= nsid <= self.mnan:
            raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"NSID {nsid} outside 1..{self.mnan}")
        if nsid in self._group_of:
            raise NvmeError(Status.NAMESPACE_ID_UNAVAILABLE, f"namespace {nsid} exists")
        if not 1 <= anagrpid <= self.states.anagrpmax:
            raise NvmeError(Status.ANA_GROUP_IDENTIFIER_INVALID, f"ANAGRPID {anagrpid} outside 1..{self.states.anagrpmax}")
        self._group_of[nsid] = anagrpid
        self._attached[nsid] = set()

    def remove_namespace(self, nsid: int) -> list[ControllerNotice]:
        """Delete ``nsid``: it leaves every controller it was attached to."""
        notices = self.detach(nsid, self.attached_controllers(nsid))
        del self._group_of[nsid], self._attached[nsid]
        return notices

    def attach(self, nsid: int, cntlids: list[int]) -> list[ControllerNotice]:
        """Namespace Attachment (attach): all or nothing, as the command is."""
        attached = self._attached[self._known(nsid)]
        self._check_list(cntlids)
        already = [c for c in cntlids if c in attached]
        if already:
            raise NvmeError(Status.NAMESPACE_ALREADY_ATTACHED, f"namespace {nsid} is attached to {already}")
        attached.update(cntlids)
        return [_attribute_changed(c, nsid) for c in sorted(set(cntlids))] + self._commit()

    def detach(self, nsid: int, cntlids: list[int]) -> list[ControllerNotice]:
        """Namespace Attachment (detach): all or nothing."""
        attached = self._attached[self._known(nsid)]
        self._check_list(cntlids)
        missing = [c for c in cntlids if c not in attached]
        if missing:
            raise NvmeError(Status.NAMESPACE_NOT_ATTACHED, f"namespace {nsid} is not attached to {missing}")
        attached.difference_update(cntlids)
        return [_attribute_changed(c, nsid) for c in sorted(set(cntlids))] + self._commit()

    # -- ANA -------------------------------------------------------------------------------

    def set_ana_state(self, cntlid: int, grpid: int, state: AnaState, now: float, change_ms: int = 0) -> list[ControllerNotice]:
        """The control plane's ``ana-set``: at once, or through ANA Change for ``change_ms``."""
        self.states.set(self._controller(cntlid), grpid, state, now, change_ms)
        return self._commit()

    def advance(self, now: float) -> list[ControllerNotice]:
        """End the transitions due by ``now`` (call at :meth:`next_due`)."""
        self.states.advance(now)
        return self._commit()

    def next_due(self) -> float | None:
        return self.states.next_due()

    def ana_log(self, cntlid: int, *, rgo: bool = False) -> bytes:
        """Controller ``cntlid``'s ANA log page (0Ch), groups ascending."""
        views = self._views[self._controller(cntlid)]
        groups = [views[g] for g in sorted(views)]
        return build_ana_log(self._log_chgcnt[cntlid], groups, rgo=rgo)

    # -- internals ---------------------------------------------------------------------------

    def _view(self, cntlid: int) -> dict[int, tuple[AnaState, tuple[int, ...]]]:
        """What ``cntlid``'s log reports now: grpid -> (state, NSIDs)."""
        nsids = self.active_nsids(cntlid)
        return {
            grpid: (self.states.state(cntlid, grpid), tuple(n for n in nsids if self._group_of[n] == grpid))
            for grpid in sorted({self._group_of[n] for n in nsids})
        }

    def _commit(self) -> list[ControllerNotice]:
        """Count what changed in each controller's log since it was last reported; an ANA
        Change notice for each controller whose log changed."""
        notices = []
        for cntlid in self.controllers:
            old = self._views[cntlid]
            new = self._view(cntlid)
            changed = {g for g in old.keys() | new.keys() if g not in new or g not in old or (old[g].state, old[g].nsids) != new[g]}
            if not changed:
                continue
            for grpid in changed & new.keys():
                self._group_chgcnt[cntlid, grpid] = (self._group_chgcnt[cntlid, grpid] + 1) & _COUNT_MASK
            self._log_chgcnt[cntlid] = (self._log_chgcnt[cntlid] + 1) & _COUNT_MASK
            self._views[cntlid] = {
                g: AnaGroupView(g, state, nsids, self._group_chgcnt[cntlid, g]) for g, (state, nsids) in new.items()
            }
            notices.append(_ana_change(cntlid))
        return notices

    def _controller(self, cntlid: int) -> int:
        if cntlid not in self._controllers:
            raise KeyError(f"controller {cntlid:#x} is not in this subsystem")
        return cntlid

    def _known(self, nsid: int) -> int:
        if nsid not in self._group_of:
            raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid} is not allocated")
        return nsid

    def _check_list(self, cntlids: list[int]) -> None:
        """A controller list naming a controller twice or one outside the subsystem is invalid."""
        if not cntlids or len(set(cntlids)) != len(cntlids) or not set(cntlids) <= self._controllers:
            raise NvmeError(Status.CONTROLLER_LIST_INVALID, f"controller list {cntlids}")
