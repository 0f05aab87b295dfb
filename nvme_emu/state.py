"""The controller's state as one explicit object, and the few callbacks handlers may use.

Command handlers (identify, log_page, features, async_event, queue_management, format_nvm,
dbbuf, nvm) receive a :class:`ControllerState` and a :class:`ControllerHooks` instead of a
back-pointer to the controller: what they may read and change is in the state, what they may
*cause* (a completion posted later, an event, work on the I/O pool) goes through a hook. So
each spec area can be exercised in-process with a state and hooks that record their calls.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from vfio_user.dma import DmaError, GuestMemory

from . import identity
from .latency import LatencyRecorder
from .lba_ranges import LbaStatusState
from .spec.commands import NvmeError, Status
from .spec.features import ACRE_ENABLED, HOST_BEHAVIOR_ACRE_BYTE, HOST_BEHAVIOR_SIZE, TEMP_COMPOSITE, TEMP_OVER, TEMP_UNDER
from .spec.registers import NVME_VERSION, Cc, Csts

if TYPE_CHECKING:
    from .aio import IoPool
    from .namespace import Namespace
    from .queue import CompletionQueue, DoorbellBuffer, QueueEvent, SubmissionQueue

#: Temperature sensors the SMART log reports (besides the composite); each has thresholds.
TEMPERATURE_SENSORS = 1
#: The over-temperature threshold a controller starts with (70 degrees C, in kelvin).
DEFAULT_TEMP_OVER_KELVIN = 343
#: A sensor's over threshold starts at the largest value (the spec's default): no warning.
DEFAULT_SENSOR_OVER_KELVIN = 0xFFFF
#: What the host may allocate with Namespace Management unless ``serve --nvm-capacity`` says
#: otherwise. Namespaces it creates live in RAM by default (a memfd that fills as LBAs are
#: written), so this is host memory a guest can take: 4 GiB is 4 default namespaces, a sixth
#: of the 23 GiB host an outside fuzz run filled with 31 x 2 GiB under the former 64 GiB.
#: A fixed figure, not a share of MemAvailable: TNVMCAP should not change from run to run.
DEFAULT_NVM_CAPACITY = 4 << 30


def default_temp_thresholds() -> dict[tuple[int, int], int]:
    """{(TMPSEL, THSEL): kelvin} for the composite and every reported sensor."""
    thresholds = {(TEMP_COMPOSITE, TEMP_OVER): DEFAULT_TEMP_OVER_KELVIN, (TEMP_COMPOSITE, TEMP_UNDER): 0}
    for sensor in range(1, TEMPERATURE_SENSORS + 1):
        thresholds[(sensor, TEMP_OVER)] = DEFAULT_SENSOR_OVER_KELVIN
        thresholds[(sensor, TEMP_UNDER)] = 0
    return thresholds


@dataclass
class ControllerConfig:
    """What a user may choose for a controller; the rest follows from the spec."""

    serial: str = "NVMEEMU00000001"
    model: str = "nvme-emu RAM controller"
    firmware: str = "0.1.0"
    max_queue_entries: int = 4096  # CAP.MQES + 1
    max_io_queues: int = 64
    msix_vectors: int = 65
    mdts: int = 7  # 2^7 * 4 KiB = 512 KiB per command
    timeout_500ms: int = 15  # CAP.TO
    mpsmax: int = 4  # 64 KiB pages
    max_namespaces: int = 32
    aerl: int = 3  # 4 outstanding AERs (0-based)
    acl: int = 3  # 4 outstanding Aborts (0-based)
    error_log_entries: int = 64
    volatile_write_cache: bool = True
    shadow_doorbells: bool = True  # OACS.DBCS (Doorbell Buffer Config)
    temperature_kelvin: int = 313
    pci_vendor: int = 0x4E58
    pci_device: int = 0x4E56
    #: CNTLID; None: derived from the serial number, so distinct controllers differ
    cntlid: int | None = None
    #: What RAM namespaces added later derive their IDs from (nvme_emu.identity)
    identity_seed: str = ""
    #: Bytes Namespace Management may allocate over the namespaces it creates (the host's
    #: budget, UNVMCAP when none exists). Namespaces the operator gives (command line, control
    #: plane) bring their own capacity: TNVMCAP is this plus theirs (identify.total_capacity).
    nvm_capacity: int = DEFAULT_NVM_CAPACITY
    #: Where Namespace Management creates namespace files; None: RAM (gone with the process).
    ns_dir: str | None = None
    #: Identify Controller CRDT1, in 100 ms: how long a host that enabled Advanced Command
    #: Retry waits before retrying a command failed with CRD = 1 (a namespace whose storage
    #: server is unreachable: Namespace Not Ready). Linux retries five times, so 1 s rides
    #: out 5 s without the server: a qemu-nbd or nbdkit restart (60 ms / 20 ms to listen
    #: here) and the backend's reconnect (one handshake, ~1 ms) fit many times over, while a
    #: server that is really gone fails the guest's I/O after ~5 s, far below Linux's 30 s
    #: I/O timeout. Without the delay, the five retries are spent in about a millisecond.
    command_retry_delay_100ms: int = 10

    @property
    def max_transfer(self) -> int:
        """MDTS in bytes (its unit is CAP.MPSMIN, 4 KiB)."""
        return (1 << self.mdts) * 4096

    @property
    def controller_id(self) -> int:
        """CNTLID in Identify Controller."""
        return self.cntlid if self.cntlid is not None else identity.controller_id(self.serial)

    @property
    def doorbell_bytes(self) -> int:
        return 8 * (self.max_io_queues + 1)


@dataclass
class ErrorLog:
    """The Error Information log: a ring of the newest entries plus a running count."""

    capacity: int
    count: int = 0
    entries: deque = field(default_factory=deque)

    def add(self, **fields: int) -> None:
        self.count += 1
        self.entries.appendleft(dict(fields, error_count=self.count))
        while len(self.entries) > self.capacity:
            self.entries.pop()


@dataclass
class HealthCounters:
    """Real counters behind the SMART / Health log."""

    started: float = field(default_factory=time.monotonic)
    busy_seconds: float = 0.0
    power_cycles: int = 0
    unsafe_shutdowns: int = 0
    media_errors: int = 0


@dataclass
class FeatureState:
    """Current values of the features Set Features changes (all back to these defaults at a
    Controller Level Reset; the timestamp then counts from 0 again)."""

    arbitration: int = 0
    power_state: int = 0
    temp_thresholds: dict[tuple[int, int], int] = field(default_factory=default_temp_thresholds)
    error_recovery: int = 0
    write_cache: bool = True
    queues_requested: tuple[int, int] | None = None
    coalescing: int = 0  # THR 7:0, TIME 15:8 (100 us units)
    vector_config: dict[int, bool] = field(default_factory=dict)  # vector -> coalescing disabled
    write_atomicity: int = 0
    async_event_config: int = 0
    host_behavior: bytes = bytes(HOST_BEHAVIOR_SIZE)
    io_command_set_index: int = 0  # I/O Command Set Profile: combination 0, NVM
    timestamp_base_ms: int = 0
    timestamp_set_at: float = field(default_factory=time.monotonic)
    timestamp_synced: bool = False

    @property
    def acre(self) -> bool:
        """The host enabled Advanced Command Retry (Host Behavior Support): a transient
        failure's completion may carry a Command Retry Delay (CRD)."""
        return bool(self.host_behavior[HOST_BEHAVIOR_ACRE_BYTE] & ACRE_ENABLED)


@dataclass
class AsyncEventState:
    """Outstanding Asynchronous Event Requests and the events waiting for one."""

    #: CIDs of AERs the host has outstanding, oldest first.
    aer_cids: deque[int] = field(default_factory=deque)
    #: (type, info, log page) not reported yet.
    queued: deque[tuple[int, int, int]] = field(default_factory=deque)
    #: Event types reported and not yet acknowledged by reading their log page.
    masked_types: set[int] = field(default_factory=set)
    #: NSIDs for the Changed Namespace List log (kept across a controller reset).
    changed_nsids: set[int] = field(default_factory=set)

    def reset(self) -> None:
        """A Controller Reset aborts the AERs and drops what they would have reported."""
        self.aer_cids.clear()
        self.queued.clear()
        self.masked_types.clear()


@dataclass(eq=False)
class ControllerState:
    """Everything a controller knows: configuration, namespaces, registers, queues, the
    shadow doorbell buffer, health counters, the error log, features and pending events."""

    config: ControllerConfig
    #: Active namespaces: allocated and attached to this controller (what I/O may address).
    namespaces: dict[int, "Namespace"]
    #: Every allocated namespace of the subsystem, attached or not (Namespace Management).
    allocated: dict[int, "Namespace"] = field(default_factory=dict)
    #: The allocated NSIDs Namespace Management created: they draw on ``config.nvm_capacity``.
    created: set[int] = field(default_factory=set)
    cap: int = 0
    vs: int = NVME_VERSION
    #: Guest memory while a host is attached.
    memory: GuestMemory | None = None
    #: PCI COMMAND.BME as the function last set it: while clear, no DMA (no fetch, no data,
    #: no CQE, no interrupt). A controller used on its own is one whose host enabled it.
    bus_master: bool = True
    cc: int = 0
    csts: int = 0
    intms: int = 0
    aqa: int = 0
    asq: int = 0
    acq: int = 0
    sqs: dict[int, "SubmissionQueue"] = field(default_factory=dict)
    cqs: dict[int, "CompletionQueue"] = field(default_factory=dict)
    page_size: int = 4096
    dbbuf: "DoorbellBuffer | None" = None
    health: HealthCounters = field(default_factory=HealthCounters)
    error_log: ErrorLog = field(init=False)
    features: FeatureState = field(init=False)
    events: AsyncEventState = field(default_factory=AsyncEventState)
    #: Media-error fault ranges and the LBA Status Generation Counter (nvme_emu.lba_status).
    lba_status: LbaStatusState = field(default_factory=LbaStatusState)
    #: Per-stage latency histograms per queue and doorbell path (nvme_emu.latency); kept
    #: across controller resets, like the health counters.
    latency: LatencyRecorder = field(default_factory=LatencyRecorder)
    #: Admin opcodes the composed controller dispatches (Commands Supported and Effects log;
    #: the I/O ones are their command set's, nvme_emu.command_set).
    admin_opcodes: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self.error_log = ErrorLog(self.config.error_log_entries)
        self.features = self.default_features()
        for nsid, ns in self.namespaces.items():
            self.allocated.setdefault(nsid, ns)

    @classmethod
    def of(cls, namespaces: Iterable["Namespace"], config: ControllerConfig | None = None) -> "ControllerState":
        """A state for these namespaces, keyed by NSID. Each NSID must be unique and within
        1..NN (Identify Controller NN = ``config.max_namespaces``): a host never looks above NN."""
        config = config or ControllerConfig()
        by_nsid: dict[int, "Namespace"] = {}
        for ns in namespaces:
            if not 0 < ns.nsid <= config.max_namespaces:
                raise ValueError(f"NSID {ns.nsid} is above the {config.max_namespaces} namespaces the controller reports (NN)")
            if ns.nsid in by_nsid:
                raise ValueError(f"NSID {ns.nsid} is given twice")
            by_nsid[ns.nsid] = ns
        return cls(config, by_nsid)

    def default_features(self) -> FeatureState:
        """Feature values after a reset (also what Get Features SEL=default reports)."""
        return FeatureState(write_cache=self.config.volatile_write_cache)

    @property
    def enabled(self) -> bool:
        return bool(self.cc & Cc.EN)

    @property
    def ready(self) -> bool:
        return bool(self.csts & Csts.RDY)

    @property
    def fatal(self) -> bool:
        return bool(self.csts & Csts.CFS)

    def record_error(self, sqid: int, cid: int, err: NvmeError, *, nsid: int = 0, lba: int = 0) -> None:
        """An Error Information entry for a failed command; media errors count in SMART."""
        self.error_log.add(sqid=sqid, cid=cid, status_field=err.status_for(acre=self.features.acre), nsid=nsid, lba=lba)
        if err.status in (Status.UNRECOVERED_READ_ERROR, Status.WRITE_FAULT):
            self.health.media_errors += 1

    def host_memory(self) -> GuestMemory:
        """Guest memory, or Data Transfer Error when no host is attached (a command that
        outlived its client's connection)."""
        if self.memory is None:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, "no host memory")
        return self.memory

    def transfer_faulted(self) -> NvmeError:
        """The error for a command during which the SIGBUS guard absorbed a fault
        (vfio_user.dma_guard: the caller compared its counter around the command): its copy
        may have gone to, or come from, a scratch page instead of the host's memory. The
        mappings hit are withdrawn for every later command. (The fault may have been another
        thread's: then this command fails needlessly, once, while a client is already breaking
        its memory.) One place for the admin and the NVM commands."""
        if self.memory is not None:
            self.memory.table.quarantine()
        return NvmeError(Status.DATA_TRANSFER_ERROR, "host memory faulted (SIGBUS) during the data transfer")

    def dma_check(self, iova: int, length: int) -> None:
        """Raise Data Transfer Error if guest memory does not hold [iova, iova+length)."""
        try:
            self.host_memory().view(iova, length)
        except DmaError:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, f"{iova:#x}+{length} not in guest memory") from None

    def active_namespace(self, nsid: int) -> "Namespace":
        """The namespace ``nsid`` names, or Invalid Namespace or Format."""
        ns = self.namespaces.get(nsid)
        if ns is None:
            raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid} is not active")
        return ns


@dataclass(frozen=True)
class ControllerHooks:
    """What a handler may cause outside the state; the controller binds its own methods.

    - ``complete(sqid, cid, status, dw0)``: post a CQE for a deferred command now and raise
      its CQ's interrupt; False when the queue is gone or full (the AER path).
    - ``begin_request(sq)`` / ``finish_request(sq, cid, status, dw0)``: a command goes in
      flight holding a CQ slot, and later completes with the next drain.
    - ``io_pool()``: the worker pool for blocking calls, None when there is no event loop
      (then the work runs in place).
    - ``queue_event(event, qid)``: a queue was created or deleted, or doorbells moved
      (a :class:`~nvme_emu.queue.QueueEvent`), for the doorbell paths and timers.
    - ``call_soon(fn)``: run after the current batch of commands.
    - ``async_event(type, info, log_page)``: post an asynchronous event.
    """

    complete: Callable[[int, int, int, int], bool]
    begin_request: Callable[["SubmissionQueue"], None]
    finish_request: Callable[..., None]
    io_pool: Callable[[], "IoPool | None"]
    queue_event: Callable[["QueueEvent", int], None]
    call_soon: Callable[[Callable[[], None]], None]
    async_event: Callable[[int, int, int], None]
