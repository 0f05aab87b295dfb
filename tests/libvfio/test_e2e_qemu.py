"""QEMU end to end on both backends: a Linux guest finds the NVMe controller and runs fio.

``nvme-emu serve --backend B`` in its own process, QEMU's vfio-user-pci attached to it,
a verify job in the guest. Slow (marker ``e2e``); skips where QEMU/the guest cannot be
provided, and the libvfio-user case where the library is absent.
"""

from __future__ import annotations

import os

from pathlib import Path

import pytest

from ..support.server import ServerProcess
from .libvfio_helpers import skip_unless_available

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
    server = ServerProcess.serve(sock, tmp_path / "server.log", ["ram:size=256M"], backend=backend, doorbell="auto",
                                 extra=["--serial", f"E2E-{backend}"])
    try:
        res = guest_infra.run_guest(socket_path=sock, command="nvme list", fio_job=FIO_VERIFY_JOB, timeout=600)
        assert res.returncode == 0, res.describe_failure()
        assert "/dev/nvme0n1" in res.output and f"E2E-{backend}" in res.output, res.output
        job = res.fio["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["total_ios"] == (16 << 20) // 4096
        assert job["read"]["total_ios"] == job["write"]["total_ios"]
        print(f"[{backend}] accel={res.accel}\n" + guest_infra.format_fio_summary(res.fio))
        assert server.alive(), "the server died"
    finally:
        server.stop()
        print("---- server log ----")
        print(server.log()[-6000:])
        try:
            os.rmdir(sock_dir)
        except OSError:
            pass
