"""The Asymmetric Namespace Access log page (0Ch) as ``construct`` layouts (Base 2.0, Figures
"Asymmetric Namespace Access Log Page" and "ANA Group Descriptor format").

A header (the log's Change Count and the number of descriptors), then one variable-length
ANA Group Descriptor per group: its ANAGRPID, the number of NSIDs that follow, its own Change
Count, its ANA state, and the NSIDs. With RGO (Return Groups Only, LSP bit 0) each descriptor
has NNSID 0 and no NSID list, so a host can poll the states cheaply. Reserved bytes are
spelled out as ``Padding`` as in :mod:`nvme_emu.structures`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from construct import Array, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct, this

from ..spec.log_pages import ANA_GROUP_DESCRIPTOR_SIZE, ANA_LOG_HEADER_SIZE, AnaState

AnaLogHeader = Struct(
    "chgcnt" / Int64ul,  # 0 Change Count
    "ngrps" / Int16ul,  # 8 Number of ANA Group Descriptors
    Padding(6),  # 10
)

AnaGroupDescriptor = Struct(
    "anagrpid" / Int32ul,  # 0
    "nnsids" / Int32ul,  # 4 Number of NSID Values
    "chgcnt" / Int64ul,  # 8 Change Count
    "state" / Int8ul,  # 16 ANA State, bits 3:0
    Padding(15),  # 17
    "nsids" / Array(this.nnsids, Int32ul),  # 32
)

AnaLog = Struct(
    "header" / AnaLogHeader,
    "groups" / Array(this.header.ngrps, AnaGroupDescriptor),
)

assert AnaLogHeader.sizeof() == ANA_LOG_HEADER_SIZE
assert len(AnaGroupDescriptor.build(dict(anagrpid=0, nnsids=0, chgcnt=0, state=0, nsids=[]))) == ANA_GROUP_DESCRIPTOR_SIZE


@dataclass(frozen=True)
class AnaGroupView:
    """One ANA Group Descriptor as one controller reports it."""

    anagrpid: int
    state: AnaState
    nsids: tuple[int, ...]
    chgcnt: int = 0


def build_ana_log(chgcnt: int, groups: Iterable[AnaGroupView], *, rgo: bool = False) -> bytes:
    """The whole log page, descriptors in the order given; ``rgo``: without NSID lists."""
    descriptors = [
        dict(anagrpid=g.anagrpid, chgcnt=g.chgcnt, state=int(g.state), nnsids=0 if rgo else len(g.nsids), nsids=[] if rgo else list(g.nsids))
        for g in groups
    ]
    return AnaLog.build(dict(header=dict(chgcnt=chgcnt, ngrps=len(descriptors)), groups=descriptors))


def ana_log_size_limit(nanagrpid: int, mnan: int) -> int:
    """The largest log a controller reporting NANAGRPID and MNAN may return: Linux sizes its
    ANA log buffer from exactly these (and refuses a controller whose bound exceeds MDTS)."""
    return ANA_LOG_HEADER_SIZE + nanagrpid * ANA_GROUP_DESCRIPTOR_SIZE + mnan * 4
