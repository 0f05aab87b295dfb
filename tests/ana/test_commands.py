"""The ANA state x command table (Base 2.0, "Asymmetric Namespace Access Reporting": what a
controller does with a command to a namespace in each state), checked for every opcode the
emulator knows against the rows below, typed here from the specification (and the choices
nvme_emu.ana.commands names), not taken from the model."""

from __future__ import annotations

import pytest

from nvme_emu.ana.commands import ana_refusal
from nvme_emu.spec.commands import STATUS_DNR, AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.log_pages import AnaState
from nvme_emu.spec.zns import ZnsOpcode

# state -> the Path Related status of a refused command (None: every command is processed)
SPEC_STATUS = {
    AnaState.OPTIMIZED: None,
    AnaState.NON_OPTIMIZED: None,
    AnaState.INACCESSIBLE: Status.ASYMMETRIC_ACCESS_INACCESSIBLE,
    AnaState.PERSISTENT_LOSS: Status.ASYMMETRIC_ACCESS_PERSISTENT_LOSS,
    AnaState.CHANGE: Status.ASYMMETRIC_ACCESS_TRANSITION,
}
# admin commands naming an unreachable namespace that are still processed
SPEC_ADMIN_PROCESSED = {0x06, 0x02, 0x0A, 0x09, 0x0D, 0x15}  # Identify, Get Log Page, Get/Set Features, NS Mgmt/Attach

CASES = (
    [(s, op, True) for s in AnaState for op in AdminOpcode]
    + [(s, op, False) for s in AnaState for op in NvmOpcode]
    + [(s, op, False) for s in AnaState for op in ZnsOpcode]
)


@pytest.mark.parametrize(("state", "opcode", "admin"), CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_state_command_table(state: AnaState, opcode: int, admin: bool) -> None:
    expected = SPEC_STATUS[state]
    if admin and opcode in SPEC_ADMIN_PROCESSED:
        expected = None
    err = ana_refusal(state, opcode, admin=admin)
    if expected is None:
        assert err is None
    else:
        assert err is not None
        assert err.status == expected
        assert err.status.sct == 3  # Path Related Status
        assert not err.status_field & STATUS_DNR  # the host may fail over (see ana.commands)


def test_the_table_refuses_io_on_an_unreachable_path() -> None:
    """The cases a multipath host depends on, spelled out: a read through an Inaccessible or
    changing path is refused, while the Optimized and Non-Optimized paths serve it."""
    assert ana_refusal(AnaState.OPTIMIZED, NvmOpcode.READ, admin=False) is None
    assert ana_refusal(AnaState.NON_OPTIMIZED, NvmOpcode.WRITE, admin=False) is None
    refused = ana_refusal(AnaState.INACCESSIBLE, NvmOpcode.READ, admin=False)
    assert refused is not None and refused.status_field == 0x302
    refused = ana_refusal(AnaState.CHANGE, NvmOpcode.WRITE, admin=False)
    assert refused is not None and refused.status_field == 0x303
    refused = ana_refusal(AnaState.PERSISTENT_LOSS, AdminOpcode.FORMAT_NVM, admin=True)
    assert refused is not None and refused.status_field == 0x301
    # the same opcode value means another command on the admin queue: 02h is Get Log Page there
    assert ana_refusal(AnaState.INACCESSIBLE, 0x02, admin=True) is None
    assert ana_refusal(AnaState.INACCESSIBLE, 0x02, admin=False) is not None
