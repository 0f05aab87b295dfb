"""The admin dispatch table in-process: opcode checks and the Error Information entry a
failed command leaves; Abort; no Keep Alive (KAS = 0)."""

from __future__ import annotations

from .area_helpers import Area, sqe

from nvme_emu.admin import AdminCommands, handlers_for
from nvme_emu.spec.commands import STATUS_DNR, AdminOpcode, Status
from nvme_emu.spec.features import FeatureId
from nvme_emu.state import ControllerConfig


def test_unknown_opcode(area: Area):
    admin = AdminCommands(area.state, area.hooks)
    status, _dw0 = admin.execute(area.admin_sq, sqe(AdminOpcode.VIRTUALIZATION_MANAGEMENT, cid=4))
    assert status & 0x7FF == Status.INVALID_OPCODE and status & STATUS_DNR
    entry = area.state.error_log.entries[0]
    assert (entry["sqid"], entry["cid"]) == (0, 4)


def test_fused_and_sgl_admin_commands_refused(area: Area):
    admin = AdminCommands(area.state, area.hooks)
    for flags in (0b01, 0b01 << 6):
        status, _ = admin.execute(area.admin_sq, sqe(AdminOpcode.GET_FEATURES, flags=flags, cdw10=FeatureId.ARBITRATION))
        assert status & 0x7FF == Status.INVALID_FIELD
    assert admin.execute(area.admin_sq, sqe(AdminOpcode.GET_FEATURES, cdw10=FeatureId.ARBITRATION)) == (Status.SUCCESS, 0)


def test_abort_never_aborts(area: Area):
    admin = AdminCommands(area.state, area.hooks)
    assert admin.execute(area.admin_sq, sqe(AdminOpcode.ABORT, cdw10=5 << 16 | 0)) == (Status.SUCCESS, 1)
    status, _ = admin.execute(area.admin_sq, sqe(AdminOpcode.ABORT, cdw10=3))
    assert status & 0x7FF == Status.INVALID_FIELD


def test_doorbell_buffer_config_only_when_advertised():
    assert AdminOpcode.DOORBELL_BUFFER_CONFIG in handlers_for(ControllerConfig())
    assert AdminOpcode.DOORBELL_BUFFER_CONFIG not in handlers_for(ControllerConfig(shadow_doorbells=False))


def test_a_handler_bug_costs_one_command(area: Area, monkeypatch):
    admin = AdminCommands(area.state, area.hooks)

    def broken(*_args):
        raise KeyError("bug")

    monkeypatch.setitem(admin.handlers, AdminOpcode.ABORT, broken)
    assert admin.execute(area.admin_sq, sqe(AdminOpcode.ABORT)) == (Status.INTERNAL_ERROR, 0)


def test_keep_alive_is_not_dispatched_as_kas_is_0(area: Area):
    admin = AdminCommands(area.state, area.hooks)
    status, _ = admin.execute(area.admin_sq, sqe(AdminOpcode.KEEP_ALIVE))
    assert status & 0x7FF == Status.INVALID_OPCODE
