"""Fixtures: the sample Ticker server in a separate process, driven by the real client.

Every test that talks to a server gets a fresh ``python -m vfio_user.sample`` process on a
socket in its tmp dir. At teardown the fixture checks that the process is still alive and
that its fd count came back to what it was right after start-up (a per-test leak check of
the server), then kills it and prints its stderr: pytest shows that output for failing tests.
"""

from __future__ import annotations

import pytest

from vu_helpers import ServerProcess


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(str(tmp_path / "ticker.sock"), tmp_path / "server.stderr")
    try:
        yield srv
        alive = srv.alive()
        leaked = None
        if alive:
            n = srv.wait_fd_count()
            if n != srv.baseline_fds:
                leaked = f"server holds {n} fds, {srv.baseline_fds} at start:\n" + "\n".join(srv.fds())
    finally:
        srv.kill()
        print("---- server stderr ----")
        print(srv.stderr())
    assert alive, "the server process died"
    assert leaked is None, leaked


@pytest.fixture
def client(server):
    """A negotiated client on a fresh server; closed (and waited for) at teardown."""
    c = server.connect()
    try:
        yield c
    finally:
        c.close()


