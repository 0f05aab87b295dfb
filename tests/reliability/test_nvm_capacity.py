"""What a guest can make the server allocate with Namespace Management (issue 22, item 11).

An outside fuzz run's guest created 31 RAM namespaces of 2 GiB under a fixed 64 GiB TNVMCAP
on a 23 GiB host, and every write grew the server's shared memory. Against a server process:
creation beyond the budget (``--nvm-capacity``, default 4 GiB) fails with Namespace
Insufficient Capacity, and the namespaces' memfds (what writes can fill) never add up to more
than the budget plus the namespaces given on the command line. Not a transport matter: the
Python backend only.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..support.host import PAGE, Host
from ..support.server import ServerProcess
from nvme_emu import structures as st
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.identify import Cns, flbas_encode

GIVEN = 16 << 20
NS_MEMFD = "/memfd:nvme-emu-ns"
CREATE, DELETE = 0, 1
ATTACH = 0


def _serve(tmp_path: Path, *extra: str) -> ServerProcess:
    return ServerProcess.serve(str(tmp_path / "cap.sock"), tmp_path / "server.log", [f"ram:size={GIVEN}"], extra=extra)


def _create(h: Host, size: int, lbaf: int = 0) -> tuple[int, int]:
    """Namespace Management create of ``size`` bytes; (status, NSID)."""
    nsze = size >> (9 if lbaf == 0 else 12)
    buf = h.alloc(4096)
    h.write_mem(buf, st.build_identify_namespace(nsze=nsze, ncap=nsze, flbas=flbas_encode(lbaf)))
    c = h.admin(AdminOpcode.NAMESPACE_MANAGEMENT, prp1=buf, cdw10=CREATE)
    return c.status, c.dw0


def _attach(h: Host, nsid: int) -> None:
    buf = h.alloc(4096)
    h.write_mem(buf, st.build_controller_list([st.IdentifyController.parse(h.identify(Cns.CONTROLLER)[1]).cntlid]))
    h.ok(0, AdminOpcode.NAMESPACE_ATTACHMENT, nsid=nsid, prp1=buf, cdw10=ATTACH)


def _capacities(h: Host) -> tuple[int, int]:
    idc = st.IdentifyController.parse(h.identify(Cns.CONTROLLER)[1])
    return idc.tnvmcap, idc.unvmcap


def _namespace_memfd_bytes(srv: ServerProcess) -> int:
    """The sizes of the server's RAM namespaces' memfds together: what writes can fill (each
    memfd once: its mmap keeps a second fd)."""
    d = f"/proc/{srv.pid}/fd"
    sizes = {}
    for name in os.listdir(d):
        try:
            if os.readlink(f"{d}/{name}").startswith(NS_MEMFD):
                st_ = os.stat(f"{d}/{name}")
                sizes[st_.st_ino] = st_.st_size
        except OSError:
            pass
    return sum(sizes.values())


def test_default_budget_refuses_the_fuzzers_namespaces(tmp_path):
    """31 x 2 GiB asked, as the fuzz run did: two fit in the default 4 GiB, the rest get 0x115."""
    srv = _serve(tmp_path)
    try:
        h = Host(srv.path)
        try:
            statuses = [_create(h, 2 << 30)[0] for _ in range(31)]
            assert statuses[:2] == [Status.SUCCESS] * 2, statuses
            assert set(statuses[2:]) == {Status.NAMESPACE_INSUFFICIENT_CAPACITY}, [hex(s) for s in statuses]
            assert _capacities(h) == (GIVEN + (4 << 30), 0)
            assert _namespace_memfd_bytes(srv) == GIVEN + (4 << 30)
        finally:
            h.close()
    finally:
        assert srv.stop() == 0


def test_nvm_capacity_bounds_what_writes_can_fill(tmp_path):
    srv = _serve(tmp_path, "--nvm-capacity", "64M")
    try:
        h = Host(srv.path, ram_size=8 << 20)
        try:
            assert _capacities(h) == (GIVEN + (64 << 20), 64 << 20)
            status, first = _create(h, 32 << 20)
            assert status == Status.SUCCESS
            status, second = _create(h, 32 << 20, lbaf=1)
            assert status == Status.SUCCESS
            assert _create(h, 4096, lbaf=1)[0] == Status.NAMESPACE_INSUFFICIENT_CAPACITY
            assert _capacities(h) == (GIVEN + (64 << 20), 0)
            h.ok(0, AdminOpcode.NAMESPACE_MANAGEMENT, nsid=first, cdw10=DELETE)
            assert _capacities(h) == (GIVEN + (64 << 20), 32 << 20)
            status, third = _create(h, 32 << 20)
            assert status == Status.SUCCESS
            assert _create(h, 512)[0] == Status.NAMESPACE_INSUFFICIENT_CAPACITY
            # fill every block of the created namespaces: the shared memory they take is the budget
            h.set_queues(1)
            h.create_pair(1, 64)
            chunk = 512 << 10  # MDTS
            buf, plist = h.alloc(chunk), h.alloc(PAGE)  # one PRP list, in a page of its own
            h.write_mem(buf, bytes(range(256)) * (chunk // 256))
            h.write_mem(plist, struct.pack(f"<{chunk // PAGE - 1}Q", *range(buf + PAGE, buf + chunk, PAGE)))
            for nsid, lba_size in ((second, 4096), (third, 512)):
                _attach(h, nsid)
                for off in range(0, 32 << 20, chunk):
                    h.ok(1, NvmOpcode.WRITE, nsid=nsid, prp1=buf, prp2=plist, cdw10=off // lba_size, cdw12=chunk // lba_size - 1)
            assert _namespace_memfd_bytes(srv) == GIVEN + (64 << 20)
            shmem_kib = srv.memory_kb()["RssShmem"]
            assert 64 << 10 <= shmem_kib <= (GIVEN + (64 << 20) + (8 << 20)) >> 10, shmem_kib
        finally:
            h.close()
    finally:
        assert srv.stop() == 0
