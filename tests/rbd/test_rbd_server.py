"""An rbd: namespace in a real ``nvme-emu serve`` process, driven by the test host over
vfio-user: data through it; a controller reset while Reads wait on a paused OSD (the reset is
not held up, and when the OSD answers later nothing lands in the host's buffers); the OSD
paused under the host's I/O (Namespace Not Ready, DNR clear, within the timeout; the RAM
namespace beside it unaffected) and resumed (I/O resumes without restarting nvme-emu)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..support.ceph import CephCluster
from ..support.host import Host
from ..support.server import ServerProcess
from .test_rbd_backend import FAIL_WITHIN_S, TIMEOUT_S, cluster_write
from nvme_emu.ctl import default_control_socket
from nvme_emu.rpc_socket import RpcClient
from nvme_emu.spec.commands import NvmOpcode, RwCdw12, Status


def storage(srv: ServerProcess) -> dict:
    """The rbd: namespace's storage counters, from the control plane."""
    with RpcClient(default_control_socket(srv.path)) as rpc:
        return next(ns for ns in rpc.call("namespaces") if ns["nsid"] == 1)["storage"]


def test_paused_osd_under_a_served_namespace(tmp_path: Path, ceph_cluster: CephCluster) -> None:
    stale = (160 << 20) // 512  # blocks another client wrote: reads of them must ask the OSD
    cluster_write(ceph_cluster, stale * 512, os.urandom(1 << 20))
    srv = ServerProcess.serve(str(tmp_path / "nvme.sock"), tmp_path / "server.log",
                              [f"{ceph_cluster.spec},timeout={TIMEOUT_S}", "ram:size=16M"])
    host = None
    try:
        host = Host(srv.path)
        host.set_queues(2)
        host.create_pair(1, 32)
        flushed = os.urandom(8192)
        host.write_ok(1, 1, 0, flushed, cdw12=RwCdw12.FUA)
        host.ok(1, NvmOpcode.FLUSH, nsid=1)
        assert host.read_ok(1, 1, 0, 16) == flushed

        # a reset with Reads in flight on a paused OSD: done at once; nothing copied after it
        bufs = [host.alloc(4096) for _ in range(4)]
        for b in bufs:
            host.write_mem(b, b"\xee" * 4096)
        ceph_cluster.pause()
        try:
            for i, b in enumerate(bufs):
                host.rw(1, NvmOpcode.READ, 1, stale + 64 * i, 8, b, 4096)
            deadline = time.monotonic() + TIMEOUT_S
            while storage(srv)["in_flight"] < 4:  # started on the server, librbd waiting on the OSD
                assert time.monotonic() < deadline, storage(srv)
                time.sleep(0.01)
            t0 = time.monotonic()
            host.host.disable()
            assert time.monotonic() - t0 < TIMEOUT_S, "the reset waited for librbd"
        finally:
            ceph_cluster.resume()
        deadline = time.monotonic() + 2 * TIMEOUT_S
        while storage(srv)["in_flight"]:  # the OSD answers now (or librados gives up): it came back
            assert time.monotonic() < deadline, storage(srv)
            time.sleep(0.01)
        time.sleep(0.1)  # and the loop has had its turn with it
        assert all(host.read_mem(b, 4096) == b"\xee" * 4096 for b in bufs), "data landed after the reset"
        host.enable()
        host.set_queues(2)
        host.create_pair(1, 32)
        assert host.read_ok(1, 1, stale, 8) != b"\xee" * 4096

        # the OSD paused under the host's I/O
        ceph_cluster.pause()
        try:
            t0 = time.monotonic()
            done, _data = host.read(1, 1, stale + 512, 8)
            assert (done.status, done.dnr) == (Status.NAMESPACE_NOT_READY, False)
            assert time.monotonic() - t0 < FAIL_WITHIN_S
            host.write_ok(1, 2, 0, b"\x42" * 512)  # the RAM namespace beside it serves on
            assert host.read_ok(1, 2, 0, 1) == b"\x42" * 512
        finally:
            ceph_cluster.resume()
        assert host.read_ok(1, 1, 0, 16) == flushed  # resumed on a new connection, no restart
        host.write_ok(1, 1, 32, b"\x01" * 512)
        assert srv.alive
    finally:
        if host is not None:
            host.close()
        rc = srv.stop()
        log = srv.log()
        print(log)
    assert rc == 0 and "Traceback" not in log
    assert "connection to rbd/img dropped" in log and "connected to rbd/img again" in log
