"""The ANA numbers added to nvme_emu.spec, against the Base specification's values."""

from __future__ import annotations

from nvme_emu.spec.identify import CNTLID_MAX, Anacap, Cmic, Nmic
from nvme_emu.spec.log_pages import ANA_GROUP_DESCRIPTOR_SIZE, ANA_LOG_HEADER_SIZE, ANA_LSP_RGO, AnaState


def test_ana_states() -> None:
    assert [(s.name, s.value) for s in AnaState] == [
        ("OPTIMIZED", 1), ("NON_OPTIMIZED", 2), ("INACCESSIBLE", 3), ("PERSISTENT_LOSS", 4), ("CHANGE", 0xF)
    ]


def test_capability_bits() -> None:
    assert (Cmic.MULTI_PORT, Cmic.MULTI_CONTROLLER, Cmic.SRIOV, Cmic.ANA_REPORTING) == (1, 2, 4, 8)
    assert [int(b) for b in (Anacap.OPTIMIZED, Anacap.NON_OPTIMIZED, Anacap.INACCESSIBLE, Anacap.PERSISTENT_LOSS,
                             Anacap.CHANGE, Anacap.GRPID_STATIC, Anacap.GRPID_IN_NS_MANAGEMENT)] == [1, 2, 4, 8, 16, 64, 128]
    assert Nmic.SHARED == 1
    assert CNTLID_MAX == 0xFFEF


def test_log_sizes() -> None:
    assert (ANA_LOG_HEADER_SIZE, ANA_GROUP_DESCRIPTOR_SIZE, ANA_LSP_RGO) == (16, 32, 1)
