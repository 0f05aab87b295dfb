"""fio in a QEMU guest: nvme-emu against QEMU's own ``-device nvme``, same guest, same file.

One run boots the same test guest (nvme_emu.guest: QEMU 11.1, q35, 2 vCPUs, TCG here) twice
per round: first with QEMU's built-in NVMe controller (hw/nvme) on a raw file, then with
nvme-emu (vfio-user-pci -> ``nvme-emu serve --namespace file:<the same file>``, default
doorbell mode ``auto``: upstream QEMU takes no io fds, so trapped writes + shadow doorbells
with EventIdx). The file is filled with data first, so neither device reads holes.

Jobs (fio, io_uring, direct=1, time_based, 10 s + 1 s ramp each, one after the other):
4k randread QD1, 4k randread QD32, 4k randwrite QD1, 128k sequential read QD8, and a short
stall check (the end-to-end suite's verify job: 4k randwrite QD16 + crc32c verify read-back)
whose clat max would show multi-100-ms stalls. Rounds alternate the two devices; the median
round is reported, with the ratio nvme-emu / hw/nvme.

    ./dev bench fio_vs_qemu                 # 2 rounds, ~4-5 minutes under TCG
    ./dev bench fio_vs_qemu --rounds 1 --runtime 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

from nvme_emu import guest

FILE_SIZE = 1 << 30

JOBS = [
    # name, fio options
    ("randread-4k-qd1", "rw=randread\nbs=4k\niodepth=1"),
    ("randread-4k-qd32", "rw=randread\nbs=4k\niodepth=32"),
    ("randwrite-4k-qd1", "rw=randwrite\nbs=4k\niodepth=1"),
    ("seqread-128k-qd8", "rw=read\nbs=128k\niodepth=8"),
]

STALL_JOB = """
[stallcheck-verify-4k-qd16]
stonewall
time_based=0
runtime=0
ramp_time=0
rw=randwrite
bs=4k
iodepth=16
size=32m
offset=512m
verify=crc32c
do_verify=1
verify_fatal=1
randrepeat=0
"""


def fio_job(runtime: float, ramp: float, stall_check: bool) -> str:
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
    text = "\n".join(out) + "\n"
    return text + (STALL_JOB if stall_check else "")


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


def run_builtin(image: str, job: str, timeout: float, **guest_kw) -> dict:
    t0 = time.monotonic()
    r = guest.run_guest(builtin_image=image, fio_job=job, timeout=timeout, **guest_kw)
    if not r.ok or r.fio is None:
        raise RuntimeError("built-in nvme run failed:\n" + r.describe_failure())
    return {"jobs": summarise(r.fio), "elapsed_s": time.monotonic() - t0, "accel": r.accel}


def run_nvme_emu(image: str, job: str, timeout: float, workdir: str, tag: str, doorbell: str,
                 server_args: tuple[str, ...] = (), **guest_kw) -> dict:
    sock = os.path.join(workdir, f"emu-{tag}.sock")
    srv = common.serve(sock, ["--namespace", f"file:{image}", "--doorbell", doorbell, *server_args], Path(workdir) / f"emu-{tag}.log")
    t0 = time.monotonic()
    try:
        cpu0 = srv.cpu_seconds()
        r = guest.run_guest(socket_path=sock, fio_job=job, timeout=timeout, **guest_kw)
        cpu1 = srv.cpu_seconds()
        stats = srv.stats()
    finally:
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
    }


COLUMNS = [
    ("job", "job", ""),
    ("builtin_iops", "hw/nvme IOPS", ",.0f"),
    ("emu_iops", "nvme-emu IOPS", ",.0f"),
    ("iops_ratio", "IOPS ratio", ".2f"),
    ("builtin_mean_us", "hw/nvme mean us", ".0f"),
    ("emu_mean_us", "emu mean us", ".0f"),
    ("lat_ratio", "mean lat ratio", ".2f"),
    ("builtin_p99_us", "hw/nvme p99 us", ".0f"),
    ("emu_p99_us", "emu p99 us", ".0f"),
    ("builtin_max_us", "hw/nvme max us", ",.0f"),
    ("emu_max_us", "emu max us", ",.0f"),
]


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    rows = [r for r in rows if "stallcheck" not in r["job"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    x = range(len(rows))
    w = 0.38
    a1.bar([i - w / 2 for i in x], [r["builtin_iops"] for r in rows], w, label="QEMU hw/nvme")
    a1.bar([i + w / 2 for i in x], [r["emu_iops"] for r in rows], w, label="nvme-emu (vfio-user)")
    for i, r in enumerate(rows):
        a1.text(i + w / 2, r["emu_iops"], f"{r['iops_ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(list(x), [r["job"] for r in rows], rotation=15, fontsize=8)
    a1.set_ylabel("IOPS")
    a1.set_title("IOPS (label: nvme-emu / hw/nvme)")
    a1.legend(fontsize=8)
    a2.bar([i - w / 2 for i in x], [r["builtin_mean_us"] for r in rows], w, label="QEMU hw/nvme")
    a2.bar([i + w / 2 for i in x], [r["emu_mean_us"] for r in rows], w, label="nvme-emu (vfio-user)")
    for i, r in enumerate(rows):
        a2.text(i + w / 2, r["emu_mean_us"], f"{r['lat_ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    a2.set_xticks(list(x), [r["job"] for r in rows], rotation=15, fontsize=8)
    a2.set_ylabel("mean completion latency (us)")
    a2.set_title("clat mean (label: nvme-emu / hw/nvme)")
    a2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
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
                            ([f"[{n}]"] + (["stonewall"] if i else []) + [o])]) + "\n"
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
    if inner["l1_deaths"]:
        lines.append("L1 deaths: " + ", ".join(f"round {d['round']} (lost {', '.join(d['configs_lost']) or 'nothing'})" for d in inner["l1_deaths"]))
    lines.append("")
    lines.append(f"target shadow QD1 mean <= trap / 1.3: {sh['qd1_vs_trap']:.2f}x trap -> {'MET' if targets['shadow_qd1_vs_trap']['met'] else 'MISSED'}")
    lines.append(f"target shadow QD1 mean <= 1.2x hw/nvme: {sh['qd1_vs_hw_nvme']:.2f}x -> {'MET' if targets['shadow_qd1_vs_hw_nvme']['met'] else 'MISSED'}")
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
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runtime", type=float, default=10)
    ap.add_argument("--ramp", type=float, default=1)
    ap.add_argument("--doorbell", default="auto")
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

    mach = common.machine()
    mach["busy_before"] = common.wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else common.machine_busy()
    print("machine:", common.describe_machine(mach), f"busy before: {mach['busy_before']:.0%}", flush=True)
    workdir = tempfile.mkdtemp(prefix="nvme-bench-fio-", dir="/tmp")
    image = os.path.join(workdir, "disk.raw")
    job = fio_job(args.runtime, args.ramp, not args.no_stall_check)
    timeout = 120 + (len(JOBS) * (args.runtime + args.ramp) + 60) * 6
    rounds: list[dict[str, Any]] = []
    try:
        t = time.monotonic()
        fill(image, FILE_SIZE)
        print(f"backing file {image}: {FILE_SIZE >> 20} MiB of data ({time.monotonic() - t:.1f}s)", flush=True)
        for rnd in range(args.rounds):
            b = run_builtin(image, job, timeout)
            print(f"[{rnd}] hw/nvme done in {b['elapsed_s']:.0f}s ({b['accel']})", flush=True)
            for n, j in b["jobs"].items():
                print(
                    f"      {n:34} {j['iops']:>9,.0f} IOPS mean {j['clat_mean_us']:8.0f} us p99 {j['clat_p99_us'] or 0:8.0f} max {j['clat_max_us']:>10,.0f} us",
                    flush=True,
                )
            e = run_nvme_emu(image, job, timeout, workdir, f"r{rnd}", args.doorbell)
            print(f"[{rnd}] nvme-emu done in {e['elapsed_s']:.0f}s, server CPU {e['server_cpu_s']:.1f}s", flush=True)
            for n, j in e["jobs"].items():
                print(
                    f"      {n:34} {j['iops']:>9,.0f} IOPS mean {j['clat_mean_us']:8.0f} us p99 {j['clat_p99_us'] or 0:8.0f} max {j['clat_max_us']:>10,.0f} us",
                    flush=True,
                )
            rounds.append({"round": rnd, "builtin": b, "nvme_emu": e})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    names = list(rounds[0]["builtin"]["jobs"])
    for name in names:
        per = []
        for r in rounds:
            bj, ej = r["builtin"]["jobs"].get(name), r["nvme_emu"]["jobs"].get(name)
            if bj and ej:
                per.append((bj, ej))
        if not per:
            continue
        # the median round by the nvme-emu/hw-nvme IOPS ratio (both devices of one round)
        per.sort(key=lambda be: be[1]["iops"] / be[0]["iops"] if be[0]["iops"] else 0)
        bj, ej = per[len(per) // 2]
        rows.append({
            "job": name,
            "builtin_iops": bj["iops"], "emu_iops": ej["iops"], "iops_ratio": ej["iops"] / bj["iops"] if bj["iops"] else None,
            "builtin_mean_us": bj["clat_mean_us"], "emu_mean_us": ej["clat_mean_us"],
            "lat_ratio": ej["clat_mean_us"] / bj["clat_mean_us"] if bj["clat_mean_us"] else None,
            "builtin_p50_us": bj["clat_p50_us"], "emu_p50_us": ej["clat_p50_us"],
            "builtin_p99_us": bj["clat_p99_us"], "emu_p99_us": ej["clat_p99_us"],
            "builtin_max_us": bj["clat_max_us"], "emu_max_us": ej["clat_max_us"],
            "emu_max_us_all_rounds": [e["clat_max_us"] for _b, e in per],
            "iops_ratio_all_rounds": [e["iops"] / b["iops"] for b, e in per if b["iops"]],
            "rounds": len(per),
        })
    table = common.format_table(rows, COLUMNS)
    print()
    print(table)
    by = {r["job"]: r for r in rows}
    qd32 = by.get("randread-4k-qd32", {}).get("iops_ratio")
    qd1 = by.get("randread-4k-qd1", {}).get("lat_ratio")
    targets = {
        "qd32_iops_ratio": qd32, "qd32_target": 0.90, "qd32_met": bool(qd32 and qd32 >= 0.90),
        "qd1_latency_ratio": qd1, "qd1_target": 1.30, "qd1_met": bool(qd1 and qd1 <= 1.30),
    }
    def ratio(x: float | None) -> str:  # None: the job did no I/O on one side (the JSON is still written)
        return "-" if x is None else f"{x:.2f}x"

    print(f"\ntargets: QD32 IOPS {ratio(qd32)} of hw/nvme (>= 0.90: {'met' if targets['qd32_met'] else 'MISSED'}); "
          f"QD1 mean latency {ratio(qd1)} (<= 1.30: {'met' if targets['qd1_met'] else 'MISSED'})")
    name = "fio_vs_qemu" + (f"-{args.label}" if args.label else "")
    out = Path(args.out)
    common.write_json(out / f"{name}.json", {
        "benchmark": "fio_vs_qemu", "machine": mach, "method": __doc__, "fio_job": job,
        "config": {"rounds": args.rounds, "runtime": args.runtime, "ramp": args.ramp, "doorbell": args.doorbell, "file_size": FILE_SIZE},
        "targets": targets, "results": rows, "rounds": rounds, "table": table,
    })
    plot(
        rows,
        out / f"{name}.png",
        f"fio in a QEMU guest ({rounds[0]['builtin']['accel']}): nvme-emu vs QEMU hw/nvme, same guest + file, median of {len(rounds)} "
        f"round(s)\n{common.describe_machine(mach)}",
    )
    print(f"wrote {out / (name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
