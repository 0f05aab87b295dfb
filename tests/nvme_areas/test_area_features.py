"""Get/Set Features (0Ah/09h) in-process: values, defaults, selectors, failures, events."""

from __future__ import annotations

from .area_helpers import BUF, Area, status_of

from nvme_emu import structures as st
from nvme_emu.features import get_features, io_queue_limit, reset, set_features
from nvme_emu.health import smart_log
from nvme_emu.queue import CompletionQueue
from nvme_emu.spec.commands import AdminOpcode, Status
from nvme_emu.spec.events import AsyncEventSmart, AsyncEventType
from nvme_emu.spec.features import FeatureId, FeatureSelect
from nvme_emu.spec.log_pages import CriticalWarning, LogPageId
from nvme_emu.state import ControllerConfig


def get(area: Area, fid: int, sel: int = FeatureSelect.CURRENT, cdw11: int = 0) -> int:
    return area.run(get_features, opc=AdminOpcode.GET_FEATURES, prp1=BUF, cdw10=fid | sel << 8, cdw11=cdw11)


def put(area: Area, fid: int, cdw11: int = 0, *, save: bool = False) -> int:
    return area.run(set_features, opc=AdminOpcode.SET_FEATURES, prp1=BUF, cdw10=fid | int(save) << 31, cdw11=cdw11)


def test_set_then_get_current_and_default(area: Area):
    put(area, FeatureId.ARBITRATION, 0x0302_0103)
    assert get(area, FeatureId.ARBITRATION) == 0x0302_0103
    assert get(area, FeatureId.ARBITRATION, FeatureSelect.DEFAULT) == 0
    assert get(area, FeatureId.ARBITRATION, FeatureSelect.SAVED) == 0
    assert get(area, FeatureId.ARBITRATION, FeatureSelect.SUPPORTED_CAPABILITIES) == 1 << 2  # changeable


def test_nothing_is_saveable(area: Area):
    assert status_of(lambda: put(area, FeatureId.ARBITRATION, 1, save=True)) == Status.FEATURE_ID_NOT_SAVEABLE


def test_unsupported_feature_and_bad_select(area: Area):
    assert status_of(lambda: get(area, FeatureId.LBA_RANGE_TYPE)) == Status.INVALID_FIELD
    assert status_of(lambda: put(area, FeatureId.HOST_MEMORY_BUFFER)) == Status.INVALID_FIELD
    assert status_of(lambda: get(area, FeatureId.ARBITRATION, 4)) == Status.INVALID_FIELD


def test_number_of_queues_capped_and_only_before_io_queues(area: Area):
    cap = area.state.config.max_io_queues
    dw0 = put(area, FeatureId.NUMBER_OF_QUEUES, (1000 - 1) << 16 | (2 - 1))
    assert dw0 == (cap - 1) << 16 | (2 - 1)
    assert io_queue_limit(area.state) == (2, cap)
    assert status_of(lambda: put(area, FeatureId.NUMBER_OF_QUEUES, 0xFFFF)) == Status.INVALID_FIELD
    area.state.cqs[1] = CompletionQueue(1, BUF, 2, vector=0, irq_enabled=False)
    assert status_of(lambda: put(area, FeatureId.NUMBER_OF_QUEUES, 0)) == Status.COMMAND_SEQUENCE_ERROR


def test_volatile_write_cache(area: Area):
    assert get(area, FeatureId.VOLATILE_WRITE_CACHE) == 1
    put(area, FeatureId.VOLATILE_WRITE_CACHE, 0)
    assert area.state.features.write_cache is False
    area.state.config = ControllerConfig(volatile_write_cache=False)
    assert status_of(lambda: put(area, FeatureId.VOLATILE_WRITE_CACHE, 1)) == Status.INVALID_FIELD


def test_temperature_threshold_selectors_and_event(area: Area):
    assert get(area, FeatureId.TEMPERATURE_THRESHOLD) & 0xFFFF == 343
    assert status_of(lambda: get(area, FeatureId.TEMPERATURE_THRESHOLD, cdw11=2 << 16)) == Status.INVALID_FIELD
    put(area, FeatureId.TEMPERATURE_THRESHOLD, 300)  # below the current temperature: no event yet
    assert area.record.named("async_event") == []
    area.state.features.async_event_config = CriticalWarning.TEMPERATURE
    put(area, FeatureId.TEMPERATURE_THRESHOLD, 301)
    assert area.record.named("async_event") == [(AsyncEventType.SMART_HEALTH, AsyncEventSmart.TEMPERATURE_THRESHOLD, LogPageId.SMART_HEALTH)]


def test_temperature_threshold_of_the_reported_sensor(area: Area):
    """SMART reports Temperature Sensor 1, so TMPSEL 1 works (Linux's hwmon temp2_max)."""
    smart = st.SmartLog.parse(smart_log(area.state))
    assert smart.temperature_sensors[0] != 0 and smart.temperature_sensors[1] == 0
    assert get(area, FeatureId.TEMPERATURE_THRESHOLD, cdw11=1 << 16) & 0xFFFF == 0xFFFF  # over: no limit
    assert get(area, FeatureId.TEMPERATURE_THRESHOLD, cdw11=1 << 16 | 1 << 20) & 0xFFFF == 0  # under
    put(area, FeatureId.TEMPERATURE_THRESHOLD, 1 << 16 | 350)
    assert get(area, FeatureId.TEMPERATURE_THRESHOLD, cdw11=1 << 16) == 1 << 16 | 350
    assert get(area, FeatureId.TEMPERATURE_THRESHOLD) & 0xFFFF == 343  # the composite's is its own
    put(area, FeatureId.TEMPERATURE_THRESHOLD, 1 << 16 | area.state.config.temperature_kelvin)  # sensor 1 over
    assert smart_log_warning(area) & CriticalWarning.TEMPERATURE
    put(area, FeatureId.TEMPERATURE_THRESHOLD, 0xF << 16 | 400)  # every sensor at once
    assert get(area, FeatureId.TEMPERATURE_THRESHOLD, cdw11=1 << 16) & 0xFFFF == 400
    assert get(area, FeatureId.TEMPERATURE_THRESHOLD) & 0xFFFF == 400
    assert not smart_log_warning(area) & CriticalWarning.TEMPERATURE


def smart_log_warning(area: Area) -> int:
    return st.SmartLog.parse(smart_log(area.state)).critical_warning


def test_interrupt_vector_configuration(area: Area):
    assert get(area, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cdw11=0) >> 16 == 1  # admin: CD set
    put(area, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, 1 << 16 | 3)
    assert get(area, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cdw11=3) == 1 << 16 | 3
    assert status_of(lambda: put(area, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, 0)) == Status.INVALID_FIELD
    vectors = area.state.config.msix_vectors
    assert status_of(lambda: get(area, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cdw11=vectors)) == Status.INVALID_FIELD


def test_power_management_only_state_zero(area: Area):
    assert status_of(lambda: put(area, FeatureId.POWER_MANAGEMENT, 1)) == Status.INVALID_FIELD
    assert put(area, FeatureId.POWER_MANAGEMENT, 0) == 0


def test_host_behavior_round_trips_through_host_buffer(area: Area):
    area.guest.write(BUF, b"\x01" + bytes(511))
    put(area, FeatureId.HOST_BEHAVIOR_SUPPORT)
    area.guest.write(BUF, bytes(512))
    get(area, FeatureId.HOST_BEHAVIOR_SUPPORT)
    assert area.guest.read(BUF, 2) == b"\x01\x00"


def read_timestamp(area: Area) -> tuple[int, int]:
    """(milliseconds, Timestamp Origin) as Get Features reports them."""
    get(area, FeatureId.TIMESTAMP)
    data = area.guest.read(BUF, 8)
    return int.from_bytes(data[:6], "little"), (data[6] >> 1) & 0b111


def test_timestamp_set_by_host_then_zeroed_by_controller_level_reset(area: Area):
    area.guest.write(BUF, (1_000_000).to_bytes(6, "little") + bytes(2))
    put(area, FeatureId.TIMESTAMP)
    value, origin = read_timestamp(area)
    assert 1_000_000 <= value < 1_000_000 + 5_000 and origin == 0b001  # set by Set Features
    reset(area.state)
    value, origin = read_timestamp(area)
    assert value < 5_000 and origin == 0b000  # initialized to 0 by the reset, counting again


def test_io_command_set_profile(area: Area):
    """CAP.CSS bit 6 is set, so Feature 19h exists: combination 0 (NVM) is all there is."""
    assert get(area, FeatureId.IO_COMMAND_SET_PROFILE) == 0
    assert put(area, FeatureId.IO_COMMAND_SET_PROFILE, 0) == 0
    for bad in (1, 0x1FF):
        assert status_of(lambda bad=bad: put(area, FeatureId.IO_COMMAND_SET_PROFILE, bad)) == Status.IO_COMMAND_SET_COMBINATION_REJECTED
    assert get(area, FeatureId.IO_COMMAND_SET_PROFILE) == 0


def test_keep_alive_timer_is_not_a_feature_as_kas_is_0(area: Area):
    assert status_of(lambda: put(area, FeatureId.KEEP_ALIVE_TIMER, 120_000)) == Status.INVALID_FIELD
    assert status_of(lambda: get(area, FeatureId.KEEP_ALIVE_TIMER)) == Status.INVALID_FIELD


def test_reset_restores_defaults(area: Area):
    put(area, FeatureId.INTERRUPT_COALESCING, 0x0A05)
    put(area, FeatureId.NUMBER_OF_QUEUES, 0)
    reset(area.state)
    assert get(area, FeatureId.INTERRUPT_COALESCING) == 0
    assert io_queue_limit(area.state) == (area.state.config.max_io_queues,) * 2
