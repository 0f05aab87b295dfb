"""Identify: every CNS the controller supports and the ones it refuses."""

from __future__ import annotations

import struct
import uuid

import pytest

from ..support.host import Host
from .ctrl_helpers import NS1_SIZE, NS2_SIZE, NS3_SIZE
from nvme_emu import identity, structures as st
from nvme_emu.spec.commands import Status
from nvme_emu.spec.identify import Cns, NsIdType, Oacs, Oncs


def nsid_list(data: bytes) -> list[int]:
    ids = struct.unpack("<1024I", data)
    return [i for i in ids if i]


def test_identify_controller(server, nvme: Host):
    c, data = nvme.identify(Cns.CONTROLLER)
    assert c.status == Status.SUCCESS
    idc = st.IdentifyController.parse(data)
    assert idc.mn == "nvme-emu"  # the CLI's --model default
    serial = identity.controller_serial(identity.controller_seed(server.path))  # no --serial: from the socket
    assert idc.sn == serial and idc.cntlid == identity.controller_id(serial)
    assert idc.fr == "0.1.0"
    assert idc.ver == 0x00020000
    assert idc.vid == 0x4E58 and idc.ssvid == 0x4E58
    assert idc.oacs & Oacs.DOORBELL_BUFFER_CONFIG  # OACS bit 8
    assert idc.oacs & Oacs.FORMAT_NVM
    for bit in (Oncs.COMPARE, Oncs.DATASET_MANAGEMENT, Oncs.WRITE_ZEROES, Oncs.TIMESTAMP, Oncs.VERIFY, Oncs.COPY):
        assert idc.oncs & bit, bit
    assert idc.sgls & 0b11 == 0b01  # SGLs supported, no alignment requirement
    assert idc.sgls & (1 << 16)  # bit bucket
    assert idc.mdts == 7
    assert idc.nn == 32
    assert idc.aerl == 3 and idc.acl == 3
    assert idc.sqes == 0x66 and idc.cqes == 0x44
    assert idc.subnqn.startswith("nqn.2014-08.org.nvmexpress:uuid:")
    uuid.UUID(idc.subnqn.rsplit(":", 1)[1])
    assert idc.subnqn == st.subsystem_nqn(serial)


def test_identify_namespace(nvme: Host):
    c, data = nvme.identify(Cns.NAMESPACE, nsid=1)
    assert c.status == Status.SUCCESS
    ns = st.IdentifyNamespace.parse(data)
    assert ns.nsze == ns.ncap == NS1_SIZE // 512
    assert ns.flbas == 0
    assert ns.nlbaf == 7 and ns.lbaf[0].lbads == 9 and ns.lbaf[1].lbads == 12  # 512 and 4096 (+0) first
    assert ns.dlfeat & 0b111 == 1
    _, data = nvme.identify(Cns.NAMESPACE, nsid=2)
    ns2 = st.IdentifyNamespace.parse(data)
    assert ns2.flbas == 1 and ns2.nsze == NS2_SIZE // 4096
    _, data = nvme.identify(Cns.NAMESPACE, nsid=3)
    assert st.IdentifyNamespace.parse(data).nsze == NS3_SIZE // 512
    assert ns.eui64 != ns2.eui64 and ns.nguid != ns2.nguid


def test_identify_namespace_inactive_is_zeros(nvme: Host):
    c, data = nvme.identify(Cns.NAMESPACE, nsid=7)  # allocatable (<= NN) but not active
    assert c.status == Status.SUCCESS
    assert data == bytes(4096)


@pytest.mark.parametrize("nsid", [0, 33, 0x12345678, 0xFFFFFFFE])
def test_identify_namespace_bad_nsid(nvme: Host, nsid: int):
    c, _ = nvme.identify(Cns.NAMESPACE, nsid=nsid)
    assert c.status == Status.INVALID_NAMESPACE_OR_FORMAT


def test_identify_namespace_broadcast_gives_common_format(nvme: Host):
    c, data = nvme.identify(Cns.NAMESPACE, nsid=0xFFFFFFFF)
    assert c.status == Status.SUCCESS
    ns = st.IdentifyNamespace.parse(data)
    assert ns.nsze == 0 and ns.lbaf[0].lbads == 9


def test_identify_active_namespace_list(nvme: Host):
    c, data = nvme.identify(Cns.ACTIVE_NSID_LIST, nsid=0)
    assert c.status == Status.SUCCESS
    assert nsid_list(data) == [1, 2, 3]
    assert nsid_list(nvme.identify(Cns.ACTIVE_NSID_LIST, nsid=1)[1]) == [2, 3]
    assert nsid_list(nvme.identify(Cns.ACTIVE_NSID_LIST, nsid=2)[1]) == [3]
    c, data = nvme.identify(Cns.ACTIVE_NSID_LIST, nsid=3)
    assert c.status == Status.SUCCESS and data == bytes(4096)
    for bad in (0xFFFFFFFE, 0xFFFFFFFF):
        assert nvme.identify(Cns.ACTIVE_NSID_LIST, nsid=bad)[0].status == Status.INVALID_NAMESPACE_OR_FORMAT


def test_identify_ns_descriptors(nvme: Host):
    seen = set()
    for nsid in (1, 2, 3):
        c, data = nvme.identify(Cns.NS_ID_DESCRIPTOR_LIST, nsid=nsid)
        assert c.status == Status.SUCCESS
        descs = dict(st.parse_ns_id_descriptors(data))
        assert set(descs) == {NsIdType.EUI64, NsIdType.NGUID, NsIdType.UUID, NsIdType.CSI}
        assert len(descs[NsIdType.EUI64]) == 8 and any(descs[NsIdType.EUI64])
        assert len(descs[NsIdType.NGUID]) == 16 and any(descs[NsIdType.NGUID])
        assert len(descs[NsIdType.UUID]) == 16
        assert descs[NsIdType.CSI] == b"\x00"
        _, idns = nvme.identify(Cns.NAMESPACE, nsid=nsid)
        ns = st.IdentifyNamespace.parse(idns)
        assert ns.eui64 == descs[NsIdType.EUI64] and ns.nguid == descs[NsIdType.NGUID]
        seen.add(descs[NsIdType.UUID])
    assert len(seen) == 3
    assert nvme.identify(Cns.NS_ID_DESCRIPTOR_LIST, nsid=9)[0].status == Status.INVALID_NAMESPACE_OR_FORMAT


def test_identify_iocs_namespace_cns05(nvme: Host):
    c, data = nvme.identify(Cns.IOCS_NAMESPACE, nsid=1, csi=0)
    assert c.status == Status.SUCCESS
    assert st.IdentifyNamespaceNvm.parse(data).pic == 0
    assert nvme.identify(Cns.IOCS_NAMESPACE, nsid=1, csi=2)[0].status == Status.INVALID_FIELD
    assert nvme.identify(Cns.IOCS_NAMESPACE, nsid=9, csi=0)[0].status == Status.INVALID_NAMESPACE_OR_FORMAT


def test_identify_iocs_controller_cns06(nvme: Host):
    c, data = nvme.identify(Cns.IOCS_CONTROLLER, csi=0)
    assert c.status == Status.SUCCESS
    assert st.IdentifyControllerNvm.parse(data).dmrl == 255
    assert nvme.identify(Cns.IOCS_CONTROLLER, csi=1)[0].status == Status.INVALID_FIELD


def test_identify_iocs_active_list_cns07(nvme: Host):
    c, data = nvme.identify(Cns.IOCS_ACTIVE_NSID_LIST, nsid=0, csi=0)
    assert c.status == Status.SUCCESS and nsid_list(data) == [1, 2, 3]
    assert nsid_list(nvme.identify(Cns.IOCS_ACTIVE_NSID_LIST, nsid=2, csi=0)[1]) == [3]
    c, data = nvme.identify(Cns.IOCS_ACTIVE_NSID_LIST, nsid=0, csi=2)  # zoned: none of these
    assert c.status == Status.SUCCESS and nsid_list(data) == []
    c, data = nvme.identify(Cns.IOCS_ACTIVE_NSID_LIST, nsid=0, csi=1)  # key value: not supported
    assert c.status == Status.INVALID_FIELD


def test_identify_independent_namespace_cns08(nvme: Host):
    c, data = nvme.identify(Cns.IOCS_INDEPENDENT_NAMESPACE, nsid=2)
    assert c.status == Status.SUCCESS
    assert st.IdentifyNamespaceIndependent.parse(data).nstat & 1
    assert nvme.identify(Cns.IOCS_INDEPENDENT_NAMESPACE, nsid=5)[0].status == Status.INVALID_NAMESPACE_OR_FORMAT


def test_identify_io_command_set_cns1c(nvme: Host):
    c, data = nvme.identify(Cns.IO_COMMAND_SET)
    assert c.status == Status.SUCCESS
    vectors = st.IdentifyIoCommandSet.parse(data).vectors
    assert vectors[0] == 0b101 and not any(vectors[1:])  # NVM and Zoned, together


@pytest.mark.parametrize("cns", [0x04, 0x14, 0x15, 0x1D, 0xFF])
def test_identify_unsupported_cns(nvme: Host, cns: int):
    c, data = nvme.identify(cns, nsid=1)
    assert c.status == Status.INVALID_FIELD
    assert data == b"\xa5" * 4096  # nothing was written
