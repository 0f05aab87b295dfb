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

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nvme_emu import guest
from vfio_user.vmm import kvm as K
from vfio_user.vmm.post_write import post_write_contract_violation, post_write_expectation

from ..support.server import ServerProcess

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


def start_server(directory: Path, namespace: str, name: str = "server") -> ServerProcess:
    """``nvme-emu serve --doorbell shadow`` on ``directory/nvme.sock``; log ``name.log``."""
    return ServerProcess.serve(str(directory / "nvme.sock"), directory / f"{name}.log", [namespace], doorbell="shadow")


#: What a guest kernel prints when it finds a bug (possibly ours): such a death is a failure.
_KERNEL_COMPLAINT = re.compile(r"Kernel panic|Oops|BUG:|general protection|Call Trace")


def _vanished(result: guest.GuestResult) -> bool:
    """The L2 guest reset itself without a word: QEMU exited on its own, the job never ended and
    the kernel printed no complaint. Under the nested rig that is TCG's emulated SVM dropping
    L2 (a triple fault; seen in a full-suite run, 20 s into a patched-set boot), not the device
    under test."""
    return (result.returncode is None and not result.timed_out and result.qemu_returncode == 0
            and not _KERNEL_COMPLAINT.search(result.console))


def _boot(srv: ServerProcess, **kw) -> guest.GuestResult:
    result = guest.run_guest(socket_path=srv.path, timeout=900, cpus=1, memory_mb=512, **kw)
    if _vanished(result):
        print("L2 guest vanished (reset without a kernel complaint); booting it once more:\n"
              + result.describe_failure())
        result = guest.run_guest(socket_path=srv.path, timeout=900, cpus=1, memory_mb=512, **kw)
    assert result.accel == "kvm"
    print(result.qemu_stderr[-3000:])
    assert "nvme-emu agent: VM fd" in result.qemu_stderr
    return result.check()


def _check_agent_counters(srv: ServerProcess, post_write: bool) -> dict:
    st = srv.stats(timeout=30)  # the nested rig runs all this under TCG
    agent, db = st["ioeventfd_agent"], st["doorbells"]
    print(f"agent {agent}\ndoorbells {db}")
    assert agent["failures"] == 0 and agent["sets"] >= 1 and agent["refused"] == 0, agent
    assert agent["post_write"] == post_write
    assert db["signals"] > 0 and db["lost_values"] == 0, db
    if post_write:
        # every doorbell, admin included, was a POST_WRITE ioeventfd from the BAR's enabling on
        assert db["trapped"] == 0 and db["trapped_io_sq"] == 0, db
    else:
        # plain ioeventfds only for I/O queues backed by Doorbell Buffer Config; the admin
        # queue stays trapped. The I/O SQ tails are eventfd signals, but for one per
        # controller bring-up (measured: exactly one; see the note on issue 12)
        enables = srv.log().count("controller enabled")
        assert db["trapped_io_sq"] <= enables, (db, enables)
    return st


@pytest.fixture
def server(kvm_guest, tmp_path):
    srv = start_server(tmp_path, "ram:size=64M")
    try:
        yield srv
    finally:
        srv.stop_clean()


def _kernel_has_post_write() -> bool:
    with K.Kvm() as kvm, kvm.create_vm() as vm:
        supported, why = vm.post_write_supported()
    expected = post_write_expectation()
    if expected is not None and expected != supported:
        pytest.fail(post_write_contract_violation(supported, why))
    print(f"kernel POST_WRITE: {supported} ({why})")
    return supported


#: Run as uid 65534 while QEMU runs: try the agent's socket; print what happened.
HOSTILE_PEER = r"""
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused: permission denied"); sys.exit(0)
s.send(bytes(16))  # a HELLO-sized message: the agent must close without answering
try:
    print("refused: closed" if s.recv(64) == b"" else "ANSWERED")
except ConnectionResetError:
    print("refused: reset")
"""


def _hostile_peer(agent_socket: str, out: list) -> None:
    deadline = time.monotonic() + 600
    while not os.path.exists(agent_socket) and time.monotonic() < deadline:
        time.sleep(0.1)
    r = subprocess.run([sys.executable, "-c", HOSTILE_PEER, agent_socket], capture_output=True, text=True, timeout=60)
    out.append((r.returncode, r.stdout.strip(), r.stderr.strip()))


def test_fio_with_agent_doorbells(server):
    post_write = _kernel_has_post_write()
    hostile: list = []
    probe = threading.Thread(target=_hostile_peer, args=(server.path + ".agent", hostile), daemon=True)
    probe.start()
    result = _boot(server, fio_job=FIO_JOB)
    probe.join(60)
    print(f"hostile peer (uid 65534): {hostile}")
    assert hostile and hostile[0][0] == 0 and hostile[0][1].startswith("refused"), hostile
    errors = [j.get("error") for j in result.fio["jobs"]]
    assert errors == [0, 0], errors
    ios = sum(j[d]["total_ios"] for j in result.fio["jobs"] for d in ("read", "write"))
    print(f"fio I/Os {ios}")
    assert ios >= 2 * 2048  # 8 MiB of 4k writes, then 8 MiB of reads (verify reads come on top)
    _check_agent_counters(server, post_write)
    assert ("POST_WRITE" if post_write else "plain") in server.log()


#: In one boot: fio verify, controller reset, fio verify, PCI remove + rescan, fio verify.
#: Each step moves the registrations (reset: dbbuf gone and back; remove: decoding off,
#: BAR released; rescan: BAR assigned and enabled again).
LIFECYCLE = r"""
set -e
job() {
  fio --name=v$1 --filename=/dev/$(ls /sys/block | grep -m1 nvme) --ioengine=io_uring --direct=1 \
      --rw=randwrite --bs=4k --iodepth=8 --size=4m --offset=$(( $1 * 4 ))m --verify=crc32c \
      --do_verify=1 --verify_fatal=1 --randrepeat=0 --output-format=terse >/dev/null
  echo "verify $1 ok"
}
live() {
  for i in $(seq 300); do
    for s in /sys/class/nvme/nvme*/state; do
      [ -f "$s" ] && [ "$(cat "$s")" = live ] && ls /sys/block | grep -q nvme && return 0
    done
    sleep 0.1
  done
  echo "controller not live"; return 1
}
job 0
echo 1 > /sys/class/nvme/nvme0/reset_controller
sleep 0.5; live
job 1
pci=$(basename "$(readlink -f /sys/class/nvme/nvme0/device)")
echo 1 > /sys/bus/pci/devices/$pci/remove
echo "removed $pci"
[ ! -e /sys/bus/pci/devices/$pci ]
echo 1 > /sys/bus/pci/rescan
live
job 2
echo lifecycle done
"""


def test_reset_remove_rescan_keep_io(server):
    post_write = _kernel_has_post_write()
    out = _boot(server, command=LIFECYCLE).output
    for n in range(3):
        assert f"verify {n} ok" in out, out
    assert "lifecycle done" in out, out
    agent = _check_agent_counters(server, post_write)["ioeventfd_agent"]
    # reset and remove/rescan withdrew the registrations and sent them again
    assert agent["clears"] >= 2 and agent["sets"] >= 3, agent


def test_qemu_restart_and_server_restart(kvm_guest, tmp_path):
    """A new QEMU brings a new agent (same socket path): the server connects to it. A new
    server finds the QEMU's agent the same way; data written before both is intact."""
    post_write = _kernel_has_post_write()
    image = tmp_path / "disk.img"
    ns = f"file:{image},size=64M"
    write = (
        "dd if=/dev/urandom of=/tmp/p bs=4096 count=16 2>/dev/null && "
        "dd if=/tmp/p of=/dev/nvme0n1 bs=4096 seek=100 oflag=direct 2>/dev/null && sha256sum /tmp/p"
    )
    read = "dd if=/dev/nvme0n1 bs=4096 skip=100 count=16 iflag=direct 2>/dev/null | sha256sum"
    srv = start_server(tmp_path, ns, "server-a")
    try:
        digest = _boot(srv, command=write).output.split()[0]
        out = _boot(srv, command=read + "; " + write.replace("seek=100", "seek=200")).output  # a new QEMU
        assert out.split()[0] == digest, out
        digest2 = out.split()[2]
        agent = _check_agent_counters(srv, post_write)["ioeventfd_agent"]
        assert agent["agent_gone"] + agent["clears"] >= 1, agent
    finally:
        srv.stop_clean()
    srv = start_server(tmp_path, ns, "server-b")  # a new nvme-emu on the same file and socket
    try:
        out = _boot(srv, command=read + "; " + read.replace("skip=100", "skip=200")).output
        assert out.split()[0] == digest and out.split()[2] == digest2, out
        _check_agent_counters(srv, post_write)
    finally:
        srv.stop_clean()
