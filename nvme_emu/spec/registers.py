"""The controller registers in BAR0 (Base 2.0, "Controller Registers"): offsets, the fields
of CAP, CC, CSTS and AQA, the doorbells' offsets, and the version VS reports.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


# ---------------------------------------------------------------------------------------------
# Version
# ---------------------------------------------------------------------------------------------

#: VS register / Identify Controller VER: major in 31:16, minor in 15:8, tertiary in 7:0.
NVME_VERSION = 0x0002_0000


def version(major: int, minor: int, tertiary: int = 0) -> int:
    """Encode a version the way VS and VER do."""
    return (major << 16) | (minor << 8) | tertiary


# ---------------------------------------------------------------------------------------------
# Registers and their fields
# ---------------------------------------------------------------------------------------------


class Reg(IntEnum):
    """Controller register offsets in BAR0 (Base 2.0, "Controller Registers")."""

    CAP = 0x00  # 8 bytes
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28  # 8 bytes
    ACQ = 0x30  # 8 bytes
    CMBLOC = 0x38
    CMBSZ = 0x3C
    BPINFO = 0x40
    BPRSEL = 0x44
    BPMBL = 0x48  # 8 bytes
    CMBMSC = 0x50  # 8 bytes
    CMBSTS = 0x58
    CMBEBS = 0x5C
    CMBSWTP = 0x60
    NSSD = 0x64
    CRTO = 0x68
    PMRCAP = 0xE00
    PMRCTL = 0xE04
    PMRSTS = 0xE08
    PMREBS = 0xE0C
    PMRSWTP = 0xE10
    PMRMSCL = 0xE14
    PMRMSCU = 0xE18
    DOORBELLS = 0x1000


REG_SIZES = {Reg.CAP: 8, Reg.ASQ: 8, Reg.ACQ: 8, Reg.BPMBL: 8, Reg.CMBMSC: 8}
NSSR_RESET_VALUE = 0x4E564D65  #: "NVMe": writing it to NSSR starts an NVM Subsystem Reset


def sq_tail_doorbell(qid: int, dstrd: int = 0) -> int:
    """BAR0 offset of SQ ``qid``'s Tail Doorbell for CAP.DSTRD ``dstrd``."""
    return Reg.DOORBELLS + (2 * qid) * (4 << dstrd)


def cq_head_doorbell(qid: int, dstrd: int = 0) -> int:
    """BAR0 offset of CQ ``qid``'s Head Doorbell for CAP.DSTRD ``dstrd``."""
    return Reg.DOORBELLS + (2 * qid + 1) * (4 << dstrd)


class Cap:
    """CAP field shifts and masks (64-bit register)."""

    MQES_SHIFT, MQES_MASK = 0, 0xFFFF  # maximum queue entries, 0-based
    CQR = 1 << 16  # contiguous queues required
    AMS_SHIFT, AMS_MASK = 17, 0x3  # bit 17: weighted round robin, bit 18: vendor specific
    TO_SHIFT, TO_MASK = 24, 0xFF  # timeout, 500 ms units
    DSTRD_SHIFT, DSTRD_MASK = 32, 0xF
    NSSRS = 1 << 36  # NVM subsystem reset supported
    CSS_SHIFT, CSS_MASK = 37, 0xFF
    BPS = 1 << 45
    CPS_SHIFT, CPS_MASK = 46, 0x3
    MPSMIN_SHIFT, MPSMIN_MASK = 48, 0xF
    MPSMAX_SHIFT, MPSMAX_MASK = 52, 0xF
    PMRS = 1 << 56
    CMBS = 1 << 57
    NSSS = 1 << 58
    CRWMS = 1 << 59
    CRIMS = 1 << 60


class CapCss(IntFlag):
    """CAP.CSS bits (Command Sets Supported)."""

    NVM = 1 << 0
    IO_COMMAND_SETS = 1 << 6  # one or more I/O command sets, selected by CC.CSS = 110b
    ADMIN_ONLY = 1 << 7


class Cc:
    """CC (Controller Configuration) fields."""

    EN = 1 << 0
    CSS_SHIFT, CSS_MASK = 4, 0x7
    MPS_SHIFT, MPS_MASK = 7, 0xF
    AMS_SHIFT, AMS_MASK = 11, 0x7
    SHN_SHIFT, SHN_MASK = 14, 0x3
    IOSQES_SHIFT, IOSQES_MASK = 16, 0xF
    IOCQES_SHIFT, IOCQES_MASK = 20, 0xF
    CRIME = 1 << 24


MEMORY_PAGE_SHIFT_MIN = 12  #: CC.MPS = 0 means a 4 KiB memory page


class CcCss(IntEnum):
    """CC.CSS values."""

    NVM = 0b000
    ALL_IO_COMMAND_SETS = 0b110
    ADMIN_ONLY = 0b111


class Shn(IntEnum):
    """CC.SHN shutdown notification."""

    NONE = 0b00
    NORMAL = 0b01
    ABRUPT = 0b10


class Csts:
    """CSTS (Controller Status) fields."""

    RDY = 1 << 0
    CFS = 1 << 1
    SHST_SHIFT, SHST_MASK = 2, 0x3
    NSSRO = 1 << 4
    PP = 1 << 5
    ST = 1 << 6


class Shst(IntEnum):
    """CSTS.SHST shutdown status."""

    NORMAL = 0b00
    OCCURRING = 0b01
    COMPLETE = 0b10


class Aqa:
    """AQA (Admin Queue Attributes) fields, both sizes 0-based."""

    ASQS_SHIFT, ASQS_MASK = 0, 0xFFF
    ACQS_SHIFT, ACQS_MASK = 16, 0xFFF
