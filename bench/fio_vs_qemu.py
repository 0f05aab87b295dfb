"""fio in a QEMU guest: nvme-emu against QEMU's own ``-device nvme``, same guest, same file,
and against the floor: QEMU's ``-device nvme`` on a ``null-co`` block node (no host I/O).

Each round boots the same test guest (nvme_emu.guest: QEMU 11.1, q35, 2 vCPUs, TCG here)
once per device: QEMU's built-in NVMe controller (hw/nvme) on a raw file; hw/nvme on
``null-co`` (reads return zeroes, writes go nowhere: what the guest, TCG and hw/nvme cost
with nothing behind them); nvme-emu (vfio-user-pci -> ``nvme-emu serve --namespace
file:<the same file>``, default doorbell mode ``auto``: upstream QEMU takes no io fds, so
trapped writes + shadow doorbells with EventIdx); and one more nvme-emu per
``--emu-variant NAME=SERVE-ARGS`` (the same server with extra ``serve`` arguments). The file
is filled with data first, so no device reads holes.

Jobs (fio, io_uring, direct=1, time_based, 10 s + 1 s ramp each, one after the other):
4k randread QD1, 4k randread QD32, 4k randwrite QD1, 128k sequential read QD8, and a short
stall check (the end-to-end suite's verify job: 4k randwrite QD16 + crc32c verify read-back)
whose clat max would show multi-100-ms stalls. The floor cannot verify (zeroes come back):
it runs the same writes and a read-back of the same blocks without the check.

The order of the devices rotates from round to round, so none always goes first. Per job the
table gives each device's figures as the median over the rounds, and each nvme-emu's ratios
to hw/nvme, to the floor and to the default nvme-emu as the median of the per-round ratios
with their spread (min..max).

    ./dev bench fio_vs_qemu                 # 3 rounds, ~15 minutes under TCG
    ./dev bench fio_vs_qemu --rounds 1 --runtime 5
    ./dev bench fio_vs_qemu --emu-variant si100='--switch-interval-us 100'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

from nvme_emu import guest
from nvme_emu.rpc_socket import RpcClient

FILE_SIZE = 1 << 30

JOBS = [
    # name, fio options
    ("randread-4k-qd1", "rw=randread\nbs=4k\niodepth=1"),
    ("randread-4k-qd32", "rw=randread\nbs=4k\niodepth=32"),
    ("randwrite-4k-qd1", "rw=randwrite\nbs=4k\niodepth=1"),
    ("seqread-128k-qd8", "rw=read\nbs=128k\niodepth=8"),
]

#: Each fio job prints ``@@ANATOMY START|END <job>`` on the guest console just before it starts
#: and after it ends (fio's exec_prerun/exec_postrun; fio sends their own output to a file, so
#: a tiny script writes to /dev/console). The nvme-emu runs reset the server's latency
#: anatomy at START and read it at END, so each job gets its own (ramp included).
MARK_SCRIPT = "printf '#!/bin/sh\\necho \"@@ANATOMY $1 $2\" > /dev/console\\n' > /tmp/mark && chmod +x /tmp/mark"
MARK_RE = re.compile(r"@@ANATOMY (START|END) (\S+)")


def _marked(name: str) -> list[str]:
    return [f"exec_prerun=/tmp/mark START {name}", f"exec_postrun=/tmp/mark END {name}"]


def _stall_section(rw: str, *extra: str) -> str:
    """One section of the stall check: 32 MiB of 4k at QD16 from 512 MiB on, run to the end."""
    lines = ["[stallcheck-verify-4k-qd16]", "stonewall", "time_based=0", "runtime=0", "ramp_time=0",
             f"rw={rw}", "bs=4k", "iodepth=16", "size=32m", "offset=512m", *extra, *_marked("stallcheck-verify-4k-qd16")]
    return "\n".join(lines) + "\n"


STALL_JOB = "\n" + _stall_section("randwrite", "verify=crc32c", "do_verify=1", "verify_fatal=1", "randrepeat=0")

#: The floor (null-co) cannot verify: reads return zeroes. The same I/O without the check: the
#: 32 MiB of 4k random writes at QD16, then a read-back of those 32 MiB at QD16 in offset order
#: (what fio's verify phase reads for a random-write job: the written blocks sorted by offset).
STALL_JOB_NO_VERIFY = "\n" + _stall_section("randwrite", "randrepeat=0") + _stall_section("read")


def fio_job(runtime: float, ramp: float, stall_check: bool, verify: bool = True) -> str:
    out = [
        "[global]",
        "filename=/dev/nvme0n1",
        "ioengine=io_uring",
        "direct=1",
        "time_based=1",
        f"runtime={runtime:g}",
        f"ramp_time={ramp:g}",
        "size=1g",
        "randrepeat=0",
        "percentile_list=50:90:99:99.9:99.99",
    ]
    for i, (name, opts) in enumerate(JOBS):
        out.append(f"[{name}]")
        if i:
            out.append("stonewall")
        out.append(opts)
        out += _marked(name)
    text = "\n".join(out) + "\n"
    return text + ((STALL_JOB if verify else STALL_JOB_NO_VERIFY) if stall_check else "")


def fill(path: str, size: int) -> None:
    """A file of ``size`` bytes of non-zero data (every 4 KiB block different)."""
    chunk = bytearray(os.urandom(1 << 20))
    with open(path, "wb") as f:
        for i in range(size >> 20):
            chunk[:8] = i.to_bytes(8, "little")
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def summarise(fio: dict) -> dict[str, dict]:
    out = {}
    for job in fio.get("jobs", []):
        for d in ("read", "write"):
            st = job.get(d) or {}
            if not st.get("total_ios"):
                continue
            clat = st.get("clat_ns") or {}
            pct = clat.get("percentile") or {}

            def p(key: str, pct: dict = pct) -> float | None:
                v = pct.get(key)
                return v / 1000 if v is not None else None

            name = job["jobname"] if d != "read" or "verify" not in job["jobname"] else job["jobname"] + "/verify-read"
            if "verify" in job["jobname"] and d == "write":
                name = job["jobname"] + "/write"
            out[name] = {
                "dir": d,
                "iops": st.get("iops", 0.0),
                "bw_mib_s": st.get("bw", 0) / 1024,
                "ios": st.get("total_ios", 0),
                "clat_mean_us": clat.get("mean", 0.0) / 1000,
                "clat_p50_us": p("50.000000"),
                "clat_p99_us": p("99.000000"),
                "clat_p99_9_us": p("99.900000"),
                "clat_p99_99_us": p("99.990000"),
                "clat_max_us": clat.get("max", 0) / 1000,
                "errors": job.get("error", 0),
            }
    return out


def run_builtin(image: str | None, job: str, timeout: float, **guest_kw) -> dict:
    t0 = time.monotonic()
    r = guest.run_guest(builtin_image=image, fio_job=job, timeout=timeout, command=MARK_SCRIPT, **guest_kw)
    if not r.ok or r.fio is None:
        raise RuntimeError("built-in nvme run failed:\n" + r.describe_failure())
    return {"jobs": summarise(r.fio), "elapsed_s": time.monotonic() - t0, "accel": r.accel}


class AnatomyPerJob:
    """The server's latency anatomy per fio job: reset at the job's START marker, read at its
    END marker (``nvme-emu ctl latency``, over the control socket), on the console thread."""

    def __init__(self, ctl_socket: str) -> None:
        self.ctl_socket = ctl_socket
        self.jobs: dict[str, dict] = {}
        self.errors: list[str] = []
        self._client: RpcClient | None = None

    def on_line(self, line: str) -> None:
        m = MARK_RE.search(line)
        if m is None:
            return
        try:
            if self._client is None:
                self._client = RpcClient(self.ctl_socket)
            if m.group(1) == "START":
                self._client.call("latency_reset")
            else:
                self.jobs[m.group(2)] = self._client.call("latency")
        except Exception as e:  # recorded with the results; the fio figures still count
            self.errors.append(f"{line.strip()}: {e!r}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def run_nvme_emu(image: str, job: str, timeout: float, workdir: str, tag: str, doorbell: str,
                 server_args: tuple[str, ...] = (), **guest_kw) -> dict:
    sock = os.path.join(workdir, f"emu-{tag}.sock")
    srv = common.serve(sock, ["--namespace", f"file:{image}", "--doorbell", doorbell, *server_args], Path(workdir) / f"emu-{tag}.log")
    t0 = time.monotonic()
    anatomy = AnatomyPerJob(sock + ".ctl")
    try:
        cpu0 = srv.cpu_seconds()
        r = guest.run_guest(socket_path=sock, fio_job=job, timeout=timeout, command=MARK_SCRIPT,
                            on_console_line=anatomy.on_line, **guest_kw)
        cpu1 = srv.cpu_seconds()
        stats = srv.stats()
    finally:
        anatomy.close()
        rc = srv.stop()
    if not r.ok or r.fio is None:
        raise RuntimeError(f"nvme-emu run failed (server exit {rc}):\n{r.describe_failure()}\n--- server log ---\n{srv.log()[-4000:]}")
    return {
        "jobs": summarise(r.fio),
        "elapsed_s": time.monotonic() - t0,
        "accel": r.accel,
        "server_cpu_s": cpu1 - cpu0,
        "server_stats": stats,
        "server_exit": rc,
        "anatomy": anatomy.jobs,
        "anatomy_errors": anatomy.errors,
    }


#: The devices every round runs, besides the nvme-emu variants: QEMU's own nvme on the backing
#: file, and on a null-co node (no host I/O at all: the floor of guest + TCG + hw/nvme).
HW_NVME, FLOOR, EMU = "hw_nvme", "floor", "emu"
LABELS = {HW_NVME: "hw/nvme (file)", FLOOR: "floor: hw/nvme on null-co"}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``--emu-variant NAME=SERVE-ARGS``: another nvme-emu column, ``nvme-emu serve`` with these
    extra arguments (shell words) on top of the namespace and ``--doorbell``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or name in (HW_NVME, FLOOR, EMU) or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=SERVE-ARGS, NAME alphanumeric and not hw_nvme/floor/emu")
    return name, shlex.split(rest)


def run_device(device: str, variants: dict[str, list[str]], image: str, jobs: dict[str, str], timeout: float, workdir: str,
               rnd: int, doorbell: str, **guest_kw: Any) -> dict:
    """One device's guest run; ``guest_kw`` goes on to ``run_guest`` (e.g. extra QEMU arguments)."""
    if device == HW_NVME:
        return run_builtin(image, jobs[HW_NVME], timeout, **guest_kw)
    if device == FLOOR:
        return run_builtin(None, jobs[FLOOR], timeout, builtin_null=FILE_SIZE, **guest_kw)
    return run_nvme_emu(image, jobs[EMU], timeout, workdir, f"{device}-r{rnd}", doorbell, tuple(variants[device]), **guest_kw)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise_rounds(rounds: list[dict], devices: list[str], variants: dict[str, list[str]]) -> list[dict]:
    """Per job: each device's figures as the median over the rounds, and per nvme-emu variant its
    ratios to hw/nvme, to the floor and (other variants) to the default nvme-emu: the ratio of
    each round (both devices of one round), their median and their spread (min, max)."""
    rows = []
    names = list(dict.fromkeys(n for r in rounds for d in devices if d in r["devices"] for n in r["devices"][d]["jobs"]))
    for name in names:
        row: dict[str, Any] = {"job": name, "devices": {}, "ratios": {}}
        for d in devices:
            got = [r["devices"][d]["jobs"][name] for r in rounds if name in r["devices"].get(d, {}).get("jobs", {})]
            if not got:
                continue
            row["devices"][d] = {
                "rounds": len(got),
                **{k: _median([g[k] for g in got if g[k] is not None]) for k in
                   ("iops", "clat_mean_us", "clat_p50_us", "clat_p99_us", "clat_max_us")},
                "iops_all_rounds": [g["iops"] for g in got],
                "clat_mean_us_all_rounds": [g["clat_mean_us"] for g in got],
                "clat_max_us_all_rounds": [g["clat_max_us"] for g in got],
            }
        for v in variants:
            for ref in (HW_NVME, FLOOR, *([EMU] if v != EMU else [])):
                per: dict[str, list[float]] = {"iops": [], "mean": [], "max": []}
                for r in rounds:
                    a = r["devices"].get(v, {}).get("jobs", {}).get(name)
                    b = r["devices"].get(ref, {}).get("jobs", {}).get(name)
                    if not a or not b:
                        continue
                    for key, field in (("iops", "iops"), ("mean", "clat_mean_us"), ("max", "clat_max_us")):
                        if b[field]:
                            per[key].append(a[field] / b[field])
                row["ratios"][f"{v}/{ref}"] = {k: {"median": _median(vals), "min": min(vals, default=None), "max": max(vals, default=None),
                                                   "all_rounds": vals} for k, vals in per.items()}
        rows.append(row)
    return rows


def _ratio_cell(r: dict | None) -> str:
    if not r or r["median"] is None:
        return "-"
    return f"{r['median']:.2f} ({r['min']:.2f}..{r['max']:.2f})"


def device_label(device: str, job: str, variants: dict[str, list[str]]) -> str:
    if device == FLOOR and "stallcheck" in job:
        return LABELS[FLOOR] + " (no verify)"
    if device in LABELS:
        return LABELS[device]
    return "nvme-emu" + (f" {device}: {' '.join(variants[device])}" if variants[device] else "")


def format_tables(rows: list[dict], devices: list[str], variants: dict[str, list[str]]) -> str:
    abs_rows, ratio_rows = [], []
    for row in rows:
        for d in devices:
            f = row["devices"].get(d)
            if f is None:
                continue
            abs_rows.append({"job": row["job"], "device": device_label(d, row["job"], variants), "iops": f["iops"],
                             "mean": f["clat_mean_us"], "p99": f["clat_p99_us"], "max": f["clat_max_us"],
                             "max_rounds": ", ".join(f"{m / 1000:.1f}" for m in f["clat_max_us_all_rounds"])})
        for v in variants:
            rr = row["ratios"]
            ratio_rows.append({"job": row["job"], "variant": v,
                               "iops_hw": _ratio_cell(rr[f"{v}/{HW_NVME}"]["iops"]), "mean_hw": _ratio_cell(rr[f"{v}/{HW_NVME}"]["mean"]),
                               "iops_floor": _ratio_cell(rr[f"{v}/{FLOOR}"]["iops"]), "mean_floor": _ratio_cell(rr[f"{v}/{FLOOR}"]["mean"]),
                               **({"iops_emu": _ratio_cell(rr[f"{v}/{EMU}"]["iops"]), "mean_emu": _ratio_cell(rr[f"{v}/{EMU}"]["mean"]),
                                   "max_emu": _ratio_cell(rr[f"{v}/{EMU}"]["max"])} if v != EMU else {})})
    t1 = common.format_table(abs_rows, [("job", "job", ""), ("device", "device", ""), ("iops", "IOPS", ",.0f"), ("mean", "mean us", ",.0f"),
                                        ("p99", "p99 us", ",.0f"), ("max", "max us", ",.0f"), ("max_rounds", "max ms per round", "")])
    cols = [("job", "job", ""), ("variant", "nvme-emu", ""), ("iops_hw", "IOPS / hw/nvme", ""), ("mean_hw", "mean / hw/nvme", ""),
            ("iops_floor", "IOPS / floor", ""), ("mean_floor", "mean / floor", "")]
    if len(variants) > 1:
        cols += [("iops_emu", "IOPS / emu", ""), ("mean_emu", "mean / emu", ""), ("max_emu", "max / emu", "")]
    t2 = common.format_table(ratio_rows, cols)
    return (f"Per device: median over rounds of each figure\n\n{t1}\n\n"
            f"Ratios of nvme-emu to the others: median of the per-round ratios (min..max over rounds)\n\n{t2}")


def plot(rows: list[dict], devices: list[str], variants: dict[str, list[str]], path: Path, title: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    x = range(len(rows))
    w = 0.8 / len(devices)
    for k, (ax, field, ylabel) in enumerate(zip(axes, ("iops", "clat_mean_us", "clat_max_us"),
                                                ("IOPS", "mean completion latency (us)", "max completion latency (us)"), strict=True)):
        for i, d in enumerate(devices):
            ys = [r["devices"].get(d, {}).get(field) or 0 for r in rows]
            ax.bar([j - 0.4 + w * (i + 0.5) for j in x], ys, w, label=device_label(d, "", variants))
        if k == 2:
            ax.set_yscale("log")
        ax.set_xticks(list(x), [r["job"].replace("stallcheck-verify-", "verify-") for r in rows], rotation=20, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]} (median of rounds)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# the server's stages joined to fio's completion latency
# ----------------------------------------------------------------------------------------
INLINE_STAGES = ("doorbell", "fetch", "backend", "cqe", "irq")
DEFERRED_STAGES = ("to_worker", "worker", "to_loop", "to_cqe", "drain_irq")


def _weighted_p50(rows: list[dict], stage: str, vias: set[str] | None, exclude: frozenset[str] = frozenset()) -> tuple[float, int]:
    """The count-weighted mean of one stage's p50 over queues (and vias), in us; its count."""
    total = weight = 0
    for row in rows:
        if (vias is not None and row["via"] not in vias) or row["via"] in exclude:
            continue
        st = row["stages"].get(stage)
        if st and st["count"]:
            total += st["p50_ns"] * st["count"]
            weight += st["count"]
    return (total / weight / 1e3 if weight else 0.0), weight


def server_split(snapshot: dict, ios: int) -> dict:
    """One job's server time per I/O from its anatomy: the inline stages (p50, every command
    passes them; the backend stage of a deferred one is its hand-off), plus the deferred
    stages (p50) times the share of commands that went to the workers."""
    rows = snapshot.get("queues", [])
    inline = {st: _weighted_p50(rows, st, None, exclude=frozenset({"worker"}))[0] for st in INLINE_STAGES}
    deferred = {st: _weighted_p50(rows, st, {"worker"})[0] for st in DEFERRED_STAGES}
    n_deferred = _weighted_p50(rows, "to_worker", {"worker"})[1]
    share = min(1.0, n_deferred / ios) if ios else 0.0
    return {"inline_us": inline, "deferred_us": deferred, "deferred_share": share,
            "server_us": sum(inline.values()) + share * sum(deferred.values())}


def anatomy_rows(rounds: list[dict], device: str = EMU) -> list[dict]:
    """Per job, the median over rounds of: fio's clat p50 on nvme-emu, on the floor and on
    hw/nvme, the server's time per I/O (:func:`server_split`), and what is left of nvme-emu's
    clat above the floor and the server: the transport (the doorbell and interrupt hops
    through QEMU and the socket, and what waiting for them costs the guest). At depth the
    stages of different commands overlap and clat includes queueing: QD1 is where the
    split reads directly."""
    per: dict[str, list[dict]] = {}
    for r in rounds:
        dev = r["devices"].get(device) or {}
        for job, snap in (dev.get("anatomy") or {}).items():
            names = [n for n in dev["jobs"] if n == job or n.startswith(job + "/")]
            if not names:
                continue
            for name in names:
                fio = dev["jobs"][name]
                floor = r["devices"].get(FLOOR, {}).get("jobs", {}).get(name)
                hw = r["devices"].get(HW_NVME, {}).get("jobs", {}).get(name)
                ios = sum(dev["jobs"][n]["ios"] for n in names)
                split = server_split(snap, ios)
                emu_p50 = fio["clat_p50_us"] or 0.0
                floor_p50 = (floor or {}).get("clat_p50_us") or 0.0
                per.setdefault(name, []).append({
                    "emu_clat_p50_us": emu_p50, "floor_clat_p50_us": floor_p50 if floor else None,
                    "hw_clat_p50_us": (hw or {}).get("clat_p50_us"),
                    "server_us": split["server_us"], "deferred_share": split["deferred_share"],
                    "inline_us": split["inline_us"], "deferred_us": split["deferred_us"],
                    "transport_us": emu_p50 - floor_p50 - split["server_us"] if floor else None,
                })
    out = []
    for name, got in per.items():
        row: dict[str, Any] = {"job": name, "rounds": len(got)}
        for key in ("emu_clat_p50_us", "floor_clat_p50_us", "hw_clat_p50_us", "server_us", "deferred_share", "transport_us"):
            vals = [g[key] for g in got if g[key] is not None]
            row[key] = _median(vals)
        for key in ("inline_us", "deferred_us"):
            row[key] = {st: _median([g[key][st] for g in got]) for st in got[0][key]}
        out.append(row)
    return out


def format_anatomy(rows: list[dict]) -> str:
    table = [{"job": r["job"], "emu": r["emu_clat_p50_us"], "floor": r["floor_clat_p50_us"], "hw": r["hw_clat_p50_us"],
              "server": r["server_us"], "inline": " + ".join(f"{v:.1f}" for v in r["inline_us"].values()),
              "share": r["deferred_share"], "deferred": " + ".join(f"{v:.0f}" for v in r["deferred_us"].values()),
              "transport": r["transport_us"]} for r in rows]
    return common.format_table(table, [
        ("job", "job", ""), ("emu", "emu clat p50", ",.0f"), ("floor", "floor clat p50", ",.0f"), ("hw", "hw/nvme clat p50", ",.0f"),
        ("server", "server us/IO", ",.1f"), ("inline", "doorbell+fetch+backend+cqe+irq", ""), ("share", "to workers", ".0%"),
        ("deferred", "to_worker+worker+to_loop+to_cqe+drain_irq", ""), ("transport", "transport (rest)", ",.0f")])


def plot_anatomy(rows: list[dict], path: Path, title: str) -> None:
    """One panel per job (each its own scale): nvme-emu's clat p50 as a stacked bar of the
    floor's clat, the server's stages and the transport, beside hw/nvme's clat p50. Where the
    floor's clat is above nvme-emu's (deep queues: the guest's own queueing dominates and
    differs per device), the bar is the server's stages and the rest of nvme-emu's clat."""
    plt = common.pyplot()
    if plt is None or not rows:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows) + 1, 5), squeeze=False)
    colors = {"floor": "#7f8c8d", "inline": "#27ae60", "deferred": "#f1c40f", "transport": "#c0392b", "rest": "#95a5a6", "hw": "#2980b9"}
    labels = {"floor": "floor: guest + TCG + in-process hw/nvme (null-co clat p50)", "inline": "server: doorbell..irq stages (p50)",
              "deferred": "server: worker hand-off stages x share", "transport": "transport: socket + irq hops through QEMU, the rest",
              "rest": "rest of clat (at depth: queueing in the guest)", "hw": "hw/nvme on the file: clat p50"}
    seen: set[str] = set()
    for ax, r in zip(axes[0], rows, strict=True):
        inline = sum(r["inline_us"].values())
        deferred = r["server_us"] - inline
        clat = r["emu_clat_p50_us"]
        if r["transport_us"] is not None and r["transport_us"] >= 0:
            parts = [("floor", r["floor_clat_p50_us"]), ("inline", inline), ("deferred", deferred), ("transport", r["transport_us"])]
        else:
            parts = [("inline", inline), ("deferred", deferred), ("rest", max(0.0, clat - r["server_us"]))]
        bottom = 0.0
        for key, val in parts:
            ax.bar(0, val, 0.7, bottom=bottom, color=colors[key], label=None if key in seen else labels[key])
            seen.add(key)
            bottom += val
        ax.bar(1, r["hw_clat_p50_us"] or 0, 0.7, color=colors["hw"], label=None if "hw" in seen else labels["hw"])
        seen.add("hw")
        ax.scatter([0], [clat], marker="_", s=500, color="black", zorder=3)
        ax.set_xticks([0, 1], ["nvme-emu", "hw/nvme"], fontsize=7)
        ax.set_title(r["job"].replace("stallcheck-verify-", "verify-"), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].set_ylabel("completion latency p50 (us); black tick: fio's clat p50")
    fig.legend(loc="lower center", ncol=3, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# --nested: under KVM in the nested rig, where QEMU can take the doorbell agent
# ----------------------------------------------------------------------------------------
#: name -> (how, server arguments, run_guest keywords). All emu configs use the shadow server;
#: they differ in how the guest's doorbell writes reach it.
NESTED_CONFIGS = {
    "trap": ("emu", ("--agent-socket", "off"), {"agent": False}),
    "shadow": ("emu", (), {"agent": True}),
    "ioeventfd_dbbuf": ("emu", ("--agent-post-write", "off"), {"agent": True}),
    "hw_nvme": ("builtin", (), {}),
}
NESTED_LABELS = {"trap": "trap (REGION_WRITE + dbbuf/EventIdx)", "shadow": "shadow, agent, real POST_WRITE",
                 "ioeventfd_dbbuf": "ioeventfd + dbbuf, agent", "hw_nvme": "QEMU -device nvme"}
NESTED_JOBS = [("randread-4k-qd1", "rw=randread\nbs=4k\niodepth=1"), ("randread-4k-qd32", "rw=randread\nbs=4k\niodepth=32")]
NESTED_FILE = 256 << 20
NESTED_GUEST = {"cpus": 1, "memory_mb": 512}


def nested_inner(args: argparse.Namespace) -> int:
    """Inside the rig (KVM): the chosen configs in turn, ``args.rounds`` times, on one file."""
    assert guest.detect_accel() == "kvm", "--nested-inner needs KVM (the nested rig)"
    configs = {n: NESTED_CONFIGS[n] for n in args.configs.split(",")} if args.configs else NESTED_CONFIGS
    workdir = tempfile.mkdtemp(prefix="nvme-bench-fio-", dir="/tmp")
    image = os.path.join(workdir, "disk.raw")
    head = ["[global]", "filename=/dev/nvme0n1", "ioengine=io_uring", "direct=1", "time_based=1",
            f"runtime={args.runtime:g}", f"ramp_time={args.ramp:g}", "size=256m", "randrepeat=0"]
    job = "\n".join(head + [line for i, (n, o) in enumerate(NESTED_JOBS) for line in
                            ([f"[{n}]"] + (["stonewall"] if i else []) + [o] + _marked(n))]) + "\n"
    out: dict = {"rounds": [], "fio_job": job}
    try:
        fill(image, NESTED_FILE)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for rnd in range(args.rounds):
            r: dict = {}
            out["rounds"].append(r)
            for name, (how, server_args, kw) in configs.items():
                if how == "builtin":
                    res = run_builtin(image, job, 900, **kw, **NESTED_GUEST)
                else:
                    res = run_nvme_emu(image, job, 900, workdir, f"{name}{rnd}", "shadow", server_args, **kw, **NESTED_GUEST)
                r[name] = res
                print(f"[{rnd}] {name}: " + ", ".join(f"{n} {j['iops']:,.0f} IOPS mean {j['clat_mean_us']:.0f} us"
                                                        for n, j in res["jobs"].items()), flush=True)
                # after every config: if L1 dies later (it has, under TCG's nested SVM), what
                # completed still counts
                common.write_json(Path(args.out) / args.inner_json, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def nested_rows(rounds: list[dict]) -> list[dict]:
    """Per config: QD1 mean latency and QD32 IOPS, each the median over the rounds that have it."""
    rows = []
    for name in NESTED_CONFIGS:
        have = [r for r in rounds if name in r]
        qd1 = sorted(r[name]["jobs"]["randread-4k-qd1"]["clat_mean_us"] for r in have)
        qd32 = sorted(r[name]["jobs"]["randread-4k-qd32"]["iops"] for r in have)
        row = {"config": name, "label": NESTED_LABELS[name], "qd1_mean_us": qd1[len(qd1) // 2],
               "qd32_iops": qd32[len(qd32) // 2], "qd1_all": qd1, "qd32_all": qd32}
        splits = [server_split(r[name]["anatomy"][job], r[name]["jobs"][job]["ios"])
                  for r in have for job in ("randread-4k-qd1",) if job in (r[name].get("anatomy") or {})]
        if splits:  # the server's time per QD1 I/O (p50 stages), median over rounds
            row["qd1_server_us"] = _median([sp["server_us"] for sp in splits])
            row["qd1_server_stages_us"] = {st: _median([sp["inline_us"][st] for sp in splits]) for st in INLINE_STAGES}
            row["qd1_deferred_share"] = _median([sp["deferred_share"] for sp in splits])
        st = have[-1][name].get("server_stats") or {}
        if st:
            db = st.get("doorbells", {})
            row["doorbells"] = {k: db.get(k) for k in ("trapped", "trapped_io_sq", "signals", "lost_values")}
            row["agent"] = st.get("ioeventfd_agent")
        rows.append(row)
    return rows


def nested_main(args: argparse.Namespace) -> int:
    """Boot the rig with our POST_WRITE KVM modules, one L1 boot per round, and print the
    table, the targets, and write JSON + PNG.

    L1 (TCG's emulated SVM running real KVM) has died in long runs, with a corrupted kernel
    stack in a vCPU thread of the L2 QEMU. So each round gets a fresh L1, what completed
    before a death counts, and the configs a death took are run once more in a new L1.
    """
    from nvme_emu import nested

    out = Path(args.out)
    inner_dir = out / "tmp" / "fio_vs_qemu_nested"
    inner_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    names = list(NESTED_CONFIGS)
    inner: dict = {"rounds": [], "l1_deaths": [], "fio_job": None}
    for rnd in range(args.rounds):
        got: dict = {}
        # All configs of a round in one L1 boot, back to back (this machine is shared: the
        # closer in time, the fairer the comparison); the order rotates from round to round.
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for attempt in range(2):
            todo = [n for n in order if n not in got]
            if not todo:
                break
            inner_json = inner_dir / f"inner-{rnd}-{attempt}.json"
            inner_json.unlink(missing_ok=True)
            res = nested.run_nested([sys.executable, str(Path(__file__).resolve()), "--nested-inner", "--out", str(inner_dir),
                                     "--inner-json", inner_json.name, "--configs", ",".join(todo), "--rounds", "1",
                                     "--runtime", str(args.runtime), "--ramp", str(args.ramp)],
                                    kvm="patched", cwd=str(common.REPO), out_dirs=[str(inner_dir)],
                                    timeout=300 + 300 * len(todo))
            if inner_json.exists():
                one = json.loads(inner_json.read_text())
                got.update(one["rounds"][0] if one["rounds"] else {})
                inner["fio_job"] = one["fio_job"]
            for line in res.output.splitlines():
                if line.startswith("[0] "):
                    print(f"[round {rnd}, boot {attempt}] {line[4:]}", flush=True)
            if res.returncode != 0:
                lost = [n for n in todo if n not in got]
                inner["l1_deaths"].append({"round": rnd, "attempt": attempt, "configs_lost": lost, "returncode": res.returncode,
                                           "tail": res.describe_failure()[-3000:]})
                print(f"  L1 run failed (rc {res.returncode}), lost {lost}; " + ("retrying those" if attempt == 0 else "giving up on them this round"),
                      file=sys.stderr, flush=True)
        inner["rounds"].append(got)
    missing = [n for n in names if not any(n in r for r in inner["rounds"])]
    if missing:
        print(f"no measurement at all for {missing}", file=sys.stderr)
        return 1
    incomplete = sum(len(r) < len(names) for r in inner["rounds"])
    rows = nested_rows(inner["rounds"])
    by = {r["config"]: r for r in rows}
    for r in rows:
        r["qd1_vs_trap"] = r["qd1_mean_us"] / by["trap"]["qd1_mean_us"]
        r["qd1_vs_hw_nvme"] = r["qd1_mean_us"] / by["hw_nvme"]["qd1_mean_us"]
        r["qd32_vs_hw_nvme"] = r["qd32_iops"] / by["hw_nvme"]["qd32_iops"]
    sh = by["shadow"]
    # the same pairs within one round (one L1 boot, back to back): what the machine's load at
    # that moment did to one config it did to the other
    paired = [r["shadow"]["jobs"]["randread-4k-qd1"]["clat_mean_us"] / r["hw_nvme"]["jobs"]["randread-4k-qd1"]["clat_mean_us"]
              for r in inner["rounds"] if "shadow" in r and "hw_nvme" in r]
    sh["qd1_vs_hw_nvme_per_round"] = paired
    if paired:
        sh["qd1_vs_hw_nvme_paired_median"] = statistics.median(paired)
    targets = {
        "shadow_qd1_vs_trap": {"value": sh["qd1_vs_trap"], "target": 1 / 1.3, "met": sh["qd1_vs_trap"] <= 1 / 1.3},
        "shadow_qd1_vs_hw_nvme": {"value": sh["qd1_vs_hw_nvme"], "target": 1.2, "met": sh["qd1_vs_hw_nvme"] <= 1.2},
    }
    lines = ["Nested: L1 is a TCG guest with real KVM (our POST_WRITE modules); QEMU 11.1.3 -accel kvm runs an L2 "
             "guest with fio. Every exit is TCG-emulated: only ratios within this run carry over.",
             f"{len(inner['rounds'])} round(s) of all four configs, one L1 boot per round, 1 vCPU / 512 MiB L2, fio {args.runtime:g} s "
             f"per job; median over rounds per figure; L1 deaths (retried once): {len(inner['l1_deaths'])}"
             + (f"; {incomplete} round(s) missing a config" if incomplete else ""), "",
             f"{'config':40s} {'QD1 mean us':>12s} {'x trap':>7s} {'x hw/nvme':>9s} {'QD32 IOPS':>10s} {'x hw/nvme':>9s}  doorbells"]
    for r in rows:
        db = r.get("doorbells") or {}
        lines.append(f"{r['label']:40s} {r['qd1_mean_us']:12.0f} {r['qd1_vs_trap']:7.2f} {r['qd1_vs_hw_nvme']:9.2f} "
                     f"{r['qd32_iops']:10,.0f} {r['qd32_vs_hw_nvme']:9.2f}  "
                     + (f"trapped {db.get('trapped')} (I/O SQ {db.get('trapped_io_sq')}), signals {db.get('signals')}" if db else "-"))
    lines.append("")
    lines += [f"QD1 mean us per round, {r['config']}: {[round(v) for v in r['qd1_all']]}" for r in rows]
    lines.append("")
    lines += [f"QD1 server us per I/O (p50 stages, median of rounds), {r['config']}: {r['qd1_server_us']:.1f} = "
              + " + ".join(f"{k} {v:.1f}" for k, v in r["qd1_server_stages_us"].items())
              + f"; to workers {r['qd1_deferred_share']:.0%}" for r in rows if r.get("qd1_server_us") is not None]
    if inner["l1_deaths"]:
        lines.append("L1 deaths: " + ", ".join(f"round {d['round']} (lost {', '.join(d['configs_lost']) or 'nothing'})" for d in inner["l1_deaths"]))
    lines.append("")
    lines.append(f"target shadow QD1 mean <= trap / 1.3: {sh['qd1_vs_trap']:.2f}x trap -> {'MET' if targets['shadow_qd1_vs_trap']['met'] else 'MISSED'}")
    lines.append(f"target shadow QD1 mean <= 1.2x hw/nvme: {sh['qd1_vs_hw_nvme']:.2f}x -> {'MET' if targets['shadow_qd1_vs_hw_nvme']['met'] else 'MISSED'}")
    if paired:
        lines.append(f"shadow / hw/nvme QD1 mean within each round that has both: {', '.join(f'{x:.2f}' for x in paired)} "
                     f"(median {sh['qd1_vs_hw_nvme_paired_median']:.2f}; issue 23's target: <= 1.0 -> "
                     f"{'MET' if sh['qd1_vs_hw_nvme_paired_median'] <= 1.0 else 'MISSED'})")
    table = "\n".join(lines)
    print(table)
    common.write_json(out / "fio_vs_qemu_nested.json", {"benchmark": "fio_vs_qemu --nested", "machine": common.machine(),
                                                       "rows": rows, "targets": targets, "inner": inner, "table": table,
                                                       "elapsed_s": time.monotonic() - t0})
    (out / "fio_vs_qemu_nested.md").write_text("```\n" + table + "\n```\n")
    plt = common.pyplot()
    if plt is not None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
        x = range(len(rows))
        a1.bar(x, [r["qd1_mean_us"] for r in rows], color=["#c0392b", "#e67e22", "#27ae60", "#7f8c8d"])
        a1.set_xticks(list(x), [r["label"] for r in rows], rotation=12, fontsize=7)
        a1.set_ylabel("fio 4k randread QD1 mean latency (us)")
        a2.bar(x, [r["qd32_iops"] for r in rows], color=["#c0392b", "#e67e22", "#27ae60", "#7f8c8d"])
        a2.set_xticks(list(x), [r["label"] for r in rows], rotation=12, fontsize=7)
        a2.set_ylabel("fio 4k randread QD32 IOPS")
        fig.suptitle("fio in an L2 guest (QEMU 11.1.3 -accel kvm in the nested rig): only in-run ratios carry over", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "fio_vs_qemu_nested.png", dpi=110)
        plt.close(fig)
    print(f"wrote {out / 'fio_vs_qemu_nested.json'}, .md, .png in {time.monotonic() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=10)
    ap.add_argument("--ramp", type=float, default=1)
    ap.add_argument("--doorbell", default="auto")
    ap.add_argument("--emu-variant", type=parse_variant, action="append", default=[], metavar="NAME=SERVE-ARGS",
                    help="one more nvme-emu device per round: `nvme-emu serve` with these extra arguments (repeatable); "
                         "its ratios to the default nvme-emu ('emu') are reported too, e.g. si100='--switch-interval-us 100'")
    ap.add_argument("--no-floor", action="store_true", help="leave out the floor (hw/nvme on null-co)")
    ap.add_argument("--no-stall-check", action="store_true")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=str(common.RESULTS))
    ap.add_argument("--nested", action="store_true",
                    help="run in the nested rig under KVM with our POST_WRITE modules: trap, shadow (agent, POST_WRITE), "
                         "ioeventfd+dbbuf (agent) and QEMU's -device nvme, fio randread QD1 and QD32")
    ap.add_argument("--nested-inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--configs", default="", help=argparse.SUPPRESS)  # --nested-inner: a subset of NESTED_CONFIGS
    ap.add_argument("--inner-json", default="fio_vs_qemu_nested_inner.json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.nested_inner:
        return nested_inner(args)
    if args.nested:
        return nested_main(args)

    variants: dict[str, list[str]] = {EMU: []}
    for name, serve_args in args.emu_variant:
        if name in variants:
            ap.error(f"--emu-variant {name} given twice")
        variants[name] = serve_args
    devices = [HW_NVME, *([] if args.no_floor else [FLOOR]), *variants]
    mach = common.machine()
    mach["busy_before"] = common.wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else common.machine_busy()
    print("machine:", common.describe_machine(mach), f"busy before: {mach['busy_before']:.0%}", flush=True)
    workdir = tempfile.mkdtemp(prefix="nvme-bench-fio-", dir="/tmp")
    image = os.path.join(workdir, "disk.raw")
    jobs = {HW_NVME: fio_job(args.runtime, args.ramp, not args.no_stall_check)}
    jobs[EMU] = jobs[HW_NVME]
    jobs[FLOOR] = fio_job(args.runtime, args.ramp, not args.no_stall_check, verify=False)
    timeout = 120 + (len(JOBS) * (args.runtime + args.ramp) + 60) * 6
    rounds: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        t = time.monotonic()
        fill(image, FILE_SIZE)
        print(f"backing file {image}: {FILE_SIZE >> 20} MiB of data ({time.monotonic() - t:.1f}s)", flush=True)
        for rnd in range(args.rounds):
            # every device takes every place in the order in turn (none always goes first)
            order = devices[rnd % len(devices):] + devices[: rnd % len(devices)]
            got: dict[str, Any] = {}
            for d in order:
                res = run_device(d, variants, image, jobs, timeout, workdir, rnd, args.doorbell)
                got[d] = res
                cpu = f", server CPU {res['server_cpu_s']:.1f}s" if "server_cpu_s" in res else ""
                print(f"[{rnd}] {device_label(d, '', variants)} done in {res['elapsed_s']:.0f}s ({res['accel']}){cpu}; "
                      f"load {' '.join(common.read_file('/proc/loadavg').split()[:3])}", flush=True)
                for n, j in res["jobs"].items():
                    print(f"      {n:38} {j['iops']:>9,.0f} IOPS mean {j['clat_mean_us']:8.0f} us p99 {j['clat_p99_us'] or 0:8.0f} "
                          f"max {j['clat_max_us']:>10,.0f} us", flush=True)
            rounds.append({"round": rnd, "order": order, "devices": got})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = summarise_rounds(rounds, devices, variants)
    table = format_tables(rows, devices, variants)
    anatomy = {v: anatomy_rows(rounds, v) for v in variants}
    anatomy_table = "\n\n".join(f"Where nvme-emu's time goes ({v}; us, p50, median of rounds):\n\n{format_anatomy(a)}"
                                for v, a in anatomy.items() if a)
    print()
    print(table)
    if anatomy_table:
        print()
        print(anatomy_table)
    # issue 23's targets: every job's IOPS at least hw/nvme's, QD1 mean latency at most
    # hw/nvme's, no max above 3x hw/nvme's for the same job (medians of the per-round ratios)
    per_job: dict[str, dict[str, Any]] = {}
    for r in rows:
        rr = r["ratios"].get(f"{EMU}/{HW_NVME}", {})
        iops, mean, mx = (rr.get(k, {}).get("median") for k in ("iops", "mean", "max"))
        qd1 = re.search(r"-qd1(?!\d)", r["job"]) is not None
        per_job[r["job"]] = {"iops_ratio": iops, "iops_met": bool(iops and iops >= 1.0),
                             "mean_ratio": mean, "mean_met": (bool(mean and mean <= 1.0) if qd1 else None),
                             "max_ratio": mx, "max_met": bool(mx and mx <= 3.0)}
    targets = {"per_job": per_job, "iops_target": 1.0, "qd1_mean_target": 1.0, "max_target": 3.0,
               "all_met": all(tj["iops_met"] and tj["max_met"] and tj["mean_met"] is not False for tj in per_job.values())}

    def ratio(x: float | None) -> str:  # None: the job did no I/O on one side (the JSON is still written)
        return "-" if x is None else f"{x:.2f}x"

    print("\ntargets (nvme-emu default vs hw/nvme; IOPS >= 1.0x, QD1 mean <= 1.0x, max <= 3x):")
    for job, tj in per_job.items():
        print(f"  {job:38} IOPS {ratio(tj['iops_ratio'])} {'met' if tj['iops_met'] else 'MISSED'}; "
              + (f"mean {ratio(tj['mean_ratio'])} {'met' if tj['mean_met'] else 'MISSED'}; " if tj["mean_met"] is not None else "")
              + f"max {ratio(tj['max_ratio'])} {'met' if tj['max_met'] else 'MISSED'}")
    mach["loadavg_at_end"] = common.read_file("/proc/loadavg").split()[:3]
    name = "fio_vs_qemu" + (f"-{args.label}" if args.label else "")
    out = Path(args.out)
    common.write_json(out / f"{name}.json", {
        "benchmark": "fio_vs_qemu", "machine": mach, "method": __doc__, "fio_job": jobs[HW_NVME], "fio_job_floor": jobs[FLOOR],
        "config": {"rounds": args.rounds, "runtime": args.runtime, "ramp": args.ramp, "doorbell": args.doorbell, "file_size": FILE_SIZE,
                   "devices": devices, "emu_variants": variants},
        "targets": targets, "results": rows, "rounds": rounds, "table": table, "anatomy": anatomy,
        "anatomy_table": anatomy_table, "elapsed_s": time.monotonic() - t_start,
    })
    for v, a in anatomy.items():
        plot_anatomy(a, out / f"{name}-anatomy{'' if v == EMU else '-' + v}.png",
                     f"nvme-emu{'' if v == EMU else ' ' + v}: fio clat p50 split into the floor, the server's stages and the transport "
                     f"(median of {len(rounds)} round(s))\n{common.describe_machine(mach)}")
    plot(
        rows, devices, variants,
        out / f"{name}.png",
        f"fio in a QEMU guest ({rounds[0]['devices'][HW_NVME]['accel']}): nvme-emu vs QEMU hw/nvme on the file and on null-co (floor), "
        f"same guest, median of {len(rounds)} round(s)\n{common.describe_machine(mach)}",
    )
    print(f"wrote {out / (name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
