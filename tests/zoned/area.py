"""In-process helpers for the Zoned command set's area tests: a controller state (tests/nvme_areas'
helpers: real memfd guest memory, recording hooks) with an NVM namespace 1 and a zoned RAM
namespace 2, CC.CSS selecting every I/O command set (as Linux does), and the I/O dispatcher
bound to every registered set, as the Controller binds it. Commands are real SQEs through
:meth:`NvmCommands.execute`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterator

import pytest

from nvme_emu.backends.ram import RamBackend
from nvme_emu.command_set import COMMAND_SETS, namespace_attached
from nvme_emu.namespace import Namespace
from nvme_emu.nvm import NvmCommands
from nvme_emu.outcome import Deferred
from nvme_emu.spec.commands import NvmOpcode
from nvme_emu.spec.registers import Cc, CcCss
from nvme_emu.spec.zns import ZMS_SELECT_ALL, ZnsOpcode, ZoneSendAction
from nvme_emu.zoned.geometry import ZoneGeometry
from nvme_emu.zoned.zone_set import ZoneSet

from ..nvme_areas.area_helpers import BUF, Area, Guest, make_area, sqe

LBA = 512
ZONE_LBAS = 64  #: 32 KiB zones
ZONE_CAP_LBAS = 48  #: of which 24 KiB are writable
ZONES = 16
NS_BYTES = ZONES * ZONE_LBAS * LBA + 3 * LBA  #: a tail of 3 LBAs that is no whole zone
GEOMETRY = ZoneGeometry(zone_size=ZONE_LBAS * LBA, zone_capacity=ZONE_CAP_LBAS * LBA)
ZNSID = 2
#: Where a PRP list goes when a transfer spans more than two pages (data is at BUF).
PRP_LIST = BUF + (1 << 20)


@dataclass
class Zoned:
    """An area with a zoned namespace ``ns`` (NSID 2) and the bound dispatcher ``nvm``."""

    area: Area
    nvm: NvmCommands
    ns: Namespace

    @property
    def zones(self) -> ZoneSet:
        assert self.ns.zones is not None
        return self.ns.zones

    @property
    def guest(self) -> Guest:
        return self.area.guest

    def execute(self, opc: int, *, nsid: int = ZNSID, **fields: int) -> tuple[int, int] | Deferred:
        fields.setdefault("prp1", BUF)
        fields.setdefault("prp2", BUF + 4096)
        return self.nvm.execute(self.area.admin_sq, sqe(opc, nsid=nsid, **fields))

    def status(self, opc: int, **fields: int) -> int:
        """The status (without DNR and the like) a command completes with."""
        result = self.execute(opc, **fields)
        assert isinstance(result, tuple), result
        return result[0] & 0x7FF

    def prps(self, length: int) -> dict[str, int]:
        """PRP1 and PRP2 for ``length`` bytes at BUF: PRP2 a list past two pages."""
        if length <= 2 * 4096:
            return {"prp1": BUF, "prp2": BUF + 4096}
        pages = -(-length // 4096)
        self.guest.write(PRP_LIST, b"".join(struct.pack("<Q", BUF + 4096 * i) for i in range(1, pages)))
        return {"prp1": BUF, "prp2": PRP_LIST}

    def rw(self, opc: int, slba: int, nlb: int, *, cdw12: int = 0, **fields: int) -> int:
        for key, value in self.prps(nlb * LBA).items():
            fields.setdefault(key, value)
        return self.status(opc, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=(nlb - 1) | cdw12, **fields)

    def write(self, slba: int, nlb: int, data: bytes | None = None, **fields: int) -> int:
        self.guest.write(BUF, os.urandom(nlb * LBA) if data is None else data)
        return self.rw(NvmOpcode.WRITE, slba, nlb, **fields)

    def read(self, slba: int, nlb: int) -> bytes:
        self.guest.write(BUF, b"\xa5" * nlb * LBA)
        status = self.rw(NvmOpcode.READ, slba, nlb)
        assert status == 0, hex(status)
        return self.guest.read(BUF, nlb * LBA)

    def append(self, zslba: int, nlb: int, data: bytes | None = None, **fields: int) -> tuple[int, int]:
        """(status, the completion's result: the LBA written) of a Zone Append."""
        self.guest.write(BUF, os.urandom(nlb * LBA) if data is None else data)
        for key, value in self.prps(nlb * LBA).items():
            fields.setdefault(key, value)
        result = self.execute(ZnsOpcode.ZONE_APPEND, cdw10=zslba & 0xFFFFFFFF, cdw11=zslba >> 32, cdw12=nlb - 1, **fields)
        assert isinstance(result, tuple)
        return result[0] & 0x7FF, result[1]

    def send(self, action: int, slba: int = 0, *, select_all: bool = False, cdw13: int = 0) -> int:
        """Zone Management Send's status."""
        return self.status(ZnsOpcode.ZONE_MANAGEMENT_SEND, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                           cdw13=action | (ZMS_SELECT_ALL if select_all else 0) | cdw13)

    def zslba(self, index: int) -> int:
        return index * ZONE_LBAS


def bind(area: Area) -> NvmCommands:
    """The I/O dispatcher as the Controller binds it: every registered set's table."""
    nvm = NvmCommands(area.state, area.hooks)
    for cs in COMMAND_SETS.values():
        nvm.bind(cs.csi, cs.handlers(nvm), frozenset(cs.effects), cs.lba_changing)
    return nvm


def make_zoned(guest: Guest, geometry: ZoneGeometry = GEOMETRY, backend_bytes: int = NS_BYTES) -> Zoned:
    area = make_area(guest)
    area.state.cc |= CcCss.ALL_IO_COMMAND_SETS << Cc.CSS_SHIFT
    ns = Namespace(ZNSID, RamBackend(backend_bytes), zoned=geometry)
    area.state.namespaces[ZNSID] = area.state.allocated[ZNSID] = ns
    namespace_attached(area.state, area.hooks, ns)
    return Zoned(area, bind(area), ns)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def zoned(guest: Guest) -> Iterator[Zoned]:
    z = make_zoned(guest)
    yield z
    for ns in z.area.state.allocated.values():
        ns.close()


__all__ = ["GEOMETRY", "LBA", "ZNSID", "ZONES", "ZONE_CAP_LBAS", "ZONE_LBAS", "Zoned", "ZoneSendAction", "bind", "guest",
           "make_zoned", "zoned"]
