"""Latency anatomy: where a 4 KiB I/O's time goes inside the server, per doorbell path and QD.

The same servers and client as ``server_throughput`` (its :class:`Rig`: the real vfio-user
client, memfd guest RAM, a precomputed SQE blob, one doorbell per batch; client on CPU 0,
servers on CPU 1), one ``nvme-emu serve`` per path, started with ``--latency-sample N``. For
every (path, QD) point the server's histograms are emptied (``ctl latency --reset``), the
point runs, and ``ctl latency`` is read back over the control socket: what a user of a real
server would see. Each stage's p50/p99/max comes from the server's log-linear buckets
(within 12.5 %; nvme_emu/latency.py).

Outputs ``bench/results/latency_anatomy[-LABEL].{json,png}`` and a table: per path and QD the
median of each stage, and a stacked bar per path/QD of the median stage times of one batch
(at QD1 a batch is one I/O; at QD>1 BACKEND is counted once per command of the batch), next
to the host's turn between batches (HOST_AND_LOOP), drawn apart since it is not server time.

    ./dev bench latency_anatomy                          # shadow, trap, ioeventfd+dbbuf, poll; QD 1 and 128
    ./dev bench latency_anatomy --paths shadow --qd 1 --sample 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
import server_throughput as st

from nvme_emu.ctl import ControlClient, default_control_socket
from nvme_emu.latency import DEFAULT_SAMPLE_EVERY, Stage

PATHS = ["shadow", "trap", "ioeventfd+dbbuf", "poll"]
QDS = [1, 128]
IOS = {1: 20_000, 8: 40_000, 32: 80_000, 128: 150_000}
#: The server stages of one batch, in the order they happen (the stacked bar's layers).
BAR_STAGES = [Stage.DOORBELL, Stage.FETCH, Stage.BACKEND, Stage.CQE, Stage.IRQ]


def stage_summary(snapshot: dict[str, Any], qid: int = 1) -> dict[str, dict[str, Any]]:
    """Per stage, the samples of all vias of queue ``qid`` merged by count-weighted median
    (one via dominates each path: the spin on shadow, the re-check on dbbuf)."""
    out: dict[str, dict[str, Any]] = {}
    for row in snapshot["queues"]:
        if row["qid"] != qid:
            continue
        for stage, s in row["stages"].items():
            cur = out.get(stage)
            if cur is None or s["count"] > cur["count"]:
                out[stage] = dict(s, via=row["via"])
    return out


def measure_point(rig: st.Rig, ctl: ControlClient, qd: int, ios: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    ctl.latency_reset()
    r = st.measure(rig, "randread", qd, ios, args.max_seconds, seed)
    snap = ctl.latency()
    stages = stage_summary(snap)
    vias = sorted({row["via"] for row in snap["queues"] if row["qid"] == 1})
    return {**{k: r[k] for k in ("path", "qd", "iops", "server_cpu_us_per_io", "cmds_per_batch", "lat_p50_us")},
            "vias": vias, "stages": stages, "snapshot": snap}


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        t: dict[str, Any] = {"path": r["path"], "qd": r["qd"], "iops": r["iops"], "vias": ",".join(v for v in r["vias"])}
        for s in Stage:
            v = r["stages"].get(s.name.lower())
            t[s.name.lower()] = v["p50_ns"] / 1e3 if v else None
        out.append(t)
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per QD, linear: a stacked bar per path of its stages' medians per batch."""
    plt = common.pyplot()
    if plt is None:
        return
    qds = sorted({r["qd"] for r in rows})
    fig, axes = plt.subplots(1, len(qds), figsize=(5.5 * len(qds), 5), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, qd in zip(axes[0], qds, strict=True):
        sel = [r for r in rows if r["qd"] == qd]
        labels = [r["path"] for r in sel]
        bottoms = [0.0] * len(sel)
        for i, stage in enumerate(BAR_STAGES):
            heights = []
            for r in sel:
                v = r["stages"].get(stage.name.lower())
                us = v["p50_ns"] / 1e3 if v else 0.0
                if stage is Stage.BACKEND:
                    us *= r["cmds_per_batch"] or 1  # once per command of the batch
                heights.append(us)
            name = stage.name.lower() + (" (x cmds/batch)" if stage is Stage.BACKEND else "")
            ax.bar(labels, heights, bottom=bottoms, color=colors(i), label=name)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        host = [(r["stages"].get("host_and_loop") or {}).get("p50_ns", 0.0) / 1e3 for r in sel]
        ax.scatter(labels, host, marker="_", s=500, color="black", zorder=3, label="host_and_loop p50 (not server time)")
        ax.set_ylabel("us per batch (median of each stage)")
        ax.set_title(f"QD{qd}" + (" (a batch is one I/O)" if qd == 1 else f" ({qd} I/Os per batch)"))
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--qd", default=",".join(map(str, QDS)))
    ap.add_argument("--sample", type=int, default=DEFAULT_SAMPLE_EVERY, help="the servers' --latency-sample")
    ap.add_argument("--ios-scale", type=float, default=1.0)
    ap.add_argument("--max-seconds", type=float, default=3.0)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    qds = [int(q) for q in args.qd.split(",")]
    mach = common.machine()
    mach["busy_before"] = common.machine_busy()
    print("machine:", common.describe_machine(mach), flush=True)
    tmp = tempfile.mkdtemp(prefix="nvme-anatomy-", dir="/tmp")
    servers = {}
    for p in paths:
        extra = ["--doorbell", st.SERVER_MODE[p], "--namespace", f"ram:size={st.NS_SIZE}", "--queues", "4", "--latency-sample", str(args.sample)]
        servers[p] = common.serve(os.path.join(tmp, f"{p}.sock"), extra, Path(tmp) / f"{p}.log")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    rigs: dict[str, st.Rig] = {}
    ctls: dict[str, ControlClient] = {}
    rows: list[dict[str, Any]] = []
    try:
        if pin:
            os.sched_setaffinity(0, {0})
            for s in servers.values():
                os.sched_setaffinity(s.pid, {1})
        for p, srv in servers.items():
            rigs[p] = st.Rig(p, srv)
            rigs[p].prefill()
            ctls[p] = ControlClient(default_control_socket(srv.path))
        for qd in qds:
            for p in paths:
                ios = max(qd, int(IOS.get(qd, 50_000) * args.ios_scale) // qd * qd)
                r = measure_point(rigs[p], ctls[p], qd, ios, args, seed=qd)
                rows.append(r)
                print(f"{p:16} QD{qd:<4} {r['iops']:>9,.0f} IOPS  vias {','.join(r['vias'])}", flush=True)
    finally:
        for c in ctls.values():
            c.close()
        for rig in rigs.values():
            try:
                rig.close()
            except Exception as e:
                print(f"close: {e}", file=sys.stderr)
        for s in servers.values():
            s.stop()
    columns = [("path", "path", ""), ("qd", "QD", "d"), ("iops", "IOPS", ",.0f"), ("vias", "via(s)", "")]
    columns += [(s.name.lower(), s.name.lower() + " us", ".2f") for s in Stage]
    table = common.format_table(table_rows(rows), columns)
    print("\nmedian (p50) per stage, us; per batch unless the stage is per command (backend, service, worker stages)\n")
    print(table)
    name = "latency_anatomy" + (f"-{args.label}" if args.label else "")
    out = Path(args.out)
    common.write_json(out / f"{name}.json", {
        "benchmark": "latency_anatomy",
        "machine": mach,
        "method": __doc__,
        "config": {"paths": paths, "qds": qds, "sample_every": args.sample, "pinned": pin, "namespace": f"ram:size={st.NS_SIZE}"},
        "results": rows,
        "table": table,
    })
    plot(rows, out / f"{name}.png", f"nvme-emu latency anatomy, 4 KiB randread, RAM namespace (1 batch in {args.sample} stamped)\n"
         f"{common.describe_machine(mach)}")
    print(f"\nwrote {out / (name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
