"""Get Features (0Ah) and Set Features (09h): the controller's settable state, validated
field by field.

Keep Alive is not supported (Identify Controller KAS = 0; Linux uses it only over fabrics):
the Keep Alive command (18h) is an invalid opcode and the Keep Alive Timer feature (0Fh) an
unsupported feature (Invalid Field), as the spec has it for a controller without KAS.

None of our features is saveable (CAP of every feature: changeable only), so SAVED reads
return the default and Set Features with SV fails with "Feature Identifier Not Saveable".
The values live in :attr:`ControllerState.features`; interrupt coalescing acts on them in
:mod:`nvme_emu.coalescing`.
"""

from __future__ import annotations

import time

from .health import check_temperature
from .command_set import IO_COMMAND_SET_COMBINATIONS
from .queue import SubmissionQueue
from .spec.commands import NvmeError, Status
from .spec.features import HOST_BEHAVIOR_SIZE, TEMP_ALL_SENSORS, TEMP_COMPOSITE, TEMP_OVER, TEMP_UNDER, FeatureId, FeatureSelect
from .sqe import CDW10, CDW11
from .state import (
    TEMPERATURE_SENSORS,
    ControllerHooks,
    ControllerState,
    FeatureState,
)
from .transfer import from_host, to_host

#: Get Features with SEL=3: bit 2 "changeable" (not saveable, not namespace specific).
CAPABILITY_CHANGEABLE = 1 << 2
TIMESTAMP_SIZE = 8
#: Timestamp Origin (attribute bits 3:1): zeroed by a Controller Level Reset, or set by a host.
TIMESTAMP_ORIGIN_RESET, TIMESTAMP_ORIGIN_SET = 0b000, 0b001

SUPPORTED = frozenset(
    {
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
        FeatureId.HOST_BEHAVIOR_SUPPORT,
        FeatureId.IO_COMMAND_SET_PROFILE,
    }
)


# -- commands ------------------------------------------------------------------------------


def get_features(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """DW0 of the feature; features with a data structure also fill the host buffer."""
    fid, sel = e[CDW10] & 0xFF, (e[CDW10] >> 8) & 0x7
    dw0, data = get(state, fid, sel, e[CDW11])
    if data is not None:
        to_host(state, e, data)
    return dw0


def set_features(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """Apply the feature CDW11 (and the host buffer, for those with data) describe."""
    fid, save = e[CDW10] & 0xFF, bool(e[CDW10] >> 31)
    length = data_length(fid)
    data = from_host(state, e, length) if length else None
    return set_feature(state, hooks, fid, save, e[CDW11], data)


# -- state ---------------------------------------------------------------------------------


def reset(state: ControllerState) -> None:
    """Controller Level Reset: every feature to its default; the Timestamp restarts at 0
    with Timestamp Origin 000b ("initialized to 0h by a Controller Level Reset")."""
    state.features = state.default_features()


def io_queue_limit(state: ControllerState) -> tuple[int, int]:
    """(SQs, CQs) the host may create: what it asked for, capped by what we have."""
    cap = state.config.max_io_queues
    if state.features.queues_requested is None:
        return cap, cap
    nsq, ncq = state.features.queues_requested
    return min(nsq, cap), min(ncq, cap)


def timestamp_ms(state: ControllerState) -> int:
    """The value the host set plus the time since, or the time since the last Controller
    Level Reset if it did not set one after it."""
    s = state.features
    return s.timestamp_base_ms + int((time.monotonic() - s.timestamp_set_at) * 1000)


def data_length(fid: int) -> int:
    """Bytes of host buffer a feature transfers (0 for DW0-only features)."""
    if fid == FeatureId.TIMESTAMP:
        return TIMESTAMP_SIZE
    if fid == FeatureId.HOST_BEHAVIOR_SUPPORT:
        return HOST_BEHAVIOR_SIZE
    return 0


# -- Get Features --------------------------------------------------------------------------


def get(state: ControllerState, fid: int, sel: int, cdw11: int) -> tuple[int, bytes | None]:
    """(DW0, data for the host buffer or None)."""
    if fid not in SUPPORTED:
        raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
    if sel == FeatureSelect.SUPPORTED_CAPABILITIES:
        return CAPABILITY_CHANGEABLE, None
    if sel not in (FeatureSelect.CURRENT, FeatureSelect.DEFAULT, FeatureSelect.SAVED):
        raise NvmeError(Status.INVALID_FIELD, f"bad SEL {sel}")
    current = sel == FeatureSelect.CURRENT
    return _value(state, state.features if current else state.default_features(), FeatureId(fid), cdw11, current)


def _value(state: ControllerState, s: FeatureState, fid: FeatureId, cdw11: int, current: bool) -> tuple[int, bytes | None]:
    if fid == FeatureId.TEMPERATURE_THRESHOLD:
        tmpsel, thsel = _temp_selector(cdw11)
        sensor = TEMP_COMPOSITE if tmpsel == TEMP_ALL_SENSORS else tmpsel
        return s.temp_thresholds[(sensor, thsel)] | tmpsel << 16 | thsel << 20, None
    if fid == FeatureId.NUMBER_OF_QUEUES:
        nsq, ncq = io_queue_limit(state) if current else (state.config.max_io_queues,) * 2
        return (ncq - 1) << 16 | (nsq - 1), None
    if fid == FeatureId.INTERRUPT_VECTOR_CONFIGURATION:
        iv = cdw11 & 0xFFFF
        _check_vector(state, iv)
        return iv | (int(s.vector_config.get(iv, iv == 0)) << 16), None
    if fid == FeatureId.HOST_BEHAVIOR_SUPPORT:
        return 0, s.host_behavior
    if fid == FeatureId.TIMESTAMP:
        attrs = (TIMESTAMP_ORIGIN_SET if state.features.timestamp_synced else TIMESTAMP_ORIGIN_RESET) << 1
        return 0, timestamp_ms(state).to_bytes(6, "little") + bytes([attrs, 0])
    return _DW0_FIELDS[fid](s), None


#: Features whose DW0 is one stored field.
_DW0_FIELDS = {
    FeatureId.ARBITRATION: lambda s: s.arbitration,
    FeatureId.POWER_MANAGEMENT: lambda s: s.power_state,
    FeatureId.ERROR_RECOVERY: lambda s: s.error_recovery,
    FeatureId.VOLATILE_WRITE_CACHE: lambda s: int(s.write_cache),
    FeatureId.INTERRUPT_COALESCING: lambda s: s.coalescing,
    FeatureId.WRITE_ATOMICITY_NORMAL: lambda s: s.write_atomicity,
    FeatureId.ASYNC_EVENT_CONFIGURATION: lambda s: s.async_event_config,
    FeatureId.IO_COMMAND_SET_PROFILE: lambda s: s.io_command_set_index,
}


# -- Set Features --------------------------------------------------------------------------


def set_feature(state: ControllerState, hooks: ControllerHooks, fid: int, save: bool, cdw11: int, data: bytes | None) -> int:
    """Apply a Set Features; returns DW0 of the completion."""
    if fid not in SUPPORTED:
        raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
    if save:
        raise NvmeError(Status.FEATURE_ID_NOT_SAVEABLE, "no feature is saveable")
    s = state.features
    fid = FeatureId(fid)
    if fid == FeatureId.ARBITRATION:
        s.arbitration = cdw11
    elif fid == FeatureId.POWER_MANAGEMENT:
        if cdw11 & 0x1F != 0:  # NPSS = 0: only power state 0 exists
            raise NvmeError(Status.INVALID_FIELD, "only power state 0 exists")
        s.power_state = cdw11 & 0xFF
    elif fid == FeatureId.TEMPERATURE_THRESHOLD:
        tmpsel, thsel = _temp_selector(cdw11)
        sensors = range(TEMPERATURE_SENSORS + 1) if tmpsel == TEMP_ALL_SENSORS else (tmpsel,)
        for sensor in sensors:
            s.temp_thresholds[(sensor, thsel)] = cdw11 & 0xFFFF
        check_temperature(state, hooks)
    elif fid == FeatureId.ERROR_RECOVERY:
        if cdw11 & (1 << 16):  # DULBE needs NSFEAT bit 2, which we do not set
            raise NvmeError(Status.INVALID_FIELD, "DULBE not supported")
        s.error_recovery = cdw11 & 0xFFFF
    elif fid == FeatureId.VOLATILE_WRITE_CACHE:
        if not state.config.volatile_write_cache:
            raise NvmeError(Status.INVALID_FIELD, "no volatile write cache")
        s.write_cache = bool(cdw11 & 1)
    elif fid == FeatureId.NUMBER_OF_QUEUES:
        return _set_queues(state, cdw11)
    elif fid == FeatureId.INTERRUPT_COALESCING:
        s.coalescing = cdw11 & 0xFFFF
    elif fid == FeatureId.INTERRUPT_VECTOR_CONFIGURATION:
        iv = cdw11 & 0xFFFF
        _check_vector(state, iv)
        if iv == 0 and not cdw11 & (1 << 16):
            raise NvmeError(Status.INVALID_FIELD, "coalescing cannot be enabled on the admin vector")
        s.vector_config[iv] = bool(cdw11 & (1 << 16))
    elif fid == FeatureId.WRITE_ATOMICITY_NORMAL:
        s.write_atomicity = cdw11 & 1
    elif fid == FeatureId.ASYNC_EVENT_CONFIGURATION:
        s.async_event_config = cdw11
    elif fid == FeatureId.IO_COMMAND_SET_PROFILE:
        s.io_command_set_index = _io_command_set_index(cdw11)
    elif fid == FeatureId.HOST_BEHAVIOR_SUPPORT:
        assert data is not None
        s.host_behavior = bytes(data[:HOST_BEHAVIOR_SIZE]).ljust(HOST_BEHAVIOR_SIZE, b"\0")
    elif fid == FeatureId.TIMESTAMP:
        assert data is not None
        s.timestamp_base_ms = int.from_bytes(data[:6], "little")
        s.timestamp_set_at = time.monotonic()
        s.timestamp_synced = True
    return 0


def _set_queues(state: ControllerState, cdw11: int) -> int:
    nsqr, ncqr = cdw11 & 0xFFFF, cdw11 >> 16
    if nsqr == 0xFFFF or ncqr == 0xFFFF:
        raise NvmeError(Status.INVALID_FIELD, "65536 queues requested")
    if len(state.sqs) > 1 or len(state.cqs) > 1:
        raise NvmeError(Status.COMMAND_SEQUENCE_ERROR, "Number of Queues after I/O queues exist")
    state.features.queues_requested = (nsqr + 1, ncqr + 1)
    nsq, ncq = io_queue_limit(state)
    return (ncq - 1) << 16 | (nsq - 1)


def _io_command_set_index(cdw11: int) -> int:
    """IOCSCI (bits 8:0): an index into Identify CNS 1H's list of command set combinations;
    one that names no combination is rejected with the status the spec has for it."""
    index = cdw11 & 0x1FF
    if index >= len(IO_COMMAND_SET_COMBINATIONS) or not IO_COMMAND_SET_COMBINATIONS[index]:
        raise NvmeError(Status.IO_COMMAND_SET_COMBINATION_REJECTED, f"I/O command set combination {index}")
    return index


def _check_vector(state: ControllerState, iv: int) -> None:
    if iv >= state.config.msix_vectors:
        raise NvmeError(Status.INVALID_FIELD, f"interrupt vector {iv} does not exist")


def _temp_selector(cdw11: int) -> tuple[int, int]:
    """(TMPSEL, THSEL) of a Temperature Threshold command: the composite, a sensor the SMART
    log reports (Linux offers each as an hwmon tempN_max/min) or all of them."""
    tmpsel, thsel = (cdw11 >> 16) & 0xF, (cdw11 >> 20) & 0x3
    if not (tmpsel <= TEMPERATURE_SENSORS or tmpsel == TEMP_ALL_SENSORS) or thsel not in (TEMP_OVER, TEMP_UNDER):
        raise NvmeError(Status.INVALID_FIELD, f"temperature sensor {tmpsel} / threshold type {thsel}")
    return tmpsel, thsel
