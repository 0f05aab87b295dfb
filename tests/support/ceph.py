"""A real single-node Ceph cluster for the ``rbd:`` backend's tests: start, readiness, stop.

:class:`CephCluster` runs Debian's Ceph (bookworm: 16.2.15, Pacific) from a temporary directory
alone: its own ``ceph.conf`` (a fresh fsid), one monitor on 127.0.0.1 at a free port (msgr2 only),
one OSD on ``memstore`` (objects in the OSD's RAM; ``memstore_device_bytes`` is only the size it
reports; still in 16.2) or, with ``objectstore="bluestore"``, on a sparse block file in the
directory, ``osd_pool_default_size = 1`` with ``mon_allow_pool_size_one``, a pool and an RBD image.
Nothing goes to /etc/ceph or /var/lib/ceph, and no systemd unit runs: each daemon is started in
the foreground (``-f``) in its own process group (session), with the parent-death signal set to
SIGKILL, and :meth:`CephCluster.stop` kills the groups and removes the directory. The fixture
:func:`ceph_cluster` (session scope; ``tests/rbd/conftest.py`` imports it) stops it on every exit path; an ``atexit`` hook and the death signal
cover a test process that ends without running its finalizers.

No manager daemon: the monitor creates pools and their PGs by itself, and librbd's image
creation, reads and writes need only the monitor and the OSD (``ceph -s`` says ``mgr: no daemons
active`` and shows no PG statistics, which are the manager's; nothing here reads them).

Auth is ``cephx`` by default, as a real cluster has it: one keyring in the directory with keys
for ``mon.``, ``client.admin`` and ``osd.0`` (generated here in ceph-authtool's format), which the
monitor imports at ``--mkfs``. ``auth="none"`` turns it off (``auth_*_required = none``).

Readiness is asked of the cluster through python3-rados (librados, in this process): the monitor
answers a connect, ``osd dump`` lists osd.0 up, then the pool is created and initialised for rbd
and the image created, which waits for the pool's PGs to be active on the OSD.

Measured on this machine (2 shared vCPUs, Debian 12, 2026-12-07), ``python -m
tests.support.ceph --runs 3`` (start = mkfs of both daemons + OSD up + pool + image):

| what | cephx (the default) | auth none |
|---|---|---|
| start to a pool and an image, 3 runs | 0.80, 0.78, 0.72 s: median 0.78 s, spread 0.07 s | 0.70, 0.69, 0.70 s: median 0.70 s, spread 0.01 s |
| its steps: mon mkfs / mon answers / OSD mkfs / OSD up / pool / image | 0.05 / 0.22 / 0.06 / 0.22 / 0.12 / 0.11 s | 0.04 / 0.21 / 0.04 / 0.21 / 0.08 / 0.11 s |
| idle, 30 s after the start: CPU of mon / OSD | 0.1 % / 0.1 % of one CPU | 0.13 % / 0.1 % |
| idle RSS: mon / OSD | 36.5 / 41.9 MiB | 33.5 / 39.2 MiB |
| stop (SIGKILL both groups, reap, remove the dir) | 7-14 ms | 5-15 ms |
| start with both CPUs busy (two ``yes`` loops), 3 runs | 0.89, 0.99, 0.95 s: median 0.95 s, spread 0.10 s | |

With Ceph's default ``paxos_propose_interval`` (1 s: the monitor batches map updates), each
step that changes a map waits for it: 7.31, 7.30, 7.29 s (OSD up 3.0 s, pool 2.0 s, image
2.0 s); ``paxos_propose_interval = 0.05`` here makes it 0.7-0.8 s. ``pg_num`` 1, 8 or 32 makes
no difference (0.70-0.71 s median). Memstore keeps the data in the OSD's RAM, about twice over:
256 MiB written to a 1 GiB image (0.42 s) took the OSD from 42 to 555 MiB RSS, so size images
for a test by what it writes. The start is well under a second against CI's 90 minutes; this is
already the smallest configuration (no manager, one OSD on memstore, size-1 pools).

File-backed bluestore (``--objectstore bluestore``, cephx, 1 GiB sparse block file): 4.21,
3.90, 3.92 s, median 3.92 s, spread 0.32 s (its mkfs 2.2 s, OSD up 1.1-1.4 s); idle mon / OSD
0.03 % / 0.2 % CPU, 37 / 50 MiB RSS; stop 41-92 ms. Memstore stays the default: five times
faster to start; bluestore is there for images larger than RAM should hold.

To look at a running cluster: ``ceph -c DIR/ceph.conf -s`` (HEALTH_OK, ``mgr: no daemons
active``), ``rbd -c DIR/ceph.conf info rbd/img``; the daemons log to ``DIR/log``.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

#: Daemons and the bindings the cluster needs (Debian packages ceph-mon, ceph-osd, python3-rados,
#: python3-rbd; ./dev installs them and links the two bindings into the venv).
DAEMONS = ("ceph-mon", "ceph-osd", "monmaptool")
#: Upper bound for the whole start; a healthy start takes a few seconds.
START_DEADLINE = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def missing() -> str | None:
    """Why a cluster cannot run on this machine (a daemon or a binding absent), else None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/bin", d).exists()]
    if absent:
        return f"{', '.join(absent)} not installed (Debian packages ceph-mon, ceph-osd, ceph-base; ./dev test installs them)"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError as e:
        return f"python3-rados/python3-rbd not importable in this interpreter ({e}); ./dev test links them into the venv"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cephx_key() -> str:
    """A new secret in CryptoKey's encoding (as ceph-authtool --gen-key writes it)."""
    now = time.time()
    return base64.b64encode(struct.pack("<HIIH", 1, int(now), int(now % 1 * 1e9), 16) + os.urandom(16)).decode()


def _daemon_preexec() -> None:
    # The daemon dies with the process that started it, even one that is SIGKILLed.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds; 0.0 once it is gone (a daemon's, or a
    benchmark's storage server's: bench/netstore_fio.py samples them too)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class CephCluster:
    """One mon, one memstore OSD, one pool with one RBD image, all under ``base`` (a new temp dir)."""

    auth: str = "cephx"  # or "none"
    pool: str = "rbd"
    image: str = "img"
    image_size: int = 256 << 20
    pg_num: int = 8
    #: ``memstore`` (objects in the OSD's RAM) or ``bluestore`` (a sparse block file in the dir)
    objectstore: str = "memstore"
    #: The capacity the OSD reports (memstore) or its block file's size (bluestore)
    osd_bytes: int = 1 << 30
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nvme-emu-ceph-")))
    fsid: str = field(default_factory=lambda: str(uuid.uuid4()))
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: Seconds each start step took (mkfs, mon_up, osd_up, pool, image, total).
    timings: dict[str, float] = field(default_factory=dict)
    #: More ``[global]`` options (name: value), after ours.
    extra_conf: dict[str, str] = field(default_factory=dict)
    #: How each daemon was started, to start it again (:meth:`restart`).
    argv: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.base / "ceph.conf"

    @property
    def keyring(self) -> Path:
        return self.base / "keyring"

    @property
    def client_id(self) -> str:
        return "admin"

    @property
    def spec(self) -> str:
        """The namespace spec for this image, for the ``rbd:`` backend."""
        return f"rbd:{self.pool}/{self.image},conf={self.conf},id={self.client_id}"

    # -- start -------------------------------------------------------------------------------

    def write_conf(self) -> None:
        b = self.base
        b.mkdir(parents=True, exist_ok=True)
        for d in ("mon", "osd", "run", "log"):
            (b / d).mkdir(exist_ok=True)
        auth = "cephx" if self.auth == "cephx" else "none"
        lines = [
            "[global]",
            f"fsid = {self.fsid}",
            f"mon_host = v2:127.0.0.1:{self.port}",
            "public_addr = 127.0.0.1",
            "ms_bind_msgr1 = false",
            f"auth_cluster_required = {auth}",
            f"auth_service_required = {auth}",
            f"auth_client_required = {auth}",
            f"keyring = {self.keyring}",
            f"run_dir = {b}/run",
            f"admin_socket = {b}/run/$name.asok",
            f"log_file = {b}/log/$name.log",
            "pid_file =",
            "crash_dir =",
            f"mon_data = {b}/mon",
            f"osd_data = {b}/osd",
            f"osd_objectstore = {self.objectstore}",
            f"memstore_device_bytes = {self.osd_bytes}",
            f"bluestore_block_size = {self.osd_bytes}",
            "osd_pool_default_size = 1",
            "osd_pool_default_min_size = 1",
            "mon_allow_pool_size_one = true",
            f"osd_pool_default_pg_num = {self.pg_num}",
            f"osd_pool_default_pgp_num = {self.pg_num}",
            "osd_pool_default_pg_autoscale_mode = off",
            "osd_crush_chooseleaf_type = 0",
            # a test cluster on a shared disk: no space, no-redundancy or reclaim warnings
            "mon_data_avail_warn = 1",
            "mon_data_avail_crit = 0",
            "mon_warn_on_pool_no_redundancy = false",
            "mon_warn_on_insecure_global_id_reclaim_allowed = false",
            # the monitor batches map updates for paxos_propose_interval (1 s): each step of the
            # start (OSD up, pool, PGs created) waited for it, 7.3 s in all instead of 0.8 s
            "paxos_propose_interval = 0.05",
            # fewer threads on 2 shared CPUs
            "osd_op_num_shards = 1",
            "osd_op_num_threads_per_shard = 2",
            "ms_async_op_threads = 1",
            *(f"{k} = {v}" for k, v in self.extra_conf.items()),
            "[mon.a]",
            f"mon_addr = v2:127.0.0.1:{self.port}",
            "",
        ]
        self.conf.write_text("\n".join(lines))
        if self.auth == "cephx":
            caps = {
                "mon.": ['mon = "allow *"'],
                "client.admin": ['mon = "allow *"', 'osd = "allow *"', 'mgr = "allow *"'],
                "osd.0": ['mon = "allow profile osd"', 'mgr = "allow profile osd"', 'osd = "allow *"'],
            }
            text = ""
            for name, cs in caps.items():
                text += f"[{name}]\n\tkey = {cephx_key()}\n" + "".join(f"\tcaps {c}\n" for c in cs)
            self.keyring.write_text(text)
            self.keyring.chmod(0o600)

    def _run(self, *argv: str) -> None:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stdout}{r.stderr}\n{self.logs()}")

    def _spawn(self, name: str, *argv: str) -> None:
        self.argv[name] = argv
        out = open(self.base / "log" / f"{name}.out", "ab")
        try:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_daemon_preexec
            )
        finally:
            out.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} during start-up\n{self.logs()}")

    def rados(self, timeout: int = 30) -> Any:
        """A connected ``rados.Rados`` handle as client.admin (the caller shuts it down). Its
        operations give up after ``timeout`` s (ETIMEDOUT), so a broken cluster fails a test
        rather than hanging it (librados waits for a PG to go active forever by default)."""
        import rados

        cluster = rados.Rados(conffile=str(self.conf), rados_id=self.client_id)
        for option in ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout"):
            cluster.conf_set(option, str(timeout))
        cluster.conf_set("log_file", str(self.base / "log" / f"client.{os.getpid()}.log"))
        cluster.connect(timeout=timeout)
        return cluster

    def mon_command(self, cluster: Any, prefix: str, **args: Any) -> Any:
        ret, out, err = cluster.mon_command(json.dumps({"prefix": prefix, "format": "json", **args}), b"", timeout=30)
        if ret != 0:
            raise RuntimeError(f"mon command {prefix} {args}: {ret} {err}")
        return json.loads(out) if out else None

    def start(self) -> "CephCluster":
        """Bring the cluster up to a pool and an image; on any failure, tear down and raise."""
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        import rbd

        t0 = time.monotonic()
        mark = t0

        def lap(step: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.timings[step] = now - mark
            mark = now

        self.write_conf()
        osd_uuid = str(uuid.uuid4())
        mkfs_keyring = ["--keyring", str(self.keyring)] if self.auth == "cephx" else []
        monmap = str(self.base / "monmap")
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", f"[v2:127.0.0.1:{self.port}]", monmap)
        self._run("ceph-mon", "-c", str(self.conf), "-i", "a", "--mkfs", "--monmap", monmap, *mkfs_keyring)
        self._spawn("mon", "ceph-mon", "-c", str(self.conf), "-i", "a", "-f")
        lap("mon_mkfs")
        cluster = self.rados()
        try:
            lap("mon_up")
            created = self.mon_command(cluster, "osd new", uuid=osd_uuid)
            assert created == {"osdid": 0} or created is None or "osdid" in created, created
            self._run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
            self._spawn("osd", "ceph-osd", "-c", str(self.conf), "-i", "0", "-f")
            lap("osd_mkfs")
            deadline = t0 + START_DEADLINE
            while True:
                self._check_alive()
                dump = self.mon_command(cluster, "osd dump")
                if any(o["osd"] == 0 and o["up"] for o in dump["osds"]):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"osd.0 not up after {START_DEADLINE} s\n{self.logs()}")
                time.sleep(0.05)
            lap("osd_up")
            cluster.create_pool(self.pool)
            with cluster.open_ioctx(self.pool) as ioctx:
                self.mon_command(cluster, "osd pool application enable", pool=self.pool, app="rbd")
                lap("pool")
                rbd.RBD().create(ioctx, self.image, self.image_size)
                lap("image")
        finally:
            cluster.shutdown()
        self.timings["total"] = time.monotonic() - t0

    def create_image(self, name: str, size: int) -> None:
        """One more RBD image in the pool, beside :attr:`image` (a second client whose data
        must not mix with the first's, as a peer's in tests/e2e/test_netstore_guest.py)."""
        import rbd

        cluster = self.rados()
        try:
            with cluster.open_ioctx(self.pool) as ioctx:
                rbd.RBD().create(ioctx, name, size)
        finally:
            cluster.shutdown()

    # -- failures: a daemon paused, or killed and started again -----------------------------

    def pause(self, name: str = "osd") -> None:
        """SIGSTOP the daemon's group: it holds its connections and answers nothing (a hung or
        partitioned OSD); its data stays (memstore too: the process keeps its RAM)."""
        os.killpg(self.procs[name].pid, signal.SIGSTOP)

    def resume(self, name: str = "osd") -> None:
        os.killpg(self.procs[name].pid, signal.SIGCONT)

    def kill(self, name: str = "osd") -> None:
        """SIGKILL the daemon's group (if it still runs) and reap it."""
        p = self.procs[name]
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

    def restart(self, name: str = "osd") -> float:
        """SIGKILL the daemon's group (unless it is dead already) and start it again on the same data; for the OSD, wait
        until the monitor has it up again. Seconds until then. Only a ``bluestore`` OSD keeps
        its objects: memstore's are in the killed process's RAM (and a clean stop keeps only
        its superblock: measured, the restarted OSD loaded 0 PGs), so the pool is gone."""
        cluster = self.rados() if name == "osd" else None

        def up_from() -> int | None:  # the epoch osd.0 came up in, None while it is down
            assert cluster is not None
            osd = next(o for o in self.mon_command(cluster, "osd dump")["osds"] if o["osd"] == 0)
            return int(osd["up_from"]) if osd["up"] else None

        # the monitor may never mark the killed OSD down (no peer reports it): its restart
        # shows as a new up_from
        before = up_from() if cluster is not None else None
        self.kill(name)
        t0 = time.monotonic()
        self._spawn(name, *self.argv[name])
        if cluster is not None:
            try:
                while (now := up_from()) is None or now == before:
                    self._check_alive()
                    if time.monotonic() - t0 > START_DEADLINE:
                        raise RuntimeError(f"osd.0 not up again after {START_DEADLINE} s\n{self.logs()}")
                    time.sleep(0.05)
            finally:
                cluster.shutdown()
        return time.monotonic() - t0

    # -- state and stop ----------------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def cpu_seconds(self) -> dict[str, float]:
        return {name: process_cpu_seconds(pid) for name, pid in self.pids().items()}

    def rss_bytes(self) -> dict[str, int]:
        return {name: _rss_bytes(pid) for name, pid in self.pids().items()}

    def logs(self, tail: int = 30) -> str:
        out = []
        logdir = self.base / "log"
        if logdir.is_dir():
            for f in sorted(logdir.iterdir()):
                try:
                    lines = f.read_text(errors="replace").splitlines()[-tail:]
                except OSError:
                    continue
                out.append(f"--- {f.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Kill both daemons' process groups (SIGKILL: the data is thrown away), reap, remove the dir."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        shutil.rmtree(self.base, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> "CephCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """The session's cluster (cephx, memstore, pool ``rbd``, a 256 MiB image ``img``), stopped at
    the end of the session whatever happens; a suite's conftest imports it to use it. Skips,
    saying why, where the machine lacks the daemons or the bindings."""
    why = missing()
    if why:
        pytest.skip(f"no Ceph cluster: {why}")
    cluster = CephCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def measure(runs: int, idle: float, **kwargs: Any) -> dict[str, Any]:
    """Start and stop ``runs`` clusters: start times, idle CPU and RSS of the last, stop times."""
    import statistics

    totals, stops, steps = [], [], []
    idle_cpu: dict[str, float] = {}
    rss: dict[str, int] = {}
    for i in range(runs):
        c = CephCluster(**kwargs).start()
        try:
            totals.append(c.timings["total"])
            steps.append({k: round(v, 2) for k, v in c.timings.items()})
            if i == runs - 1 and idle > 0:
                before = c.cpu_seconds()
                time.sleep(idle)
                after = c.cpu_seconds()
                idle_cpu = {k: round(100 * (after[k] - before[k]) / idle, 2) for k in after}
                rss = c.rss_bytes()
        finally:
            t = time.monotonic()
            c.stop()
            stops.append(time.monotonic() - t)
    return {
        "start_s": [round(t, 2) for t in totals],
        "start_median_s": round(statistics.median(totals), 2),
        "start_spread_s": round(max(totals) - min(totals), 2),
        "steps": steps,
        "idle_cpu_percent": idle_cpu,
        "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
        "stop_s": [round(t, 3) for t in stops],
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Start and stop the test Ceph cluster, measuring it.")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds to sample idle CPU on the last run")
    ap.add_argument("--auth", choices=("cephx", "none"), default="cephx")
    ap.add_argument("--pg-num", type=int, default=CephCluster.pg_num)
    ap.add_argument("--objectstore", choices=("memstore", "bluestore"), default=CephCluster.objectstore)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="another [global] option")
    a = ap.parse_args()
    why = missing()
    if why:
        raise SystemExit(why)
    extra = dict(kv.split("=", 1) for kv in a.set)
    print(json.dumps(measure(a.runs, a.idle, auth=a.auth, pg_num=a.pg_num, objectstore=a.objectstore, extra_conf=extra), indent=1))


if __name__ == "__main__":
    main()
