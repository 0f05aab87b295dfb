"""The tests' side of nvme_emu.metadata_io: the formats to run over, an independent oracle for
the PI bytes a block must carry (the slow bitwise CRCs, written-out byte layouts), host
buffers split into several views, and the door's calls run to the end as a host sees them."""

from __future__ import annotations

import random

from nvme_emu import metadata_io as mio
from nvme_emu.outcome import Work, finish_here
from nvme_emu.pi.format import GuardKind, PiCommand, PiFormat, PiLocation, Prinfo, ProtectionType
from nvme_emu.sqe import FIELDS
from tests.pi.cases import PiCase
from tests.pi.reference_crc import crc16_t10dif, crc64_nvme
from tests.pi_io.fake_namespace import FakeNamespace

LBADS = 512
SLBA = 10
NLB = 4
T1, T2, T3 = ProtectionType.TYPE1, ProtectionType.TYPE2, ProtectionType.TYPE3
G16, G64 = GuardKind.GUARD_16, GuardKind.GUARD_64
FIRST, LAST = PiLocation.FIRST, PiLocation.LAST
PRACT, CHK = Prinfo.PRACT, Prinfo.PRCHK_ALL
LBAT = 0xBEEF
#: An ILBRT for Types 2 and 3 (Type 1 takes the SLBA's): above 32 bits for 64b Guard.
ILBRT = {G16: 0x1234_5678, G64: 0x9876_1234_5678}

#: PI field (offset, length) in the PI, per guard: written out here, not taken from the engine.
FIELDS_AT = {G16: {"guard": (0, 2), "apptag": (2, 2), "reftag": (4, 4)}, G64: {"guard": (0, 8), "apptag": (8, 2), "reftag": (10, 6)}}


class Case(PiCase):

    def ns(self, *, blocking: bool = False) -> FakeNamespace:
        return FakeNamespace(lbads=self.fmt.lbads, ms=self.fmt.ms, pi=self.fmt, extended=self.extended, blocking=blocking)

    def cmd(self, prinfo: Prinfo, *, slba: int = SLBA, lbat: int = LBAT, lbatm: int = 0xFFFF) -> PiCommand:
        ilbrt = slba if self.fmt.pi_type is T1 else ILBRT[self.fmt.guard]
        return PiCommand(slba=slba, prinfo=prinfo, lbat=lbat, lbatm=lbatm, ilbrt=ilbrt)


def cases() -> list[Case]:
    out = []
    for pi_type in (T1, T2, T3):
        for guard in (G16, G64):
            for ms in (guard.pi_size, 64):
                for location in (LAST, FIRST) if ms > guard.pi_size else (LAST,):
                    for extended in (False, True):
                        out.append(Case(PiFormat(LBADS, ms, guard, pi_type, location), extended))
    return out


CASES = cases()


def reftag(fmt: PiFormat, cmd: PiCommand, i: int) -> int:
    mask = (1 << fmt.guard.reftag_bits) - 1
    if fmt.pi_type is T1:
        return (cmd.slba + i) & mask
    if fmt.pi_type is T2:
        return (cmd.ilbrt + i) & mask
    return cmd.ilbrt & mask


def expected_pi(fmt: PiFormat, data: bytes, meta: bytes, apptag: int, ref: int) -> bytes:
    """The PI one block carries: guard over its data (and, PI last, the metadata before the
    PI), big-endian fields, by the bitwise reference CRCs."""
    covered = data + meta[: fmt.pi_offset]
    if fmt.guard is G16:
        return crc16_t10dif(covered).to_bytes(2, "big") + apptag.to_bytes(2, "big") + ref.to_bytes(4, "big")
    return crc64_nvme(covered).to_bytes(8, "big") + apptag.to_bytes(2, "big") + ref.to_bytes(6, "big")


def with_pi(fmt: PiFormat, meta: bytes, pi: bytes) -> bytes:
    return meta[: fmt.pi_offset] + pi + meta[fmt.pi_offset + fmt.pi_size :]


def pi_of(fmt: PiFormat, meta: bytes) -> bytes:
    return meta[fmt.pi_offset : fmt.pi_offset + fmt.pi_size]


def blocks(case: Case, seed: int, nlb: int = NLB) -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(seed)
    return [rng.randbytes(case.fmt.lbads) for _ in range(nlb)], [rng.randbytes(case.fmt.ms) for _ in range(nlb)]


def valid_meta(case: Case, cmd: PiCommand, data: list[bytes], meta: list[bytes]) -> list[bytes]:
    """The metadata with the PI a host computes (what PRACT = 0 writes carry)."""
    f = case.fmt
    return [with_pi(f, m, expected_pi(f, d, m, cmd.lbat, reftag(f, cmd, i))) for i, (d, m) in enumerate(zip(data, meta, strict=True))]


def host_area(case: Case, layout: mio.HostLayout, data: list[bytes], meta: list[bytes]) -> tuple[bytes, bytes | None]:
    """What the host puts behind the data pointer and MPTR for that layout."""
    if layout.extended:
        return b"".join(d + m for d, m in zip(data, meta, strict=True)), None
    return b"".join(data), (b"".join(meta) if layout.meta_len else None)


def views_of(buf: bytearray) -> list[memoryview]:
    """Three uneven pieces: the door must not assume one view."""
    mv = memoryview(buf)
    n = len(buf)
    cuts = sorted({0, min(n, 7), min(n, n // 2 + 3), n})
    return [mv[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def finish(work: Work | None) -> None:
    """Run a door call's Work to the end, as the dispatcher would (run, then done)."""
    finish_here(work)


def write(ns: FakeNamespace, cmd: PiCommand, nlb: int, data_area: bytes, meta_area: bytes | None) -> None:
    layout = mio.host_layout(ns, nlb, cmd.prinfo)
    assert len(data_area) == layout.data_len and len(meta_area or b"") == layout.meta_len
    finish(mio.write(ns, cmd, nlb, layout, views_of(bytearray(data_area)), views_of(bytearray(meta_area or b"")), fua=False))


def read(ns: FakeNamespace, cmd: PiCommand, nlb: int) -> tuple[bytes, bytes]:
    layout = mio.host_layout(ns, nlb, cmd.prinfo)
    data, meta = bytearray(layout.data_len), bytearray(layout.meta_len)
    finish(mio.read(ns, cmd, nlb, layout, views_of(data), views_of(meta)))
    return bytes(data), bytes(meta)


def sqe(*, slba: int = 0, cdw12: int = 0, cdw3: int = 0, cdw14: int = 0, cdw15: int = 0, flags: int = 0, mptr: int = 0) -> tuple:
    values = dict.fromkeys((name for name, _ in FIELDS), 0)
    values.update(flags=flags, cdw3=cdw3, mptr=mptr, cdw10=slba & 0xFFFF_FFFF, cdw11=slba >> 32, cdw12=cdw12, cdw14=cdw14, cdw15=cdw15)
    return tuple(values.values())
