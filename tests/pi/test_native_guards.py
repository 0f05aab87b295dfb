"""The engine on the native CRCs (nvme_emu.pi.guards) gives the PI bytes the bitwise oracle
gives, for every case of test_engine, and checks them back; a corrupted guard is caught."""

from __future__ import annotations

import numpy as np
import pytest

from nvme_emu.pi.engine import PiEngine, PiField
from nvme_emu.pi.format import GuardKind, Prinfo
from nvme_emu.pi.guards import native_guards
from nvme_emu.spec.commands import Status

from .reference_crc import ReferenceGuards
from .test_engine import CASES, Case, command


@pytest.mark.parametrize("kind", list(GuardKind), ids=lambda k: k.name)
@pytest.mark.parametrize(("block", "stride", "count"), [(512, 512, 8), (512, 520, 8), (520, 528, 3), (4096, 4160, 2), (512, 512, 0)])
def test_compute_is_the_oracle(kind: GuardKind, block: int, stride: int, count: int) -> None:
    data = memoryview(np.random.default_rng(block + stride + count).integers(0, 256, stride * max(count, 1), np.uint8).tobytes())
    native, oracle = (np.zeros(max(count, 1), kind.guard_dtype) for _ in range(2))
    native_guards(kind).compute(data, block, count, stride, native)
    ReferenceGuards(kind).compute(data, block, count, stride, oracle)
    assert native.tolist() == oracle.tolist()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_engine_on_native_guards_matches_the_oracle(case: Case) -> None:
    fmt = case.fmt
    native = PiEngine(fmt, native_guards(fmt.guard))
    oracle, _ = case.engine()
    buf_n, meta_n, _, _ = case.buffers()
    buf_o, meta_o, _, _ = case.buffers()
    assert native.insert(command(fmt, Prinfo.PRACT), buf_n, meta_n) is None
    assert oracle.insert(command(fmt, Prinfo.PRACT), buf_o, meta_o) is None
    assert (buf_n, meta_n) == (buf_o, meta_o)
    assert native.check(command(fmt), buf_n, meta_n) is None
    case.flip(buf_n, meta_n, 2, PiField.GUARD)
    err = native.check(command(fmt), buf_n, meta_n)
    assert err is not None and (err.lba, err.status) == (command(fmt).slba + 2, Status.END_TO_END_GUARD_CHECK_ERROR)
