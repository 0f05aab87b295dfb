"""Fixtures: a device served on a chosen backend in its own process, and a client for it.

Every test that makes sense on both backends is parametrised over ``backend`` =
"python" (vfio_user.server) and "libvfio-user" (vfio_user.libvfio). The libvfio-user
cases skip, with the reason printed, where the library cannot be loaded.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vfio_user.vmm.client import VfioUserClient
from vfio_user.libvfio import unavailable_reason

REPO = Path(__file__).resolve().parents[2]
SERVE = Path(__file__).resolve().parent / "serve_device.py"
DEADLINE = 10.0
BACKENDS = ["python", "libvfio-user"]


def skip_unless_available(backend: str) -> None:
    if backend == "libvfio-user":
        reason = unavailable_reason()
        if reason is not None:
            print(f"libvfio-user not installed: {reason}")
            pytest.skip(f"libvfio-user not installed: {reason}")


class DeviceProcess:
    """``serve_device.py`` running one device on one backend; stderr kept for failures."""

    def __init__(self, backend: str, device: str, path: str, log_path: Path, *extra: str) -> None:
        self.backend = backend
        self.path = path
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVE), "--backend", backend, "--device", device, "--socket", path, *extra],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE)
        line = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
        if b"serving on" not in line:
            self.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.stderr()}")
        assert f"(backend {backend})".encode() in line, line
        self.baseline_fds = self.fd_count()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def wait_fd_count(self, expected: int) -> int:
        deadline = time.monotonic() + DEADLINE
        while True:
            n = self.fd_count()
            if n == expected or time.monotonic() > deadline:
                return n
            time.sleep(0.01)

    def connect(self, *, negotiate: bool = True) -> VfioUserClient:
        client = VfioUserClient(self.path, timeout=DEADLINE)
        if negotiate:
            client.negotiate()
        return client

    def stderr(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def _serve(request, tmp_path, device: str, *extra: str):
    backend = request.param
    skip_unless_available(backend)
    srv = DeviceProcess(backend, device, str(tmp_path / f"{device}.sock"), tmp_path / "server.stderr", *extra)
    try:
        yield srv
        alive = srv.alive()
        leaked = None
        if alive:
            n = srv.wait_fd_count(srv.baseline_fds)
            if n != srv.baseline_fds:
                leaked = f"server holds {n} fds, {srv.baseline_fds} at start"
    finally:
        srv.kill()
        print(f"---- server stderr ({backend}) ----")
        print(srv.stderr()[-4000:])
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
