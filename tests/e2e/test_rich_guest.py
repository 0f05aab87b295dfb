"""The rich guest: the test guest's job in a Debian trixie tree shared over virtio-9p
(qemu-configs/build-rich-guest.sh, rich-root.sh; ``run_guest(rich_root=True)``).

One boot, on nvme-emu (a RAM namespace over vfio-user): the job runs in the tree with
bash, the tools the zoned checks use are there, python3 runs, ``modprobe`` loads from the
tree's module tree, and a (regular) btrfs is made, written and read back. QEMU's zoned
nvme in the same rich guest is tests/e2e/test_zoned_guest.py's peer (that boot also shows
the rich root at work on QEMU's own device).
"""

from __future__ import annotations

import pytest

from nvme_emu import guest

from ..support.server import ServerProcess
from . import zoned_checks as zc

pytestmark = pytest.mark.e2e

#: What the zoned checks run in the guest (zoned_checks, zone_fault_step).
TOOLS = ("blkzone", "mkfs.btrfs", "mkfs.f2fs", "mkzonefs", "fio", "nvme", "gawk", "modprobe")

JOB = f"""\
step() {{ echo "=====STEP $1 $(cut -d' ' -f1 /proc/uptime)====="; }}
step tools
echo "bash=$BASH_VERSION"
echo "root=$(findmnt -no FSTYPE /)"
echo "python=$(python3 -c 'import sys; print(sys.version_info[0])')"
for t in {" ".join(TOOLS)}; do command -v $t >/dev/null && echo "has=$t"; done
modprobe btrfs && echo modprobe_btrfs=ok
step fs
echo "zoned=$(cat /sys/block/nvme0n1/queue/zoned)"
mkfs.btrfs -q -f /dev/nvme0n1 && mkdir -p /mnt/b && mount /dev/nvme0n1 /mnt/b && echo mount=ok
head -c 8M /dev/urandom > /tmp/d && cp /tmp/d /mnt/b/d && umount /mnt/b && mount /dev/nvme0n1 /mnt/b \\
    && cmp /tmp/d /mnt/b/d && echo verify=ok
umount /mnt/b
step end
"""


def test_rich_root_on_nvme_emu(rich_infra, tmp_path):
    sock = str(tmp_path / "nvme.sock")
    srv = ServerProcess.serve(sock, tmp_path / "server.log", ["ram:size=256M"], doorbell="auto")
    try:
        res = guest.run_guest(socket_path=sock, rich_root=True, timeout=900, command=JOB)
    finally:
        srv.stop_clean()
    assert res.returncode == 0, res.describe_failure()
    steps = zc.parse_steps(res.output)
    print(f"\nrich guest on nvme-emu: {res.elapsed:.1f} s, job began at uptime {steps['tools'].started} s, "
          f"fs step {steps['fs'].seconds:.1f} s")
    tools = steps["tools"].output
    kv = zc.key_values(tools)
    assert kv["bash"].startswith("5."), tools
    assert kv["root"] == "overlay", tools
    assert kv["python"] == "3", tools
    assert {line.split("=", 1)[1] for line in tools.splitlines() if line.startswith("has=")} == set(TOOLS), tools
    assert kv.get("modprobe_btrfs") == "ok", tools
    kv = zc.key_values(steps["fs"].output)
    assert kv["zoned"] == "none" and kv.get("mount") == "ok" and kv.get("verify") == "ok", res.output
