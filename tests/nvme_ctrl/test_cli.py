"""``nvme-emu`` with no arguments: default socket, QEMU arguments, a working controller."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from ..support.host import Host
from ..support.server import NVME_EMU_READY, ServerProcess, child_env
from nvme_emu.cli import DEFAULT_SOCKET
from nvme_emu.spec.commands import Status
from nvme_emu.spec.identify import Cns
from nvme_emu import structures as st


def _live(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_no_arguments_serves_on_the_default_socket(tmp_path):
    # The CLI has no way to move its default socket (no TMPDIR support), so the no-argument
    # form runs on DEFAULT_SOCKET itself; never steal it from a server someone else runs.
    assert DEFAULT_SOCKET == "/tmp/nvme-emu.sock"
    if _live(DEFAULT_SOCKET):
        pytest.skip(f"{DEFAULT_SOCKET} is in use by another server")
    if os.path.exists(DEFAULT_SOCKET):
        os.unlink(DEFAULT_SOCKET)  # stale: nobody answers on it
    srv = ServerProcess([sys.executable, "-m", "nvme_emu"], DEFAULT_SOCKET, tmp_path / "noargs.log", ready=NVME_EMU_READY, cwd=tmp_path)
    try:
        n = Host(DEFAULT_SOCKET)
        try:
            c, data = n.identify(Cns.CONTROLLER)
            assert c.status == Status.SUCCESS
            assert st.IdentifyController.parse(data).mn == "nvme-emu"
            c, data = n.identify(Cns.NAMESPACE, nsid=1)
            assert st.IdentifyNamespace.parse(data).nsze == (1 << 30) // 512  # default ram:size=1G
            n.set_queues(1)
            n.create_pair(1, 16)
            payload = os.urandom(16384)
            n.write_ok(1, 1, 12345, payload)
            assert n.read_ok(1, 1, 12345, 32) == payload
        finally:
            n.close()
        rc = srv.stop()
        log = srv.log()
        print(log)
        assert rc == 0
        assert "shutting down" in log
        assert f"serving 1 namespace(s) on {DEFAULT_SOCKET}" in log
        assert "-object memory-backend-memfd,id=mem,size=1G,share=on" in log
        assert "-device '" in log and '"driver":"vfio-user-pci"' in log and f'"path":"{DEFAULT_SOCKET}"' in log
        assert not os.path.exists(DEFAULT_SOCKET)  # removed on the way out
    finally:
        if srv.stop() is None:
            print(srv.log())
        if os.path.exists(DEFAULT_SOCKET) and not _live(DEFAULT_SOCKET):
            os.unlink(DEFAULT_SOCKET)


def test_serve_refuses_a_live_socket(spawn):
    first = spawn("ram:size=16M")
    args = ["serve", "--socket", first.path, "--namespace", "ram:size=16M"]
    out = subprocess.run([sys.executable, "-m", "nvme_emu", *args], capture_output=True, text=True, env=child_env(), timeout=60)
    assert out.returncode == 1
    assert "in use" in out.stderr
    n = Host(first.path)  # the first server is untouched
    try:
        assert n.identify(Cns.CONTROLLER)[0].status == Status.SUCCESS
    finally:
        n.close()
