"""An nbd: namespace in a real ``nvme-emu serve`` process, driven by the test host over
vfio-user (the I/O pool, the completions, the loop): data through it, the NBD server
(qemu-nbd on a file) killed under it, a RAM namespace beside it unaffected, I/O resumed after
the restart without restarting nvme-emu, and data flushed before the kill read back."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .nbd_servers import NbdServer

from ..support.host import Host
from ..support.server import ServerProcess
from nvme_emu.spec.commands import NvmOpcode, RwCdw12, Status

#: A command against a dead NBD server completes within this (it fails at once).
FAIL_WITHIN_S = 5.0


def test_server_killed_under_a_served_namespace(tmp_path: Path, file_server: NbdServer):
    srv = ServerProcess.serve(str(tmp_path / "nvme.sock"), tmp_path / "server.log", [f"nbd:{file_server.uri}", "ram:size=16M"])
    host = None
    try:
        host = Host(srv.path)
        host.set_queues(2)
        host.create_pair(1, 32)
        flushed = os.urandom(8192)
        host.write_ok(1, 1, 0, flushed)
        host.ok(1, NvmOpcode.FLUSH, nsid=1)
        assert host.read_ok(1, 1, 0, 16) == flushed
        host.write_ok(1, 1, 64, os.urandom(4096), cdw12=RwCdw12.FUA)

        file_server.kill()
        t0 = time.monotonic()
        for _ in range(3):  # the lost connection, then refused reconnects: each completes, none hangs
            done, _data = host.read(1, 1, 0, 16)
            assert (done.status, done.dnr) == (Status.NAMESPACE_NOT_READY, False)
        done = host.write(1, 1, 32, bytes(512))
        assert (done.status, done.dnr) == (Status.NAMESPACE_NOT_READY, False)
        assert time.monotonic() - t0 < FAIL_WITHIN_S
        host.write_ok(1, 2, 0, b"\x42" * 512)  # the RAM namespace beside it serves on
        assert host.read_ok(1, 2, 0, 1) == b"\x42" * 512

        file_server.start()
        assert host.read_ok(1, 1, 0, 16) == flushed  # resumed, no restart of nvme-emu
        host.write_ok(1, 1, 32, b"\x01" * 512)
        assert srv.alive
    finally:
        if host is not None:
            host.close()
        rc = srv.stop()
        log = srv.log()
        print(log)
    assert rc == 0 and "Traceback" not in log
    assert "connection to nbd+unix" in log  # the lost connection is logged
