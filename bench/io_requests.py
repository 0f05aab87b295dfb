"""Asynchronous backends, measured on a real server: does the loop stay free, and what does
a file namespace cost next to RAM?

1. ``blocked``: while a long command runs on one namespace, 4 KiB QD1 reads on another
   queue (to a RAM namespace) measure how long the event loop was unavailable. Commands:
   Format NVM of an 8 GiB file namespace whose first GiB holds fresh (dirty) data, and
   1 GiB of Write Zeroes (4 x 256 MiB, the most one command can zero with 4 KiB LBAs) on a
   file namespace holding 1 GiB of fresh data. Trapped doorbells, the plain host driver
   sleeping on the MSI-X eventfd between completions.
2. ``file-vs-ram``: 4 KiB random reads, QD1 and QD32, file namespace (page cache warm: the
   prefill writes every block, then ``sync`` cleans it) against RAM, with
   ``server_throughput``'s client and paths.

Both run every tree given (``--compare-tree before=DIR``) side by side. Usage:
``./dev bench io_requests [--compare-tree before=DIR] [--parts blocked,file-vs-ram]``.
Writes ``results/io_requests.json``.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import tempfile
import time
from pathlib import Path

import common
import server_throughput as st

from nvme_emu.testing.host import HostMemory, NvmeHost
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from vfio_user.vmm.client import GuestRam, VfioUserClient
from vfio_user.constants import IrqIndex

GiB = 1 << 30
FORMAT_SIZE = 8 * GiB
WZ_CMD_BLOCKS = 1 << 16  #: NLB is 16 bits: 65536 blocks of 4 KiB = 256 MiB per command
IOVA = 0x1000_0000
PAGE = 4096


def fill(path: str, length: int) -> None:
    """Write ``length`` bytes of non-zero data from the start (left dirty in the page cache)."""
    chunk = os.urandom(8 << 20)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, length, len(chunk)):
            os.pwrite(fd, chunk, off)
    finally:
        os.close(fd)


class Client:
    """The host driver with I/O pairs 1 (reads) and 2 (Write Zeroes)."""

    def __init__(self, sock: str) -> None:
        self.client = VfioUserClient(sock, timeout=120)
        self.client.negotiate()
        self.ram = GuestRam(16 << 20)
        self.client.dma_map(IOVA, 16 << 20, self.ram)
        self.irq_fds = self.client.enable_irqs(IrqIndex.MSIX, 3)
        self.mem = HostMemory(self.ram.view, IOVA)
        self.host = NvmeHost(self.client, self.mem)
        self.host.enable()
        self.host.set_features(0x07, 1 << 16 | 1)
        self.host.create_io_queue_pair(1, 64)
        self.host.create_io_queue_pair(2, 64)
        self.buf = self.mem.alloc(PAGE)

    def read_latency(self) -> float:
        """One 4 KiB read of the RAM namespace (nsid 1), submit to completion, seconds."""
        t = time.perf_counter()
        self.host.submit(1, NvmOpcode.READ, nsid=1, prp1=self.buf, cdw10=(int(t * 1e6) % 4096) * 8, cdw12=7)
        while not (got := self.host.reap(1)):
            # sleep on queue 1's MSI-X eventfd: a spinning client would take the CPU the
            # server's loop and its I/O worker need (2 CPUs here)
            select.select([self.irq_fds[1]], [], [], 0.05)
            try:
                os.eventfd_read(self.irq_fds[1])
            except BlockingIOError:
                pass
        assert got[0].status == Status.SUCCESS, got[0]
        return time.perf_counter() - t

    def close(self) -> None:
        self.client.close()
        self.ram.close()


def run_blocked(label: str, tree: str | None, tmp: str, op: str, dirty: int) -> dict:
    if op == "wz":
        dirty = min(dirty, GiB)  # the Write Zeroes namespace is 1 GiB
    fmt_path, wz_path = os.path.join(tmp, f"format-{label}.img"), os.path.join(tmp, f"wz-{label}.img")
    for p in (fmt_path, wz_path):
        if os.path.exists(p):
            os.unlink(p)
    args = ["--doorbell", "trap", "--namespace", "ram:size=256M", "--namespace", f"file:{fmt_path},size={FORMAT_SIZE}",
            "--namespace", f"file:{wz_path},size={GiB},lba=4096"]
    server = common.serve(os.path.join(tmp, f"blocked-{label}.sock"), args, Path(tmp) / f"blocked-{label}-{op}.log", tree=tree)
    try:
        c = Client(server.path)
        try:
            for _ in range(200):  # warm-up, and the idle baseline
                c.read_latency()
            idle = [c.read_latency() for _ in range(500)]
            fill(fmt_path if op == "format" else wz_path, dirty)
            t0 = time.perf_counter()
            if op == "format":
                c.host.submit(0, AdminOpcode.FORMAT_NVM, nsid=2, cdw10=0)
                pending = {0: 1}
            else:
                for i in range(GiB // (WZ_CMD_BLOCKS * PAGE)):
                    c.host.submit(2, NvmOpcode.WRITE_ZEROES, nsid=3, cdw10=i * WZ_CMD_BLOCKS, cdw12=WZ_CMD_BLOCKS - 1)
                pending = {2: GiB // (WZ_CMD_BLOCKS * PAGE)}
            lat: list[float] = []
            while any(pending.values()):
                lat.append(c.read_latency())
                for qid in pending:
                    for done in c.host.reap(qid):
                        assert done.status == Status.SUCCESS, done
                        pending[qid] -= 1
            op_seconds = time.perf_counter() - t0
        finally:
            c.close()
    finally:
        server.stop()
        for p in (fmt_path, wz_path):
            os.unlink(p)
    ms = [x * 1e3 for x in lat]
    return {
        "tree": label,
        "op": "Format 8 GiB" if op == "format" else "Write Zeroes 1 GiB",
        "dirty_gib": dirty / GiB,
        "op_seconds": op_seconds,
        "reads": len(lat),
        "idle_p99_ms": common.percentile([x * 1e3 for x in idle], 99),
        "p50_ms": common.percentile(ms, 50),
        "p99_ms": common.percentile(ms, 99),
        "max_ms": max(ms),
    }


def run_file_vs_ram(trees: dict[str, str | None], tmp: str, paths: list[str], qds: list[int], rounds: int) -> list[dict]:
    rigs = {}
    try:
        for label, tree in trees.items():
            for kind in ("ram", "file"):
                ns = f"ram:size={st.NS_SIZE}" if kind == "ram" else f"file:{os.path.join(tmp, f'ns-{label}.img')},size={st.NS_SIZE}"
                for p in paths:
                    key = (label, kind, p)
                    server = common.serve(
                        os.path.join(tmp, f"{label}-{kind}-{p}.sock"),
                        ["--doorbell", st.SERVER_MODE[p], "--namespace", ns, "--queues", "4"],
                        Path(tmp) / f"{label}-{kind}-{p}.log",
                        tree=tree,
                    )
                    rigs[key] = st.Rig(p, server)
                    if kind == "ram" or p == paths[0]:
                        rigs[key].prefill()  # every block written: the file's pages are cached
        # Clean as well as cached: without this the flusher writes the prefill back (30 s
        # later, in the middle of the points) on one of the two CPUs the points run on.
        t = time.perf_counter()
        os.sync()
        print(f"prefilled namespaces written back in {time.perf_counter() - t:.1f} s", flush=True)
        results = []
        for qd in qds:
            per_key: dict[tuple, list[dict]] = {k: [] for k in rigs}
            for r in range(rounds):
                for key, rig in rigs.items():  # interleaved: machine load hits all alike
                    per_key[key].append(st.measure(rig, "randread", qd, st.IOS[qd], 2.0, seed=r))
            for (label, kind, p), rs in per_key.items():
                rs.sort(key=lambda x: x["iops"])
                m = rs[len(rs) // 2]
                results.append({"tree": label, "namespace": kind, "path": p, "qd": qd, "iops": m["iops"],
                                "server_cpu_us_per_io": m["server_cpu_us_per_io"], "lat_p99_us": m["lat_p99_us"],
                                "to_workers_per_io": m["to_workers_per_io"]})
        ram = {(r["tree"], r["path"], r["qd"]): r["iops"] for r in results if r["namespace"] == "ram"}
        for row in results:
            row["vs_ram"] = row["iops"] / ram[(row["tree"], row["path"], row["qd"])]
        return results
    finally:
        for rig in rigs.values():
            rig.close()
            rig.server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="blocked,file-vs-ram")
    ap.add_argument("--compare-tree", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--label", default="now", help="label of this tree")
    ap.add_argument("--paths", default="shadow,poll", help="file-vs-ram doorbell paths")
    ap.add_argument("--qd", default="1,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dirty-gib", type=int, default=1, help="GiB of fresh data in the namespace before Format / Write Zeroes")
    ap.add_argument("--dir", default="/tmp", help="where namespace files go (needs ~3 GiB)")
    args = ap.parse_args()
    trees: dict[str, str | None] = {args.label: None}
    for item in args.compare_tree:
        label, _, d = item.partition("=")
        trees[label] = d
    mach = common.machine()
    print("machine:", common.describe_machine(mach), flush=True)
    out: dict = {"machine": mach, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="nvme-emu-io-requests-", dir=args.dir) as tmp:
        if "blocked" in args.parts:
            rows = [run_blocked(label, tree, tmp, op, args.dirty_gib * GiB) for op in ("format", "wz") for label, tree in trees.items()]
            print(
                common.format_table(
                    rows,
                    [
                        ("tree", "tree", ""),
                        ("op", "command", ""),
                        ("op_seconds", "cmd s", ".2f"),
                        ("reads", "QD1 reads", "d"),
                        ("idle_p99_ms", "idle p99 ms", ".3f"),
                        ("p50_ms", "p50 ms", ".3f"),
                        ("p99_ms", "p99 ms", ".3f"),
                        ("max_ms", "max ms", ".1f"),
                    ],
                ),
                flush=True,
            )
            out["blocked"] = rows
        if "file-vs-ram" in args.parts:
            rows = run_file_vs_ram(trees, tmp, args.paths.split(","), [int(q) for q in args.qd.split(",")], args.rounds)
            print(
                common.format_table(
                    rows,
                    [
                        ("tree", "tree", ""),
                        ("path", "path", ""),
                        ("namespace", "namespace", ""),
                        ("qd", "QD", "d"),
                        ("iops", "IOPS", ",.0f"),
                        ("server_cpu_us_per_io", "srv CPU us/IO", ".2f"),
                        ("lat_p99_us", "p99 us", ".1f"),
                        ("vs_ram", "vs RAM", ".2f"),
                        ("to_workers_per_io", "to workers/IO", ".3f"),
                    ],
                ),
                flush=True,
            )
            out["file_vs_ram"] = rows
    path = common.write_json(common.RESULTS / "io_requests.json", out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
