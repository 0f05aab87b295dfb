"""Stock QEMU under KVM with the doorbell agent: fio in a guest, doorbells with no VMM round trip.

QEMU (the unmodified trixie-backports binary) runs with ``LD_PRELOAD`` of the agent
(``nvme_emu/agent``), which learns QEMU's VM fd and registers the ioeventfds nvme-emu sends
it at BAR0's guest address. With a kernel that has KVM_IOEVENTFD_FLAG_POST_WRITE every
doorbell is a POST_WRITE ioeventfd; without it only I/O queue doorbells backed by Doorbell
Buffer Config are, as plain ioeventfds. Either way no I/O SQ tail doorbell may reach the
server as a trapped REGION_WRITE once the I/O queues are up, and fio's verify must pass.

Needs KVM with VMX/SVM for a Linux guest: this project runs it inside the nested rig
(``tests/nested``), where ``NVME_EMU_EXPECT_POST_WRITE`` says which kernel to expect.
Elsewhere (TCG) it is skipped with the reason printed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from nvme_emu import guest
from vfio_user import kvm as K

pytestmark = pytest.mark.e2e

FIO_JOB = """\
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
iodepth=8
size=8m

[randread-4k-qd1]
stonewall
rw=randread
bs=4k
iodepth=1
size=8m
do_verify=0
"""


@pytest.fixture(scope="module")
def kvm_guest(guest_infra):
    if guest.detect_accel() != "kvm":
        why = "needs KVM with VMX/SVM to boot a Linux guest (runs inside the nested rig: tests/nested)"
        print(f"agent e2e skipped: {why}")
        pytest.skip(why)
    return guest_infra


@pytest.fixture
def server(kvm_guest, tmp_path):
    sock = str(tmp_path / "nvme.sock")
    stats = tmp_path / "stats.json"
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "nvme_emu", "serve", "--socket", sock, "--doorbell", "shadow",
           "--namespace", "ram:size=64M", "--stats-json", str(stats)]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=os.getcwd()))
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)

        def read_stats() -> dict:
            stats.unlink(missing_ok=True)
            proc.send_signal(signal.SIGUSR1)
            end = time.monotonic() + 20
            while not stats.exists():
                assert time.monotonic() < end, log_path.read_text()
                time.sleep(0.05)
            return json.loads(stats.read_text())

        yield {"socket": sock, "log": log_path, "stats": read_stats}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    bad = [line for line in log_path.read_text().splitlines() if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]
    assert not bad, "server log carries errors:\n" + "\n".join(bad)


def _kernel_has_post_write() -> bool:
    with K.Kvm() as kvm, kvm.create_vm() as vm:
        supported, why = vm.post_write_supported()
    expected = K.post_write_expectation()
    if expected is not None and expected != supported:
        pytest.fail(K.post_write_contract_violation(supported, why))
    print(f"kernel POST_WRITE: {supported} ({why})")
    return supported


def test_fio_with_agent_doorbells(server):
    post_write = _kernel_has_post_write()
    result = guest.run_guest(socket_path=server["socket"], fio_job=FIO_JOB, timeout=900, cpus=1, memory_mb=512)
    assert result.accel == "kvm"
    print(result.qemu_stderr[-2000:])
    result.check()
    errors = [j.get("error") for j in result.fio["jobs"]]
    assert errors == [0, 0], errors
    st = server["stats"]()
    agent, db = st["ioeventfd_agent"], st["doorbells"]
    ios = sum(j[d]["total_ios"] for j in result.fio["jobs"] for d in ("read", "write"))
    print(f"agent {agent}\ndoorbells {db}\nfio I/Os {ios}")
    assert agent["failures"] == 0 and agent["sets"] >= 1 and agent["refused"] == 0, agent
    assert agent["post_write"] == post_write
    assert ios >= 2 * 2048  # 8 MiB of 4k writes, then 8 MiB of reads (verify reads come on top)
    assert db["signals"] > 0 and db["lost_values"] == 0, db
    if post_write:
        # every doorbell, admin included, was a POST_WRITE ioeventfd from the BAR's enabling on
        assert db["trapped"] == 0 and db["trapped_io_sq"] == 0, db
    else:
        # plain ioeventfds only for I/O queues backed by Doorbell Buffer Config; the admin
        # queue stays trapped. The I/O SQ tails are eventfd signals (see the note on issue 12
        # for the odd one that traps)
        assert db["trapped_io_sq"] * 100 <= db["signals"], db
    text = server["log"].read_text()
    assert ("POST_WRITE" if post_write else "plain") in text
    assert "nvme-emu agent: VM fd" in result.qemu_stderr
