"""Fault injection on the NVM I/O path: media errors on LBA ranges, added latency, delayed
or dropped completions. The control plane configures them (:mod:`nvme_emu.control`).

Without faults the I/O path does not know this module exists: the controller dispatches I/O
through ``Controller.io``, which is the :class:`~nvme_emu.nvm.NvmCommands` itself while no
fault is configured and this module's :class:`FaultInjector` (whose :meth:`~FaultInjector.
execute` wraps :meth:`NvmCommands.execute <nvme_emu.nvm.NvmCommands.execute>`) while one is;
the first fault added and the last one removed switch it (``on_change``). The queue loop
reads ``io.execute`` once per batch, so a fault-free controller pays nothing.

What the host sees is what the spec says a device shows:

- ``media``: a Read (Compare, Verify) touching the range completes with Unrecovered Read
  Error, a Write (Write Zeroes) with Write Fault, both with DNR (retrying cannot help); each
  gets an Error Information entry and counts in SMART Media and Data Integrity Errors. While
  it fails reads, its range is reported as tracked potentially unrecoverable LBAs (Get LBA
  Status, the LBA Status Information log: :mod:`nvme_emu.lba_status`), next to the marks of
  Write Uncorrectable.
- ``latency`` / ``delay``: the command runs as usual, its completion is posted later
  (fixed, or drawn from a distribution); past the host's timeout for ``delay``.
- ``drop``: the command is fetched and never completed, as if the controller lost it; only
  the host's timeout handling (Abort, then a reset) gets it back.
"""

from __future__ import annotations

import enum
import itertools
import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .jsonrpc import Param, ParamType, Schema, check_params
from .lba_status import lba_status_changed
from .nvm import NvmCommands
from .queue import SubmissionQueue
from .spec.commands import NSID_ALL, NvmOpcode, NvmeError, Status
from .spec.zns import ZnsOpcode
from .sqe import CID, NSID, OPC, lba_range
from .outcome import DEFERRED, Deferred
from .state import ControllerHooks, ControllerState

log = logging.getLogger(__name__)

#: Commands that read the media, and those that write it. A Zone Append is matched by its
#: zone's start LBA and length (where it lands, the write pointer, is the zone's to decide).
READ_OPCODES = frozenset({NvmOpcode.READ, NvmOpcode.COMPARE, NvmOpcode.VERIFY})
WRITE_OPCODES = frozenset({NvmOpcode.WRITE, NvmOpcode.WRITE_ZEROES, ZnsOpcode.ZONE_APPEND})
#: Which commands a fault's ``op`` selects.
OPS = {"read": READ_OPCODES, "write": WRITE_OPCODES, "rw": READ_OPCODES | WRITE_OPCODES}


class FaultKind(enum.StrEnum):
    """What a fault does to the commands it matches (the module docstring says what the host
    sees). The values are the control plane's vocabulary: ``fault_add``'s ``kind``, ``nvme-emu
    ctl fault KIND``, and what ``fault_list`` reports."""

    MEDIA = "media"
    LATENCY = "latency"
    DELAY = "delay"
    DROP = "drop"


DISTRIBUTIONS = ("fixed", "uniform", "exponential", "normal")
#: The longest latency or delay a fault may add: far past any host's command timeout
#: (Linux: 30 s by default), and a deadline every timer can hold. NaN, Infinity and 1e300
#: were accepted once, and the first delayed command broke the controller's timers.
MAX_FAULT_US = 3600 * 1_000_000
U64_MAX = (1 << 64) - 1

#: ``fault_add``'s parameters (the control plane declares them with this; parse_fault checks them).
_LATENCY_US = Param(ParamType.NUMBER, minimum=0, maximum=MAX_FAULT_US)
FAULT_PARAMS: Schema = {
    "kind": Param(ParamType.STRING, required=True, choices=tuple(FaultKind)),
    "nsid": Param(ParamType.INTEGER, minimum=0, maximum=NSID_ALL - 1),  # 0: every namespace
    "slba": Param(ParamType.INTEGER, minimum=0, maximum=U64_MAX),
    "nlb": Param(ParamType.INTEGER, minimum=0, maximum=U64_MAX),  # 0: to the end
    "op": Param(ParamType.STRING, choices=tuple(OPS)),
    "remaining": Param(ParamType.INTEGER, nullable=True, minimum=1, maximum=U64_MAX),  # null: forever
    "dist": Param(ParamType.STRING, choices=DISTRIBUTIONS),
    "us": _LATENCY_US,
    "min_us": _LATENCY_US,
    "max_us": _LATENCY_US,
    "stddev_us": _LATENCY_US,
    "delay_ms": Param(ParamType.NUMBER, minimum=0, maximum=MAX_FAULT_US / 1000),
}


@dataclass
class Fault:
    """One configured fault; ``remaining`` None means every matching command, forever."""

    id: int
    kind: FaultKind
    nsid: int = 0  # 0: every namespace
    slba: int = 0
    nlb: int = 0  # 0: to the end of the namespace
    op: str = "rw"
    remaining: int | None = None
    dist: str = "fixed"
    us: float = 0.0  # fixed latency, or the mean (exponential, normal)
    min_us: float = 0.0  # uniform
    max_us: float = 0.0
    stddev_us: float = 0.0  # normal
    hits: int = 0

    def matches(self, opc: int, nsid: int, slba: int, nlb: int) -> bool:
        """Does a command (opcode, namespace, LBA range) fall under this fault?"""
        if opc not in OPS[self.op] or (self.nsid and nsid != self.nsid) or self.remaining == 0:
            return False
        return slba + nlb > self.slba and (not self.nlb or slba < self.slba + self.nlb)

    def first_lba(self, slba: int) -> int:
        """The first failing LBA of a command starting at ``slba`` (the Error log's LBA)."""
        return max(slba, self.slba)

    def hit(self) -> None:
        self.hits += 1
        if self.remaining is not None:
            self.remaining -= 1

    def delay_seconds(self, rng: random.Random) -> float:
        """This command's added latency."""
        if self.dist == "uniform":
            us = rng.uniform(self.min_us, self.max_us)
        elif self.dist == "exponential":
            us = rng.expovariate(1.0 / self.us) if self.us > 0 else 0.0
        elif self.dist == "normal":
            us = rng.gauss(self.us, self.stddev_us)
        else:
            us = self.us
        return min(max(us, 0.0), MAX_FAULT_US) / 1e6  # a draw from a wide distribution stays in range too

    def describe(self) -> dict[str, Any]:
        """The fault as the control plane reports it (plain JSON values: ``kind`` its string)."""
        return {**self.__dict__, "kind": self.kind.value}


def parse_fault(fault_id: int, params: dict[str, Any]) -> Fault:
    """A Fault from control-plane parameters (:data:`FAULT_PARAMS`); ValueError names what is wrong."""
    check_params(FAULT_PARAMS, params)
    p = {k: v for k, v in params.items() if v is not None}
    kind = FaultKind(p.pop("kind"))
    if "delay_ms" in p:
        p["us"] = float(p.pop("delay_ms")) * 1000
    if kind is FaultKind.DELAY:
        p.setdefault("remaining", 1)
    fault = Fault(fault_id, kind, **p)
    if kind in (FaultKind.LATENCY, FaultKind.DELAY) and fault.dist == "uniform" and fault.max_us < fault.min_us:
        raise ValueError("uniform latency needs min_us <= max_us")
    return fault


@dataclass
class FaultCounters:
    """How often each kind fired (also after its faults were removed)."""

    media_errors: int = 0
    delayed: int = 0
    dropped: int = 0
    fatal: int = 0


#: ``call_later(seconds, fn)``: a timer on the controller's loop.
CallLater = Callable[[float, Callable[[], None]], Any]


@dataclass(eq=False)
class FaultInjector:
    """The fault table of one controller and the wrapper that applies it to I/O.

    While :attr:`active`, the controller dispatches I/O through :meth:`execute` instead of
    ``nvm.execute`` and gives the NVM command set :attr:`hooks`, whose ``finish_request``
    holds back the completions of delayed requests that ran on the I/O pool; ``on_change``
    tells it when :attr:`active` changed."""

    state: ControllerState
    nvm: NvmCommands
    call_later: CallLater
    on_change: Callable[[], None] = lambda: None
    rng: random.Random = field(default_factory=random.Random)
    faults: dict[int, Fault] = field(default_factory=dict)
    counters: FaultCounters = field(default_factory=FaultCounters)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    #: Requests in flight (blocking namespaces) whose completion is to be held back.
    _late: dict[tuple[SubmissionQueue, int], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._inner = self.nvm.execute
        self._hooks: ControllerHooks = self.nvm.hooks
        self._finish = self._hooks.finish_request
        self._begin = self._hooks.begin_request
        #: The NVM command set's hooks while faults are active: finishing a request may wait.
        self.hooks = replace(self._hooks, finish_request=self._finish_late)

    @property
    def active(self) -> bool:
        """Some fault is configured: I/O must go through :meth:`execute`."""
        return bool(self.faults)

    # -- the table ---------------------------------------------------------------------

    def add(self, params: dict[str, Any]) -> Fault:
        fault = parse_fault(next(self._ids), params)
        first = not self.faults
        self.faults[fault.id] = fault
        if first:
            self.on_change()
        if fault.kind is FaultKind.MEDIA and fault.op in ("read", "rw"):
            self.state.lba_status.fault_ranges[fault.id] = (fault.nsid, fault.slba, fault.nlb)
            lba_status_changed(self.state, self._hooks, added=True)
        log.warning("fault %d injected: %s", fault.id, fault.describe())
        return fault

    def remove(self, fault_id: int | None = None) -> int:
        """Remove one fault, or every fault with None; how many went."""
        if fault_id is None:
            n = len(self.faults)
            self.faults.clear()
        else:
            n = 1 if self.faults.pop(fault_id, None) is not None else 0
            if not n:
                raise ValueError(f"no fault {fault_id}")
        self._untrack(*(self.state.lba_status.fault_ranges if fault_id is None else [fault_id]))
        if n and not self.faults:
            self.on_change()
        return n

    def _untrack(self, *fault_ids: int) -> None:
        """These faults no longer fail reads: their LBAs are not reported any more."""
        ranges = self.state.lba_status.fault_ranges
        if any([ranges.pop(i, None) is not None for i in fault_ids]):
            lba_status_changed(self.state, self._hooks, added=False)

    # -- the I/O path ------------------------------------------------------------------

    def execute(self, sq: SubmissionQueue, e: tuple) -> tuple[int, int] | Deferred:
        """:meth:`NvmCommands.execute` with the faults that match ``e`` applied."""
        opc, nsid, cid = e[OPC], e[NSID], e[CID]
        slba, nlb = lba_range(e)
        timing = None
        for fault in list(self.faults.values()):
            if not fault.matches(opc, nsid, slba, nlb):
                continue
            if fault.kind is FaultKind.MEDIA:
                if nsid not in self.state.namespaces:
                    break  # not a media error: the command fails as it would anyway
                return self._media_error(sq, e, fault, slba)
            if timing is None:
                timing = fault
        if timing is None:
            return self._inner(sq, e)
        timing.hit()
        if timing.kind is FaultKind.DROP:
            self.counters.dropped += 1
            log.info("fault %d: dropped command %d of SQ %d", timing.id, cid, sq.qid)
            return DEFERRED  # no request begun: nothing waits for it but the host
        delay = timing.delay_seconds(self.rng)
        self.counters.delayed += 1
        result = self._inner(sq, e)
        if result is DEFERRED:  # on the I/O pool: hold its completion when it comes
            self._late[(sq, cid)] = delay
            return DEFERRED
        status, dw0 = result
        self._begin(sq)
        self.call_later(delay, lambda: self._finish(sq, cid, status, dw0))
        return DEFERRED

    def _media_error(self, sq: SubmissionQueue, e: tuple, fault: Fault, slba: int) -> tuple[int, int]:
        fault.hit()
        if fault.remaining == 0:  # its count is used up: it fails no more reads
            self._untrack(fault.id)
        self.counters.media_errors += 1
        status = Status.UNRECOVERED_READ_ERROR if e[OPC] in READ_OPCODES else Status.WRITE_FAULT
        err = NvmeError(status, f"fault {fault.id}", dnr=True)
        self.state.record_error(sq.qid, e[CID], err, nsid=e[NSID], lba=fault.first_lba(slba))
        return err.status_field, 0

    def _finish_late(self, sq: SubmissionQueue, cid: int, status: int, dw0: int = 0, stamps: list[int] | None = None) -> None:
        """``finish_request`` for the NVM commands while faults are installed."""
        delay = self._late.pop((sq, cid), None)
        if delay is None:
            self._finish(sq, cid, status, dw0, stamps)
        else:
            self.call_later(delay, lambda: self._finish(sq, cid, status, dw0, stamps))

    def describe(self) -> dict[str, Any]:
        return {"faults": [f.describe() for f in self.faults.values()], "counters": dict(self.counters.__dict__)}
