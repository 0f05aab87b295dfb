"""I/O Command Sets: what one is to this controller, and the ones it implements, by CSI.

Each namespace belongs to one I/O command set (``Namespace.csi``). A :class:`CommandSet`
gathers what the controller needs to know of one, in one place, instead of an NVM assumption
in every spec area:

- its Command Set Identifier and its bit in an I/O Command Set Combination (Identify CNS 1Ch,
  the I/O Command Set Profile feature 19h);
- its opcode -> handler table, bound per controller (:attr:`CommandSet.handlers`): the I/O
  queue loop looks a command's handler up in its namespace's set;
- its Commands Supported and Effects entries (log 05h, by the CSI in CDW14), which also say
  what a write-protected namespace refuses (LBCC);
- its Identify pages: CNS 05h for a namespace of the set (by the CSI asked: a set built on
  another, as the Zoned one is on NVM, answers for both) and CNS 06h for the controller;
- its I/O Command Set specific log pages (by the CSI in CDW14) and what it does when one of
  its namespaces becomes active on a controller (the Zoned set points its zones' change
  notices at that controller).

:data:`COMMAND_SETS` is the registry every spec area asks: Identify, Get Log Page, Namespace
Management and the controller's dispatch. A new command set is its module (handlers, pages)
plus one :class:`CommandSet` entry here.

Every I/O command set so far is built on the NVM one (the Zoned Namespace Command Set is
"based on the NVM Command Set"), so :class:`~nvme_emu.nvm.NvmCommands` runs the request
machinery of all of them (data pointers, blocking work on the I/O pool, completions, errors)
and dispatches by CSI; another set's handlers are bound to it and may reuse its commands.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from . import structures as st
from .namespace import Namespace
from .nvm import Handler, NvmCommands
from .spec.commands import LBA_CHANGING_OPCODES, NvmeError, NvmOpcode, Status
from .spec.identify import Csi, IoCommandSetVector
from .spec.log_pages import CommandEffects, EffectsScope, LogPageId
from .state import ControllerHooks, ControllerState
from .zoned import events as zoned_events
from .zoned.commands import ZONED_LBA_CHANGING, ZONED_OPCODES, ZonedCommands, identify_controller_zns, identify_namespace_zns

#: Every I/O command acts on the namespace it names (Flush with NSID FFFFFFFFh on them all).
IO_EFFECTS = CommandEffects.CSUPP | EffectsScope.NAMESPACE


def io_effects(opcodes: Iterable[int], lba_changing: Iterable[int] = ()) -> dict[int, int]:
    """Commands Supported and Effects entries for a set's I/O opcodes: supported, namespace
    scope, and LBCC for those that change logical block content."""
    changing = frozenset(lba_changing)
    return {op: IO_EFFECTS | (CommandEffects.LBCC if op in changing else 0) for op in opcodes}


@dataclass(frozen=True)
class CommandSet:
    """One I/O command set, as the controller's spec areas see it (module docstring)."""

    csi: Csi
    #: Its bit in an I/O Command Set Combination (Identify CNS 1Ch).
    vector: IoCommandSetVector
    #: Commands Supported and Effects entries of its I/O opcodes (log 05h with this CSI);
    #: the opcodes are exactly those its handler table and the Flush before it dispatch.
    effects: Mapping[int, int]
    #: Identify CNS 05h for a namespace of this set, by the CSI the host asked for; a CSI
    #: missing here is one the namespace is not associated with (Invalid Field).
    namespace_pages: Mapping[int, Callable[[Namespace], bytes]]
    #: Identify CNS 06h with this CSI: the controller's limits for the set.
    controller_page: Callable[[ControllerState], bytes]
    #: Its opcode -> handler table for one controller, given that controller's NVM commands
    #: (the request machinery every set shares). Flush is not in it: the dispatcher handles
    #: Flush (NSID FFFFFFFFh included) before any table. The dispatcher holds the returned
    #: dict itself, so a set may swap entries in place (as NVM does for marked LBAs).
    handlers: Callable[[NvmCommands], dict[int, Handler]]
    #: Its I/O Command Set specific log pages (Get Log Page with this CSI): log identifier ->
    #: the page for the NSID the command names.
    log_pages: Mapping[int, Callable[[ControllerState, int], bytes]] = field(default_factory=dict)
    #: Called when one of its namespaces becomes active on a controller (at the controller's
    #: start for those it is given, then by Namespace Attachment and the control plane).
    on_attach: Callable[[ControllerState, ControllerHooks, Namespace], None] | None = None
    #: The opcodes with LBCC: refused with Namespace is Write Protected on such a namespace.
    lba_changing: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        changing = frozenset(op for op, entry in self.effects.items() if entry & CommandEffects.LBCC)
        object.__setattr__(self, "lba_changing", changing)


# ---------------------------------------------------------------------------------------------
# The NVM Command Set (CSI 00h): handlers in nvme_emu.nvm, pages from the namespace
# ---------------------------------------------------------------------------------------------


def identify_controller_nvm(state: ControllerState) -> bytes:
    """CNS 06h / CSI 00h."""
    # Limits in units of the minimum page size, 2^n; 0 = no limit beyond MDTS.
    return st.build_identify_controller_nvm(vsl=0, wzsl=0, wusl=0, dmrl=255, dmrsl=0xFFFFFFFF, dmsl=0)


#: What NvmCommands dispatches: its handler table's opcodes and Flush.
NVM_OPCODES = (
    NvmOpcode.FLUSH,
    NvmOpcode.WRITE,
    NvmOpcode.READ,
    NvmOpcode.WRITE_UNCORRECTABLE,
    NvmOpcode.COMPARE,
    NvmOpcode.WRITE_ZEROES,
    NvmOpcode.DATASET_MANAGEMENT,
    NvmOpcode.VERIFY,
    NvmOpcode.COPY,
)

NVM = CommandSet(
    csi=Csi.NVM,
    vector=IoCommandSetVector.NVM,
    effects=io_effects(NVM_OPCODES, LBA_CHANGING_OPCODES),
    namespace_pages={Csi.NVM: Namespace.identify_namespace_nvm},
    controller_page=identify_controller_nvm,
    handlers=operator.attrgetter("handlers"),
)

# ---------------------------------------------------------------------------------------------
# The Zoned Namespace Command Set (CSI 02h): handlers and pages in nvme_emu.zoned.commands,
# events and the Changed Zone List in nvme_emu.zoned.events
# ---------------------------------------------------------------------------------------------

ZONED = CommandSet(
    csi=Csi.ZONED,
    vector=IoCommandSetVector.ZONED,
    effects=io_effects(ZONED_OPCODES, ZONED_LBA_CHANGING),
    # "based on the NVM Command Set": a zoned namespace has the NVM page (CNS 05h, CSI 00h) too
    namespace_pages={Csi.NVM: Namespace.identify_namespace_nvm, Csi.ZONED: identify_namespace_zns},
    controller_page=identify_controller_zns,
    handlers=lambda nvm: ZonedCommands(nvm).handlers,
    log_pages={LogPageId.CHANGED_ZONE_LIST: zoned_events.changed_zone_list_log},
    on_attach=zoned_events.attach,
)

# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

#: The I/O command sets this controller implements, by CSI.
COMMAND_SETS: dict[int, CommandSet] = {cs.csi: cs for cs in (NVM, ZONED)}

#: Identify CNS 1Ch: the I/O command set combinations, indexed by the I/O Command Set Profile
#: feature (19h). One: every set this controller implements, together.
IO_COMMAND_SET_COMBINATIONS: tuple[int, ...] = (functools.reduce(operator.or_, (cs.vector for cs in COMMAND_SETS.values()), 0),)


def namespace_attached(state: ControllerState, hooks: ControllerHooks, ns: Namespace) -> None:
    """``ns`` became active on the controller ``state`` and ``hooks`` are of: its set's
    :attr:`CommandSet.on_attach`, if it has one."""
    cs = COMMAND_SETS.get(ns.csi)
    if cs is not None and cs.on_attach is not None:
        cs.on_attach(state, hooks, ns)


def command_set(csi: int, status: Status = Status.INVALID_FIELD) -> CommandSet:
    """The command set ``csi`` names, or ``status`` (what the asking command's spec names)."""
    cs = COMMAND_SETS.get(csi)
    if cs is None:
        raise NvmeError(status, f"I/O command set {csi:#x} not supported")
    return cs
