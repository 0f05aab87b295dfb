"""The PI engine's guards on the native CRCs: :class:`~nvme_emu.pi.format.Guards` for
:class:`~nvme_emu.pi.engine.PiEngine`, one C call per operation over all of an I/O's blocks.

A module of its own so that neither side knows the other: :mod:`.format` declares what the
engine needs, :mod:`.crc` computes CRCs and knows nothing of PI, and this is where the two
meet (the engine's tests pass a slow bitwise oracle instead, tests/pi/reference_crc.py).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import numpy.typing as npt

from . import crc
from .format import GuardKind

_BULK: dict[GuardKind, Callable[..., None]] = {
    GuardKind.GUARD_16: crc.crc16_t10dif_blocks,
    GuardKind.GUARD_64: crc.crc64_nvme_blocks,
}


class NativeGuards:
    """Guards of one kind from :mod:`nvme_emu.pi.crc`'s bulk forms (built on first use)."""

    def __init__(self, kind: GuardKind) -> None:
        self._kind = kind
        self._bulk = _BULK[kind]

    @property
    def kind(self) -> GuardKind:
        return self._kind

    def compute(self, data: memoryview, block: int, count: int, stride: int, out: npt.NDArray[np.unsignedinteger]) -> None:
        self._bulk(data, count, block, out, stride=stride)


def native_guards(kind: GuardKind) -> NativeGuards:
    return NativeGuards(kind)
