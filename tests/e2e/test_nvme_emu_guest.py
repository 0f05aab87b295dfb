"""nvme-emu under a real QEMU (vfio-user-pci) with a Linux guest: the user's own path.

One nvme-emu server process (file-backed namespace) serves several guest boots in turn, so
data written in one boot must be there in the next.
"""

from __future__ import annotations

import os
import re

import pytest

from nvme_emu import guest

from ..support.server import ServerProcess

pytestmark = pytest.mark.e2e

MODEL = "nvme-emu e2e"
SERIAL = "NVMEEMUE2E000001"

VERIFY_JOB = """\
[global]
filename=/dev/nvme0n1
ioengine=io_uring
direct=1
verify=crc32c
do_verify=1
verify_fatal=1
randrepeat=0

[randwrite-4k]
rw=randwrite
bs=4k
iodepth=16
size=32m

[randread-4k]
stonewall
rw=randread
bs=4k
iodepth=16
size=32m
do_verify=0

[randwrite-128k]
stonewall
rw=randwrite
bs=128k
iodepth=4
offset=64m
size=64m

[randread-128k]
stonewall
rw=randread
bs=128k
iodepth=4
offset=64m
size=64m
do_verify=0
"""

#: Two jobs pinned to the two vCPUs: blk-mq maps each CPU to its own I/O queue.
TWO_QUEUE_JOB = """\
[global]
filename=/dev/nvme0n1
ioengine=io_uring
direct=1
rw=randread
bs=4k
iodepth=8
size=32m
runtime=5
time_based=1

[cpu0]
cpus_allowed=0

[cpu1]
cpus_allowed=1
"""


@pytest.fixture(scope="module")
def server(guest_infra, tmp_path_factory):
    """A separate nvme-emu process on a sparse file namespace; its log is checked at the end."""
    d = tmp_path_factory.mktemp("e2e", numbered=True)
    sock = str(d / "nvme.sock")
    image = str(d / "disk.img")
    srv = ServerProcess.serve(sock, d / "server.log", [f"file:{image},size=512M"], doorbell="auto",
                              extra=["--serial", SERIAL, "--model", MODEL])
    try:
        yield {"socket": sock, "log": srv.log_path, "proc": srv.proc, "image": image}
    finally:
        text = srv.stop_clean()
    assert "shutting down" in text


def boot(server, **kw) -> guest.GuestResult:
    result = guest.run_guest(socket_path=server["socket"], timeout=600, **kw)
    qemu_errors = [line for line in result.qemu_stderr.splitlines() if re.search(r"vfio|error|timed out", line, re.I)]
    assert not qemu_errors, "QEMU reported:\n" + "\n".join(qemu_errors)
    return result.check()


ADMIN_TOOLS = r"""
set -e
nvme list
echo ==ID-CTRL; nvme id-ctrl /dev/nvme0
echo ==ID-NS; nvme id-ns /dev/nvme0n1
echo ==SMART; nvme smart-log /dev/nvme0
echo ==ERRLOG; nvme error-log /dev/nvme0 -e 4
echo ==FEAT-QUEUES; nvme get-feature /dev/nvme0 -f 7
echo ==FEAT-VWC; nvme get-feature /dev/nvme0 -f 6
echo ==FEAT-TEMP; nvme get-feature /dev/nvme0 -f 4
"""

#: Write Uncorrectable on LBAs 2050-2051 (4 KiB block 256): a read fails, Get LBA Status and
#: the LBA Status Information log report the LBAs, a write clears them, the read succeeds.
UNCORRECTABLE = r"""
set +e
echo ==UNCOR
printf 'nvme-emu-uncor-ok' > /tmp/u
dd if=/tmp/u of=/dev/nvme0n1 bs=4096 seek=256 conv=sync oflag=direct 2>/dev/null
nvme write-uncor /dev/nvme0n1 --namespace-id=1 --start-block=2050 --block-count=1
echo ==GLS1; nvme get-lba-status /dev/nvme0 --namespace-id=1 --start-lba=2048 --max-dw=15 --action=0x11 --range-len=64
echo ==LSLOG; nvme lba-status-log /dev/nvme0
echo ==READ1; dd if=/dev/nvme0n1 of=/dev/null bs=4096 skip=256 count=1 iflag=direct 2>&1 && echo READ1-OK || echo READ1-FAILED
echo ==SMART; nvme smart-log /dev/nvme0 | grep -i media_errors
echo ==WRITE; dd if=/tmp/u of=/dev/nvme0n1 bs=4096 seek=256 conv=sync oflag=direct 2>/dev/null && echo WRITE-OK
echo ==READ2; dd if=/dev/nvme0n1 bs=4096 skip=256 count=1 iflag=direct 2>/dev/null | head -c 17; echo
echo ==GLS2; nvme get-lba-status /dev/nvme0 --namespace-id=1 --start-lba=2048 --max-dw=15 --action=0x11 --range-len=64
echo ==END
"""


@pytest.fixture(scope="module")
def admin_boot(server) -> str:
    """One boot for the admin tools and the Write Uncorrectable / LBA status round."""
    return boot(server, command=ADMIN_TOOLS + UNCORRECTABLE).output


def test_driver_binds_and_admin_tools_answer(admin_boot):
    out = admin_boot.split("==UNCOR")[0]
    listing = out.split("==ID-CTRL")[0]
    assert "/dev/nvme0n1" in listing and SERIAL in listing and MODEL in listing
    ctrl = out.split("==ID-CTRL")[1].split("==ID-NS")[0]
    assert re.search(r"^vid\s*:\s*0x4e58", ctrl, re.M)
    assert re.search(r"^mdts\s*:\s*7", ctrl, re.M)
    assert re.search(r"^ver\s*:\s*0x20000", ctrl, re.M)
    assert re.search(r"^oacs\s*:\s*0x30[8a]", ctrl, re.M)  # Format NVM, Namespace Management, Doorbell Buffer Config, Get LBA Status
    assert re.search(r"^oncs\s*:\s*0x1cf\b", ctrl, re.M)  # with Write Uncorrectable (bit 1)
    ns = out.split("==ID-NS")[1].split("==SMART")[0]
    assert re.search(r"^nsze\s*:\s*0x100000", ns, re.M)  # 512 MiB / 512
    assert "in use" in ns  # the LBA format in use is marked
    smart = out.split("==SMART")[1].split("==ERRLOG")[0]
    assert re.search(r"temperature\s*:\s*(39|40) ?°?C", smart) or "313" in smart
    assert re.search(r"host_read_commands\s*:\s*[1-9]", smart)
    assert "==ERRLOG" in out and "Error Log Entries" in out
    assert re.search(r"get-feature:0x0?7 \(Number of Queues\), Current value:0x0*1?[0-9a-f]{4,}", out)
    assert re.search(r"get-feature:0x0?6 \(Volatile Write Cache\), Current value:0x0*1\b", out)
    assert re.search(r"get-feature:0x0?4 \(Temperature Threshold\), Current value:0x0*157\b", out)  # 343 K


def test_write_uncorrectable_and_lba_status_in_the_guest(admin_boot):
    """nvme-cli 2.13's write-uncor, get-lba-status and lba-status-log against the device."""
    out = admin_boot.split("==UNCOR")[1]
    assert "==END" in out, out
    section = {name: out.split(f"=={name}")[1].split("==")[0] for name in ("GLS1", "LSLOG", "READ1", "SMART", "WRITE", "READ2", "GLS2")}
    assert "READ1-FAILED" in section["READ1"], out  # Unrecovered Read Error reaches dd as EIO
    assert re.search(r"media_errors\s*:\s*[1-9]", section["SMART"]), out
    assert re.search(r"NLSD\)?\s*:?\s*1\b", section["GLS1"]) and re.search(r"\b(2050|0x0*802)\b", section["GLS1"]), out
    assert re.search(r"\b(2050|0x0*802)\b", section["LSLOG"]), out
    assert "WRITE-OK" in section["WRITE"] and "nvme-emu-uncor-ok" in section["READ2"], out
    assert re.search(r"NLSD\)?\s*:?\s*0\b", section["GLS2"]), out


def test_fio_verify_4k_and_128k(server):
    result = boot(server, fio_job=VERIFY_JOB)
    assert result.fio is not None, result.output
    jobs = {j["jobname"]: j for j in result.fio["jobs"]}
    assert set(jobs) == {"randwrite-4k", "randread-4k", "randwrite-128k", "randread-128k"}
    for name, job in jobs.items():
        assert job["error"] == 0, (name, job["error"])
    assert jobs["randwrite-4k"]["write"]["total_ios"] >= 8192
    assert jobs["randwrite-128k"]["write"]["total_ios"] >= 512
    # the verify pass read back every block it wrote
    assert jobs["randwrite-4k"]["read"]["total_ios"] >= 8192
    assert jobs["randwrite-128k"]["read"]["total_ios"] >= 512


def test_controller_reset_and_reboot_keep_data(server):
    pattern = "nvme-emu-keeps-this-" + os.urandom(4).hex()
    write = f"""
set -e
printf '%s' '{pattern}' > /tmp/p
dd if=/tmp/p of=/dev/nvme0n1 bs=4096 seek=1000 conv=sync oflag=direct 2>/dev/null
echo 1 > /sys/class/nvme/nvme0/reset_controller
sleep 2
dd if=/dev/nvme0n1 bs=4096 skip=1000 count=1 iflag=direct 2>/dev/null | head -c {len(pattern)}; echo
"""
    out = boot(server, command=write).output
    assert pattern in out, out  # read back after a controller reset (CC.EN 1 -> 0 -> 1)
    read = f"dd if=/dev/nvme0n1 bs=4096 skip=1000 count=1 iflag=direct 2>/dev/null | head -c {len(pattern)}; echo"
    assert pattern in boot(server, command=read).output  # a new boot: DEVICE_RESET, new client
    assert "controller disabled" in server["log"].read_text()


def test_two_vcpus_use_two_io_queues(server):
    script = f"cat > /tmp/two.fio <<'EOF'\n{TWO_QUEUE_JOB}EOF\nfio --eta=never --output=/dev/null /tmp/two.fio\ngrep nvme0q /proc/interrupts\n"
    result = boot(server, command=script, cpus=2)
    counts = {}
    for line in result.output.splitlines():
        m = re.search(r"^\s*\d+:\s+(\d+)\s+(\d+).*\b(nvme0q\d+)", line)
        if m:
            counts[m.group(3)] = int(m.group(1)) + int(m.group(2))
    io_queues = {q: n for q, n in counts.items() if q != "nvme0q0"}
    assert len(io_queues) >= 2, result.output
    busy = [q for q, n in io_queues.items() if n > 100]
    assert len(busy) >= 2, f"expected two busy I/O queues: {io_queues}"
