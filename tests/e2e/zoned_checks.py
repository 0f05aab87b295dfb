"""Zoned-device checks for one rich-guest boot (``run_guest(rich_root=True)``), written
once and run against any device that gives the guest a zoned ``/dev/nvme0n1``: QEMU's
own ``nvme-ns zoned=on`` (tests/e2e/test_rich_guest.py) and nvme-emu's zoned namespaces.

The job is one bash script of steps; each step prints ``=====STEP name uptime=====``
first, so that a single boot serves several checks (the CI budget allows few boots:
each costs ~15-25 s under TCG before the job starts) and each check reads its own
step's output with ``parse_steps``.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field

STEP_RE = re.compile(r"^=====STEP (\S+) ([0-9.]+)=====$", re.M)

#: test-zbd-support's tests that a small ZNS namespace (4 MiB zones) runs in a few
#: seconds each under TCG: buffered writes refused (1), block size beyond the zone
#: (2), sequential write + verify (5), read (6), random writes at QD1 (7) and QD64 (8),
#: mixed block sizes (11), max 1 and 4 open zones (12, 13). Measured on QEMU's zoned
#: nvme (2 vCPUs, TCG, loaded host): 4.3-9.9 s each, 72 s together. All 70 tests
#: (NVME_EMU_ZBD_TESTS=all) need 130 zones (tests 3, 4) and a 2 GiB guest (test 34:
#: iodepth 256 of zone-sized buffers, ENOMEM in 1 GiB); on QEMU's device 59 passed and
#: 11 skipped (SCSI only, conventional zones, regular devices) in 643 s, 54 tests under
#: 8 s, tests 30-32, 34, 48, 54, 57, 58 33-42 s each (fio 3.39 and its scripts).
#: With fio 3.33 and ITS scripts (build-fio-zbd.sh: the source CI's mirror serves) the
#: subset passes too, 3.9-7.2 s each, 57 s together; all 58 tests of 3.33's script: 46
#: pass, 11 skip (the same kinds), test 54 (randrw + verify) FAILS: fio 3.33 gets EIO
#: on a read in zone 0 with nothing in the guest kernel's log (2 of 2 runs; 3.39 passes
#: it), 437 s, 30-32, 48, 57, 58 32-35 s each. Each test runs with -r (all zones
#: reset first): without it
#: tests 25, 54, 55, 57 and 59 failed on QEMU's device with max_active=8, from zones
#: the previous tests left open.
ZBD_TESTS = (1, 2, 5, 6, 7, 8, 11, 12, 13)

ZBD_RESULT_RE = re.compile(r"^Running test (\d+) \.\.\. (PASS|FAIL|SKIP)\s*(.*)$", re.M)


@dataclass
class Step:
    name: str
    started: float          # guest uptime (s) when the step began
    output: str
    seconds: float = 0.0    # until the next step began
    extra: dict[str, str] = field(default_factory=dict)


def parse_steps(output: str) -> dict[str, Step]:
    """The job's output split at its ``=====STEP=====`` lines, with each step's duration."""
    marks = list(STEP_RE.finditer(output))
    steps: dict[str, Step] = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(output)
        step = Step(m.group(1), float(m.group(2)), output[m.end():end].strip("\n"))
        if i + 1 < len(marks):
            step.seconds = float(marks[i + 1].group(2)) - step.started
        steps[step.name] = step
    return steps


def zbd_results(output: str) -> dict[int, tuple[str, str]]:
    """test-zbd-support's per-test lines -> {test: (PASS|FAIL|SKIP, reason)}."""
    return {int(m.group(1)): (m.group(2), m.group(3).strip()) for m in ZBD_RESULT_RE.finditer(output)}


def zbd_tests_from_env(default: tuple[int, ...] = ZBD_TESTS) -> tuple[int, ...] | None:
    """NVME_EMU_ZBD_TESTS: ``all`` (None: every test of the script) or ``1,2,5``."""
    v = os.environ.get("NVME_EMU_ZBD_TESTS", "").strip()
    if not v:
        return default
    return None if v == "all" else tuple(int(t) for t in v.split(","))


def zoned_script(dev: str = "/dev/nvme0n1", zbd_tests: tuple[int, ...] | None = ZBD_TESTS, fs: str = "btrfs") -> str:
    """The bash job: sysfs, blkzone, test-zbd-support's tests (``None``: all; each timed),
    and a zoned filesystem (``btrfs`` -O zoned) made, mounted, written, remounted and read back."""
    name = dev.rsplit("/", 1)[-1]
    tests = ("$(sed -n 's/^test\\([0-9][0-9]*\\)() {$/\\1/p' test-zbd-support)" if zbd_tests is None
             else " ".join(str(t) for t in zbd_tests))
    return f"""\
set -u
dev={shlex.quote(dev)}
q=/sys/block/{name}/queue
step() {{ echo "=====STEP $1 $(cut -d' ' -f1 /proc/uptime)====="; }}

step sysfs
for f in zoned nr_zones chunk_sectors max_open_zones max_active_zones zone_append_max_bytes \\
         logical_block_size; do
    echo "$f=$(cat $q/$f 2>/dev/null)"
done
echo "size_sectors=$(cat /sys/block/{name}/size)"

step blkzone
blkzone report $dev > /tmp/zones; echo "rc=$?"
echo "zones=$(grep -c 'start:' /tmp/zones)"
head -n 2 /tmp/zones

step zbd
if [ -x /opt/fio-zbd/t/zbd/test-zbd-support ]; then
    # the fio the script runs ($(dirname $0)/../../fio), its scripts' version, where both came from
    echo "fio=$(/opt/fio-zbd/fio --version)"
    echo "script=$(sed -n 's/^DEF_VER=//p' /opt/fio-zbd/FIO-VERSION-GEN)"
    echo "source=$(cat /opt/fio-zbd/SOURCE)"
    cd /opt/fio-zbd/t/zbd
    echo "tests="{tests}
    for t in {tests}; do
        s=$(cut -d' ' -f1 /proc/uptime)
        ./test-zbd-support -r -t "$t" $dev 2>&1 | grep '^Running test'
        echo "time test $t $(awk -v s="$s" '{{print $1 - s}}' /proc/uptime)"
        grep -q FAIL ./test-zbd-support.log.$t 2>/dev/null && tail -n 15 ./test-zbd-support.log.$t | sed 's/^/  log: /'
    done
    cd /
else
    echo "missing: $(cat /opt/fio-zbd.missing 2>/dev/null || echo 'no /opt/fio-zbd')"
fi

step fs
blkzone reset $dev
mkdir -p /mnt/z
case {shlex.quote(fs)} in
btrfs) mkfs.btrfs -q -f -O zoned -d single -m single $dev && echo mkfs=ok
       mount -t btrfs $dev /mnt/z && echo mount=ok ;;
esac
head -c 24M /dev/urandom > /tmp/data
cp /tmp/data /mnt/z/data && sync && echo write=ok
umount /mnt/z && echo umount=ok
mount -t {shlex.quote(fs)} $dev /mnt/z && cmp /tmp/data /mnt/z/data && echo verify=ok
umount /mnt/z
blkzone report $dev | grep -vc 'zcond: 1(em)' | sed 's/^/nonempty_zones=/'

step end
"""


def key_values(text: str) -> dict[str, str]:
    """``key=value`` lines -> dict (the first ``=`` splits)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep and k and " " not in k:
            out[k] = v
    return out
