"""Issue 27's guest checks of namespaces on network storage, for one boot of the test guest
(tests/e2e/test_netstore_guest.py): the guest's script, the host's side of its kill steps,
and the readers of what it printed.

The guest has these NVMe controllers: nvme-emu's (vfio-user, CRDT1 = 1 s), with one
namespace per :class:`NetworkNamespace` (nbdkit's memory plugin, qemu-nbd serving a file, an
``rbd:`` image); a second nvme-emu started with ``--crdt1 0`` on a qemu-nbd of its own, the
kill check's "before"; and one QEMU ``-device nvme`` per :class:`Peer`, each on storage of its
own of one kind, read and written by QEMU's own client of it (its NBD client on an NBD export,
its rbd driver on an RBD image): what passes there must pass on nvme-emu's namespaces of that
kind (``NetworkNamespace.peer``). The script's steps print raw results between
``=====STEP name uptime=====`` lines (zoned_checks.parse_steps splits them):

* ``find``: which block device is which namespace (controller serial and NSID; the volatile
  write cache Linux sees, ``wc``), each controller's CRDT1 and the ACRE byte Linux set in Host
  Behavior Support;
* ``fio_LABEL``: fio writes with verify headers (4 KiB random writes at QD16, crc32c; a
  sequential job of 4-128 KiB writes, md5), then a separate pass verifies them
  (``verify_only``: the same job, reads only), on every namespace and every peer;
* ``kill`` and ``kill_nocrdt`` (:class:`Kill`): a pattern written and flushed, fio writing,
  the server SIGKILLed on the guest's request (:class:`KillSwitch`), fio's end and error,
  the other namespaces read while the server is down, dmesg's controller resets, the failed
  completions as Linux's ``nvme_complete_rq`` tracepoint saw them (status, retry count,
  time), then the server restarted on the guest's request, I/O polled until it resumes, the
  pattern read back and a write. ``kill`` runs where Linux enabled Advanced Command Retry
  (CRDT1 != 0: CRD = 1 asks for 1 s before each retry), ``kill_nocrdt`` where it could not
  (CRDT1 = 0: retries at once), so one boot shows what the retry delay changes. (The guest
  cannot clear ACRE itself: its 6.12 kernel refuses a Set Features of Host Behavior Support
  from user space with EACCES, nvme set-feature and admin-passthru alike, while it lets a
  Timestamp through.)
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .zoned_checks import Step, key_values

#: Every namespace of the boot is this big (nbdkit memory, qemu-nbd's file, the RBD images,
#: the peers').
NAMESPACE_BYTES = 64 << 20
#: fio's regions (MiB): the random job, the sequential job, the flushed pattern of the kill
#: steps (never written by fio), the kill steps' fio writes over the random job's region.
RANDOM_MIB, SEQUENTIAL_MIB, PATTERN_MIB = (0, 16), (16, 16), 48
#: The kill steps' fio: long enough that only an I/O error ends it in time.
KILL_FIO_RUNTIME_S = 90
#: How long the guest polls for I/O to resume after the restart request.
RESUME_POLL_S = 60
#: The kill steps' fio: writes over the random job's region until an error ends it.
KILL_FIO = (f"--rw=randwrite --bs=4k --iodepth=8 --offset={RANDOM_MIB[0]}M --size={RANDOM_MIB[1]}M "
            f"--time_based --runtime={KILL_FIO_RUNTIME_S}")
KILL_MARK = "NETSTORE-KILL"
RESTART_MARK = "NETSTORE-RESTART"
MARK_RE = re.compile(rf"({KILL_MARK}|{RESTART_MARK}) step=(\S+)")


class Server(Protocol):
    """A storage server the test started and can kill and restart (tests/nbd/nbd_servers.py)."""

    def start(self) -> object: ...

    def kill(self) -> None: ...


@dataclass
class NetworkNamespace:
    """One namespace of nvme-emu on network storage: its label (the steps' names and a shell
    variable's: letters, digits, underscores), its ``--namespace`` spec, the server the kill
    steps kill (None: not killed) and the label of the :class:`Peer` it is held to (None: none,
    e.g. QEMU here cannot open that storage)."""

    label: str
    spec: str
    nsid: int
    #: the serial of the nvme-emu controller that serves it
    serial: str
    killable: Server | None = None
    peer: str | None = None


@dataclass
class Peer:
    """QEMU's own ``-device nvme`` on a block node of its own (``blockdev``, a ``-blockdev``
    whose node-name is unique in the boot): the reference for nvme-emu's namespaces on storage
    of the same kind. ``label`` as a :class:`NetworkNamespace`'s; the guest finds it by its
    controller's ``serial``."""

    label: str
    serial: str
    blockdev: dict[str, Any]

    def qemu_args(self) -> list[str]:
        return ["-blockdev", json.dumps(self.blockdev, separators=(",", ":")),
                "-device", f"nvme,serial={self.serial},drive={self.blockdev['node-name']}"]


# -- the guest's script ---------------------------------------------------------------------


def _fio(name: str, dev: str, extra: str) -> str:
    return (f"fio --name={name} --filename={dev} --ioengine=libaio --direct=1 --group_reporting "
            f"--output-format=normal {extra}")


def fio_step(label: str) -> str:
    """Write then verify, in two fio runs per job, on ``$dev_LABEL``."""
    dev = f"$dev_{label}"
    rand = (f"--rw=randwrite --bs=4k --iodepth=16 --offset={RANDOM_MIB[0]}M --size={RANDOM_MIB[1]}M "
            "--verify=crc32c --verify_fatal=1")
    seq = (f"--rw=write --bsrange=4k-128k --iodepth=4 --offset={SEQUENTIAL_MIB[0]}M --size={SEQUENTIAL_MIB[1]}M "
           "--verify=md5 --verify_fatal=1")
    lines = [f"step fio_{label}"]
    for job, args in (("rand", rand), ("seq", seq)):
        lines += [
            f"{_fio(job, dev, args)} --do_verify=0 > /tmp/w.log 2>&1; echo \"{job}_write_rc=$?\"",
            "grep -E 'err=|issued rwts' /tmp/w.log | sed 's/^/  /'",
            f"{_fio(job, dev, args)} --verify_only=1 > /tmp/v.log 2>&1; echo \"{job}_verify_rc=$?\"",
            "grep -E 'err=|issued rwts|verify|bad|crc|md5' /tmp/v.log | sed 's/^/  /'",
            f"echo \"{job}_verified=$(sed -n 's/.*issued rwts: total=\\([0-9]*\\),.*/\\1/p' /tmp/v.log | head -1)\"",
        ]
    return "\n".join(lines) + "\n"


def kill_step(step: str, label: str, others: list[str]) -> str:
    """The kill check on ``$dev_LABEL`` (see the module docstring); ``others``: the
    labels read while its server is down."""
    dev = f"$dev_{label}"
    reads = "\n".join(
        f"dd if=$dev_{o} of=/dev/null bs=64k count=64 iflag=direct 2>/dev/null; echo \"{when}_read_{o}_rc=$?\""
        for when in ("during",) for o in others)
    after = reads.replace("during_read", "down_read")
    return f"""
step {step}
echo > /sys/kernel/tracing/trace
head -c 1048576 /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of={dev} bs=1M seek={PATTERN_MIB} oflag=direct 2>/dev/null; echo "pattern_write_rc=$?"
nvme flush {dev}; echo "flush_rc=$?"
dmesg -c > /dev/null  # busybox: -c reads and clears (no -C)
{{ {_fio("killed", dev, KILL_FIO)} > /tmp/kill.log 2>&1; echo $? > /tmp/fio_rc; now > /tmp/fio_end; }} &
fio_pid=$!
sleep 3
t_kill=$(now)
echo "{KILL_MARK} step={step}"
sleep 1
{reads}
wait $fio_pid; echo "fio_rc=$(cat /tmp/fio_rc)"
t_end=$(cat /tmp/fio_end)
echo "fio_after_kill_s=$(awk -v a=$t_kill -v b=$t_end 'BEGIN {{print b - a}}')"
grep -E 'err=|error' /tmp/kill.log | head -5 | sed 's/^/  fio: /'
{after}
echo "resets=$(dmesg | grep -ciE 'resetting controller|reset controller|controller is down')"
dmesg | grep -iE 'nvme|I/O error' | head -20 | sed 's/^/  dmesg: /'
grep nvme_complete_rq /sys/kernel/tracing/trace | sed 's/^/  trace: /'
echo "{RESTART_MARK} step={step}"
t_restart=$(now)
tries=0
until [ $tries -ge 1 ] && [ "$read_rc" = 0 ]; do
    tries=$((tries + 1))
    dd if={dev} of=/tmp/back bs=1M skip={PATTERN_MIB} count=1 iflag=direct 2>/dev/null; read_rc=$?
    [ "$read_rc" = 0 ] && break
    [ "$(awk -v a=$t_restart -v b=$(now) 'BEGIN {{print (b - a > {RESUME_POLL_S})}}')" = 1 ] && break
    sleep 0.5
done
echo "resume_tries=$tries"
echo "resume_read_rc=$read_rc"
echo "resumed_after_s=$(awk -v a=$t_restart -v b=$(now) 'BEGIN {{print b - a}}')"
cmp -s /tmp/back /tmp/pattern; echo "pattern_intact=$([ $? = 0 ] && echo yes || echo no)"
head -c 65536 /dev/urandom > /tmp/new
dd if=/tmp/new of={dev} bs=64k seek=$(( {PATTERN_MIB} * 16 + 16 )) oflag=direct 2>/dev/null; echo "resume_write_rc=$?"
dd if={dev} of=/tmp/newback bs=64k skip=$(( {PATTERN_MIB} * 16 + 16 )) count=1 iflag=direct 2>/dev/null
cmp -s /tmp/new /tmp/newback; echo "resume_write_intact=$([ $? = 0 ] && echo yes || echo no)"
"""


@dataclass(frozen=True)
class Kill:
    """A kill step: its name, the label of the namespace whose server it kills, and the
    labels it reads while that server is down."""

    step: str
    label: str
    others: tuple[str, ...]


def guest_script(checked: list[NetworkNamespace], kills: list[Kill], peers: list[Peer],
                 extra: list[NetworkNamespace] = ()) -> str:  # type: ignore[assignment]
    """The boot's whole job: find the devices, fio on each of ``checked`` and each of
    ``peers``, then each kill step (``extra``: namespaces only the kill steps use)."""
    everyone = [*checked, *extra]
    find = "\n".join([*(f"    [ \"$s\" = {p.serial} ] && dev_{p.label}=/dev/$b" for p in peers),
                      *(f"    [ \"$s\" = {ns.serial} ] && [ \"$n\" = {ns.nsid} ] && dev_{ns.label}=/dev/$b" for ns in everyone)])
    devs = "\n".join(f'echo "{label}=$dev_{label}"' for label in (*(ns.label for ns in everyone), *(p.label for p in peers)))
    crdt = "\n".join(
        f'c=$(basename $(readlink -f /sys/block/$(basename $dev_{ns.label})/device)); '
        f'echo "crdt1_{ns.label}=$(nvme id-ctrl /dev/$c | sed -n \'s/^crdt1 *: //p\')"; '
        f'echo "acre_{ns.label}=$(nvme get-feature /dev/$c -f 0x16 -l 512 -b 2>/dev/null | od -An -tu1 -N1 | tr -d \' \')"'
        for ns in everyone)
    return f"""
step() {{ echo "=====STEP $1 $(cut -d' ' -f1 /proc/uptime)====="; }}
now() {{ cut -d' ' -f1 /proc/uptime; }}
step find
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
echo 'status != 0' > /sys/kernel/tracing/events/nvme/nvme_complete_rq/filter
echo 1 > /sys/kernel/tracing/events/nvme/nvme_complete_rq/enable
for p in /sys/block/nvme*; do
    b=$(basename $p)
    s=$(cat $p/device/serial | tr -d ' ')
    n=$(cat $p/nsid)
    echo "block $b serial=$s nsid=$n wc=$(cat $p/queue/write_cache | tr ' ' _)"
{find}
done
{devs}
{crdt}
{''.join(fio_step(label) for label in (*(ns.label for ns in checked), *(p.label for p in peers)))}
{''.join(kill_step(k.step, k.label, list(k.others)) for k in kills)}
step end
"""


# -- the host's side ---------------------------------------------------------------------------


@dataclass
class KillSwitch:
    """run_guest's ``on_console_line`` for the kill steps: on the guest's kill request it
    SIGKILLs the server, on its restart request it reads the control plane's counters
    (``stats``) and starts the server again. What goes wrong is kept in ``errors`` (the
    console reader thread must not raise), the times in ``events``."""

    #: the server each kill step kills, by step name
    servers: dict[str, Server]
    stats: Callable[[], dict]
    errors: list[str] = field(default_factory=list)
    events: list[tuple[str, str, float]] = field(default_factory=list)
    counters: dict[str, dict] = field(default_factory=dict)

    def __call__(self, line: str) -> None:
        m = MARK_RE.search(line)
        if m is None:
            return
        what, step = m.groups()
        try:
            if what == KILL_MARK:
                self.servers[step].kill()
            else:
                self.counters[step] = self.stats()
                self.servers[step].start()
            self.events.append((what, step, time.monotonic()))
        except Exception as e:  # noqa: BLE001 (reported by the test, not lost on the reader thread)
            self.errors.append(f"{what} {step}: {e!r}")


# -- reading the steps -----------------------------------------------------------------------

#: One failed completion as Linux's nvme_complete_rq tracepoint prints it.
TRACE_RE = re.compile(r"\s(\d+\.\d+): nvme_complete_rq: .*?disk=(\S+?),.*?retries=(\d+),.*?status=(0x[0-9a-f]+)")


@dataclass
class Failures:
    """The failed completions of one disk in a kill step, as the guest's driver saw them."""

    statuses: set[int]
    completions: int
    max_retries: int
    #: seconds from the first failed completion to the first one Linux gave up on (retries 5)
    until_given_up: float | None


def failures(step: Step, disk: str) -> Failures:
    rows = [(float(t), int(r), int(s, 16)) for t, d, r, s in TRACE_RE.findall(step.output) if d == disk]
    if not rows:
        return Failures(set(), 0, -1, None)
    first = min(t for t, _, _ in rows)
    max_retries = max(r for _, r, _ in rows)
    given_up = [t for t, r, _ in rows if r == max_retries]
    return Failures({s for _, _, s in rows}, len(rows), max_retries, min(given_up) - first if given_up else None)


def values(step: Step) -> dict[str, str]:
    """The step's ``key=value`` words (several may share a line)."""
    out = key_values(step.output)
    for k, v in re.findall(r"(?:^|\s)([a-z_0-9]+)=(\S+)", step.output):
        out.setdefault(k, v)
    return out
