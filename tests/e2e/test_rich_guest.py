"""The rich guest: the test guest's job in a Debian trixie tree shared over virtio-9p
(qemu-configs/build-rich-guest.sh, rich-root.sh; ``run_guest(rich_root=True)``).

ONE boot per device, shared by the checks of this module (CI's time allows few boots):

* QEMU's own nvme with a zoned namespace (``builtin_zoned``): Linux sees it host-managed,
  ``blkzone report`` lists every zone, a subset of fio's ``t/zbd/test-zbd-support`` passes
  (when the build had fio's source, else that check skips saying why), and btrfs in
  zoned mode is made, mounted, written, remounted and read back. This is the peer that
  nvme-emu's zoned namespaces are compared against (tests/e2e/zoned_checks.py).
* nvme-emu (a RAM namespace): the same rich root over vfio-user; python3, modprobe from
  the tree's module tree and a (regular) btrfs.
"""

from __future__ import annotations

import pytest

from nvme_emu import guest

from ..support.server import ServerProcess
from . import zoned_checks as zc

pytestmark = pytest.mark.e2e

ZONE = 4 << 20
#: The subset needs 8 zones, btrfs -O zoned a few (superblock log, metadata, system, data);
#: all of test-zbd-support (NVME_EMU_ZBD_TESTS=all) 130 (tests 3 and 4).
NR_ZONES = 64 if zc.zbd_tests_from_env() else 132
ZONED = guest.ZonedNamespace(zone_size=ZONE, max_open=8, max_active=8)

PRELUDE = """\
step() { echo "=====STEP $1 $(cut -d' ' -f1 /proc/uptime)====="; }
step tools
echo "bash=$BASH_VERSION"
echo "root=$(findmnt -no FSTYPE /)"
echo "python=$(python3 -c 'import sys; print(sys.version_info[0])')"
for t in blkzone mkfs.btrfs mkfs.f2fs fio nvme gawk modprobe; do command -v $t >/dev/null && echo "has=$t"; done
modprobe btrfs && echo modprobe_btrfs=ok
"""


@pytest.fixture(scope="module")
def zoned_boot(rich_infra, tmp_path_factory):
    """One boot on QEMU's zoned nvme: (result, steps)."""
    image = tmp_path_factory.mktemp("zoned") / "zns.raw"     # under /tmp: the chroot QEMU sees it
    with open(image, "wb") as f:
        f.truncate(NR_ZONES * ZONE)
    tests = zc.zbd_tests_from_env()
    res = guest.run_guest(builtin_image=str(image), builtin_zoned=ZONED, rich_root=True,
                          command=PRELUDE + zc.zoned_script(zbd_tests=tests), timeout=1500 if tests else 3000,
                          memory_mb=1024 if tests else 2048)
    steps = zc.parse_steps(res.output)
    print(f"\nrich guest on QEMU's zoned nvme: {res.elapsed:.1f} s in all, job began at uptime "
          f"{steps['tools'].started if 'tools' in steps else '?'} s")
    for s in steps.values():
        print(f"  step {s.name:<8} {s.seconds:6.1f} s")
    assert res.returncode == 0, res.describe_failure()
    return res, steps


def test_rich_root_has_the_tools(zoned_boot):
    _, steps = zoned_boot
    kv = zc.key_values(steps["tools"].output)
    assert kv["bash"].startswith("5."), kv
    assert kv["root"] == "overlay", kv
    assert kv["python"] == "3", kv
    has = {line.split("=", 1)[1] for line in steps["tools"].output.splitlines() if line.startswith("has=")}
    assert has == {"blkzone", "mkfs.btrfs", "mkfs.f2fs", "fio", "nvme", "gawk", "modprobe"}
    assert kv.get("modprobe_btrfs") == "ok", steps["tools"].output


def test_linux_sees_a_host_managed_disk(zoned_boot):
    _, steps = zoned_boot
    kv = zc.key_values(steps["sysfs"].output)
    assert kv["zoned"] == "host-managed", kv
    assert int(kv["nr_zones"]) == NR_ZONES, kv
    assert int(kv["chunk_sectors"]) * 512 == ZONE, kv
    assert int(kv["max_open_zones"]) == ZONED.max_open, kv
    assert int(kv["max_active_zones"]) == ZONED.max_active, kv


def test_blkzone_report_lists_every_zone(zoned_boot):
    _, steps = zoned_boot
    out = steps["blkzone"].output
    kv = zc.key_values(out)
    assert kv["rc"] == "0" and int(kv["zones"]) == NR_ZONES, out
    assert "start: 0x000000000, len 0x002000" in out and "SEQ_WRITE_REQUIRED" in out, out


def test_fio_zbd_support_subset(zoned_boot):
    _, steps = zoned_boot
    out = steps["zbd"].output
    print(out)
    if out.startswith("missing:"):
        pytest.skip(f"fio's t/zbd is not in the rich guest: {out[len('missing:'):].strip()}")
    kv = zc.key_values(out)
    print(f"t/zbd ran with fio {kv['fio']} and its scripts {kv['script']}: {kv['source']}")
    assert kv["fio"] == kv["script"], out     # the scripts belong to the fio they run
    listed = [int(t) for t in kv["tests"].split()]
    wanted = zc.zbd_tests_from_env()
    assert listed and (wanted is None or listed == list(wanted)), out
    results = zc.zbd_results(out)
    assert sorted(results) == sorted(listed), out
    failed = {t: r for t, r in results.items() if r[0] == "FAIL"}
    assert not failed, out


def test_btrfs_zoned_make_mount_write_verify(zoned_boot):
    _, steps = zoned_boot
    kv = zc.key_values(steps["fs"].output)
    for k in ("mkfs", "mount", "write", "umount", "verify"):
        assert kv.get(k) == "ok", steps["fs"].output
    assert int(kv["nonempty_zones"]) > 0, steps["fs"].output


def test_rich_root_on_nvme_emu(rich_infra, tmp_path):
    """The same rich root with our controller (vfio-user): one boot."""
    sock = str(tmp_path / "nvme.sock")
    srv = ServerProcess.serve(sock, tmp_path / "server.log", ["ram:size=256M"], doorbell="auto")
    try:
        res = guest.run_guest(socket_path=sock, rich_root=True, timeout=900, command=PRELUDE + """\
step fs
echo "zoned=$(cat /sys/block/nvme0n1/queue/zoned)"
mkfs.btrfs -q -f /dev/nvme0n1 && mkdir -p /mnt/b && mount /dev/nvme0n1 /mnt/b && echo mount=ok
head -c 8M /dev/urandom > /tmp/d && cp /tmp/d /mnt/b/d && umount /mnt/b && mount /dev/nvme0n1 /mnt/b \\
    && cmp /tmp/d /mnt/b/d && echo verify=ok
umount /mnt/b
step end
""")
    finally:
        srv.stop_clean()
    assert res.returncode == 0, res.describe_failure()
    steps = zc.parse_steps(res.output)
    print(f"\nrich guest on nvme-emu: {res.elapsed:.1f} s, job began at uptime {steps['tools'].started} s, "
          f"fs step {steps['fs'].seconds:.1f} s")
    assert zc.key_values(steps["tools"].output).get("modprobe_btrfs") == "ok", res.output
    kv = zc.key_values(steps["fs"].output)
    assert kv["zoned"] == "none" and kv.get("mount") == "ok" and kv.get("verify") == "ok", res.output
