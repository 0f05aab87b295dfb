"""A zoned ``file:`` namespace served by ``nvme-emu serve`` over a real vfio-user socket (each
server backend), driven by the in-process host driver: the spec string on the command line,
Identify for CSI 02h, Zone Appends in flight together on the I/O pool (each completion's
DW0/DW1 names where its data went), Report Zones, the write rules, Reset back to zeros."""

from __future__ import annotations

import os
import struct

from nvme_emu.spec.commands import NvmOpcode, Status
from nvme_emu.spec.identify import Cns, Csi
from nvme_emu.spec.zns import ZS_SHIFT, ZnsOpcode, ZoneSendAction, ZoneState
from nvme_emu.zoned.structures import IdentifyControllerZns, IdentifyNamespaceZns
from nvme_emu import structures as st

from ..nvme_ctrl.ctrl_helpers import RAM_SIZE
from ..support.host import PAGE, Host

ZONE = 2048  #: LBAs in a 1 MiB zone of 512-byte blocks
CAP = 1536  #: 768 KiB writable


def report(host: Host, slba: int, size: int = PAGE) -> tuple[int, list[tuple[int, int, int]]]:
    """(Number of Zones, [(state, ZSLBA, WP)]) of a Report Zones from ``slba``."""
    buf = host.alloc(size)
    prp1, prp2 = host.prps(buf, size)
    host.ok(1, ZnsOpcode.ZONE_MANAGEMENT_RECEIVE, nsid=1, prp1=prp1, prp2=prp2, cdw10=slba, cdw12=size // 4 - 1)
    data = host.read_mem(buf, size)
    (count,) = struct.unpack_from("<Q", data)
    zones = []
    for i in range(min(count, (size - 64) // 64)):
        _zt, zs, _za, _zai, _zcap, zslba, wp = struct.unpack_from("<BBBB4xQQQ", data, 64 + 64 * i)
        zones.append((zs >> ZS_SHIFT, zslba, wp))
    return count, zones


def test_zoned_file_namespace_over_vfio_user(spawn, tmp_path):
    image = tmp_path / "zoned.img"
    server = spawn(f"file:{image},size=16M,zoned,zone_size=1M,zone_cap=768K,max_open=4,max_active=6", "ram:size=8M")
    host = Host(server.path, ram_size=RAM_SIZE)
    try:
        host.set_queues(2)
        host.create_pair(1, 64)
        c, data = host.identify(Cns.IOCS_NAMESPACE, nsid=1, csi=Csi.ZONED)
        assert c.status == Status.SUCCESS
        zns = IdentifyNamespaceZns.parse(data)
        assert (zns.lbafe[0].zsze, zns.mor, zns.mar) == (ZONE, 3, 5)
        assert IdentifyControllerZns.parse(host.identify(Cns.IOCS_CONTROLLER, csi=Csi.ZONED)[1]).zasl == 0
        assert st.IdentifyNamespace.parse(host.identify(Cns.NAMESPACE, nsid=1)[1]).nsze == 16 * ZONE
        assert host.identify(Cns.IOCS_NAMESPACE, nsid=2, csi=Csi.ZONED)[0].status == Status.INVALID_FIELD

        # eight 4 KiB Zone Appends to zone 2 at once: each lands somewhere, all at distinct places
        z2 = 2 * ZONE
        chunks = [os.urandom(8 * 512) for _ in range(8)]
        cids = []
        for chunk in chunks:
            buf = host.alloc(len(chunk))
            host.write_mem(buf, chunk)
            prp1, prp2 = host.prps(buf, len(chunk))
            cids.append(host.host.submit(1, ZnsOpcode.ZONE_APPEND, nsid=1, prp1=prp1, prp2=prp2, cdw10=z2, cdw12=7, ring=False))
        host.host.ring_sq(1)
        done = [host.wait_cid(1, cid) for cid in cids]
        assert all(c.status == Status.SUCCESS for c in done), [c.status for c in done]
        albas = [c.result64 for c in done]
        assert sorted(albas) == [z2 + 8 * i for i in range(8)]
        for alba, chunk in zip(albas, chunks, strict=True):
            assert host.read_ok(1, 1, alba, 8) == chunk
        with open(image, "rb") as f:  # on the file itself, where the completion said
            f.seek(albas[3] * 512)
            assert f.read(8 * 512) == chunks[3]

        count, zones = report(host, z2)
        assert count == 14 and zones[0] == (ZoneState.IMPLICITLY_OPENED, z2, z2 + 64)
        assert zones[1] == (ZoneState.EMPTY, 3 * ZONE, 3 * ZONE)

        # the write rules
        assert host.write(1, 1, z2 + 8, os.urandom(512)).status == Status.ZONE_INVALID_WRITE
        host.write_ok(1, 1, z2 + 64, os.urandom(512))
        assert host.write(1, 1, z2 + CAP - 1, os.urandom(1024)).status == Status.ZONE_INVALID_WRITE
        assert host.io(1, NvmOpcode.READ, 1, ZONE - 1, 2, prp1=host.alloc(PAGE)).status == Status.ZONE_BOUNDARY_ERROR

        # Reset: the zone is Empty and its blocks read as zeros again (punched in the file)
        host.ok(1, ZnsOpcode.ZONE_MANAGEMENT_SEND, nsid=1, cdw10=z2, cdw13=ZoneSendAction.RESET)
        assert report(host, z2)[1][0] == (ZoneState.EMPTY, z2, z2)
        assert host.read_ok(1, 1, z2, 16) == bytes(16 * 512)
        # the NVM namespace beside it is served as before
        host.write_ok(1, 2, 5, os.urandom(4096))
    finally:
        host.close()
