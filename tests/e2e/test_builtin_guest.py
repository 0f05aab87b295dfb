"""Boot the test guest against QEMU's built-in NVMe (no nvme-emu server needed).

Proves the guest infrastructure (provide-qemu.sh, build-guest.sh, *.args,
nvme_emu.guest) before our own vfio-user server exists.
"""

import os

from pathlib import Path

import pytest

from nvme_emu import guest

pytestmark = pytest.mark.e2e

FIO_VERIFY_JOB = (Path(__file__).resolve().parents[2] / "qemu-configs" / "verify-4k.fio").read_text() + "runtime=60\n"


@pytest.fixture
def raw_image(tmp_path):
    path = tmp_path / "disk.raw"           # under /tmp: visible to the chroot QEMU
    with open(path, "wb") as f:
        f.truncate(256 << 20)              # sparse
    return str(path)


def test_nvme_list_shows_builtin_device(guest_infra, raw_image):
    res = guest.run_guest(builtin_image=raw_image, command="nvme list", timeout=300)
    assert res.returncode == 0, res.describe_failure()
    assert "/dev/nvme0n1" in res.output, res.output
    assert "NVMEEMU-BUILTIN" in res.output, res.output     # serial from builtin-nvme.args
    assert "QEMU NVMe Ctrl" in res.output, res.output
    assert res.accel in ("kvm", "tcg")


def test_fio_randwrite_verify_no_errors(guest_infra, raw_image):
    res = guest.run_guest(builtin_image=raw_image, fio_job=FIO_VERIFY_JOB, timeout=300)
    assert res.returncode == 0, res.describe_failure()
    assert res.fio is not None, res.describe_failure()
    jobs = res.fio["jobs"]
    assert [j["jobname"] for j in jobs] == ["randwrite-verify"]
    job = jobs[0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] == (16 << 20) // 4096
    assert job["read"]["total_ios"] > 0            # the verify pass read everything back
    assert job["read"]["total_ios"] == job["write"]["total_ios"]
    print(guest.format_fio_summary(res.fio))
    # The writes really reached the image file.
    assert os.stat(raw_image).st_blocks > 0


def test_guest_command_failure_is_reported(guest_infra, raw_image):
    seen: list[str] = []  # on_console_line: each console line as it arrives (the bench's markers)
    res = guest.run_guest(builtin_image=raw_image, command="echo hello; echo marker > /dev/console; exit 7", timeout=300,
                          on_console_line=seen.append)
    assert res.returncode == 7
    assert res.output.strip().splitlines()[0] == "hello"
    assert "hello" in seen and "marker" in seen, seen[-20:]
    assert seen.index("hello") < seen.index("marker")
