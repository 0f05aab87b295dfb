"""The NVM handlers' hooks: commands through NvmCommands.execute, their data and metadata in
real guest memory, to a namespace with metadata (the fake, as namespace 1) and, beside it, a
plain RAM namespace that never takes the metadata path."""

from __future__ import annotations

import os
import struct


from nvme_emu.nvm import NvmCommands
from nvme_emu.pi.format import GuardKind, PiFormat, PiLocation, Prinfo, ProtectionType
from nvme_emu.spec.commands import STATUS_DNR, CopyCdw12, NvmOpcode, RwCdw12, Status
from nvme_emu.sqe import SQE
from tests.nvme_areas.area_helpers import BUF, Area
from tests.pi.reference_crc import crc16_t10dif
from tests.pi_io.fake_namespace import FakeNamespace

META = BUF + 0x10000  # the separate metadata buffer (MPTR)
DESC = BUF + 0x20000  # Copy's descriptors
SLBA, NLB = 16, 8


def cmd(opc: int, slba: int, nlb: int, *, prinfo: int = 0, nsid: int = 1, cdw12: int = 0, cdw14: int = 0, cdw15: int = 0,
        mptr: int = META, prp1: int = BUF) -> tuple:
    cdw12 |= (nlb - 1) | prinfo << RwCdw12.PRINFO_SHIFT
    return SQE.unpack(SQE.pack(opc, 0, 7, nsid, 0, 0, mptr, prp1, prp1 + 4096, slba & 0xFFFF_FFFF, slba >> 32, cdw12, 0, cdw14, cdw15))


def pi_namespace(area: Area, *, extended: bool = False) -> FakeNamespace:
    ns = FakeNamespace(ms=8, pi=PiFormat(512, 8, GuardKind.GUARD_16, ProtectionType.TYPE1, PiLocation.LAST), extended=extended)
    area.state.namespaces[1] = ns  # type: ignore[assignment]
    return ns


def pi16(data: bytes, apptag: int, reftag: int) -> bytes:
    return struct.pack(">HHI", crc16_t10dif(data), apptag, reftag)


def test_write_read_through_guest_memory(area: Area) -> None:
    ns = pi_namespace(area)
    nvm = NvmCommands(area.state, area.hooks)
    data = os.urandom(NLB * 512)
    area.guest.write(BUF, data)
    area.guest.write(META, b"\xEE" * NLB * 8)  # PRACT with MS = 8: MPTR is not looked at
    e = cmd(NvmOpcode.WRITE, SLBA, NLB, prinfo=Prinfo.PRACT | Prinfo.PRCHK_REF, cdw14=SLBA, cdw15=0x1234)
    assert nvm.execute(area.admin_sq, e) == (Status.SUCCESS, 0)
    assert ns.block_meta(SLBA + 5) == pi16(data[5 * 512 : 6 * 512], 0x1234, SLBA + 5)
    assert area.guest.read(META, 8) == b"\xEE" * 8

    # PRACT = 0: data through the PRPs, metadata through MPTR.
    area.guest.write(BUF, bytes(NLB * 512))
    e = cmd(NvmOpcode.READ, SLBA, NLB, prinfo=Prinfo.PRCHK_ALL, cdw14=SLBA, cdw15=0xFFFF << 16 | 0x1234)
    assert nvm.execute(area.admin_sq, e) == (Status.SUCCESS, 0)
    assert area.guest.read(BUF, NLB * 512) == data
    assert area.guest.read(META, NLB * 8) == b"".join(ns.block_meta(SLBA + i) for i in range(NLB))

    # PRACT = 1: stripped, MPTR untouched.
    area.guest.write(META, b"\xEE" * NLB * 8)
    e = cmd(NvmOpcode.READ, SLBA, NLB, prinfo=Prinfo.PRACT | Prinfo.PRCHK_ALL, cdw14=SLBA, cdw15=0xFFFF << 16 | 0x1234)
    assert nvm.execute(area.admin_sq, e) == (Status.SUCCESS, 0)
    assert area.guest.read(META, NLB * 8) == b"\xEE" * NLB * 8


def test_extended_write_read(area: Area) -> None:
    ns = pi_namespace(area, extended=True)
    nvm = NvmCommands(area.state, area.hooks)
    blocks = [os.urandom(512) for _ in range(4)]
    ext = b"".join(b + pi16(b, 0x42, SLBA + i) for i, b in enumerate(blocks))
    area.guest.write(BUF, ext)
    assert nvm.execute(area.admin_sq, cmd(NvmOpcode.WRITE, SLBA, 4, prinfo=Prinfo.PRCHK_ALL, cdw14=SLBA, cdw15=0xFFFF << 16 | 0x42)) == (Status.SUCCESS, 0)
    assert ns.block_data(SLBA + 3) == blocks[3]
    area.guest.write(BUF, bytes(len(ext)))
    assert nvm.execute(area.admin_sq, cmd(NvmOpcode.READ, SLBA, 4, cdw14=SLBA)) == (Status.SUCCESS, 0)
    assert area.guest.read(BUF, len(ext)) == ext


def test_check_errors_complete_with_their_status_and_lba(area: Area) -> None:
    ns = pi_namespace(area)
    nvm = NvmCommands(area.state, area.hooks)
    area.guest.write(BUF, os.urandom(NLB * 512))
    assert nvm.execute(area.admin_sq, cmd(NvmOpcode.WRITE, SLBA, NLB, prinfo=Prinfo.PRACT, cdw14=SLBA)) == (Status.SUCCESS, 0)
    ns.meta[(SLBA + 3) * 8] ^= 1  # the guard of LBA SLBA + 3
    status, _ = nvm.execute(area.admin_sq, cmd(NvmOpcode.READ, SLBA, NLB, prinfo=Prinfo.PRCHK_GUARD))
    assert (status & 0x7FF, status & STATUS_DNR) == (Status.END_TO_END_GUARD_CHECK_ERROR, 0)
    assert area.state.error_log.entries[0]["lba"] == SLBA + 3
    status, _ = nvm.execute(area.admin_sq, cmd(NvmOpcode.VERIFY, SLBA, NLB, prinfo=Prinfo.PRCHK_GUARD))
    assert status & 0x7FF == Status.END_TO_END_GUARD_CHECK_ERROR
    # Type 1 with PRCHK reference and ILBRT not the SLBA: Invalid Protection Information, DNR.
    status, _ = nvm.execute(area.admin_sq, cmd(NvmOpcode.WRITE, SLBA, NLB, prinfo=Prinfo.PRACT | Prinfo.PRCHK_REF, cdw14=SLBA + 1))
    assert (status & 0x7FF, bool(status & STATUS_DNR)) == (Status.INVALID_PROTECTION_INFORMATION, True)


def test_write_zeroes_and_copy(area: Area) -> None:
    ns = pi_namespace(area)
    nvm = NvmCommands(area.state, area.hooks)
    area.guest.write(BUF, os.urandom(NLB * 512))
    assert nvm.execute(area.admin_sq, cmd(NvmOpcode.WRITE, SLBA, NLB, prinfo=Prinfo.PRACT, cdw14=SLBA, cdw15=0x77)) == (Status.SUCCESS, 0)
    # Copy 2 blocks from SLBA + 2 to LBA 40: PRACT on both sides, a new reference tag run.
    area.guest.write(DESC, struct.pack("<8xQH6xIHH", SLBA + 2, 1, SLBA + 2, 0x77, 0xFFFF))
    cdw12 = 0 | (Prinfo.PRACT | Prinfo.PRCHK_ALL) << CopyCdw12.PRINFOR_SHIFT | (Prinfo.PRACT | Prinfo.PRCHK_REF) << CopyCdw12.PRINFOW_SHIFT
    e = SQE.unpack(SQE.pack(NvmOpcode.COPY, 0, 9, 1, 0, 0, 0, DESC, 0, 40, 0, cdw12, 0, 40, 0x99))
    assert nvm.execute(area.admin_sq, e) == (Status.SUCCESS, 0)
    assert ns.block_meta(41) == pi16(ns.block_data(SLBA + 3), 0x99, 41)
    # Write Zeroes with PRACT: zeroed data, generated PI.
    assert nvm.execute(area.admin_sq, cmd(NvmOpcode.WRITE_ZEROES, SLBA, 2, prinfo=Prinfo.PRACT, cdw14=SLBA, cdw15=0x5)) == (Status.SUCCESS, 0)
    assert ns.block_meta(SLBA + 1) == pi16(bytes(512), 0x5, SLBA + 1)


def test_plain_namespace_is_untouched(area: Area) -> None:
    """Namespace 2 (RAM, no metadata): PRINFO or MPTR garbage change nothing."""
    nvm = NvmCommands(area.state, area.hooks)
    data = os.urandom(4096)
    area.guest.write(BUF, data)
    e = cmd(NvmOpcode.WRITE, 0, 8, nsid=2, prinfo=0xF, mptr=0xDEAD_0000)
    assert nvm.execute(area.admin_sq, e) == (Status.SUCCESS, 0)
    area.guest.write(BUF, bytes(4096))
    assert nvm.execute(area.admin_sq, cmd(NvmOpcode.READ, 0, 8, nsid=2, prinfo=0xF, mptr=0xDEAD_0000)) == (Status.SUCCESS, 0)
    assert area.guest.read(BUF, 4096) == data
