"""Access: who can attach. Socket owner-only by default, --socket-mode honoured, one client
at a time (a second concurrent client is refused, the first keeps working)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from ..support.host import Host
from ..support.server import DEADLINE
from vfio_user.vmm.client import VfioUserClient


def test_socket_is_owner_only_by_default(spawn):
    srv = spawn("ram:size=4M")
    st = os.stat(srv.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


def test_socket_mode_is_configurable(spawn):
    srv = spawn("ram:size=4M", extra=["--socket-mode", "0660"])
    assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o660


def test_other_users_cannot_connect(spawn):
    """As root, try to connect as nobody: the 0600 socket refuses with EACCES."""
    if os.getuid() != 0:
        import pytest

        pytest.skip("needs root to switch to another uid")
    srv = spawn("ram:size=4M")
    os.chmod(os.path.dirname(srv.path), 0o755)  # the directory is searchable; the socket is not
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "try:\n"
        f"    s.connect({srv.path!r})\n"
        "except PermissionError:\n"
        "    sys.exit(13)\n"
        "sys.exit(0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], timeout=DEADLINE)
    assert r.returncode == 13, "a non-owner could connect to the 0600 socket"
    assert srv.answers()


def test_second_concurrent_client_is_refused(spawn):
    """Ours accepts a second client and closes it unanswered; libvfio-user leaves it in the listen
    backlog, unanswered, until the first one leaves (docs/libvfio-user.md)."""
    srv = spawn("ram:size=4M")
    srv.settle()
    lib = srv.backend == "libvfio-user"
    first = Host(srv.path, ram_size=4 << 20)
    try:
        first.set_queues(1)
        first.create_pair(1, 16)
        for _ in range(1 if lib else 3):  # libvfio-user's backlog is one connection deep
            second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            second.settimeout(DEADLINE)
            second.connect(srv.path)  # the kernel accepts into the backlog ...
            try:
                second.sendall(b"\0" * 16)
            except (BrokenPipeError, ConnectionResetError):
                pass
            if lib:
                second.settimeout(0.5)
                with pytest.raises((TimeoutError, socket.timeout)):
                    second.recv(64)  # ... where nobody answers it
            else:
                try:
                    data = second.recv(64)  # ... and the server closes it unanswered
                except ConnectionResetError:
                    data = b""
                assert data == b""
            second.close()
        if not lib:
            srv.wait_log("refused a second client", 3)
        # the first client was not disturbed
        c = first.write(1, 1, 0, b"\xab" * 4096)
        assert c.status == 0
        c, data = first.read(1, 1, 0, 8)
        assert c.status == 0 and data == b"\xab" * 4096
    finally:
        first.close()
    # once it has gone, the next client may attach; nothing of the refused ones remains
    assert srv.answers()
    assert srv.wait_fds() == srv.baseline_fds
    c = VfioUserClient(srv.path, timeout=DEADLINE)
    c.negotiate()
    c.close()
