"""Asynchronous events, Abort, no Keep Alive, Format NVM, Doorbell Buffer Config, and refusals."""

from __future__ import annotations

import os
import struct

import pytest

from ..support.host import Host
from .ctrl_helpers import NOOP_ADMIN
from nvme_emu import structures as st
from nvme_emu.testing.host import HostDoorbells, ShadowBufferDoorbells
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.events import async_event_dw0
from nvme_emu.spec.features import FeatureId
from nvme_emu.spec.identify import Cns
from nvme_emu.spec.log_pages import LogPageId
from nvme_emu.spec.registers import Reg

AER = AdminOpcode.ASYNC_EVENT_REQUEST


# -- Asynchronous Event Request --------------------------------------------------------------


def test_aer_limit_exceeded(nvme: Host):
    cids = [nvme.submit(0, AER) for _ in range(4)]  # AERL = 3: four may be outstanding
    extra = nvme.admin(AER)
    assert extra.status == Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED
    assert extra.dnr
    for cid in cids:
        assert nvme.no_completion(0, cid)
    assert nvme.admin(**NOOP_ADMIN).status == Status.SUCCESS  # the queue goes on


def test_aer_invalid_doorbell_write_value(io: Host):
    io.write_ok(1, 1, 0, os.urandom(512))
    aer = io.submit(0, AER)
    assert io.no_completion(0, aer)
    q = io.host.queues[1]
    io.host.doorbells.ring(2, q.depth)  # SQ 1 tail = 64 >= its 64 entries
    c = io.wait_cid(0, aer)
    assert c.status == Status.SUCCESS
    assert c.dw0 == async_event_dw0(0, 1, LogPageId.ERROR_INFORMATION) == 0x010100
    # the bad value was not acted on: nothing ran on queue 1
    io.sync()
    assert io.host.reap(1) == []
    data = os.urandom(1024)
    io.write_ok(1, 1, 8, data)
    assert io.read_ok(1, 1, 8, 2) == data


def test_aer_error_events_masked_until_log_read(io: Host):
    a1, a2 = io.submit(0, AER), io.submit(0, AER)
    io.host.doorbells.ring(2 * 9, 1)  # SQ 9 does not exist: invalid doorbell register
    first = io.wait_cid(0, a1)
    assert first.dw0 == async_event_dw0(0, 0, LogPageId.ERROR_INFORMATION)
    io.host.doorbells.ring(2 * 1 + 1, 64)  # CQ 1 head 64 >= 64 entries: write value
    assert io.no_completion(0, a2)  # error events are masked until the log is read
    c, _ = io.get_log(LogPageId.ERROR_INFORMATION, 64, rae=True)  # RAE: stays masked
    assert c.status == Status.SUCCESS and io.no_completion(0, a2)
    c, _ = io.get_log(LogPageId.ERROR_INFORMATION, 64)
    assert c.status == Status.SUCCESS
    second = io.wait_cid(0, a2)
    assert second.dw0 == async_event_dw0(0, 1, LogPageId.ERROR_INFORMATION)


def test_aer_temperature_event(nvme: Host):
    assert nvme.set_features(FeatureId.ASYNC_EVENT_CONFIGURATION, 1 << 1).status == Status.SUCCESS
    aer = nvme.submit(0, AER)
    assert nvme.no_completion(0, aer)
    c = nvme.set_features(FeatureId.TEMPERATURE_THRESHOLD, 300)  # over-temperature below 313 K
    assert c.status == Status.SUCCESS
    ev = nvme.wait_cid(0, aer)
    assert ev.status == Status.SUCCESS
    assert ev.dw0 & 7 == 1  # SMART / Health
    assert ev.dw0 == async_event_dw0(1, 1, LogPageId.SMART_HEALTH)
    _, data = nvme.get_log(LogPageId.SMART_HEALTH, 512)
    assert st.SmartLog.parse(data).critical_warning & 0x2
    assert nvme.set_features(FeatureId.TEMPERATURE_THRESHOLD, 343).status == Status.SUCCESS
    _, data = nvme.get_log(LogPageId.SMART_HEALTH, 512)
    assert st.SmartLog.parse(data).critical_warning == 0


def test_aer_temperature_event_not_sent_when_disabled(nvme: Host):
    aer = nvme.submit(0, AER)
    assert nvme.set_features(FeatureId.TEMPERATURE_THRESHOLD, 300).status == Status.SUCCESS
    assert nvme.no_completion(0, aer)


def test_aer_namespace_change_after_format(io: Host):
    assert io.set_features(FeatureId.ASYNC_EVENT_CONFIGURATION, 1 << 8).status == Status.SUCCESS
    aer = io.submit(0, AER)
    assert io.admin(AdminOpcode.FORMAT_NVM, nsid=1, cdw10=1).status == Status.SUCCESS
    ev = io.wait_cid(0, aer)
    assert ev.dw0 == async_event_dw0(2, 0, LogPageId.CHANGED_NAMESPACE_LIST)
    c, data = io.get_log(LogPageId.CHANGED_NAMESPACE_LIST, 4096)
    assert c.status == Status.SUCCESS
    assert st.ChangedNamespaceList.parse(data).nsids[:2] == [1, 0]


def test_aer_event_waits_for_a_request(nvme: Host):
    assert nvme.set_features(FeatureId.ASYNC_EVENT_CONFIGURATION, 1 << 8).status == Status.SUCCESS
    assert nvme.admin(AdminOpcode.FORMAT_NVM, nsid=3, cdw10=0).status == Status.SUCCESS
    ev = nvme.admin(AER)  # the event was queued; this request picks it up
    assert ev.status == Status.SUCCESS
    assert ev.dw0 == async_event_dw0(2, 0, LogPageId.CHANGED_NAMESPACE_LIST)


# -- Abort, Keep Alive (not supported) ----------------------------------------------------------------------


def test_abort(io: Host):
    c = io.admin(AdminOpcode.ABORT, cdw10=1 | 5 << 16)
    assert c.status == Status.SUCCESS
    assert c.dw0 & 1 == 1  # not aborted: it had already completed
    assert io.admin(AdminOpcode.ABORT, cdw10=0 | 7 << 16).dw0 & 1 == 1
    assert io.admin(AdminOpcode.ABORT, cdw10=9 | 1 << 16).status == Status.INVALID_FIELD


def test_keep_alive_is_not_supported_as_kas_is_0(nvme: Host):
    """KAS = 0: neither the Keep Alive command nor the Keep Alive Timer feature exists."""
    c, data = nvme.identify(Cns.CONTROLLER)
    assert st.IdentifyController.parse(data).kas == 0
    assert nvme.admin(AdminOpcode.KEEP_ALIVE).status == Status.INVALID_OPCODE
    assert nvme.set_features(FeatureId.KEEP_ALIVE_TIMER, 120000).status == Status.INVALID_FIELD
    assert nvme.get_features(FeatureId.KEEP_ALIVE_TIMER).status == Status.INVALID_FIELD


# -- Format NVM --------------------------------------------------------------------------------


def test_format_512_to_4096(io: Host):
    io.write_ok(1, 1, 0, os.urandom(64 * 1024))
    _, before = io.identify(Cns.NAMESPACE, nsid=1)
    assert st.IdentifyNamespace.parse(before).flbas == 0
    assert io.admin(AdminOpcode.FORMAT_NVM, nsid=1, cdw10=1).status == Status.SUCCESS
    _, after = io.identify(Cns.NAMESPACE, nsid=1)
    ns = st.IdentifyNamespace.parse(after)
    assert ns.flbas == 1
    assert ns.nsze == (64 << 20) // 4096
    assert io.read_ok(1, 1, 0, 16, lba_size=4096) == bytes(64 * 1024)
    data = os.urandom(8192)
    io.write_ok(1, 1, 3, data, lba_size=4096)
    assert io.read_ok(1, 1, 3, 2, lba_size=4096) == data
    assert io.io(1, NvmOpcode.READ, 1, ns.nsze, 1, prp1=io.alloc(4096)).status == Status.LBA_OUT_OF_RANGE
    # and back
    assert io.admin(AdminOpcode.FORMAT_NVM, nsid=1, cdw10=0).status == Status.SUCCESS
    assert st.IdentifyNamespace.parse(io.identify(Cns.NAMESPACE, nsid=1)[1]).flbas == 0
    assert io.read_ok(1, 1, 24, 16) == bytes(8192)


def test_format_all_namespaces(io: Host):
    for nsid, lba in ((1, 512), (2, 4096), (3, 512)):
        io.write_ok(1, nsid, 0, b"\x77" * lba, lba_size=lba)
    assert io.admin(AdminOpcode.FORMAT_NVM, nsid=0xFFFFFFFF, cdw10=1).status == Status.SUCCESS
    for nsid in (1, 2, 3):
        assert st.IdentifyNamespace.parse(io.identify(Cns.NAMESPACE, nsid=nsid)[1]).flbas == 1
        assert io.read_ok(1, nsid, 0, 1, lba_size=4096) == bytes(4096)


@pytest.mark.parametrize(
    "cdw10,status",
    [
        (1 << 5, Status.INVALID_FORMAT),  # PI type 1 on LBA format 0: no metadata to hold it
        (3 << 5 | 1, Status.INVALID_FORMAT),  # PI type 3 on LBA format 1 (4096+0)
        (4 << 5 | 2, Status.INVALID_FIELD),  # PI type 4 is reserved (LBA format 2 is 512+8)
        (8, Status.INVALID_FORMAT),  # LBA format 8 does not exist (eight formats: 0-7)
        (1 << 12, Status.INVALID_FORMAT),  # LBA format 16 (upper bits)
        (2 << 9, Status.INVALID_FIELD),  # cryptographic erase
    ],
)
def test_format_refusals(io: Host, cdw10: int, status: int):
    data = os.urandom(512)
    io.write_ok(1, 1, 0, data)
    assert io.admin(AdminOpcode.FORMAT_NVM, nsid=1, cdw10=cdw10).status == status
    assert io.read_ok(1, 1, 0, 1) == data  # nothing was erased
    assert st.IdentifyNamespace.parse(io.identify(Cns.NAMESPACE, nsid=1)[1]).flbas == 0


def test_format_bad_namespace(nvme: Host):
    assert nvme.admin(AdminOpcode.FORMAT_NVM, nsid=9, cdw10=0).status == Status.INVALID_NAMESPACE_OR_FORMAT
    assert nvme.admin(AdminOpcode.FORMAT_NVM, nsid=0, cdw10=0).status == Status.INVALID_NAMESPACE_OR_FORMAT


def test_format_with_user_data_erase(io: Host):
    io.write_ok(1, 3, 0, b"\x11" * 4096)
    assert io.admin(AdminOpcode.FORMAT_NVM, nsid=3, cdw10=1 << 9).status == Status.SUCCESS
    assert io.read_ok(1, 3, 0, 8) == bytes(4096)


# -- Doorbell Buffer Config -------------------------------------------------------------------


def test_doorbell_buffer_config_refusals(nvme: Host):
    page = nvme.alloc(2 * 4096)
    dbbc = AdminOpcode.DOORBELL_BUFFER_CONFIG
    assert nvme.admin(dbbc, prp1=page + 8, prp2=page + 4096).status == Status.INVALID_FIELD
    assert nvme.admin(dbbc, prp1=page, prp2=page + 4096 + 0x100).status == Status.INVALID_FIELD
    assert nvme.admin(dbbc, prp1=0, prp2=page).status == Status.INVALID_FIELD
    assert nvme.admin(dbbc, prp1=0x4000_0000, prp2=page).status == Status.DATA_TRANSFER_ERROR


def test_io_through_shadow_doorbells(nvme: Host):
    shadow, eventidx = nvme.alloc(4096), nvme.alloc(4096)
    assert nvme.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=eventidx).status == Status.SUCCESS
    dbs = ShadowBufferDoorbells(HostDoorbells(nvme.client), nvme.mem, shadow, eventidx)
    nvme.host.doorbells = dbs
    nvme.set_queues(2)
    nvme.create_pair(1, 16)
    nvme.create_pair(2, 8)
    written = {}
    for i in range(40):  # several trips around both rings
        qid = 1 + i % 2
        data = os.urandom(512)
        nvme.write_ok(qid, 1, i, data)
        written[i] = data
    for i, data in written.items():
        assert nvme.read_ok(2 - i % 2, 1, i, 1) == data
    assert dbs.kicks > 0
    assert dbs.suppressed > 0  # CQ head updates mostly stay in the shadow buffer
    # the controller published EventIdx for the SQ tails it consumed
    for qid in (1, 2):
        assert nvme.mem.u32(eventidx + 8 * qid) == nvme.host.queues[qid].tail
    # admin still works through the real doorbell
    assert nvme.identify(Cns.CONTROLLER)[0].status == Status.SUCCESS


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("opc", [0x03, 0x07, 0x0B, AdminOpcode.VIRTUALIZATION_MANAGEMENT, AdminOpcode.FIRMWARE_COMMIT, AdminOpcode.SANITIZE, 0x7E, 0xC0, 0xFF])
def test_unknown_admin_opcode(nvme: Host, opc: int):
    c = nvme.admin(opc, nsid=1)
    assert c.status == Status.INVALID_OPCODE
    assert c.dnr


@pytest.mark.parametrize("psdt", [1, 2])
def test_admin_sgl_is_invalid_field(nvme: Host, psdt: int):
    buf = nvme.alloc(4096)
    sgl = struct.pack("<QI3xB", buf, 4096, 0)  # a Data Block descriptor
    prp1, prp2 = struct.unpack("<QQ", sgl)
    c = nvme.admin(AdminOpcode.IDENTIFY, cdw10=Cns.CONTROLLER, prp1=prp1, prp2=prp2, flags=psdt << 6)
    assert c.status == Status.INVALID_FIELD
    assert nvme.read_mem(buf, 4096) == bytes(4096)


def test_fused_admin_is_invalid_field(nvme: Host):
    assert nvme.admin(**NOOP_ADMIN, flags=1).status == Status.INVALID_FIELD


def test_admin_queue_wraps(nvme: Host):
    for _ in range(3 * 32 + 5):  # the admin queues have 32 entries
        assert nvme.admin(**NOOP_ADMIN).status == Status.SUCCESS
    assert nvme.reg32(Reg.CSTS) & 1


def test_invalid_doorbell_value_leaves_the_queue_state_alone(inproc):
    """Looked at from inside: the SQ tail is unchanged and the event is queued for an AER."""
    srv = inproc()
    ctrl = srv.device.controller
    n = Host(srv.path)
    try:
        n.set_queues(1)
        n.create_pair(1, 16)
        n.write_ok(1, 1, 0, os.urandom(512))
        tail_before = srv.call(lambda: ctrl.sqs[1].tail)
        n.host.doorbells.ring(2, 16)
        n.sync()
        assert srv.call(lambda: (ctrl.sqs[1].tail, ctrl.sqs[1].head)) == (tail_before, tail_before)
        assert srv.call(lambda: list(ctrl.state.events.queued)) == [(0, 1, LogPageId.ERROR_INFORMATION)]
        ev = n.admin(AER)
        assert ev.dw0 == async_event_dw0(0, 1, LogPageId.ERROR_INFORMATION)
        assert srv.call(lambda: list(ctrl.state.events.queued)) == []
    finally:
        n.close()
