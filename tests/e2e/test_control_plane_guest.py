"""The control plane under a real QEMU + Linux guest: namespaces that come and go at runtime,
nvme-cli's namespace management, and faults that Linux must survive.

The guest script and the test talk through a *mailbox*: two blocks of namespace 1, a file
the test can read and write directly. The guest writes ``go:STEP`` there (O_DIRECT, so it
reaches the server), the test sees it, acts through the control socket and writes
``ack:STEP`` into the next block, which the guest polls with O_DIRECT reads.
"""

from __future__ import annotations

import errno
import re
import threading
from typing import Callable

import pytest

from nvme_emu import guest
from nvme_emu.ctl import ControlClient, default_control_socket

from ..support.server import ServerProcess

pytestmark = pytest.mark.e2e

MAILBOX_LBA = 1 << 16  # 32 MiB into namespace 1 (512-byte blocks)
BLOCK = 512
#: Linux's I/O timeout in the guest, in seconds (the default 30 s would make the timeout
#: tests slow); set per queue through sysfs, since insmod ignores the kernel command line.
IO_TIMEOUT = 5
#: A completion held past two timeouts (Linux aborts after one, resets after the second).
DELAY_MS = 2 * IO_TIMEOUT * 1000 + 2000

#: Shell helpers every guest script starts with. Linux names a namespace's disk by an
#: instance number, not by its NSID (namespaces are scanned in parallel), so scripts find
#: disks by NSID: ``$(disk N)``.
PRELUDE = f"""
disk() {{ for d in /sys/block/nvme0n*; do [ "$(cat $d/nsid 2>/dev/null)" = "$1" ] && echo /dev/${{d##*/}}; done; true; }}
wait_ns() {{  # until namespace $1 has a disk (up to 30 s)
    i=0
    until [ -n "$(disk $1)" ]; do i=$((i + 1)); [ $i -gt 300 ] && {{ echo "no disk for nsid $1"; return 1; }}; sleep 0.1; done
}}
wait_gone() {{  # until namespace $1 has no disk (up to 30 s)
    i=0
    while [ -n "$(disk $1)" ]; do i=$((i + 1)); [ $i -gt 300 ] && {{ echo "nsid $1 still has a disk"; return 1; }}; sleep 0.1; done
}}
MB={MAILBOX_LBA}
MAILBOX=$(disk 1)
step() {{  # ask the test to do step $1, then wait for its ack
    printf 'go:%s' "$1" | dd of=$MAILBOX bs={BLOCK} seek=$MB conv=sync oflag=direct 2>/dev/null
    i=0
    until [ "$(dd if=$MAILBOX bs={BLOCK} skip=$((MB + 1)) count=1 iflag=direct 2>/dev/null | tr -d '\\000')" = "ack:$1" ]; do
        i=$((i + 1)); [ $i -gt 600 ] && {{ echo "no ack for $1"; exit 1; }}
        sleep 0.1
    done
}}
echo {IO_TIMEOUT} > /sys/module/nvme_core/parameters/io_timeout
for q in /sys/block/nvme*/queue/io_timeout; do echo {IO_TIMEOUT * 1000} > $q; done
"""


class Mailbox:
    """The test's side of the mailbox: runs ``actions[step]()`` when the guest asks."""

    def __init__(self, image: str, actions: dict[str, Callable[[], None]]) -> None:
        self.image = image
        self.actions = actions
        self.done: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Mailbox":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _read(self) -> str:
        with open(self.image, "rb") as f:
            f.seek(MAILBOX_LBA * BLOCK)
            return f.read(BLOCK).rstrip(b"\0").decode(errors="replace")

    def _ack(self, step: str) -> None:
        with open(self.image, "r+b") as f:
            f.seek((MAILBOX_LBA + 1) * BLOCK)
            f.write(f"ack:{step}".encode().ljust(BLOCK, b"\0"))

    def _run(self) -> None:
        # No event tells us the guest wrote its block: poll the file (the guest polls too).
        while not self._stop.wait(0.05):
            message = self._read()
            if not message.startswith("go:") or message[3:] in self.done:
                continue
            step = message[3:]
            try:
                self.actions[step]()
            except BaseException as e:  # reported by the test, after the guest is done
                self.errors.append(e)
            self.done.append(step)
            self._ack(step)


@pytest.fixture
def server(guest_infra, tmp_path):
    """nvme-emu with namespace 1 a file (the mailbox) and namespace 2 in RAM."""
    sock = str(tmp_path / "nvme.sock")
    image = str(tmp_path / "mailbox.img")
    srv = ServerProcess.serve(sock, tmp_path / "server.log", [f"file:{image},size=64M", "ram:size=64M"], doorbell="auto")
    try:
        with ControlClient(default_control_socket(sock)) as ctl:
            yield {"socket": sock, "image": image, "log": srv.log_path, "ctl": ctl}
    finally:
        # faults injected on purpose are logged as errors; only a traceback is a failure here
        print(srv.stop_clean(bad="Traceback"))


def run(server, script: str, actions: dict[str, Callable[[], None]]) -> str:
    with Mailbox(server["image"], actions) as mailbox:
        result = guest.run_guest(socket_path=server["socket"], command=PRELUDE + script, timeout=600)
    print(result.output)
    assert not mailbox.errors, mailbox.errors
    assert mailbox.done == list(actions), (mailbox.done, result.output)
    return result.check().output


def section(out: str, name: str) -> str:
    """The guest output between ``==NAME`` and the next ``==`` marker."""
    m = re.search(rf"^=={name}\n(.*?)(?=^==|\Z)", out, re.M | re.S)
    assert m, f"no section {name} in:\n{out}"
    return m.group(1)


def listed(nvme_list: str, nsid: int) -> str | None:
    """The Usage column's capacity of namespace ``nsid`` in ``nvme list`` output, or None."""
    m = re.search(rf"^/dev/nvme0n\d+ .*\s0x{nsid:x}\s+.*/\s+([\d.]+\s+[kMG]?B)", nvme_list, re.M)
    return m.group(1) if m else None


def test_namespaces_come_and_go_at_runtime(server):
    ctl = server["ctl"]
    script = r"""
set -e
echo ==START; nvme list
step add; wait_ns 3
echo ==ADDED; nvme list
step remove; wait_gone 3
echo ==REMOVED; nvme list
echo ==CREATE; nvme create-ns /dev/nvme0 --nsze=16384 --ncap=16384 --flbas=0
nvme attach-ns /dev/nvme0 --namespace-id=3 --controllers=$(cat /sys/class/nvme/nvme0/cntlid)
wait_ns 3
echo ==ATTACHED; nvme list
nvme detach-ns /dev/nvme0 --namespace-id=3 --controllers=$(cat /sys/class/nvme/nvme0/cntlid)
wait_gone 3
echo ==DETACHED; nvme list; nvme list-ns /dev/nvme0 --all
nvme delete-ns /dev/nvme0 --namespace-id=3
echo ==DELETED; nvme list-ns /dev/nvme0 --all
echo ==DMESG; dmesg | grep -i nvme | tail -n 20
"""
    out = run(server, script, {"add": lambda: ctl.ns_add(spec="ram:size=32M"), "remove": lambda: ctl.ns_remove(nsid=3)})
    assert listed(section(out, "START"), 1) and listed(section(out, "START"), 3) is None
    assert re.match(r"33\.55\s+MB", listed(section(out, "ADDED"), 3) or ""), section(out, "ADDED")
    assert listed(section(out, "REMOVED"), 3) is None
    assert re.search(r"create-ns: Success, created nsid:3", section(out, "CREATE"))
    assert re.match(r"8\.39\s+MB", listed(section(out, "ATTACHED"), 3) or ""), section(out, "ATTACHED")
    detached = section(out, "DETACHED")
    assert listed(detached, 3) is None and re.search(r"^\[\s*2\]:0x3$", detached, re.M)  # allocated, not attached
    assert "0x3" not in section(out, "DELETED")
    assert [ns["nsid"] for ns in ctl.namespaces()] == [1, 2]


MEDIA_JOB = """\
[global]
filename=@DISK@
ioengine=io_uring
direct=1
rw=read
bs=4k
[bad]
offset=16m
size=64k
[good]
offset=32m
size=1m
"""


def test_media_error_fails_its_range_only(server):
    """fio's reads of the range fail (Linux maps Unrecovered Read Error to BLK_STS_MEDIUM,
    which reaches user space as ENODATA, not EIO), others succeed; SMART counts it."""
    ctl = server["ctl"]
    bad_lba = (16 << 20) // BLOCK
    script = f"""
echo ==BEFORE; nvme smart-log /dev/nvme0 | grep -i media
step media
cat > /tmp/media.fio <<'EOF'
{MEDIA_JOB}EOF
sed -i "s|@DISK@|$(disk 2)|" /tmp/media.fio
echo ==FIO; fio --eta=never /tmp/media.fio 2>&1 | grep -E 'err=|error|^(bad|good)'
echo ==AFTER; nvme smart-log /dev/nvme0 | grep -i media
echo ==ERRLOG; nvme error-log /dev/nvme0 -e 1
echo ==DMESG; dmesg | grep -iE 'critical medium|I/O error' | tail -n 5
"""
    out = run(server, script, {"media": lambda: ctl.fault_add(kind="media", nsid=2, slba=bad_lba + 16, nlb=8, op="read")})
    before = int(re.search(r"media_errors\s*:\s*(\d+)", section(out, "BEFORE")).group(1))
    after = int(re.search(r"media_errors\s*:\s*(\d+)", section(out, "AFTER")).group(1))
    assert after > before
    fio = section(out, "FIO")
    bad = re.search(r"^bad: .*err=\s*(\d+)", fio, re.M)
    good = re.search(r"^good: .*err=\s*(\d+)", fio, re.M)
    assert bad and int(bad.group(1)) in (errno.EIO, errno.ENODATA), fio
    assert good and int(good.group(1)) == 0, fio  # elsewhere, reads succeed
    errlog = section(out, "ERRLOG")
    assert re.search(r"lba\s*:\s*(0x)?0*" + f"{bad_lba + 16:x}" + r"\b", errlog) or str(bad_lba + 16) in errlog, errlog
    assert ctl.fault_list()["counters"]["media_errors"] >= 1


def test_dropped_and_late_completions_and_fatal_status_are_recovered(server):
    ctl = server["ctl"]
    script = """
set -e
DISK=$(disk 2)
step drop
start=$(date +%s)
dd if=$DISK of=/dev/null bs=4096 skip=77 count=1 iflag=direct
echo ==DROP; echo "took $(( $(date +%s) - start )) s"
dd if=$DISK of=/dev/null bs=4096 skip=78 count=1 iflag=direct && echo "next read ok"
step delay
start=$(date +%s)
dd if=$DISK of=/dev/null bs=4096 skip=80 count=1 iflag=direct
echo ==DELAY; echo "took $(( $(date +%s) - start )) s"
dd if=$DISK of=/dev/null bs=4096 skip=81 count=1 iflag=direct && echo "read after delay ok"
step fatal
dd if=$DISK of=/dev/null bs=4096 skip=79 count=1 iflag=direct && echo "read after CFS ok"
echo ==STATE; cat /sys/class/nvme/nvme0/state; nvme list
echo ==DMESG; dmesg | grep -iE 'nvme' | tail -n 25
"""
    actions = {
        "drop": lambda: ctl.fault_add(kind="drop", nsid=2, remaining=1),
        "delay": lambda: ctl.fault_add(kind="delay", nsid=2, delay_ms=DELAY_MS),
        "fatal": lambda: ctl.fatal(reason="e2e"),
    }
    out = run(server, script, actions)
    drop = section(out, "DROP")
    took = int(re.search(r"took (\d+) s", drop).group(1))
    assert took >= IO_TIMEOUT and "next read ok" in drop  # recovered by the timeout path
    delay = section(out, "DELAY")
    assert int(re.search(r"took (\d+) s", delay).group(1)) >= IO_TIMEOUT and "read after delay ok" in delay
    assert "read after CFS ok" in out
    assert "live" in section(out, "STATE") and listed(section(out, "STATE"), 2)
    dmesg = section(out, "DMESG")
    assert re.search(r"timeout|abort", dmesg, re.I), dmesg
    assert re.search(r"CSTS=0x3|controller is down|reset", dmesg, re.I), dmesg
    counters = ctl.fault_list()["counters"]
    assert counters["dropped"] == 1 and counters["delayed"] == 1 and counters["fatal"] == 1
    assert not ctl.controllers()[0]["fatal"]  # the reset cleared CFS
