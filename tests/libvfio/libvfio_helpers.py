"""Fixtures: a device served on a chosen backend in its own process, and a client for it.

Every test that makes sense on both backends is parametrised over ``backend`` =
"python" (vfio_user.server) and "libvfio-user" (vfio_user.libvfio). The libvfio-user
cases skip, with the reason printed, where the library cannot be loaded.
"""

from __future__ import annotations

import pytest

from vfio_user.libvfio.library import unavailable_reason
from vfio_user.server_api import ServerBackend

from ..support.server import ServerProcess

BACKENDS = [ServerBackend.PYTHON, ServerBackend.LIBVFIO_USER]


def skip_unless_available(backend: ServerBackend) -> None:
    if backend == ServerBackend.LIBVFIO_USER:
        reason = unavailable_reason()
        if reason is not None:
            print(f"libvfio-user not installed: {reason}")
            pytest.skip(f"libvfio-user not installed: {reason}")


def _serve(request, tmp_path, device: str, *extra: str):
    backend = request.param
    skip_unless_available(backend)
    srv = ServerProcess.device(backend, device, str(tmp_path / f"{device}.sock"), tmp_path / "server.log", *extra)
    srv.baseline_fds = srv.fd_count()
    try:
        yield srv
        alive = srv.alive()
        leaked = None
        if alive:
            n = srv.wait_fds()
            if n != srv.baseline_fds:
                leaked = f"server holds {n} fds, {srv.baseline_fds} at start"
    finally:
        srv.kill()
        print(f"---- server log ({backend}) ----")
        print(srv.log()[-4000:])
    assert alive, "the server process died"
    assert leaked is None, leaked


@pytest.fixture(params=BACKENDS)
def ticker(request, tmp_path):
    """The Ticker sample served on each backend."""
    yield from _serve(request, tmp_path, "ticker")


@pytest.fixture
def client(ticker):
    c = ticker.connect()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(params=BACKENDS)
def nvme_server(request, tmp_path):
    """The NVMe function (RAM namespace, doorbells auto) served on each backend."""
    yield from _serve(request, tmp_path, "nvme")
