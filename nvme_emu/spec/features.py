"""Get Features and Set Features (Base 2.0, "Feature Values"): feature identifiers, the select
field, and the fields of the features whose values are more than a number.
"""

from __future__ import annotations

from enum import IntEnum


class FeatureId(IntEnum):
    """Feature Identifiers (Base 2.0, Figure "Feature Identifiers")."""

    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    LBA_RANGE_TYPE = 0x03
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIGURATION = 0x09
    WRITE_ATOMICITY_NORMAL = 0x0A
    ASYNC_EVENT_CONFIGURATION = 0x0B
    AUTONOMOUS_POWER_STATE_TRANSITION = 0x0C
    HOST_MEMORY_BUFFER = 0x0D
    TIMESTAMP = 0x0E
    KEEP_ALIVE_TIMER = 0x0F
    HOST_CONTROLLED_THERMAL_MANAGEMENT = 0x10
    NON_OPERATIONAL_POWER_STATE_CONFIG = 0x11
    READ_RECOVERY_LEVEL_CONFIG = 0x12
    PREDICTABLE_LATENCY_MODE_CONFIG = 0x13
    PREDICTABLE_LATENCY_MODE_WINDOW = 0x14
    LBA_STATUS_INFORMATION_ATTRIBUTES = 0x15
    HOST_BEHAVIOR_SUPPORT = 0x16
    SANITIZE_CONFIG = 0x17
    ENDURANCE_GROUP_EVENT_CONFIGURATION = 0x18
    IO_COMMAND_SET_PROFILE = 0x19
    SPINUP_CONTROL = 0x1A
    ENHANCED_CONTROLLER_METADATA = 0x7D
    CONTROLLER_METADATA = 0x7E
    NAMESPACE_METADATA = 0x7F
    SOFTWARE_PROGRESS_MARKER = 0x80
    HOST_IDENTIFIER = 0x81
    RESERVATION_NOTIFICATION_MASK = 0x82
    RESERVATION_PERSISTENCE = 0x83
    NAMESPACE_WRITE_PROTECTION_CONFIG = 0x84


class FeatureSelect(IntEnum):
    """Get Features SEL field (CDW10 bits 10:8)."""

    CURRENT = 0
    DEFAULT = 1
    SAVED = 2
    SUPPORTED_CAPABILITIES = 3


#: Temperature Threshold feature (FID 04h), THSEL: the over- and under-temperature threshold.
TEMP_OVER, TEMP_UNDER = 0, 1
#: Its TMPSEL: 0 is the Composite Temperature, 1..8 Temperature Sensor 1..8, Fh every one of them.
TEMP_COMPOSITE, TEMP_ALL_SENSORS = 0, 0xF
#: Host Behavior Support feature (FID 16h): the size of its data structure.
HOST_BEHAVIOR_SIZE = 512
#: Its byte 0, Advanced Command Retry Enable (ACRE): 1 lets the controller ask for a delay
#: before a retry (the CQE's CRD, Identify Controller CRDT1-3). Linux sets it when CRDT1 != 0.
HOST_BEHAVIOR_ACRE_BYTE = 0
ACRE_ENABLED = 0x01
