"""SMART / Health: the SMART log's content from the live counters, its Critical Warning, and
the temperature event a threshold change may raise.

Two spec areas read it: Get Log Page (02h) serves the SMART / Health page
(:mod:`nvme_emu.log_page`), and Set Features (09h) changes the temperature thresholds it is
measured against (:mod:`nvme_emu.features`); both import this module, neither the other.
"""

from __future__ import annotations

import time

from . import structures as st
from .spec.events import AsyncEventSmart, AsyncEventType
from .spec.features import TEMP_OVER, TEMP_UNDER
from .spec.log_pages import CriticalWarning, LogPageId
from .state import TEMPERATURE_SENSORS, ControllerHooks, ControllerState


def io_totals(state: ControllerState) -> dict[str, int]:
    """Bytes and commands read and written, over every namespace."""
    out = {"bytes_read": 0, "bytes_written": 0, "read_commands": 0, "write_commands": 0}
    for ns in state.namespaces.values():
        for key in out:
            out[key] += getattr(ns.stats, key)
    return out


def smart_log(state: ControllerState) -> bytes:
    """SMART / Health Information from the live counters."""
    h = state.health
    totals = io_totals(state)
    temp = state.config.temperature_kelvin
    return st.build_smart_log(
        critical_warning=critical_warning(state),
        composite_temperature=temp,
        data_units_read=st.smart_data_units(totals["bytes_read"]),
        data_units_written=st.smart_data_units(totals["bytes_written"]),
        host_read_commands=totals["read_commands"],
        host_write_commands=totals["write_commands"],
        controller_busy_time=int(h.busy_seconds // 60),
        power_cycles=h.power_cycles,
        power_on_hours=int((time.monotonic() - h.started) // 3600),
        unsafe_shutdowns=h.unsafe_shutdowns,
        media_errors=h.media_errors,
        num_error_log_entries=state.error_log.count,
        temperature_sensors=[temp] * TEMPERATURE_SENSORS,
    )


def critical_warning(state: ControllerState) -> int:
    """SMART Critical Warning: temperature outside the thresholds. A namespace the user
    made read-only is write protected (NSATTR), not media that failed into read-only mode:
    bit 3 stays clear."""
    temp = state.config.temperature_kelvin
    thresholds = state.features.temp_thresholds
    warning = 0
    for sensor in range(TEMPERATURE_SENSORS + 1):  # the composite, then each sensor (same reading)
        if temp >= thresholds[(sensor, TEMP_OVER)] or temp < thresholds[(sensor, TEMP_UNDER)]:
            warning |= CriticalWarning.TEMPERATURE
    return warning


def check_temperature(state: ControllerState, hooks: ControllerHooks) -> None:
    """A threshold change may put the temperature out of range: a SMART event."""
    if critical_warning(state) & CriticalWarning.TEMPERATURE and state.features.async_event_config & CriticalWarning.TEMPERATURE:
        hooks.async_event(AsyncEventType.SMART_HEALTH, AsyncEventSmart.TEMPERATURE_THRESHOLD, LogPageId.SMART_HEALTH)
