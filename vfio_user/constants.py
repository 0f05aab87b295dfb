"""Numbers of the vfio-user protocol and of the VFIO ABI it reuses.

This module is the single source of truth for every protocol constant; the message
definitions, the server, the client and the tests all import from here.
"""

from __future__ import annotations

import enum

HEADER_SIZE = 16

#: The protocol version we speak (major, minor). QEMU 11.1 rejects anything but 0.0.
VERSION_MAJOR = 0
VERSION_MINOR = 0


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgType(enum.IntEnum):
    REQUEST = 0
    REPLY = 1


#: Header flag bits (the low nibble is the message type).
FLAG_TYPE_MASK = 0xF
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

# DMA_MAP / DMA_UNMAP flags.
DMA_FLAG_READ = 0x1
DMA_FLAG_WRITE = 0x2
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 0x1
DMA_UNMAP_FLAG_ALL = 0x2

# DEVICE_GET_INFO flags.
DEVICE_FLAG_RESET = 0x1
DEVICE_FLAG_PCI = 0x2

# GET_REGION_INFO flags and capability ids.
REGION_FLAG_READ = 0x1
REGION_FLAG_WRITE = 0x2
REGION_FLAG_MMAP = 0x4
REGION_FLAG_CAPS = 0x8
REGION_INFO_BASE_SIZE = 32
CAP_SPARSE_MMAP = 1
CAP_TYPE = 2
CAP_MSIX_MAPPABLE = 3


class RegionIndex(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


#: Regions a PCI device reports (BAR0-5, ROM, CONFIG, VGA); QEMU needs at least 8.
PCI_NUM_REGIONS = 9


class IrqIndex(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5

# GET_IRQ_INFO flags.
IRQ_INFO_EVENTFD = 0x1
IRQ_INFO_MASKABLE = 0x2
IRQ_INFO_AUTOMASKED = 0x4
IRQ_INFO_NORESIZE = 0x8

# SET_IRQS flags.
IRQ_DATA_NONE = 0x1
IRQ_DATA_BOOL = 0x2
IRQ_DATA_EVENTFD = 0x4
IRQ_ACTION_MASK = 0x8
IRQ_ACTION_UNMASK = 0x10
IRQ_ACTION_TRIGGER = 0x20
IRQ_DATA_TYPE_MASK = IRQ_DATA_NONE | IRQ_DATA_BOOL | IRQ_DATA_EVENTFD
IRQ_ACTION_TYPE_MASK = IRQ_ACTION_MASK | IRQ_ACTION_UNMASK | IRQ_ACTION_TRIGGER

# GET_REGION_IO_FDS sub-region record types (libvfio-user's 48-byte records).
IO_FD_TYPE_IOEVENTFD = 0
IO_FD_TYPE_IOREGIONFD = 1
IO_FD_TYPE_IOEVENTFD_SHADOW = 2
IO_FD_RECORD_SIZE = 48
IO_FDS_HEADER_SIZE = 16
#: KVM ioeventfd flags carried in the records.
IOEVENTFD_FLAG_DATAMATCH = 0x1
IOEVENTFD_FLAG_PIO = 0x2

#: Sizes of the fixed parts of messages, as QEMU's receive buffers expect them.
REGION_ACCESS_PREFIX = 16  # offset u64, region u32, count u32
DMA_ACCESS_PREFIX = 16  # address u64, count u64 (64-bit count in QEMU 11.1.3)
WRITE_MULTI_MAX = 200
WRITE_MULTI_ENTRY_SIZE = 24
WRITE_MULTI_MAX_DATA = 8

# Limits the server declares in VERSION and enforces.
DEFAULT_MAX_MSG_FDS = 8
MAX_MAX_MSG_FDS = 16
DEFAULT_MAX_DATA_XFER = 1 << 20
MAX_MAX_DATA_XFER = 64 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZE = 4096
#: Slack above max_data_xfer_size for message headers and fixed payload parts.
MESSAGE_OVERHEAD = 64
