"""The test oracle itself: the reference CRCs give the catalogue check values (the CRC of
b"123456789"), so the known answers in test_engine.py rest on something checked."""

from __future__ import annotations

import numpy as np
import pytest

from nvme_emu.pi.format import GuardKind
from tests.pi.reference_crc import ReferenceGuards, crc16_t10dif, crc64_nvme


def test_check_values() -> None:
    assert crc16_t10dif(b"123456789") == 0xD0DB
    assert crc64_nvme(b"123456789") == 0xAE8B14860A799888
    assert crc16_t10dif(b"") == 0x0000 and crc64_nvme(b"") == 0x0


@pytest.mark.parametrize("kind", list(GuardKind), ids=lambda k: k.name)
def test_reference_guards_compute_strided_runs(kind: GuardKind) -> None:
    crc = crc16_t10dif if kind is GuardKind.GUARD_16 else crc64_nvme
    data = bytes(range(256)) * 3
    out = np.zeros(3, dtype=kind.guard_dtype)
    ReferenceGuards(kind).compute(memoryview(data), 100, 3, 256, out)
    assert [int(x) for x in out] == [crc(data[i * 256 : i * 256 + 100]) for i in range(3)]
