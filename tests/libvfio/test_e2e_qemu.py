"""QEMU end to end on both backends: a Linux guest finds the NVMe controller and runs fio.

``nvme-emu serve --backend B`` in its own process, QEMU's vfio-user-pci attached to it,
a verify job in the guest. Slow (marker ``e2e``); skips where QEMU/the guest cannot be
provided, and the libvfio-user case where the library is absent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest

from libvfio_helpers import REPO, skip_unless_available

pytestmark = pytest.mark.e2e

FIO_VERIFY_JOB = (Path(__file__).resolve().parents[2] / "qemu-configs" / "verify-4k.fio").read_text() + "runtime=120\n"


@pytest.fixture(scope="module")
def guest_infra():
    from nvme_emu import guest

    try:
        guest.ensure_qemu()
        guest.ensure_guest()
    except guest.GuestError as e:
        print(f"e2e skipped: {e}")
        pytest.skip(f"no QEMU/guest on this machine: {str(e).splitlines()[-1]}")
    return guest


@pytest.mark.parametrize("backend", ["python", "libvfio-user"])
def test_guest_nvme_list_and_fio_verify(guest_infra, backend, tmp_path):
    skip_unless_available(backend)
    sock_dir = os.path.join("/tmp", f"nvme-emu-e2e-{os.getpid()}-{backend}")  # /tmp: visible to the chroot QEMU
    os.makedirs(sock_dir, exist_ok=True)
    sock = os.path.join(sock_dir, "nvme.sock")
    log = open(tmp_path / "server.log", "wb")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen(
        [sys.executable, "-m", "nvme_emu", "serve", "--backend", backend, "--socket", sock, "--namespace", "ram:size=256M", "--serial", f"E2E-{backend}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.05)
        res = guest_infra.run_guest(socket_path=sock, command="nvme list", fio_job=FIO_VERIFY_JOB, timeout=600)
        assert res.returncode == 0, res.describe_failure()
        assert "/dev/nvme0n1" in res.output and f"E2E-{backend}" in res.output, res.output
        job = res.fio["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["total_ios"] == (16 << 20) // 4096
        assert job["read"]["total_ios"] == job["write"]["total_ios"]
        print(f"[{backend}] accel={res.accel}\n" + guest_infra.format_fio_summary(res.fio))
        assert server.poll() is None, "the server died"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        print("---- server log ----")
        print((tmp_path / "server.log").read_text(errors="replace")[-6000:])
        try:
            os.rmdir(sock_dir)
        except OSError:
            pass
