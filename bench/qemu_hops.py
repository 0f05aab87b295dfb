"""The two hops of a QD1 I/O as QEMU sees them: doorbell -> interrupt, interrupt -> next doorbell.

fio's completion latency in a guest is one number; the server's latency anatomy (``nvme-emu
ctl latency``) covers only what happens inside the server. This benchmark asks QEMU itself,
through its trace events (``-trace`` with ``-msg timestamp=on``, wall-clock microseconds):

- nvme-emu: ``vfio_region_write`` of an I/O SQ tail doorbell (the vCPU's MMIO write, just
  before QEMU sends the REGION_WRITE) -> ``vfio_msi_interrupt`` (QEMU's main loop read the
  server's interrupt eventfd) -> the next SQ tail ``vfio_region_write``;
- QEMU's own NVMe (on the file, and the floor: on ``null-co``): ``pci_nvme_mmio_doorbell_sq``
  -> ``pci_nvme_irq_msix`` -> the next ``pci_nvme_mmio_doorbell_sq``.

So *doorbell -> irq* is the device's whole turn (for nvme-emu: the socket hop, the server, the
eventfd hop into QEMU's main loop), and *irq -> doorbell* the guest's (interrupt delivery,
the driver, fio, the next submission). At QD1 every I/O is one of each. Tracing costs QEMU
a few microseconds per event on every device alike; read the figures side by side.

    ./dev bench qemu_hops                       # 4k randread QD1, 3 rounds, the three devices
    ./dev bench qemu_hops --rw randwrite --emu-variant wk='--inline-write-budget-us 0'
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import common
import fio_vs_qemu


EVENTS = ("vfio_region_write", "vfio_msi_interrupt", "pci_nvme_mmio_doorbell_sq", "pci_nvme_irq_msix")
LINE_RE = re.compile(r"^(\S+)Z (\w+) (.*)$")
#: an I/O SQ tail doorbell of nvme-emu's BAR0 (0x1000 + 8*qid, qid >= 1), and its value
VFIO_DB_RE = re.compile(r"region0\+0x([0-9a-f]+), 0x([0-9a-f]+), 4\)")


def hops(trace: str) -> dict[str, list[float]]:
    """(doorbell -> irq, irq -> next doorbell) intervals in us from a QEMU trace log."""
    d2i: list[float] = []
    i2d: list[float] = []
    last_db = last_irq = None
    for line in trace.splitlines():
        m = LINE_RE.match(line.strip())
        if m is None:
            continue
        name, args = m.group(2), m.group(3)
        if name == "vfio_region_write":
            db = VFIO_DB_RE.search(args)
            if db is None:
                continue
            off = int(db.group(1), 16)
            if off < 0x1008 or off & 4:  # admin queue, CQ heads, registers
                continue
        elif name == "pci_nvme_mmio_doorbell_sq":
            if "sqid 0 " in args + " ":
                continue
        elif name not in ("vfio_msi_interrupt", "pci_nvme_irq_msix"):
            continue
        t = datetime.fromisoformat(m.group(1)).timestamp() * 1e6
        if name in ("vfio_region_write", "pci_nvme_mmio_doorbell_sq"):
            if last_irq is not None:
                i2d.append(t - last_irq)
                last_irq = None
            last_db = t
        else:
            if last_db is not None:
                d2i.append(t - last_db)
                last_db = None
            last_irq = t
    return {"doorbell_to_irq": d2i, "irq_to_doorbell": i2d}


def pct(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p10": None, "p50": None, "p90": None, "mean": None}
    v = sorted(values)
    n = len(v)
    return {"n": n, "p10": v[n // 10], "p50": v[n // 2], "p90": v[9 * n // 10], "mean": statistics.fmean(v)}


def run_one(device: str, variants: dict[str, list[str]], image: str, rw: str, runtime: float, workdir: str, rnd: int) -> dict[str, Any]:
    """One device's QD1 job with QEMU's trace on (the fio bench's device runs, plus the trace)."""
    trace_path = os.path.join(workdir, f"trace-{device}-{rnd}.log")
    job = "\n".join(["[global]", "filename=/dev/nvme0n1", "ioengine=io_uring", "direct=1", "time_based=1", f"runtime={runtime:g}",
                     "ramp_time=1", "size=1g", "randrepeat=0", "[qd1]", f"rw={rw}", "bs=4k", "iodepth=1"]) + "\n"
    qemu_args = [a for e in EVENTS for a in ("-trace", f"enable={e}")] + ["-msg", "timestamp=on", "-D", trace_path]
    jobs = dict.fromkeys((fio_vs_qemu.HW_NVME, fio_vs_qemu.FLOOR, fio_vs_qemu.EMU), job)
    res = fio_vs_qemu.run_device(device, variants, image, jobs, 600, workdir, rnd, "auto", extra_qemu_args=qemu_args)
    with open(trace_path, errors="replace") as f:
        h = hops(f.read())
    os.unlink(trace_path)
    return {"fio": res["jobs"]["qd1"], **{k: pct(v) for k, v in h.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--rw", default="randread", choices=["randread", "randwrite"])
    ap.add_argument("--emu-variant", type=fio_vs_qemu.parse_variant, action="append", default=[], metavar="NAME=SERVE-ARGS")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    variants: dict[str, list[str]] = {fio_vs_qemu.EMU: [], **dict(args.emu_variant)}
    devices = [fio_vs_qemu.HW_NVME, fio_vs_qemu.FLOOR, *variants]
    mach = common.machine()
    mach["busy_before"] = common.machine_busy()
    print("machine:", common.describe_machine(mach), flush=True)
    workdir = tempfile.mkdtemp(prefix="nvme-bench-hops-", dir="/tmp")
    image = os.path.join(workdir, "disk.raw")
    t0 = time.monotonic()
    rounds: list[dict[str, Any]] = []
    try:
        fio_vs_qemu.fill(image, fio_vs_qemu.FILE_SIZE)
        for rnd in range(args.rounds):
            order = devices[rnd % len(devices):] + devices[: rnd % len(devices)]
            got = {}
            for d in order:
                got[d] = res = run_one(d, variants, image, args.rw, args.runtime, workdir, rnd)
                print(f"[{rnd}] {d:8} clat p50 {res['fio']['clat_p50_us']:6.0f} us; doorbell->irq p50 {res['doorbell_to_irq']['p50'] or 0:6.0f}, "
                      f"irq->doorbell p50 {res['irq_to_doorbell']['p50'] or 0:6.0f} us (n={res['doorbell_to_irq']['n']})", flush=True)
            rounds.append({"round": rnd, "order": order, "devices": got})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def med(d: str, *path: str) -> float | None:
        vals = []
        for r in rounds:
            v: Any = r["devices"][d]
            for p in path:
                v = v[p]
            if v is not None:
                vals.append(v)
        return statistics.median(vals) if vals else None

    rows = []
    for d in devices:
        rows.append({"device": fio_vs_qemu.device_label(d, "", variants), "clat": med(d, "fio", "clat_p50_us"), "iops": med(d, "fio", "iops"),
                     "d2i": med(d, "doorbell_to_irq", "p50"), "d2i90": med(d, "doorbell_to_irq", "p90"),
                     "i2d": med(d, "irq_to_doorbell", "p50"), "i2d90": med(d, "irq_to_doorbell", "p90"),
                     "d2i_all": [r["devices"][d]["doorbell_to_irq"]["p50"] for r in rounds],
                     "i2d_all": [r["devices"][d]["irq_to_doorbell"]["p50"] for r in rounds]})
    table = common.format_table(rows, [("device", "device", ""), ("iops", "IOPS", ",.0f"), ("clat", "fio clat p50 us", ",.0f"),
                                       ("d2i", "doorbell->irq p50", ",.0f"), ("d2i90", "p90", ",.0f"),
                                       ("i2d", "irq->doorbell p50", ",.0f"), ("i2d90", "p90", ",.0f")])
    print(f"\n4k {args.rw} QD1, QEMU trace events, median over {args.rounds} round(s) of each round's percentiles (us)\n\n{table}")
    name = "qemu_hops" + (f"-{args.label}" if args.label else "")
    out = Path(args.out)
    common.write_json(out / f"{name}.json", {"benchmark": "qemu_hops", "machine": mach, "method": __doc__, "rw": args.rw,
                                             "variants": variants, "rows": rows, "rounds": rounds, "table": table,
                                             "elapsed_s": time.monotonic() - t0})
    plt = common.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        y = list(range(len(rows)))
        ax.barh(y, [r["d2i"] or 0 for r in rows], color="#c0392b", label="doorbell -> irq (the device's turn)")
        ax.barh(y, [r["i2d"] or 0 for r in rows], left=[r["d2i"] or 0 for r in rows], color="#7f8c8d",
                label="irq -> next doorbell (the guest's turn)")
        ax.set_yticks(y, [r["device"] for r in rows], fontsize=8)
        ax.set_xlabel("us (p50, median of rounds)")
        ax.legend(fontsize=8)
        ax.set_title(f"4k {args.rw} QD1 in a TCG guest, as QEMU's trace events see it\n{common.describe_machine(mach)}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
    print(f"wrote {out / (name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
