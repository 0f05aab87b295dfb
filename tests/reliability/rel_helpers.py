"""Fixtures for the reliability suite: hostile clients, hostile guests, faults, access.

Servers run as separate processes (:class:`~tests.support.server.ServerProcess`) so that what
we count is the server's own state: its fds and its guest-memory mappings. Every wait is
bounded; a test that hits a bound fails rather than hangs. The tests that start their servers
through ``spawn`` run on both vfio-user backends (libvfio-user skips, saying why, where it is
not installed), and so do the module-scoped servers of test_hostile_client/_guest and
test_fd_kinds (parametrised the same way); where libvfio-user answers differently the test
asserts each backend's answer (docs/libvfio-user.md).
"""

from __future__ import annotations

import subprocess

import pytest

from ..libvfio.libvfio_helpers import BACKENDS, skip_unless_available
from ..support.server import ServerProcess


@pytest.fixture(params=BACKENDS)
def spawn(request, tmp_path):
    """``spawn(*namespace_specs, extra=[...], sock=...)``: a server process; checked at teardown.

    Teardown sends SIGTERM: a server that was not killed on purpose must exit 0.
    """
    skip_unless_available(request.param)
    started: list[tuple[ServerProcess, bool]] = []

    def _spawn(*namespaces: str, extra: list[str] | None = None, sock: str | None = None, check_exit: bool = True) -> ServerProcess:
        n = len(started) + 1
        path = sock or str(tmp_path / f"s{n}.sock")
        srv = ServerProcess.serve(path, tmp_path / f"server{n}.log", list(namespaces) or ["ram:size=16M"], backend=request.param,
                                  extra=extra or ())
        started.append((srv, check_exit))
        return srv

    yield _spawn
    bad = []
    for srv, check in started:
        was_running = srv.returncode is None and srv.alive()
        rc = srv.stop()
        if check and was_running and rc != 0:
            bad.append((srv.log_path.name, rc, srv.log()[-3000:]))
    assert not bad, bad


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped, saying why, where it cannot be mounted), unmounted
    afterwards: a filesystem a test can fill."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
