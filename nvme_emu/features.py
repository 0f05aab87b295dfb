"""Get/Set Features: the controller's settable state, validated field by field.

None of our features is saveable (CAP of every feature: changeable only), so SAVED reads
return the default and Set Features with SV fails with "Feature Identifier Not Saveable".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .spec import FeatureId, FeatureSelect, NvmeError, Status
from .timer import FineTimer

if TYPE_CHECKING:
    from .controller import Controller
    from .queue import CompletionQueue

#: Get Features with SEL=3: bit 2 "changeable" (not saveable, not namespace specific).
CAPABILITY_CHANGEABLE = 1 << 2
TEMP_OVER, TEMP_UNDER = 0, 1
HOST_BEHAVIOR_SIZE = 512
TIMESTAMP_SIZE = 8


@dataclass
class FeatureState:
    arbitration: int = 0
    power_state: int = 0
    temp_thresholds: dict[tuple[int, int], int] = field(default_factory=dict)
    error_recovery: int = 0
    write_cache: bool = True
    queues_requested: tuple[int, int] | None = None
    coalescing: int = 0  # THR 7:0, TIME 15:8 (100 us units)
    vector_config: dict[int, bool] = field(default_factory=dict)  # vector -> coalescing disabled
    write_atomicity: int = 0
    async_event_config: int = 0
    keep_alive: int = 0
    host_behavior: bytes = bytes(HOST_BEHAVIOR_SIZE)
    timestamp_base_ms: int = 0
    timestamp_set_at: float = 0.0
    timestamp_synced: bool = False


class Features:
    """Feature state of one controller and the Get/Set Features rules."""

    def __init__(self, ctrl: "Controller") -> None:
        self.ctrl = ctrl
        self.state = FeatureState()
        self.reset()
        ctrl.queue_listeners.append(self._queue_event)

    def _queue_event(self, event: str, qid: int) -> None:
        """A deleted CQ takes its coalescing timer along (a new CQ may reuse the QID)."""
        if event == "delete-cq":
            timer = self._timers.pop(qid, None)
            if timer is not None:
                timer.cancel()

    def reset(self) -> None:
        for timer in getattr(self, "_timers", {}).values():
            timer.cancel()
        self._timers: dict[int, FineTimer] = {}
        kept_ts = (self.state.timestamp_base_ms, self.state.timestamp_set_at, self.state.timestamp_synced)
        self.state = FeatureState(write_cache=self.ctrl.config.volatile_write_cache)
        self.state.temp_thresholds = {(0, TEMP_OVER): 343, (0, TEMP_UNDER): 0}
        # The timestamp keeps counting across a controller reset (spec: "retained").
        self.state.timestamp_base_ms, self.state.timestamp_set_at, self.state.timestamp_synced = kept_ts

    # -- queues --------------------------------------------------------------------------

    @property
    def io_queue_limit(self) -> tuple[int, int]:
        """(SQs, CQs) the host may create: what it asked for, capped by what we have."""
        cap = self.ctrl.config.max_io_queues
        if self.state.queues_requested is None:
            return cap, cap
        nsq, ncq = self.state.queues_requested
        return min(nsq, cap), min(ncq, cap)

    # -- coalescing ----------------------------------------------------------------------

    def coalescing_allows(self, cq: "CompletionQueue") -> bool:
        """Whether an interrupt may go now; if not, a timer delivers it within TIME.

        THR is 0-based (THR + 1 completions), TIME is in 100 us units and 0 means no delay.
        """
        thr = self.state.coalescing & 0xFF
        tim = (self.state.coalescing >> 8) & 0xFF
        timers = self.ctrl.timers
        if tim == 0 or timers is None or self.state.vector_config.get(cq.vector, False) or cq.unsignalled >= thr + 1:
            timer = self._timers.pop(cq.qid, None)
            if timer is not None:
                timer.cancel()
            return True
        if cq.qid not in self._timers:
            def deliver() -> None:
                self._timers.pop(cq.qid, None)
                if self.ctrl.cqs.get(cq.qid) is cq:
                    self.ctrl.flush_coalesced(cq)

            self._timers[cq.qid] = timers.call_later(tim * 100e-6, deliver)
        return False

    # -- timestamp -----------------------------------------------------------------------

    def timestamp_ms(self) -> int:
        s = self.state
        if not s.timestamp_synced:
            return int((time.monotonic() - self.ctrl.health.started) * 1000)
        return s.timestamp_base_ms + int((time.monotonic() - s.timestamp_set_at) * 1000)

    # -- Get Features --------------------------------------------------------------------

    def get(self, fid: int, sel: int, cdw11: int) -> tuple[int, bytes | None]:
        """(DW0, data for the host buffer or None)."""
        if fid not in self.supported():
            raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
        if sel == FeatureSelect.SUPPORTED_CAPABILITIES:
            return CAPABILITY_CHANGEABLE, None
        if sel not in (FeatureSelect.CURRENT, FeatureSelect.DEFAULT, FeatureSelect.SAVED):
            raise NvmeError(Status.INVALID_FIELD, f"bad SEL {sel}")
        state = self.state if sel == FeatureSelect.CURRENT else self._defaults()
        return self._value(state, FeatureId(fid), cdw11)

    def _defaults(self) -> FeatureState:
        d = FeatureState(write_cache=self.ctrl.config.volatile_write_cache)
        d.temp_thresholds = {(0, TEMP_OVER): 343, (0, TEMP_UNDER): 0}
        return d

    def _value(self, s: FeatureState, fid: FeatureId, cdw11: int) -> tuple[int, bytes | None]:
        if fid == FeatureId.ARBITRATION:
            return s.arbitration, None
        if fid == FeatureId.POWER_MANAGEMENT:
            return s.power_state, None
        if fid == FeatureId.TEMPERATURE_THRESHOLD:
            tmpsel, thsel = (cdw11 >> 16) & 0xF, (cdw11 >> 20) & 0x3
            self._check_temp_selector(tmpsel, thsel)
            return s.temp_thresholds.get((0, thsel), 0) | tmpsel << 16 | thsel << 20, None
        if fid == FeatureId.ERROR_RECOVERY:
            return s.error_recovery, None
        if fid == FeatureId.VOLATILE_WRITE_CACHE:
            return int(s.write_cache), None
        if fid == FeatureId.NUMBER_OF_QUEUES:
            nsq, ncq = self.io_queue_limit if s is self.state else (self.ctrl.config.max_io_queues,) * 2
            return (ncq - 1) << 16 | (nsq - 1), None
        if fid == FeatureId.INTERRUPT_COALESCING:
            return s.coalescing, None
        if fid == FeatureId.INTERRUPT_VECTOR_CONFIGURATION:
            iv = cdw11 & 0xFFFF
            self._check_vector(iv)
            return iv | (int(s.vector_config.get(iv, iv == 0)) << 16), None
        if fid == FeatureId.WRITE_ATOMICITY_NORMAL:
            return s.write_atomicity, None
        if fid == FeatureId.ASYNC_EVENT_CONFIGURATION:
            return s.async_event_config, None
        if fid == FeatureId.KEEP_ALIVE_TIMER:
            return s.keep_alive, None
        if fid == FeatureId.HOST_BEHAVIOR_SUPPORT:
            return 0, s.host_behavior
        if fid == FeatureId.TIMESTAMP:
            attrs = (1 if self.state.timestamp_synced else 0) << 1  # origin: set by host
            return 0, self.timestamp_ms().to_bytes(6, "little") + bytes([attrs, 0])
        raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")

    # -- Set Features --------------------------------------------------------------------

    def set(self, fid: int, save: bool, cdw11: int, data: bytes | None) -> int:
        """Apply a Set Features; returns DW0 of the completion."""
        if fid not in self.supported():
            raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
        if save:
            raise NvmeError(Status.FEATURE_ID_NOT_SAVEABLE, "no feature is saveable")
        s = self.state
        fid = FeatureId(fid)
        if fid == FeatureId.ARBITRATION:
            s.arbitration = cdw11
        elif fid == FeatureId.POWER_MANAGEMENT:
            if cdw11 & 0x1F != 0:  # NPSS = 0: only power state 0 exists
                raise NvmeError(Status.INVALID_FIELD, "only power state 0 exists")
            s.power_state = cdw11 & 0xFF
        elif fid == FeatureId.TEMPERATURE_THRESHOLD:
            tmpsel, thsel = (cdw11 >> 16) & 0xF, (cdw11 >> 20) & 0x3
            self._check_temp_selector(tmpsel, thsel)
            s.temp_thresholds[(0, thsel)] = cdw11 & 0xFFFF
            self.ctrl.admin.check_temperature()
        elif fid == FeatureId.ERROR_RECOVERY:
            if cdw11 & (1 << 16):  # DULBE needs NSFEAT bit 2, which we do not set
                raise NvmeError(Status.INVALID_FIELD, "DULBE not supported")
            s.error_recovery = cdw11 & 0xFFFF
        elif fid == FeatureId.VOLATILE_WRITE_CACHE:
            if not self.ctrl.config.volatile_write_cache:
                raise NvmeError(Status.INVALID_FIELD, "no volatile write cache")
            s.write_cache = bool(cdw11 & 1)
        elif fid == FeatureId.NUMBER_OF_QUEUES:
            return self._set_queues(cdw11)
        elif fid == FeatureId.INTERRUPT_COALESCING:
            s.coalescing = cdw11 & 0xFFFF
        elif fid == FeatureId.INTERRUPT_VECTOR_CONFIGURATION:
            iv = cdw11 & 0xFFFF
            self._check_vector(iv)
            if iv == 0 and not cdw11 & (1 << 16):
                raise NvmeError(Status.INVALID_FIELD, "coalescing cannot be enabled on the admin vector")
            s.vector_config[iv] = bool(cdw11 & (1 << 16))
        elif fid == FeatureId.WRITE_ATOMICITY_NORMAL:
            s.write_atomicity = cdw11 & 1
        elif fid == FeatureId.ASYNC_EVENT_CONFIGURATION:
            s.async_event_config = cdw11
        elif fid == FeatureId.KEEP_ALIVE_TIMER:
            s.keep_alive = cdw11
        elif fid == FeatureId.HOST_BEHAVIOR_SUPPORT:
            assert data is not None
            s.host_behavior = bytes(data[:HOST_BEHAVIOR_SIZE]).ljust(HOST_BEHAVIOR_SIZE, b"\0")
        elif fid == FeatureId.TIMESTAMP:
            assert data is not None
            s.timestamp_base_ms = int.from_bytes(data[:6], "little")
            s.timestamp_set_at = time.monotonic()
            s.timestamp_synced = True
        return 0

    def _set_queues(self, cdw11: int) -> int:
        nsqr, ncqr = cdw11 & 0xFFFF, cdw11 >> 16
        if nsqr == 0xFFFF or ncqr == 0xFFFF:
            raise NvmeError(Status.INVALID_FIELD, "65536 queues requested")
        if len(self.ctrl.sqs) > 1 or len(self.ctrl.cqs) > 1:
            raise NvmeError(Status.COMMAND_SEQUENCE_ERROR, "Number of Queues after I/O queues exist")
        self.state.queues_requested = (nsqr + 1, ncqr + 1)
        nsq, ncq = self.io_queue_limit
        return (ncq - 1) << 16 | (nsq - 1)

    def _check_vector(self, iv: int) -> None:
        if iv >= self.ctrl.config.msix_vectors:
            raise NvmeError(Status.INVALID_FIELD, f"interrupt vector {iv} does not exist")

    @staticmethod
    def _check_temp_selector(tmpsel: int, thsel: int) -> None:
        if tmpsel not in (0, 0xF) or thsel not in (TEMP_OVER, TEMP_UNDER):
            raise NvmeError(Status.INVALID_FIELD, f"temperature sensor {tmpsel} / threshold type {thsel}")

    def supported(self) -> set[int]:
        return {
            FeatureId.ARBITRATION,
            FeatureId.POWER_MANAGEMENT,
            FeatureId.TEMPERATURE_THRESHOLD,
            FeatureId.ERROR_RECOVERY,
            FeatureId.VOLATILE_WRITE_CACHE,
            FeatureId.NUMBER_OF_QUEUES,
            FeatureId.INTERRUPT_COALESCING,
            FeatureId.INTERRUPT_VECTOR_CONFIGURATION,
            FeatureId.WRITE_ATOMICITY_NORMAL,
            FeatureId.ASYNC_EVENT_CONFIGURATION,
            FeatureId.TIMESTAMP,
            FeatureId.KEEP_ALIVE_TIMER,
            FeatureId.HOST_BEHAVIOR_SUPPORT,
        }

    def data_length(self, fid: int) -> int:
        """Bytes of host buffer a feature transfers (0 for DW0-only features)."""
        if fid == FeatureId.TIMESTAMP:
            return TIMESTAMP_SIZE
        if fid == FeatureId.HOST_BEHAVIOR_SUPPORT:
            return HOST_BEHAVIOR_SIZE
        return 0
