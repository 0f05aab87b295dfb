"""fio in a QEMU guest on network storage (issue 27): nvme-emu's ``nbd:`` and ``rbd:`` namespaces
against QEMU's own ``-device nvme`` on the SAME NBD export and the SAME RBD image, with nvme-emu's
``ram`` and ``file`` namespaces beside them as the local yardsticks.

One guest (nvme_emu.guest: QEMU 11.1, q35, 2 vCPUs, TCG here) has every device attached at once:

- one nvme-emu controller (vfio-user-pci, ``--doorbell auto``) with a namespace per kind:
  ``ram``, ``file`` (a file filled with data first), ``nbd:`` on nbdkit's memory plugin (started
  here, on a Unix socket; the memory plugin offers multi-conn, so the backend opens one connection
  per I/O worker and QEMU's client one more, all on the same RAM disk), and ``rbd:`` on the image
  of a real 1-mon 1-OSD memstore cluster (tests/support/ceph.py) when nvme_emu has that backend;
- QEMU's hw/nvme (``-device nvme``) on a ``-blockdev driver=nbd`` node on the same nbdkit socket
  (QEMU's NBD client), and one on ``-blockdev driver=rbd`` on the same image (QEMU's rbd driver,
  Debian's qemu-block-extra: qemu-configs/provide-qemu.sh installs it into the chroot).

Both peers of a pair are in the same TCG guest, one after the other: what the machine's load at
that moment does to one it does to the other. librbd's cache is off for both (``rbd_cache =
false`` in the cluster's conf, and ``cache.direct=on`` on QEMU's node, which is how QEMU's rbd
driver sets it): with fio's direct=1 the guest asks for uncached I/O, and librbd's writeback
cache would otherwise acknowledge writes from the client's RAM on one side only. The image keeps
Ceph's default features (exclusive-lock among them): when both peers have it open, the lock moves
once per switch from one writer to the other (one round trip to the OSD per job, not per I/O).

Jobs (fio, io_uring, direct=1, time_based): 4k randread and randwrite at QD1 and QD32 over the
first ``--region`` bytes of each device (filled with 1 MiB writes at the start, so no one reads
holes: nbdkit's sparse array and RBD's absent objects answer those without any I/O). The rounds
are interleaved inside the one fio run: round r runs each job on every device in turn, the
devices' order rotating from round to round, so no device always goes first.

The table gives per job and device the median IOPS over the rounds, their spread (min..max) and
the median mean latency; the ratios nvme-emu / QEMU are taken within each round (the same job,
back to back) and reported as their median and spread. The headline: nvme-emu / QEMU IOPS at
QD32 on the same export and the same image (issue 27's target: at least 0.8x). Beside them, the
share of one CPU that nvme-emu's server and the storage servers (nbdkit; Ceph's mon + OSD) used
during each job (from fio's START/END console markers, ramp included): a side near 1.0 is bound
by its CPU, a device far below 1.0 everywhere waits on something else (its queue depth towards
the storage, the guest).

    ./dev bench netstore_fio                       # 3 rounds of 10 s jobs (~25 min under TCG)
    ./dev bench netstore_fio --rounds 1 --runtime 3 --ramp 1      # a quick check that it runs
    ./dev bench netstore_fio --emu-tree ../wt-rbd                  # nvme-emu from another checkout
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import fio_vs_qemu

from nvme_emu import guest
from nvme_emu.rpc_socket import RpcClient
from tests.nbd.nbd_servers import NbdServer
from tests.rbd import qemu_rbd
from tests.rbd.qemu_rbd import driver_problem
from tests.support import ceph
from tests.support.server import child_env

#: The four jobs the issue asks for: name, fio options.
JOBS = [
    ("randread-4k-qd1", "rw=randread\nbs=4k\niodepth=1"),
    ("randread-4k-qd32", "rw=randread\nbs=4k\niodepth=32"),
    ("randwrite-4k-qd1", "rw=randwrite\nbs=4k\niodepth=1"),
    ("randwrite-4k-qd32", "rw=randwrite\nbs=4k\niodepth=32"),
]
HEADLINE_JOBS = ("randread-4k-qd32", "randwrite-4k-qd32")
#: Issue 27's target for nvme-emu / QEMU at QD32 on the same export or image.
TARGET = 0.8
#: Every namespace's and image's size; the jobs run on the first --region bytes of it.
DEVICE_SIZE = 512 << 20
DEFAULT_REGION = 256 << 20
#: QEMU's hw/nvme serial numbers: how the guest tells its controllers from nvme-emu's.
QEMU_SERIAL = {"qemu-nbd": "QEMUNBD", "qemu-rbd": "QEMURBD"}


@dataclass
class Device:
    """One device of the guest: nvme-emu's namespace ``nsid``, or a QEMU hw/nvme controller."""

    name: str
    label: str
    #: the guest's link to its block device, made by LINK_SCRIPT
    link: str
    #: nvme-emu: its ``--namespace`` spec; QEMU: None
    spec: str | None = None
    #: QEMU: its -blockdev (JSON)
    blockdev: dict[str, Any] | None = None
    #: the device's peer in the other emulator (the same storage), for the ratios
    peer: str | None = None


#: The guest links each NVMe block device to /dev/bench-<name>: nvme-emu's by NSID (its model is
#: "nvme-emu"), QEMU's by serial. sysfs, not device order: the PCI probe order decides the latter.
LINK_SCRIPT = r"""
for d in /sys/block/nvme*n*; do
    [ -e "$d/nsid" ] || continue
    b=${d##*/}
    model=$(cat "$d/device/model" 2>/dev/null | tr -d ' ')
    serial=$(cat "$d/device/serial" 2>/dev/null | tr -d ' ')
    nsid=$(cat "$d/nsid")
    case "$model" in
        nvme-emu*) ln -sf "/dev/$b" "/dev/bench-emu-$nsid" ;;
        *) ln -sf "/dev/$b" "/dev/bench-$serial" ;;
    esac
    echo "bench: /dev/$b model=$model serial=$serial nsid=$nsid"
done
"""


def fio_job(devices: list[Device], rounds: int, runtime: float, ramp: float, region: int) -> str:
    """Fill every device's region, then ``rounds`` rounds of each job on each device in turn."""
    out = ["[global]", "ioengine=io_uring", "direct=1", "randrepeat=0", "norandommap=1", f"size={region}",
           "percentile_list=50:99", "stonewall"]
    for d in devices:
        out += [f"[fill-{d.name}]", f"filename={d.link}", "rw=write", "bs=1m", "iodepth=8", "time_based=0"]
    for rnd in range(rounds):
        order = devices[rnd % len(devices):] + devices[: rnd % len(devices)]
        for job, opts in JOBS:
            for d in order:
                name = f"r{rnd}.{job}.{d.name}"
                out += [f"[{name}]", f"filename={d.link}", opts, "time_based=1",
                        f"runtime={runtime:g}", f"ramp_time={ramp:g}", *fio_vs_qemu._marked(name)]
    return "\n".join(out) + "\n"


class CpuPerJob:
    """CPU seconds of nvme-emu's server and of the storage servers (nbdkit; Ceph's mon and OSD)
    during each measured job, from fio's START/END console markers (on the console thread): how
    busy each side was, i.e. whether a device was bound by a CPU or by something else."""

    def __init__(self, server_pid: int, nbdkit_pid: int, ceph_pids: list[int]) -> None:
        self.pids = {"server": [server_pid], "nbdkit": [nbdkit_pid], "ceph": ceph_pids}
        self.jobs: dict[str, dict[str, float]] = {}
        self._start: dict[str, tuple[float, dict[str, float]]] = {}

    def _sample(self) -> dict[str, float]:
        return {k: sum(ceph.process_cpu_seconds(p) for p in pids) for k, pids in self.pids.items()}

    def on_line(self, line: str) -> None:
        m = fio_vs_qemu.MARK_RE.search(line)
        if m is None:
            return
        now, cpu = time.monotonic(), self._sample()
        if m.group(1) == "START":
            self._start[m.group(2)] = (now, cpu)
        elif m.group(2) in self._start:
            t0, cpu0 = self._start.pop(m.group(2))
            self.jobs[m.group(2)] = {"wall_s": now - t0, **{f"{k}_cpu_s": cpu[k] - cpu0[k] for k in cpu}}


def namespaces_now(ctl_socket: str) -> list[dict] | str:
    """Each namespace as the control plane describes it, with its backend's counters (an nbd:
    namespace's connections, reconnects, timeouts, errors): what the JSON keeps beside fio's figures."""
    try:
        client = RpcClient(ctl_socket)
        try:
            return list(client.call("namespaces"))
        finally:
            client.close()
    except Exception as e:  # recorded with the results; the fio figures still count
        return f"ctl namespaces failed: {e!r}"


def backend_kinds(tree: Path) -> set[str]:
    """The backend kinds the nvme_emu of checkout ``tree`` serves (its BackendKind), asked of
    that tree in a child interpreter: --emu-tree may be a branch with a backend this one lacks."""
    r = subprocess.run([sys.executable, "-c", "from nvme_emu.backends.base import BackendKind; print(*(k.value for k in BackendKind))"],
                       cwd=tree, env=child_env(tree), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"cannot import nvme_emu from {tree}: {r.stderr[-1000:]}")
    return set(r.stdout.split())


def plan_devices(workdir: str, nbd: NbdServer, cluster: ceph.CephCluster | None, qemu: str,
                 tree: Path) -> tuple[list[Device], list[str]]:
    """The devices this machine can run, and a line for each one left out, saying why."""
    notes: list[str] = []
    nsid = iter(range(1, 10))
    image = os.path.join(workdir, "disk.raw")
    devices = [
        Device("emu-ram", "nvme-emu ram", f"/dev/bench-emu-{next(nsid)}", spec=f"ram:size={DEVICE_SIZE}"),
        Device("emu-file", "nvme-emu file", f"/dev/bench-emu-{next(nsid)}", spec=f"file:{image}"),
        Device("emu-nbd", "nvme-emu nbd: (nbdkit memory)", f"/dev/bench-emu-{next(nsid)}", spec=f"nbd:{nbd.uri}", peer="qemu-nbd"),
    ]
    nbd_node = {"driver": "nbd", "node-name": "qnbd", "server": {"type": "unix", "path": str(nbd.socket)}}
    why = driver_problem(qemu, nbd_node)
    if why is None:
        devices.append(Device("qemu-nbd", "QEMU hw/nvme, QEMU's NBD client", f"/dev/bench-{QEMU_SERIAL['qemu-nbd']}",
                              blockdev=nbd_node, peer="emu-nbd"))
    else:
        notes.append(f"left out qemu-nbd: QEMU cannot open the nbdkit export: {why}")
    if cluster is None:
        return devices, notes
    if "rbd" in backend_kinds(tree):
        devices.append(Device("emu-rbd", "nvme-emu rbd: (Ceph memstore)", f"/dev/bench-emu-{next(nsid)}", spec=cluster.spec,
                              peer="qemu-rbd"))
    else:
        notes.append(f"left out emu-rbd: the nvme_emu of {tree} has no rbd: backend yet (BackendKind has no RBD member)")
    rbd_node = qemu_rbd.rbd_node(cluster, "qrbd")
    why = driver_problem(qemu, rbd_node)
    if why is None:
        devices.append(Device("qemu-rbd", "QEMU hw/nvme, QEMU's rbd driver", f"/dev/bench-{QEMU_SERIAL['qemu-rbd']}",
                              blockdev=rbd_node, peer="emu-rbd"))
    else:
        notes.append(f"left out qemu-rbd: QEMU's rbd driver cannot open the image (qemu-block-extra missing?): {why}")
    present = {d.name for d in devices}
    for d in devices:
        if d.peer not in present:
            d.peer = None
    return devices, notes


def qemu_args(devices: list[Device]) -> list[str]:
    args: list[str] = []
    for d in devices:
        if d.blockdev is None:
            continue
        args += ["-blockdev", json.dumps(d.blockdev, separators=(",", ":")),
                 "-device", f"nvme,serial={QEMU_SERIAL[d.name]},drive={d.blockdev['node-name']}"]
    return args


def parse_rounds(fio: dict, cpu: dict[str, dict[str, float]], anatomy: dict[str, dict], rounds: int) -> list[dict[str, dict[str, dict]]]:
    """fio's JSON, the CPU and the server's latency anatomy per job -> per round, per job, per
    device: IOPS, mean/p50/p99 latency, errors, CPU seconds of each process during the job, and
    for nvme-emu's namespaces the server's time per I/O by stage."""
    got = fio_vs_qemu.summarise(fio)
    out: list[dict[str, dict[str, dict]]] = [{job: {} for job, _ in JOBS} for _ in range(rounds)]
    for name, fig in got.items():
        if name.startswith("fill-"):
            continue
        rnd, job, dev = name.split(".")
        snap = anatomy.get(name) if dev.startswith("emu-") else None
        out[int(rnd[1:])][job][dev] = {**fig, "cpu": cpu.get(name),
                                       "server_split": fio_vs_qemu.server_split(snap, fig["ios"]) if snap else None}
    return out


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(per_round: list[dict[str, dict[str, dict]]], devices: list[Device]) -> list[dict]:
    rows = []
    for job, _ in JOBS:
        for d in devices:
            figs = [r[job][d.name] for r in per_round if d.name in r[job]]
            if not figs:
                continue
            row: dict[str, Any] = {"job": job, "device": d.name, "label": d.label, "rounds": len(figs),
                                   "iops": _spread([f["iops"] for f in figs]),
                                   "mean_us": _spread([f["clat_mean_us"] for f in figs]),
                                   "p99_us": _spread([f["clat_p99_us"] for f in figs if f["clat_p99_us"] is not None]),
                                   "errors": sum(f["errors"] for f in figs),
                                   "iops_all_rounds": [f["iops"] for f in figs]}
            # share of one CPU each side used during the job (ramp included)
            for who in ("server", "nbdkit", "ceph"):
                utils = [f["cpu"][f"{who}_cpu_s"] / f["cpu"]["wall_s"] for f in figs if f.get("cpu") and f["cpu"]["wall_s"] > 0]
                row[f"{who}_util"] = statistics.median(utils) if utils else None
            splits = [f["server_split"] for f in figs if f.get("server_split")]
            if splits:
                row["server_us"] = statistics.median(x["server_us"] for x in splits)
                row["deferred_share"] = statistics.median(x["deferred_share"] for x in splits)
                row["deferred_us"] = {st: statistics.median(x["deferred_us"][st] for x in splits) for st in splits[0]["deferred_us"]}
            if d.peer is not None and d.name.startswith("emu-"):
                ratios = [r[job][d.name]["iops"] / r[job][d.peer]["iops"] for r in per_round
                          if d.name in r[job] and d.peer in r[job] and r[job][d.peer]["iops"]]
                row["iops_vs_qemu"] = {**_spread(ratios), "all_rounds": ratios}
            rows.append(row)
    return rows


def _cell(s: dict[str, float | None], fmt: str) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}..{s['max']:{fmt}})"


def format_table(rows: list[dict]) -> str:
    return common.format_table(
        [{"job": r["job"], "device": r["label"], "iops": _cell(r["iops"], ",.0f"), "mean": r["mean_us"]["median"],
          "p99": r["p99_us"]["median"], "err": r["errors"],
          "srv": r["server_util"] if r["device"].startswith("emu-") else None,
          "store": r["nbdkit_util"] if r["device"].endswith("-nbd") else r["ceph_util"] if r["device"].endswith("-rbd") else None,
          "ratio": _cell(r["iops_vs_qemu"], ".2f") if "iops_vs_qemu" in r else ""} for r in rows],
        [("job", "job", ""), ("device", "device", ""), ("iops", "IOPS median (min..max)", ""), ("mean", "mean us", ",.0f"),
         ("p99", "p99 us", ",.0f"), ("err", "err", ""), ("srv", "nvme-emu CPU", ".2f"), ("store", "nbdkit/ceph CPU", ".2f"),
         ("ratio", "IOPS / QEMU same storage", "")])


def format_anatomy(rows: list[dict]) -> str:
    """nvme-emu's side per job: the server's time per I/O and, for the commands handed to the I/O
    workers (every nbd: command), the p50 of each hand-off stage and of the backend call itself."""
    st = fio_vs_qemu.DEFERRED_STAGES
    return common.format_table(
        [{"job": r["job"], "device": r["label"], "server": r["server_us"], "share": r["deferred_share"],
          **{s: r["deferred_us"][s] for s in st}} for r in rows if "server_us" in r],
        [("job", "job", ""), ("device", "device", ""), ("server", "server us/IO", ".1f"), ("share", "to workers", ".0%"),
         *((s, f"{s} p50 us", ".1f") for s in st)])


def headline(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for r in rows:
        if r["job"] in HEADLINE_JOBS and "iops_vs_qemu" in r:
            m = r["iops_vs_qemu"]["median"]
            out[f"{r['device']}/{r['job']}"] = {**r["iops_vs_qemu"], "target": TARGET, "met": m is not None and m >= TARGET}
    return out


def plot(rows: list[dict], devices: list[Device], path: Path, title: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(13, 5))
    jobs = [j for j, _ in JOBS]
    w = 0.8 / len(devices)
    by = {(r["job"], r["device"]): r for r in rows}
    for i, d in enumerate(devices):
        xs, ys, lo, hi = [], [], [], []
        for j, job in enumerate(jobs):
            r = by.get((job, d.name))
            if r is None or r["iops"]["median"] is None:
                continue
            xs.append(j - 0.4 + w * (i + 0.5))
            ys.append(r["iops"]["median"])
            lo.append(r["iops"]["median"] - r["iops"]["min"])
            hi.append(r["iops"]["max"] - r["iops"]["median"])
        ax.bar(xs, ys, w, yerr=[lo, hi], capsize=2, label=d.label, hatch="" if d.name.startswith("emu-") else "//")
    ax.set_xticks(range(len(jobs)), jobs)
    ax.set_ylabel("fio IOPS (median of rounds, bars: min..max)")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def start_cluster() -> tuple[ceph.CephCluster | None, str | None]:
    why = ceph.missing()
    if why:
        return None, why
    # librbd's cache off for every client of this cluster (the module docstring)
    return ceph.CephCluster(image_size=DEVICE_SIZE, osd_bytes=4 * DEVICE_SIZE, extra_conf={"rbd_cache": "false"}).start(), None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=10, help="seconds per job and device")
    ap.add_argument("--ramp", type=float, default=1)
    ap.add_argument("--region", type=lambda s: int(float(s) * (1 << 20)), default=DEFAULT_REGION, metavar="MIB",
                    help="MiB of each device the jobs run on (filled first)")
    ap.add_argument("--doorbell", default="auto")
    ap.add_argument("--emu-tree", type=lambda p: Path(p).resolve(), default=common.REPO, metavar="CHECKOUT",
                    help="serve nvme-emu from another checkout (e.g. a branch with the rbd: backend before it is merged)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    if args.region > DEVICE_SIZE:
        ap.error(f"--region is at most {DEVICE_SIZE >> 20} MiB")
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        print("nbdkit is not installed (Debian: nbdkit; ./dev test installs it): cannot run", file=sys.stderr)
        return 2

    mach = common.machine()
    if args.emu_tree != common.REPO:
        mach["emu_tree_commit"] = subprocess.run(["git", "-C", str(args.emu_tree), "rev-parse", "--short", "HEAD"],
                                                 capture_output=True, text=True).stdout.strip()
        print(f"nvme-emu from {args.emu_tree} (git {mach['emu_tree_commit']})", flush=True)
    mach["busy_before"] = common.wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else common.machine_busy()
    print("machine:", common.describe_machine(mach), f"busy before: {mach['busy_before']:.0%}", flush=True)
    t_start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="nvme-bench-netstore-", dir="/tmp")  # /tmp: the chroot's QEMU sees it
    nbd = NbdServer([nbdkit, "--foreground", "--exit-with-parent", "-U", os.path.join(workdir, "nbdkit.sock"), "memory", str(DEVICE_SIZE)],
                    Path(workdir) / "nbdkit.sock")
    cluster: ceph.CephCluster | None = None
    srv = None
    try:
        fio_vs_qemu.fill(os.path.join(workdir, "disk.raw"), DEVICE_SIZE)
        nbd.start()
        cluster, why = start_cluster()
        notes = [] if why is None else [f"left out emu-rbd and qemu-rbd: no Ceph cluster ({why})"]
        if cluster is not None:
            print(f"Ceph cluster up in {cluster.timings['total']:.2f} s: {cluster.spec}", flush=True)
        qemu = guest.ensure_qemu()
        devices, more = plan_devices(workdir, nbd, cluster, qemu, args.emu_tree)
        notes += more
        for n in notes:
            print(n, flush=True)
        print("devices:", ", ".join(d.name for d in devices), flush=True)
        job = fio_job(devices, args.rounds, args.runtime, args.ramp, args.region)
        sock = os.path.join(workdir, "emu.sock")
        serve_args = ["--doorbell", args.doorbell]
        for d in devices:
            if d.spec is not None:
                serve_args += ["--namespace", d.spec]
        srv = common.serve(sock, serve_args, Path(workdir) / "emu.log", tree=args.emu_tree)
        per_job = args.runtime + args.ramp + 2
        timeout = 300 + len(devices) * (60 + args.rounds * len(JOBS) * per_job * 2)
        cpu0 = srv.cpu_seconds()
        ceph_cpu0 = cluster.cpu_seconds() if cluster else {}
        assert nbd.proc is not None
        cpu_per_job = CpuPerJob(srv.pid, nbd.proc.pid, list(cluster.pids().values()) if cluster else [])
        anatomy = fio_vs_qemu.AnatomyPerJob(sock + ".ctl")

        def on_line(line: str) -> None:
            cpu_per_job.on_line(line)
            anatomy.on_line(line)

        try:
            r = guest.run_guest(socket_path=sock, command=LINK_SCRIPT + fio_vs_qemu.MARK_SCRIPT + "\n", fio_job=job, timeout=timeout,
                                extra_qemu_args=qemu_args(devices), on_console_line=on_line)
        finally:
            anatomy.close()
        server_cpu = srv.cpu_seconds() - cpu0
        ceph_cpu = {k: v - ceph_cpu0.get(k, 0.0) for k, v in (cluster.cpu_seconds() if cluster else {}).items()}
        stats = srv.stats()
        namespaces = namespaces_now(sock + ".ctl")
        if not r.ok or r.fio is None:
            raise RuntimeError(f"guest run failed:\n{r.describe_failure()}\n--- server log ---\n{srv.log()[-4000:]}")
    finally:
        if srv is not None:
            srv.stop()
        nbd.kill()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    per_round = parse_rounds(r.fio, cpu_per_job.jobs, anatomy.jobs, args.rounds)
    rows = summarise(per_round, devices)
    table = format_table(rows)
    head = headline(rows)
    print()
    print("\n".join(line for line in r.output.splitlines() if line.startswith("bench: ")))
    print()
    print(table)
    anatomy_table = format_anatomy(rows)
    print(f"\nWhere nvme-emu's server time goes (the server's latency anatomy per job; p50, median of rounds):\n\n{anatomy_table}")
    print(f"\nheadline: nvme-emu / QEMU IOPS on the same storage at QD32 (target >= {TARGET}):")
    for k, h in head.items():
        print(f"  {k:32} {h['median']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in h['all_rounds'])}) "
              f"{'met' if h['met'] else 'MISSED'}")
    for n in notes:
        print(f"  ({n})")
    mach["loadavg_at_end"] = common.read_file("/proc/loadavg").split()[:3]
    name = "netstore_fio" + (f"-{args.label}" if args.label else "")
    out = Path(args.out)
    common.write_json(out / f"{name}.json", {
        "benchmark": "netstore_fio", "machine": mach, "method": __doc__, "fio_job": job,
        "config": {"rounds": args.rounds, "runtime": args.runtime, "ramp": args.ramp, "region": args.region,
                   "device_size": DEVICE_SIZE, "doorbell": args.doorbell, "accel": r.accel, "emu_tree": str(args.emu_tree),
                   "devices": [d.__dict__ for d in devices], "left_out": notes},
        "headline": head, "results": rows, "rounds": per_round, "table": table, "anatomy_table": anatomy_table,
        "anatomy": anatomy.jobs, "anatomy_errors": anatomy.errors,
        "server_cpu_s": server_cpu, "ceph_cpu_s": ceph_cpu, "server_stats": stats, "namespaces": namespaces,
        "guest_elapsed_s": r.elapsed, "elapsed_s": time.monotonic() - t_start,
    })
    plot(rows, devices, out / f"{name}.png",
         f"fio 4k in one QEMU guest ({r.accel}): nvme-emu namespaces vs QEMU hw/nvme on the same NBD export / RBD image, "
         f"{args.rounds} interleaved round(s) of {args.runtime:g} s\n{common.describe_machine(mach)}")
    print(f"wrote {out / (name + '.json')} and .png in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
