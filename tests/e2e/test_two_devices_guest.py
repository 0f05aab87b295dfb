"""Two nvme-emu servers as two NVMe controllers in one QEMU guest, with default identities.

Linux must bind both: distinct serial numbers, subsystem NQNs and CNTLIDs (with the same
NQN it ignores the second controller), distinct namespace IDs (a duplicate NGUID, EUI-64 or
UUID makes it refuse the namespace), and no complaint about duplicates in dmesg. The second
server also has a read-only namespace, which Linux must mark read-only (NSATTR bit 0).
"""

from __future__ import annotations

import re

import pytest

from nvme_emu import guest

from ..support.server import ServerProcess

pytestmark = pytest.mark.e2e

#: Namespaces in the guest: two on the first controller, two on the second.
NAMESPACES = 4

SCRIPT = rf"""
for i in $(seq 1 120); do
    [ "$(ls -d /sys/block/nvme* 2>/dev/null | wc -l)" -ge {NAMESPACES} ] && break
    sleep 0.5
done
nvme list
for c in /sys/class/nvme/nvme*; do
    echo "CTRL $(basename $c) cntlid=$(cat $c/cntlid) serial=$(cat $c/serial) nqn=$(cat $c/subsysnqn)"
done
for b in /sys/block/nvme*; do
    echo "BLOCK $(basename $b) wwid=$(cat $b/wwid) ro=$(cat $b/ro)"
done
head -c 512 /dev/zero > /tmp/zero
for b in /sys/block/nvme*; do
    [ "$(cat $b/ro)" = 1 ] || continue
    echo ==RO-WRITE  # passthrough, past the block layer's own read-only check
    nvme write /dev/$(basename $b) --start-block=0 --block-count=0 --data-size=512 --data=/tmp/zero 2>&1
    echo "rc=$?"
done
echo ==HWMON
for t in /sys/class/nvme/nvme*/hwmon*/temp2_max; do
    [ -e "$t" ] && echo "TEMP2MAX $(cat $t 2>&1)"
done
echo ==DMESG
dmesg | grep -i nvme
true
"""

#: What Linux says when two controllers or namespaces claim one identity.
DUPLICATE_COMPLAINTS = re.compile(r"duplicate|ignoring ctrl|same NQN|Duplicate cntlid", re.I)


@pytest.fixture
def two_servers(guest_infra, tmp_path):
    readonly = tmp_path / "ro.img"
    readonly.write_bytes(b"\x5a" * (1 << 20))
    # no --serial: the identity defaults apply
    servers = [
        ServerProcess.serve(str(tmp_path / "a.sock"), tmp_path / "a.log", [f"file:{tmp_path / 'a.img'},size=64M", "ram:size=16M"], doorbell="auto"),
        ServerProcess.serve(str(tmp_path / "b.sock"), tmp_path / "b.log", [f"file:{tmp_path / 'b.img'},size=64M", f"file:{readonly},ro"], doorbell="auto"),
    ]
    try:
        yield servers
    finally:
        for s in servers:
            s.stop_clean()


def test_two_controllers_bind_with_distinct_identities(two_servers):
    a, b = two_servers
    result = guest.run_guest(socket_path=a.path, extra_sockets=[b.path], command=SCRIPT, timeout=600)
    out = result.check().output
    ctrls = re.findall(r"^CTRL (\S+) cntlid=(\d+) serial=(\S+)\s+nqn=(\S+)$", out, re.M)
    assert len(ctrls) == 2, out
    for field in (1, 2, 3):  # cntlid, serial, subsystem NQN
        assert len({c[field] for c in ctrls}) == 2, (field, ctrls)
    blocks = re.findall(r"^BLOCK (\S+) wwid=(\S+) ro=(\d)$", out, re.M)
    assert len(blocks) == NAMESPACES, out
    assert len({wwid for _, wwid, _ in blocks}) == NAMESPACES, blocks
    assert sorted(ro for _, _, ro in blocks) == ["0", "0", "0", "1"], blocks  # the write-protected one
    ro_write = out.split("==RO-WRITE", 1)[1].split("==HWMON", 1)[0]
    assert re.search(r"write protected|\(0x20\)|0x20\b", ro_write, re.I) and "rc=0" not in ro_write, ro_write
    hwmon = out.split("==HWMON", 1)[1].split("==DMESG", 1)[0]
    for value in re.findall(r"^TEMP2MAX (.*)$", hwmon, re.M):  # sensor 1's threshold (no EIO)
        assert value.strip().lstrip("-").isdigit(), value
    dmesg = out.split("==DMESG", 1)[1]
    complaints = [line for line in dmesg.splitlines() if DUPLICATE_COMPLAINTS.search(line)]
    assert not complaints, "\n".join(complaints)
    print(out)
