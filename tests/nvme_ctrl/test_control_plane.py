"""The control plane against a real server process: ``ControlClient`` on its control socket,
the host driver on its vfio-user socket. Namespaces added, removed, created and attached at
runtime (with the events the host sees), and every kind of injected fault."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import time

import pytest

from ..support.host import Host
from ..support.server import child_env
from .ctrl_helpers import PAGE
from nvme_emu import structures as st
from nvme_emu.ctl import ControlClient, default_control_socket
from nvme_emu.jsonrpc import INVALID_PARAMS, RpcError
from nvme_emu.testing.host import Completion
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.events import AsyncEventConfig, AsyncEventNotice, AsyncEventType, async_event_dw0
from nvme_emu.spec.features import FeatureId
from nvme_emu.spec.identify import Cns, flbas_encode
from nvme_emu.spec.log_pages import LogPageId
from nvme_emu.spec.registers import Csts, Reg

AER = AdminOpcode.ASYNC_EVENT_REQUEST
NS_ATTRIBUTE_CHANGED = async_event_dw0(2, 0, LogPageId.CHANGED_NAMESPACE_LIST)


@pytest.fixture
def ctl(server):
    with ControlClient(default_control_socket(server.path)) as client:
        yield client


def active_nsids(n: Host, cns: int = Cns.ACTIVE_NSID_LIST) -> list[int]:
    c, data = n.identify(cns)
    assert c.status == Status.SUCCESS
    return [x for x in st.NsidList.parse(data).nsids if x]


def changed_nsids(n: Host) -> list[int]:
    c, data = n.get_log(LogPageId.CHANGED_NAMESPACE_LIST, 4096)
    assert c.status == Status.SUCCESS
    return [x for x in struct.unpack("<1024I", data) if x]


def enable_ns_notices(n: Host) -> int:
    """Ask for Namespace Attribute Changed notices and post one AER; its CID."""
    assert n.set_features(FeatureId.ASYNC_EVENT_CONFIGURATION, AsyncEventConfig.NAMESPACE_ATTRIBUTE).status == Status.SUCCESS
    aer = n.submit(0, AER)
    assert n.no_completion(0, aer)
    return aer


def media_errors(n: Host) -> int:
    c, data = n.get_log(LogPageId.SMART_HEALTH, 512)
    assert c.status == Status.SUCCESS
    return st.SmartLog.parse(data).media_errors


def newest_error(n: Host):
    c, data = n.get_log(LogPageId.ERROR_INFORMATION, 64)
    assert c.status == Status.SUCCESS
    return st.ErrorLogEntry.parse(data)


# -- the socket ------------------------------------------------------------------------------


def test_control_socket_is_owner_only_and_can_be_off(spawn, tmp_path):
    srv = spawn("ram:size=16M")
    assert stat.S_IMODE(os.stat(default_control_socket(srv.path)).st_mode) == 0o600
    off = spawn("ram:size=16M", extra=["--ctl-socket", "off"])
    assert not os.path.exists(default_control_socket(off.path))


def test_bad_requests_read_as_errors(ctl):
    with pytest.raises(RpcError) as err:
        ctl.fault_add(kind="media", nsid=7)
    assert err.value.code == INVALID_PARAMS and "no namespace 7" in err.value.message
    with pytest.raises(RpcError, match="kind must be one of"):
        ctl.fault_add(kind="meteor")
    with pytest.raises(RpcError, match="unknown parameter"):
        ctl.fault_add(kind="drop", colour="red")
    assert ctl.controllers()[0]["active_namespaces"] == [1, 2, 3]  # the connection goes on


def test_stats_and_listing(ctl, io: Host):
    io.write_ok(1, 1, 0, os.urandom(4096))
    stats = ctl.stats()
    assert stats["queues"]["sq1"]["commands"] >= 1 and stats["doorbell_mode"] == "trap"
    assert stats["controllers"][0]["enabled"] and stats["counters"]["dropped"] == 0
    namespaces = ctl.namespaces()
    assert [(ns["nsid"], ns["backend"], ns["lba_size"]) for ns in namespaces] == [
        (1, "RamBackend", 512), (2, "RamBackend", 4096), (3, "FileBackend", 512)]
    assert namespaces[0]["stats"]["write_commands"] == 1
    assert set(ctl.queues()) == {"sq0", "sq1"}


# -- namespaces at runtime -------------------------------------------------------------------


def test_namespace_added_and_removed_at_runtime(ctl, io: Host):
    aer = enable_ns_notices(io)
    added = ctl.ns_add(spec="ram:size=8M,lba=4096")
    assert added["nsid"] == 4 and added["attached"]
    assert io.wait_cid(0, aer).dw0 == NS_ATTRIBUTE_CHANGED
    assert changed_nsids(io) == [4]
    assert active_nsids(io) == [1, 2, 3, 4]
    data = os.urandom(4096)
    io.write_ok(1, 4, 7, data, lba_size=4096)
    assert io.read_ok(1, 4, 7, 1, lba_size=4096) == data

    aer = io.submit(0, AER)
    ctl.ns_remove(nsid=4)
    assert io.wait_cid(0, aer).dw0 == NS_ATTRIBUTE_CHANGED
    assert changed_nsids(io) == [4]
    assert active_nsids(io) == [1, 2, 3]
    assert io.write(1, 4, 0, data, lba_size=4096).status == Status.INVALID_NAMESPACE_OR_FORMAT
    assert [ns["nsid"] for ns in ctl.namespaces()] == [1, 2, 3]


def create_ns(n: Host, nsze: int, *, ncap: int | None = None, lbaf: int = 0):
    buf = n.alloc(PAGE)
    n.write_mem(buf, st.build_identify_namespace(nsze=nsze, ncap=nsze if ncap is None else ncap, flbas=flbas_encode(lbaf)))
    return n.admin(AdminOpcode.NAMESPACE_MANAGEMENT, prp1=buf, cdw10=0)


def own_cntlid(n: Host) -> int:
    """This controller's ID (derived from its serial number, see nvme_emu/identity.py)."""
    return st.IdentifyController.parse(n.identify(Cns.CONTROLLER)[1]).cntlid


def attachment(n: Host, nsid: int, sel: int, cntlids=None):
    if cntlids is None:
        cntlids = (own_cntlid(n),)
    buf = n.alloc(PAGE)
    n.write_mem(buf, st.build_controller_list(cntlids))
    return n.admin(AdminOpcode.NAMESPACE_ATTACHMENT, nsid=nsid, prp1=buf, cdw10=sel)


def test_namespace_management_and_attachment(ctl, io: Host):
    c, ctrl = io.identify(Cns.CONTROLLER)
    idc = st.IdentifyController.parse(ctrl)
    assert idc.oacs & (1 << 3) and idc.mnan == idc.nn
    created = create_ns(io, 2048, lbaf=1)  # 8 MiB of 4 KiB blocks
    assert created.status == Status.SUCCESS and created.dw0 == 4
    assert active_nsids(io, Cns.ALLOCATED_NSID_LIST) == [1, 2, 3, 4]
    assert active_nsids(io) == [1, 2, 3]  # allocated, not attached
    c, data = io.identify(Cns.ALLOCATED_NAMESPACE, nsid=4)
    assert st.IdentifyNamespace.parse(data).nsze == 2048
    c, data = io.identify(Cns.NAMESPACE, nsid=4)
    assert data == bytes(PAGE)  # inactive
    assert st.ControllerList.parse(io.identify(Cns.NS_ATTACHED_CONTROLLER_LIST, nsid=4)[1]).count == 0

    aer = enable_ns_notices(io)
    assert attachment(io, 4, 0).status == Status.SUCCESS
    assert io.wait_cid(0, aer).dw0 == NS_ATTRIBUTE_CHANGED
    assert active_nsids(io) == [1, 2, 3, 4]
    assert list(st.ControllerList.parse(io.identify(Cns.NS_ATTACHED_CONTROLLER_LIST, nsid=4)[1]).ids[:1]) == [idc.cntlid]
    data = os.urandom(4096)
    io.write_ok(1, 4, 2047, data, lba_size=4096)
    assert io.read_ok(1, 4, 2047, 1, lba_size=4096) == data
    assert attachment(io, 4, 0).status == Status.NAMESPACE_ALREADY_ATTACHED
    assert attachment(io, 4, 1, cntlids=(idc.cntlid % 0xFFEF + 1,)).status == Status.CONTROLLER_LIST_INVALID  # another
    assert ctl.namespaces()[3]["attached"] is True

    assert attachment(io, 4, 1).status == Status.SUCCESS
    assert io.read(1, 4, 0, 1, lba_size=4096)[0].status == Status.INVALID_NAMESPACE_OR_FORMAT
    assert attachment(io, 4, 1).status == Status.NAMESPACE_NOT_ATTACHED
    assert io.admin(AdminOpcode.NAMESPACE_MANAGEMENT, nsid=4, cdw10=1).status == Status.SUCCESS
    assert active_nsids(io, Cns.ALLOCATED_NSID_LIST) == [1, 2, 3]
    assert io.admin(AdminOpcode.NAMESPACE_MANAGEMENT, nsid=4, cdw10=1).status == Status.INVALID_NAMESPACE_OR_FORMAT


def test_namespace_management_refusals(io: Host):
    assert create_ns(io, 100, ncap=50).status == Status.THIN_PROVISIONING_NOT_SUPPORTED
    assert create_ns(io, 1 << 40).status == Status.NAMESPACE_INSUFFICIENT_CAPACITY
    assert create_ns(io, 100, lbaf=8).status == Status.INVALID_FORMAT  # past the last of eight
    c, ctrl = io.identify(Cns.CONTROLLER)
    idc = st.IdentifyController.parse(ctrl)
    assert 0 < idc.unvmcap < idc.tnvmcap


def test_created_namespace_file_in_ns_dir(spawn, tmp_path):
    ns_dir = tmp_path / "namespaces"
    ns_dir.mkdir()
    srv = spawn("ram:size=16M", extra=["--ns-dir", str(ns_dir)])
    n = Host(srv.path)
    try:
        assert create_ns(n, 4096).dw0 == 2
        assert (ns_dir / "ns2.img").stat().st_size == 4096 * 512
        assert n.admin(AdminOpcode.NAMESPACE_MANAGEMENT, nsid=2, cdw10=1).status == Status.SUCCESS
        assert not (ns_dir / "ns2.img").exists()
    finally:
        n.close()


# -- faults ----------------------------------------------------------------------------------


def test_media_error_on_a_range(ctl, io: Host):
    before = media_errors(io)
    fault = ctl.fault_add(kind="media", nsid=1, slba=100, nlb=8, op="read")
    c, _ = io.read(1, 1, 96, 8)
    assert c.status == Status.UNRECOVERED_READ_ERROR and c.dnr
    entry = newest_error(io)
    assert (entry.sqid, entry.cid, entry.nsid, entry.lba) == (1, c.cid, 1, 100)
    assert media_errors(io) == before + 1
    io.read_ok(1, 1, 0, 8)  # outside the range
    io.read_ok(1, 1, 108, 8)
    io.read_ok(1, 2, 100, 1, lba_size=4096)  # another namespace
    io.write_ok(1, 1, 100, os.urandom(4096))  # reads only
    listed = ctl.fault_list()
    assert listed["faults"][0]["hits"] == 1 and listed["counters"]["media_errors"] == 1
    assert ctl.controllers()[0]["media_errors"] == before + 1
    assert ctl.fault_clear(id=fault["id"]) == 1
    io.read_ok(1, 1, 96, 8)


def test_write_fault_counts_down(ctl, io: Host):
    ctl.fault_add(kind="media", nsid=3, op="write", remaining=1)
    data = os.urandom(512)
    c = io.write(1, 3, 5, data)
    assert c.status == Status.WRITE_FAULT and c.dnr
    io.write_ok(1, 3, 5, data)  # the one hit is used up
    assert io.read_ok(1, 3, 5, 1) == data


@pytest.mark.parametrize("nsid", [1, 3], ids=["ram", "file"])
def test_latency_holds_the_completion(ctl, io: Host, nsid: int):
    ctl.fault_add(kind="latency", nsid=nsid, us=300_000, op="write", remaining=1)
    started = time.monotonic()
    io.write_ok(1, nsid, 0, os.urandom(512))
    assert time.monotonic() - started >= 0.3
    assert ctl.fault_list()["counters"]["delayed"] == 1


def test_latency_distributions_are_validated(ctl):
    with pytest.raises(RpcError, match="min_us <= max_us"):
        ctl.fault_add(kind="latency", dist="uniform", min_us=10, max_us=5)
    fault = ctl.fault_add(kind="latency", dist="exponential", us=50)
    assert fault["dist"] == "exponential"


def test_dropped_completion_then_reset(ctl, io: Host):
    ctl.fault_add(kind="drop", nsid=1, remaining=1)
    lost = io.submit(1, 0x02, nsid=1, prp1=io.alloc(512), cdw10=0, cdw12=0)
    io.read_ok(1, 1, 0, 1)  # after the lost one on the same SQ: the device keeps serving
    assert io.no_completion(1, lost)
    assert ctl.fault_list()["counters"]["dropped"] == 1
    io.host.disable()  # what a host's timeout handling ends with
    io.enable()
    io.set_queues(4)
    io.create_pair(1, 64)
    io.read_ok(1, 1, 0, 1)


def test_fatal_status_until_reset(ctl, io: Host):
    state = ctl.fatal(reason="test")
    assert state["fatal"]
    assert io.reg32(Reg.CSTS) & Csts.CFS
    cid = io.submit(1, 0x02, nsid=1, prp1=io.alloc(512))
    assert io.no_completion(1, cid)  # nothing is processed
    io.host.disable()
    assert not io.reg32(Reg.CSTS) & Csts.CFS
    io.enable()
    io.set_queues(4)
    io.create_pair(1, 64)
    io.read_ok(1, 1, 0, 1)
    assert ctl.controllers()[0]["faults"]["fatal"] == 1


def test_ctl_command_line(server):
    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nvme_emu", "ctl", "--socket", default_control_socket(server.path), *args],
                              capture_output=True, text=True, env=child_env(), timeout=60)

    added = ctl("fault", "media", "--nsid", "2", "--slba", "5", "--nlb", "1", "--op", "write", "--count", "2")
    assert added.returncode == 0, added.stderr
    assert {k: json.loads(added.stdout)[k] for k in ("kind", "nsid", "slba", "nlb", "op", "remaining")} == {
        "kind": "media", "nsid": 2, "slba": 5, "nlb": 1, "op": "write", "remaining": 2}
    ctl("fault", "latency", "--dist", "uniform", "--min-us", "1", "--max-us", "2")
    listing = json.loads(ctl("list").stdout)
    assert [f["kind"] for f in listing["faults"]] == ["media", "latency"]
    assert [ns["nsid"] for ns in listing["namespaces"]] == [1, 2, 3]
    assert json.loads(ctl("fault-clear").stdout) == 2
    refused = ctl("ns-remove", "9")
    assert refused.returncode == 1 and "no namespace 9" in refused.stderr


def lba_status(n: Host, nsid: int, slba: int = 0, *, mndw: int = 63, atype: int = 0x11, rl: int = 0) -> tuple[Completion, list[tuple[int, int]]]:
    """Get LBA Status: the completion and the (DSLBA, NLB) of each descriptor returned."""
    buf = n.alloc(PAGE)
    n.write_mem(buf, b"\xa5" * PAGE)
    c = n.admin(AdminOpcode.GET_LBA_STATUS, nsid=nsid, prp1=buf, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=mndw, cdw13=atype << 24 | rl)
    raw = n.read_mem(buf, PAGE)
    nlsd = struct.unpack_from("<I", raw)[0] if c.status == Status.SUCCESS else 0
    return c, [struct.unpack_from("<QI", raw, 8 + 16 * i) for i in range(nlsd)]


def test_write_uncorrectable_and_media_faults_in_lba_status(ctl, io: Host):
    """A whole controller on each backend: Write Uncorrectable on a RAM and a file namespace,
    the LBA Status Information Alert, Get LBA Status and the log with a media fault's range
    among the marks, and writes that clear them."""
    assert io.set_features(FeatureId.ASYNC_EVENT_CONFIGURATION, AsyncEventConfig.LBA_STATUS).status == Status.SUCCESS
    aer = io.submit(0, AER)
    data = os.urandom(4096)
    for nsid in (1, 3):  # RAM, file
        io.write_ok(1, nsid, 40, data)
        assert io.io(1, NvmOpcode.WRITE_UNCORRECTABLE, nsid, 42, 2).status == Status.SUCCESS
        c, _ = io.read(1, nsid, 40, 8)
        assert c.status == Status.UNRECOVERED_READ_ERROR and c.dnr
        assert newest_error(io).lba == 42
    assert io.wait_cid(0, aer).dw0 == async_event_dw0(AsyncEventType.NOTICE, AsyncEventNotice.LBA_STATUS_INFORMATION_ALERT, LogPageId.LBA_STATUS_INFORMATION)
    fault = ctl.fault_add(kind="media", nsid=1, slba=300, nlb=4, op="read")
    c, descs = lba_status(io, 1)
    assert c.status == Status.SUCCESS and descs == [(42, 2), (300, 4)]
    c, log = io.get_log(LogPageId.LBA_STATUS_INFORMATION, 4096)
    assert c.status == Status.SUCCESS
    length, elements = struct.unpack_from("<II", log)
    assert (length, elements) == (16 + (16 + 2 * 16) + (16 + 16), 2)
    assert struct.unpack_from("<II", log, 16) == (1, 2) and struct.unpack_from("<II", log, 16 + 48) == (3, 1)
    for nsid in (1, 3):
        io.write_ok(1, nsid, 42, data[:1024])
        assert io.read_ok(1, nsid, 40, 8) == data[:1024] + data[:1024] + data[2048:]
    assert ctl.fault_clear(id=fault["id"]) == 1
    for nsid in (1, 3):
        c, descs = lba_status(io, nsid)
        assert c.status == Status.SUCCESS and descs == []
    assert lba_status(io, 7)[0].status == Status.INVALID_NAMESPACE_OR_FORMAT
