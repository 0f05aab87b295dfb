"""Asynchronous events (Base 2.0, "Asynchronous Event Request command"): event types, the
information each type carries, the completion's DW0, and the Asynchronous Event
Configuration feature (FID 0Bh) that enables them.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class AsyncEventType(IntEnum):
    """Asynchronous Event Type, completion DW0 bits 2:0."""

    ERROR = 0
    SMART_HEALTH = 1
    NOTICE = 2
    IMMEDIATE = 3
    ONE_SHOT = 4
    IO_COMMAND_SET = 6
    VENDOR_SPECIFIC = 7


class AsyncEventError(IntEnum):
    """Asynchronous Event Information for type Error."""

    INVALID_DOORBELL_REGISTER = 0x00
    INVALID_DOORBELL_WRITE_VALUE = 0x01
    DIAGNOSTIC_FAILURE = 0x02
    PERSISTENT_INTERNAL_ERROR = 0x03
    TRANSIENT_INTERNAL_ERROR = 0x04
    FIRMWARE_IMAGE_LOAD_ERROR = 0x05


class AsyncEventSmart(IntEnum):
    """Asynchronous Event Information for type SMART / Health Status."""

    SUBSYSTEM_RELIABILITY = 0x00
    TEMPERATURE_THRESHOLD = 0x01
    SPARE_BELOW_THRESHOLD = 0x02


class AsyncEventNotice(IntEnum):
    """Asynchronous Event Information for type Notice."""

    NAMESPACE_ATTRIBUTE_CHANGED = 0x00
    FIRMWARE_ACTIVATION_STARTING = 0x01
    TELEMETRY_LOG_CHANGED = 0x02
    ASYMMETRIC_NAMESPACE_ACCESS_CHANGE = 0x03
    PREDICTABLE_LATENCY_EVENT_AGGREGATE_CHANGE = 0x04
    LBA_STATUS_INFORMATION_ALERT = 0x05
    ENDURANCE_GROUP_EVENT_AGGREGATE_CHANGE = 0x06
    NORMAL_SUBSYSTEM_SHUTDOWN = 0x07
    ZONE_DESCRIPTOR_CHANGED = 0xEF  # ZNS 1.1; its log page is the Changed Zone List (BFh)
    DISCOVERY_LOG_PAGE_CHANGE = 0xF0


class AsyncEventNvm(IntEnum):
    """Asynchronous Event Information for type I/O Command Set specific (NVM)."""

    RESERVATION_LOG_PAGE_AVAILABLE = 0x00
    SANITIZE_OPERATION_COMPLETED = 0x01
    SANITIZE_COMPLETED_WITH_UNEXPECTED_DEALLOCATION = 0x02


def async_event_dw0(event_type: int, info: int, log_page: int) -> int:
    """Completion DW0 of an Asynchronous Event Request: type 2:0, info 15:8, log page 23:16."""
    return (event_type & 0x7) | ((info & 0xFF) << 8) | ((log_page & 0xFF) << 16)


class AsyncEventConfig(IntFlag):
    """Asynchronous Event Configuration feature (FID 0Bh) bits."""

    SMART_CRITICAL_WARNINGS = 0xFF  # bits 7:0 mirror the SMART critical warning bits
    NAMESPACE_ATTRIBUTE = 1 << 8
    FIRMWARE_ACTIVATION = 1 << 9
    TELEMETRY_LOG = 1 << 10
    ASYMMETRIC_NAMESPACE_ACCESS = 1 << 11
    PREDICTABLE_LATENCY = 1 << 12
    LBA_STATUS = 1 << 13
    ENDURANCE_GROUP_EVENT = 1 << 14
    NORMAL_SUBSYSTEM_SHUTDOWN = 1 << 15
    ZONE_DESCRIPTOR_CHANGED = 1 << 27  # ZNS 1.1: Zone Descriptor Changed Notices
