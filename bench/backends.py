"""The same NVMe workload on both vfio-user backends: our Python server and libvfio-user.

4 KiB random reads from a RAM namespace, doorbells trapped (every doorbell is a
REGION_WRITE message, so the backend's message handling is on the critical path), driven by
the test host driver (nvme_emu.testing.host.NvmeHost) over our blocking client, at QD1 and QD32.
QD1: one command, ring, wait, reap. QD32: 32 commands, one SQ doorbell, wait for all 32,
one CQ doorbell. Both backends run in one invocation, interleaved, so they share the
machine's state; nothing here asserts on speed.

    python bench/backends.py [--ios 20000] [--qd 1 32] [--rounds 2]

Writes bench/results/backends.json (+ .png when matplotlib is importable) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path


import common
from nvme_emu.testing.host import HostMemory, NvmeHost
from nvme_emu.spec.commands import NvmOpcode
from vfio_user.vmm.client import GuestRam, VfioUserClient
from vfio_user.libvfio.library import unavailable_reason

IOVA = 0x1000_0000
RAM = 64 << 20
NS_SIZE = 256 << 20
LBA = 512
BLOCK = 4096


def run_backend(backend: str, qd: int, ios: int, tmp: str, seed: int) -> dict:
    sock = os.path.join(tmp, f"{backend}-{qd}.sock")
    srv = common.serve(
        sock, ["--backend", backend, "--doorbell", "trap", "--namespace", f"ram:size={NS_SIZE >> 20}M", "--queues", "4"], Path(tmp) / f"{backend}-{qd}.log"
    )
    try:
        client = VfioUserClient(sock, timeout=30)
        client.negotiate()
        ram = GuestRam(RAM)
        client.dma_map(IOVA, RAM, ram)
        host = NvmeHost(client, HostMemory(ram.view, IOVA))
        host.enable()
        depth = 256
        host.create_io_queue_pair(1, depth)
        bufs = [host.mem.alloc(BLOCK) for _ in range(qd)]
        rng = random.Random(seed)
        nblocks = NS_SIZE // BLOCK
        warm = max(qd, min(ios, 2000) // qd * qd)
        lbas = [rng.randrange(nblocks) * (BLOCK // LBA) for _ in range(ios + warm)]
        nlb = BLOCK // LBA - 1

        def batch(start: int, n: int) -> None:
            for i in range(n):
                host.submit(1, NvmOpcode.READ, nsid=1, prp1=bufs[i], cdw10=lbas[start + i], cdw12=nlb, ring=False)
            host.ring_sq(1)
            got = host.wait(1, n, timeout=30)
            bad = [c for c in got if c.status]
            if bad:
                raise RuntimeError(f"I/O failed: {bad[0]}")

        for i in range(ios, ios + warm, qd):  # warm-up, on LBAs the measured run does not use
            batch(i, qd)
        lat = []
        cpu0 = srv.cpu_seconds()
        t0 = time.perf_counter()
        done = 0
        while done + qd <= ios:
            b0 = time.perf_counter()
            batch(done, qd)
            lat.append(time.perf_counter() - b0)
            done += qd
        elapsed = time.perf_counter() - t0
        cpu = srv.cpu_seconds() - cpu0
        client.close()
        ram.close()
    finally:
        srv.stop()
    p50, p99 = common.percentile(lat, 50), common.percentile(lat, 99)
    assert p50 is not None and p99 is not None  # one sample per batch, and there was one
    return {
        "backend": backend,
        "qd": qd,
        "ios": done,
        "seconds": round(elapsed, 3),
        "iops": round(done / elapsed),
        "lat_p50_us": round(p50 * 1e6, 1),
        "lat_p99_us": round(p99 * 1e6, 1),
        "lat_kind": "per I/O" if qd == 1 else f"per batch of {qd}",
        "server_cpu_us_per_io": round(cpu / done * 1e6, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ios", type=int, default=20000)
    ap.add_argument("--qd", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=2, help="alternate the backends this many times; the best round is kept")
    ap.add_argument("--out", default=str(common.RESULTS / "backends.json"))
    args = ap.parse_args()
    reason = unavailable_reason()
    backends = ["python"] + (["libvfio-user"] if reason is None else [])
    if reason is not None:
        print(f"libvfio-user not installed, python backend only: {reason}", file=sys.stderr)
    machine = common.machine()
    machine["uname"] = " ".join(platform.uname())
    print(common.describe_machine(machine))
    rows = []
    with tempfile.TemporaryDirectory(prefix="nvme-emu-bench-", dir="/tmp") as tmp:
        for qd in args.qd:
            best: dict[str, dict] = {}
            for rnd in range(args.rounds):
                for backend in backends if rnd % 2 == 0 else backends[::-1]:
                    r = run_backend(backend, qd, args.ios, tmp, seed=qd)
                    print(f"  round {rnd} {backend} QD{qd}: {r['iops']} IOPS", flush=True)
                    if backend not in best or r["iops"] > best[backend]["iops"]:
                        best[backend] = r
            rows += [best[b] for b in backends]
    base = {r["qd"]: r["iops"] for r in rows if r["backend"] == "python"}
    for r in rows:
        r["vs_python"] = round(r["iops"] / base[r["qd"]], 2)
    cols = [
        ("backend", "backend", ""),
        ("qd", "QD", ""),
        ("iops", "IOPS", ",d"),
        ("vs_python", "x python", ".2f"),
        ("lat_p50_us", "p50 us", ".1f"),
        ("lat_p99_us", "p99 us", ".1f"),
        ("lat_kind", "latency of", ""),
        ("server_cpu_us_per_io", "server CPU us/IO", ".1f"),
    ]
    print()
    print("4 KiB random read, RAM namespace, trapped doorbells, NvmeHost over VfioUserClient")
    print(common.format_table(rows, cols))
    lib_version = None
    if reason is None:
        from vfio_user.libvfio.library import load_library

        lib_version = load_library().path
    out = Path(args.out)
    common.write_json(
        out,
        {
            "benchmark": "backends",
            "workload": {
                "rw": "randread",
                "bs": BLOCK,
                "ios": args.ios,
                "qd": args.qd,
                "namespace": f"ram {NS_SIZE >> 20} MiB",
                "doorbells": "trap",
                "rounds": args.rounds,
                "kept": "best round per backend",
            },
            "machine": machine,
            "libvfio_user": lib_version,
            "results": rows,
        },
    )
    print(f"\nwrote {out}")
    plt = common.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        qds = sorted({r["qd"] for r in rows})
        width = 0.8 / len(backends)
        for i, b in enumerate(backends):
            vals = [next(r["iops"] for r in rows if r["backend"] == b and r["qd"] == q) for q in qds]
            ax.bar([x + i * width for x in range(len(qds))], vals, width, label=b)
        ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(qds))], [f"QD{q}" for q in qds])
        ax.set_ylabel("IOPS (4 KiB random read)")
        ax.set_title("nvme-emu: vfio-user backends, trapped doorbells")
        ax.legend()
        fig.tight_layout()
        png = out.with_suffix(".png")
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
