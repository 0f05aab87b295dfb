"""The subsystem's Identify fields, through the existing builders, at the specification's
byte offsets (Identify Controller: CMIC 76, ANATT 342, ANACAP 343, ANAGRPMAX 344,
NANAGRPID 348, MNAN 540, SUBNQN 768; Identify Namespace: NMIC 30, ANAGRPID 92)."""

from __future__ import annotations

import struct

from nvme_emu import structures as st
from nvme_emu.ana.identify import identify_controller_fields, identify_namespace_fields
from nvme_emu.ana.subsystem import Subsystem


def test_identify_controller_fields() -> None:
    sub = Subsystem("nqn.2026-12.io.nvme-emu:s1", anagrpmax=5, anatt=7, mnan=64)
    page = st.build_identify_controller(**identify_controller_fields(sub))
    assert page[76] == 0b1011  # multi-port, multi-controller, ANA reporting; not SR-IOV
    assert page[342] == 7
    assert page[343] == 0b0101_1111  # all five states, ANAGRPID static
    assert struct.unpack_from("<III", page, 344)[:2] == (5, 5)
    assert struct.unpack_from("<I", page, 540)[0] == 64
    assert page[768:768 + 27] == b"nqn.2026-12.io.nvme-emu:s1\0"


def test_identify_namespace_fields() -> None:
    sub = Subsystem("nqn.x", anagrpmax=5)
    sub.add_namespace(3, 4)
    page = st.build_identify_namespace(**identify_namespace_fields(sub, 3))
    assert page[30] == 1  # shared
    assert struct.unpack_from("<I", page, 92)[0] == 4


def test_identify_namespace_independent_fields() -> None:
    """CNS 08h carries NMIC and ANAGRPID too, at bytes 1 and 4: the same keywords fit."""
    sub = Subsystem("nqn.x", anagrpmax=5)
    sub.add_namespace(3, 2)
    page = st.build_identify_namespace_independent(**identify_namespace_fields(sub, 3))
    assert page[1] == 1
    assert struct.unpack_from("<I", page, 4)[0] == 2
