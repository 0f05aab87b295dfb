"""Fixtures: the sample Ticker server in a separate process, driven by the real client.

One ``python -m vfio_user.sample`` process serves every test of a module (``server``), or a
test gets its own (``fresh_server``). Around each test the fixture checks that the process is
still alive and that its fd count is back to what it was at start-up (a per-test leak check
of the server), and prints the server's log lines written during the test: pytest shows that
output for failing tests. The ``client`` fixture brings the device to a known state first
(DEVICE_RESET, SCRATCH and BAR1 zeroed) since the device outlives clients by design.
"""

from __future__ import annotations

import pytest

from ..support.server import ServerProcess


def _check_after_test(srv: ServerProcess, log_start: int):
    alive = srv.alive()
    leaked = None
    if alive:
        n = srv.wait_fds()
        if n != srv.baseline_fds:
            leaked = f"server holds {n} fds, {srv.baseline_fds} at start:\n" + "\n".join(srv.fds())
    print("---- server log during this test ----")
    print(srv.log()[log_start:])
    assert alive, "the server process died"
    assert leaked is None, leaked


@pytest.fixture(scope="module")
def _module_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("ticker")
    srv = ServerProcess.sample(str(d / "ticker.sock"), d / "server.log")
    srv.settle()
    yield srv
    srv.kill()


@pytest.fixture
def server(_module_server):
    """The module's server process (shared; the device keeps state between tests)."""
    if not _module_server.alive():
        pytest.fail("the shared server process died in an earlier test:\n" + _module_server.log())
    start = len(_module_server.log())
    yield _module_server
    _check_after_test(_module_server, start)


@pytest.fixture
def backend() -> str:
    """The vfio-user server backend of ``fresh_server``; a module that runs on both overrides
    this with a fixture parametrised over ``BACKENDS`` (see test_lifecycle.py)."""
    return "python"


@pytest.fixture
def fresh_server(tmp_path, backend):
    """A server process of this test's own."""
    srv = ServerProcess.sample(str(tmp_path / "ticker.sock"), tmp_path / "server.log", backend)
    try:
        srv.settle()
        yield srv
        _check_after_test(srv, 0)
    finally:
        srv.kill()


@pytest.fixture
def client(server):
    """A negotiated client with the device in a known state; closed at teardown."""
    c = server.connect()
    try:
        c.reset()
        c.region_write(0, 0x4, bytes(4))  # SCRATCH
        c.region_write(1, 0, bytes(4096))  # BAR1 shared memory
        c.region_write(7, 0x3C, b"\0")  # INTERRUPT_LINE
        yield c
    finally:
        c.close()
