"""Test-only, deliberately slow reference guards for the PI engine: bit by bit, straight
from the parameters (nvme_emu.pi.crc.reference, the definition the C is tested against), so
that they can be read against the definitions and trusted as an oracle.

CRC-16/T10-DIF: width 16, poly 8BB7h, init 0, not reflected, no final XOR; check value
(CRC of b"123456789") D0DBh. CRC-64/NVME: width 64, poly AD93D23594C93659h (reflected:
9A6C9329AC4BC9B5h), init and final XOR all ones, reflected in and out; check value
AE8B14860A799888h. Never use these outside tests: about 1 ms per 512-byte block.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from nvme_emu.pi import crc
from nvme_emu.pi.format import GuardKind


def crc16_t10dif(data: bytes | memoryview) -> int:
    return crc.reference(crc.CRC16_T10DIF, data)


def crc64_nvme(data: bytes | memoryview) -> int:
    return crc.reference(crc.CRC64_NVME, data)


class ReferenceGuards:
    """The engine's :class:`~nvme_emu.pi.format.Guards`, one block at a time in Python."""

    def __init__(self, kind: GuardKind) -> None:
        self._kind = kind
        self._crc = crc16_t10dif if kind is GuardKind.GUARD_16 else crc64_nvme
        self.calls = 0  # how many compute() calls: the engine makes one per operation

    @property
    def kind(self) -> GuardKind:
        return self._kind

    def compute(self, data: memoryview, block: int, count: int, stride: int, out: npt.NDArray[np.unsignedinteger]) -> None:
        self.calls += 1
        assert out.dtype == self._kind.guard_dtype and out.size >= count
        assert (count - 1) * stride + block <= len(data) if count else True
        for i in range(count):
            out[i] = self._crc(data[i * stride : i * stride + block])
