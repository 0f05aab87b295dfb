"""Get / Set Features for every feature the controller supports, and the refusals."""

from __future__ import annotations

import os

import pytest

from ..support.host import Host
from ..support.server import wait_until
from nvme_emu.spec.commands import Status
from nvme_emu.spec.features import FeatureId as F


def get_ok(n: Host, fid: int, cdw11: int = 0, sel: int = 0, **kw) -> int:
    c = n.get_features(fid, cdw11, sel, **kw)
    assert c.status == Status.SUCCESS, (fid, sel, c.status)
    return c.dw0


def set_ok(n: Host, fid: int, cdw11: int = 0, **kw) -> int:
    c = n.set_features(fid, cdw11, **kw)
    assert c.status == Status.SUCCESS, (fid, c.status)
    return c.dw0


def test_arbitration(nvme: Host):
    assert get_ok(nvme, F.ARBITRATION) == 0
    value = 0x04030207  # HPW, MPW, LPW, AB
    set_ok(nvme, F.ARBITRATION, value)
    assert get_ok(nvme, F.ARBITRATION) == value


def test_power_management(nvme: Host):
    assert get_ok(nvme, F.POWER_MANAGEMENT) == 0
    set_ok(nvme, F.POWER_MANAGEMENT, 0)
    for ps in (1, 2, 31):
        assert nvme.set_features(F.POWER_MANAGEMENT, ps).status == Status.INVALID_FIELD
    assert get_ok(nvme, F.POWER_MANAGEMENT) == 0


OVER, UNDER = 0 << 20, 1 << 20


def test_temperature_threshold(nvme: Host):
    assert get_ok(nvme, F.TEMPERATURE_THRESHOLD, OVER) & 0xFFFF == 343
    assert get_ok(nvme, F.TEMPERATURE_THRESHOLD, UNDER) & 0xFFFF == 0
    set_ok(nvme, F.TEMPERATURE_THRESHOLD, OVER | 350)
    set_ok(nvme, F.TEMPERATURE_THRESHOLD, UNDER | 260)
    assert get_ok(nvme, F.TEMPERATURE_THRESHOLD, OVER) & 0xFFFF == 350
    assert get_ok(nvme, F.TEMPERATURE_THRESHOLD, UNDER) & 0xFFFF == 260
    # TMPSEL Fh (all sensors) is accepted too
    set_ok(nvme, F.TEMPERATURE_THRESHOLD, 0xF << 16 | OVER | 345)
    assert get_ok(nvme, F.TEMPERATURE_THRESHOLD, OVER) & 0xFFFF == 345


@pytest.mark.parametrize("cdw11", [2 << 16 | 300, 8 << 16 | 300, 2 << 20 | 300, 3 << 20 | 300])
def test_temperature_threshold_bad_selector(nvme: Host, cdw11: int):
    assert nvme.set_features(F.TEMPERATURE_THRESHOLD, cdw11).status == Status.INVALID_FIELD
    assert nvme.get_features(F.TEMPERATURE_THRESHOLD, cdw11).status == Status.INVALID_FIELD


def test_error_recovery(nvme: Host):
    set_ok(nvme, F.ERROR_RECOVERY, 100)  # TLER
    assert get_ok(nvme, F.ERROR_RECOVERY) == 100
    assert nvme.set_features(F.ERROR_RECOVERY, 1 << 16).status == Status.INVALID_FIELD  # DULBE
    assert get_ok(nvme, F.ERROR_RECOVERY) == 100


def test_volatile_write_cache(io: Host):
    assert get_ok(io, F.VOLATILE_WRITE_CACHE) == 1
    set_ok(io, F.VOLATILE_WRITE_CACHE, 0)
    assert get_ok(io, F.VOLATILE_WRITE_CACHE) == 0
    data = os.urandom(2048)
    io.write_ok(1, 3, 0, data)  # write-through now
    assert io.read_ok(1, 3, 0, 4) == data
    set_ok(io, F.VOLATILE_WRITE_CACHE, 1)
    assert get_ok(io, F.VOLATILE_WRITE_CACHE) == 1


def test_number_of_queues(nvme: Host):
    assert get_ok(nvme, F.NUMBER_OF_QUEUES) == (63 << 16 | 63)
    assert set_ok(nvme, F.NUMBER_OF_QUEUES, 3 << 16 | 7) == (3 << 16 | 7)
    assert get_ok(nvme, F.NUMBER_OF_QUEUES) == (3 << 16 | 7)
    # asking for more than we have: the answer is what we allocated
    assert set_ok(nvme, F.NUMBER_OF_QUEUES, 1000 << 16 | 1000) == (63 << 16 | 63)


@pytest.mark.parametrize("cdw11", [0xFFFF, 0xFFFF << 16, 0xFFFFFFFF])
def test_number_of_queues_65536_is_invalid(nvme: Host, cdw11: int):
    assert nvme.set_features(F.NUMBER_OF_QUEUES, cdw11).status == Status.INVALID_FIELD


def test_number_of_queues_after_queue_creation(io: Host):
    assert io.set_features(F.NUMBER_OF_QUEUES, 1 << 16 | 1).status == Status.COMMAND_SEQUENCE_ERROR
    assert get_ok(io, F.NUMBER_OF_QUEUES) == (3 << 16 | 3)


def test_interrupt_coalescing(nvme: Host):
    assert get_ok(nvme, F.INTERRUPT_COALESCING) == 0
    set_ok(nvme, F.INTERRUPT_COALESCING, 0x0A07)
    assert get_ok(nvme, F.INTERRUPT_COALESCING) == 0x0A07
    set_ok(nvme, F.INTERRUPT_COALESCING, 0)


def test_interrupt_vector_configuration(nvme: Host):
    assert get_ok(nvme, F.INTERRUPT_VECTOR_CONFIGURATION, 0) == (1 << 16 | 0)  # admin: CD
    assert get_ok(nvme, F.INTERRUPT_VECTOR_CONFIGURATION, 3) == 3
    set_ok(nvme, F.INTERRUPT_VECTOR_CONFIGURATION, 1 << 16 | 3)
    assert get_ok(nvme, F.INTERRUPT_VECTOR_CONFIGURATION, 3) == (1 << 16 | 3)
    set_ok(nvme, F.INTERRUPT_VECTOR_CONFIGURATION, 3)
    assert get_ok(nvme, F.INTERRUPT_VECTOR_CONFIGURATION, 3) == 3
    for bad in (65, 0xFFFF):
        assert nvme.set_features(F.INTERRUPT_VECTOR_CONFIGURATION, 1 << 16 | bad).status == Status.INVALID_FIELD
        assert nvme.get_features(F.INTERRUPT_VECTOR_CONFIGURATION, bad).status == Status.INVALID_FIELD
    # coalescing cannot be enabled on the admin vector
    assert nvme.set_features(F.INTERRUPT_VECTOR_CONFIGURATION, 0).status == Status.INVALID_FIELD


def test_async_event_configuration(nvme: Host):
    assert get_ok(nvme, F.ASYNC_EVENT_CONFIGURATION) == 0
    set_ok(nvme, F.ASYNC_EVENT_CONFIGURATION, 1 << 8 | 0x02)
    assert get_ok(nvme, F.ASYNC_EVENT_CONFIGURATION) == (1 << 8 | 0x02)


def test_write_atomicity(nvme: Host):
    set_ok(nvme, F.WRITE_ATOMICITY_NORMAL, 1)
    assert get_ok(nvme, F.WRITE_ATOMICITY_NORMAL) == 1


def test_timestamp(nvme: Host):
    buf = nvme.alloc(4096)

    def get_ts() -> tuple[int, int]:
        c = nvme.get_features(F.TIMESTAMP, prp1=buf)
        assert c.status == Status.SUCCESS
        raw = nvme.read_mem(buf, 8)
        return int.from_bytes(raw[:6], "little"), raw[6]

    start = 1_700_000_000_000  # ms since the epoch
    nvme.write_mem(buf, start.to_bytes(6, "little") + bytes(2))
    set_ok(nvme, F.TIMESTAMP, prp1=buf)
    first, attrs = get_ts()
    assert first >= start
    assert (attrs >> 1) & 0b111 == 1  # origin: set by Set Features
    # the controller's clock runs on from the value set: wait (bounded) until it moved
    wait_until(lambda: get_ts()[0] > first, "the timestamp to advance")


def test_host_behavior_support_round_trips(nvme: Host):
    buf = nvme.alloc(4096)
    data = bytes([1, 0, 1]) + os.urandom(509)
    nvme.write_mem(buf, data)
    set_ok(nvme, F.HOST_BEHAVIOR_SUPPORT, prp1=buf)
    out = nvme.alloc(4096)
    nvme.write_mem(out, b"\xff" * 4096)
    assert nvme.get_features(F.HOST_BEHAVIOR_SUPPORT, prp1=out).status == Status.SUCCESS
    assert nvme.read_mem(out, 512) == data
    assert nvme.read_mem(out + 512, 16) == b"\xff" * 16  # only 512 bytes transferred


DEFAULT, SAVED, CAPS = 1, 2, 3


def test_select_default_saved_and_capabilities(nvme: Host):
    set_ok(nvme, F.ARBITRATION, 0x01020303)
    assert get_ok(nvme, F.ARBITRATION) == 0x01020303
    assert get_ok(nvme, F.ARBITRATION, sel=DEFAULT) == 0
    assert get_ok(nvme, F.ARBITRATION, sel=SAVED) == 0  # nothing is saveable: saved = default
    assert get_ok(nvme, F.TEMPERATURE_THRESHOLD, OVER, sel=DEFAULT) & 0xFFFF == 343
    assert get_ok(nvme, F.VOLATILE_WRITE_CACHE, sel=DEFAULT) == 1
    for fid in (F.ARBITRATION, F.VOLATILE_WRITE_CACHE, F.NUMBER_OF_QUEUES, F.TIMESTAMP):
        caps = get_ok(nvme, fid, sel=CAPS)
        assert caps & 0b100  # changeable
        assert not caps & 0b011  # not saveable, not namespace specific
    for bad_sel in (4, 7):
        assert nvme.get_features(F.ARBITRATION, sel=bad_sel).status == Status.INVALID_FIELD


@pytest.mark.parametrize("fid", [F.ARBITRATION, F.VOLATILE_WRITE_CACHE, F.ASYNC_EVENT_CONFIGURATION])
def test_save_is_not_supported(nvme: Host, fid: int):
    assert nvme.set_features(fid, 0, save=True).status == Status.FEATURE_ID_NOT_SAVEABLE


@pytest.mark.parametrize(
    "fid", [0x00, F.LBA_RANGE_TYPE, F.KEEP_ALIVE_TIMER, F.AUTONOMOUS_POWER_STATE_TRANSITION, F.HOST_MEMORY_BUFFER, F.HOST_IDENTIFIER, 0x7F, 0xC0, 0xFF]
)
def test_unknown_feature(nvme: Host, fid: int):
    assert nvme.get_features(fid).status == Status.INVALID_FIELD
    assert nvme.set_features(fid, 0).status == Status.INVALID_FIELD
