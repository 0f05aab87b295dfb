"""Get Log Page: every supported page, and the refusals."""

from __future__ import annotations

import os

import pytest

from ..support.host import Host
from nvme_emu import structures as st
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.log_pages import CommandEffects, EffectsScope, LogPageId as L


def test_supported_log_pages(nvme: Host):
    c, data = nvme.get_log(L.SUPPORTED_LOG_PAGES, 1024)
    assert c.status == Status.SUCCESS
    lids = st.SupportedLogPages.parse(data).lids
    for lid in (L.SUPPORTED_LOG_PAGES, L.ERROR_INFORMATION, L.SMART_HEALTH, L.FIRMWARE_SLOT, L.CHANGED_NAMESPACE_LIST, L.COMMANDS_SUPPORTED_EFFECTS,
                L.FEATURE_IDS_EFFECTS, L.NVME_MI_COMMANDS_EFFECTS, L.LBA_STATUS_INFORMATION):
        assert lids[lid] & 1, lid
    assert sum(1 for x in lids if x) == 9


def error_entries(n: Host) -> list:
    c, data = n.get_log(L.ERROR_INFORMATION, 64 * 64)
    assert c.status == Status.SUCCESS
    entries = [st.ErrorLogEntry.parse(data[i * 64 : (i + 1) * 64]) for i in range(64)]
    return [e for e in entries if e.error_count]


def test_error_information_lists_provoked_errors(io: Host):
    assert error_entries(io) == []
    bad_admin = io.admin(0x7E)  # invalid opcode on the admin queue
    assert bad_admin.status == Status.INVALID_OPCODE
    bad_io = io.io(1, NvmOpcode.READ, 1, 1 << 40, 1, prp1=io.alloc(4096))
    assert bad_io.status == Status.LBA_OUT_OF_RANGE
    bad_ns = io.io(1, NvmOpcode.WRITE, 99, 0, 1, prp1=io.alloc(4096))
    assert bad_ns.status == Status.INVALID_NAMESPACE_OR_FORMAT
    entries = error_entries(io)
    assert len(entries) == 3
    newest, middle, oldest = entries
    assert newest.error_count > middle.error_count > oldest.error_count
    for entry, cqe, sqid in ((oldest, bad_admin, 0), (middle, bad_io, 1), (newest, bad_ns, 1)):
        assert entry.sqid == sqid
        assert entry.cid == cqe.cid
        # the entry's Status Field sits in bits 15:1, as in a CQE
        assert (entry.status >> 1) & 0x7FF == cqe.status
        assert bool(entry.status & (1 << 15)) == cqe.dnr
    assert middle.nsid == 1 and middle.lba == 1 << 40
    assert newest.nsid == 99


def smart(n: Host):
    c, data = n.get_log(L.SMART_HEALTH, 512)
    assert c.status == Status.SUCCESS
    return st.SmartLog.parse(data)


def test_smart_counters_move_after_io(io: Host):
    before = smart(io)
    assert before.composite_temperature == 313
    assert before.temperature_sensors[0] == 313
    assert before.power_cycles >= 1
    assert before.available_spare == 100
    assert before.critical_warning == 0
    data = os.urandom(512 * 1024)  # 1024 blocks = 1.024 data units
    for i in range(2):
        io.write_ok(1, 1, i * 1024, data)
    for _ in range(3):
        assert io.read_ok(1, 1, 0, 1024) == data
    after = smart(io)
    assert after.host_write_commands - before.host_write_commands == 2
    assert after.host_read_commands - before.host_read_commands == 3
    assert after.data_units_written - before.data_units_written >= 2
    assert after.data_units_read - before.data_units_read >= 3
    # a failing command counts in the error log entries
    io.io(1, NvmOpcode.READ, 1, 1 << 40, 1, prp1=io.alloc(4096))
    assert smart(io).num_error_log_entries == after.num_error_log_entries + 1


def test_smart_power_cycles_count_connections(server):
    first = Host(server.path)
    try:
        cycles = smart(first).power_cycles
    finally:
        first.close()
    second = Host(server.path)
    try:
        assert smart(second).power_cycles == cycles + 1
    finally:
        second.close()


def test_smart_per_namespace_is_refused(nvme: Host):
    c, _ = nvme.get_log(L.SMART_HEALTH, 512, nsid=1)
    assert c.status == Status.INVALID_FIELD
    assert nvme.get_log(L.SMART_HEALTH, 512, nsid=0)[0].status == Status.SUCCESS


def test_firmware_slot(nvme: Host):
    c, data = nvme.get_log(L.FIRMWARE_SLOT, 512)
    assert c.status == Status.SUCCESS
    fw = st.FirmwareSlotLog.parse(data)
    assert fw.afi & 0x7 == 1
    assert fw.frs[0] == "0.1.0"
    assert data[16:64] == bytes(48)


def test_changed_namespace_list_empty_then_after_format(nvme: Host):
    c, data = nvme.get_log(L.CHANGED_NAMESPACE_LIST, 4096)
    assert c.status == Status.SUCCESS and data == bytes(4096)
    assert nvme.admin(AdminOpcode.FORMAT_NVM, nsid=2, cdw10=0).status == Status.SUCCESS
    _, data = nvme.get_log(L.CHANGED_NAMESPACE_LIST, 4096)
    assert st.ChangedNamespaceList.parse(data).nsids[:2] == [2, 0]
    _, data = nvme.get_log(L.CHANGED_NAMESPACE_LIST, 4096)  # reading clears it
    assert data == bytes(4096)


def test_commands_supported_and_effects(nvme: Host):
    c, data = nvme.get_log(L.COMMANDS_SUPPORTED_EFFECTS, 4096, csi=0)
    assert c.status == Status.SUCCESS
    log = st.CommandsEffectsLog.parse(data)
    for op in (AdminOpcode.IDENTIFY, AdminOpcode.GET_LOG_PAGE, AdminOpcode.CREATE_IO_SQ, AdminOpcode.SET_FEATURES,
               AdminOpcode.ASYNC_EVENT_REQUEST, AdminOpcode.ABORT, AdminOpcode.DOORBELL_BUFFER_CONFIG, AdminOpcode.GET_LBA_STATUS):
        assert log.acs[op] & CommandEffects.CSUPP, op
    fmt = log.acs[AdminOpcode.FORMAT_NVM]
    assert fmt & CommandEffects.CSUPP and fmt & CommandEffects.LBCC and fmt & CommandEffects.NCC and fmt & CommandEffects.NIC
    for op in (AdminOpcode.NAMESPACE_MANAGEMENT, AdminOpcode.NAMESPACE_ATTACHMENT):
        assert log.acs[op] == CommandEffects.CSUPP | CommandEffects.NCC | CommandEffects.NIC | EffectsScope.NVM_SUBSYSTEM, op  # Linux rescans
    for op in (AdminOpcode.FIRMWARE_COMMIT, AdminOpcode.SANITIZE, AdminOpcode.KEEP_ALIVE):
        assert log.acs[op] == 0, op
    for op in (NvmOpcode.FLUSH, NvmOpcode.READ, NvmOpcode.COMPARE, NvmOpcode.VERIFY):
        assert log.iocs[op] == CommandEffects.CSUPP | EffectsScope.NAMESPACE, op
    for op in (NvmOpcode.WRITE, NvmOpcode.WRITE_UNCORRECTABLE, NvmOpcode.WRITE_ZEROES, NvmOpcode.DATASET_MANAGEMENT, NvmOpcode.COPY):
        assert log.iocs[op] == CommandEffects.CSUPP | CommandEffects.LBCC | EffectsScope.NAMESPACE, op
    for op in (NvmOpcode.RESERVATION_REGISTER, NvmOpcode.RESERVATION_REPORT):
        assert log.iocs[op] == 0, op


@pytest.mark.parametrize("lid", [L.DEVICE_SELF_TEST, L.TELEMETRY_HOST, L.PERSISTENT_EVENT, 0x7F, L.SANITIZE_STATUS, 0xFF])
def test_bad_log_page(nvme: Host, lid: int):
    assert nvme.get_log(lid, 512)[0].status == Status.INVALID_LOG_PAGE


def test_log_offset(nvme: Host):
    full = nvme.get_log(L.FIRMWARE_SLOT, 512)[1]
    c, part = nvme.get_log(L.FIRMWARE_SLOT, 64, offset=8)
    assert c.status == Status.SUCCESS and part == full[8:72]
    c, tail = nvme.get_log(L.FIRMWARE_SLOT, 64, offset=512)  # right at the end: zeros
    assert c.status == Status.SUCCESS and tail == bytes(64)
    assert nvme.get_log(L.FIRMWARE_SLOT, 64, offset=516)[0].status == Status.INVALID_FIELD
    assert nvme.get_log(L.SMART_HEALTH, 64, offset=1 << 33)[0].status == Status.INVALID_FIELD
    assert nvme.get_log(L.FIRMWARE_SLOT, 64, offset=2)[0].status == Status.INVALID_FIELD  # not dword aligned


def test_short_read_of_a_log(nvme: Host):
    c, data = nvme.get_log(L.SMART_HEALTH, 8)
    assert c.status == Status.SUCCESS
    assert int.from_bytes(data[1:3], "little") == 313
