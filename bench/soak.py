"""Soak: many queues at QD128, mixed verified read/write, for minutes; memory and fds stable.

A server process (``python -m nvme_emu serve``, a RAM and a file namespace) is driven by the
Python host driver over the vfio-user client: ``--queues`` I/O queue pairs, each kept at
``--qd`` outstanding 4 KiB commands (70 % reads, 30 % writes, 1 in 8 writes FUA, a Flush per
queue every 256 writes), random LBAs over both namespaces. Every write stamps its slot with a
new generation and every read checks the stamp it finds against the last completed write, so
the soak also verifies data. Every ``--sample`` seconds it records the server's RSS, fd count
and guest-memory mappings; halfway through, the client disconnects and reconnects (queues,
mappings and eventfds rebuilt) to soak the teardown path too.

It stops by itself after ``--duration`` seconds and writes ``bench/results/soak.json`` and
``soak.md``. Exit status 1 when a check fails: data mismatch, error status, fd count not back
to its baseline after the client left, or RSS growing more than ``--rss-slack`` MiB between
the first sample after warm-up and the last.

    python bench/soak.py --duration 180
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

import common
from nvme_emu.testing.host import HostMemory, NvmeHost
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.features import FeatureId
from vfio_user.constants import IrqIndex
from vfio_user.vmm.client import GuestRam, VfioUserClient

REPO = common.REPO
RESULTS = common.RESULTS

IOVA = 0x100000
SLOT = 4096
NS_BYTES = {1: 256 << 20, 2: 256 << 20}


def start_server(sock: str, disk: str, log: str, queues: int) -> common.ServerProcess:
    """The server under soak: a RAM and a file namespace, trapped doorbells."""
    return common.serve(sock, ["--doorbell", "trap", "--queues", str(queues), "--namespace", f"ram:size={NS_BYTES[1]}",
                               "--namespace", f"file:{disk},size={NS_BYTES[2]}"], Path(log))


def stamp(gen: int, nsid: int, slot: int) -> bytes:
    return struct.pack("<QII", gen, nsid, slot) * (SLOT // 16)


class Session:
    """One client attachment: guest RAM, queues, a buffer per outstanding command."""

    def __init__(self, sock: str, queues: int, qd: int) -> None:
        self.client = VfioUserClient(sock, timeout=30)
        self.client.negotiate()
        self.ram_size = (queues * (qd * SLOT + 2 * 65536) + (4 << 20) + 0xFFFFF) & ~0xFFFFF
        self.ram = GuestRam(self.ram_size)
        self.client.dma_map(IOVA, self.ram_size, self.ram)
        for start in range(0, queues + 1, 8):  # the server takes at most 8 fds per message
            self.client.enable_irqs(IrqIndex.MSIX, min(8, queues + 1 - start), start)
        self.mem = HostMemory(self.ram.view, IOVA)
        self.host = NvmeHost(self.client, self.mem)
        self.host.enable()
        self.host.admin(AdminOpcode.SET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES, cdw11=(queues - 1) << 16 | (queues - 1))
        self.bufs: dict[int, list[int]] = {}
        for qid in range(1, queues + 1):
            self.host.create_io_queue_pair(qid, qd + 1)
            self.bufs[qid] = [self.mem.alloc(SLOT) for _ in range(qd)]

    def close(self) -> None:
        self.client.close()
        self.ram.close()


def run(args: argparse.Namespace) -> dict:
    tmp = tempfile.mkdtemp(prefix="nvme-emu-soak-")
    sock, disk, log = os.path.join(tmp, "s.sock"), os.path.join(tmp, "disk.img"), os.path.join(tmp, "server.log")
    srv = start_server(sock, disk, log, args.queues)
    try:
        return _run(args, srv, sock, log)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        try:
            os.unlink(disk)  # up to 256 MiB; the server log stays for inspection
        except OSError:
            pass


def _run(args: argparse.Namespace, srv: common.ServerProcess, sock: str, log: str) -> dict:
    # baseline: after one full client session (the event loop allocates some fds lazily)
    c = VfioUserClient(sock)
    c.negotiate()
    c.close()
    time.sleep(0.3)
    base_fds = srv.fd_count()
    rng = random.Random(args.seed)
    nslots = {ns: NS_BYTES[ns] // SLOT for ns in NS_BYTES}
    gen_done: dict[tuple[int, int], int] = {}  # (nsid, slot) -> generation of last completed write
    busy: set[tuple[int, int]] = set()
    gen = 0
    totals = {"reads": 0, "writes": 0, "fua_writes": 0, "flushes": 0, "verified_reads": 0, "errors": 0, "mismatches": 0, "reconnects": 0}
    samples = []
    start = time.monotonic()
    end = start + args.duration
    next_sample = start
    reconnect_at = start + args.duration / 2
    io_at_last = 0
    t_last = start
    cpu_last = srv.cpu_seconds()
    failures: list[str] = []

    def attach() -> tuple[Session, dict]:
        s = Session(sock, args.queues, args.qd)
        st = {qid: {"inflight": {}, "free": list(range(args.qd)), "writes": 0} for qid in range(1, args.queues + 1)}
        return s, st

    sess, qstate = attach()

    def submit(qid: int) -> bool:
        nonlocal gen
        q = qstate[qid]
        if not q["free"] or len(q["inflight"]) >= args.qd:  # the SQ holds qd + 1 entries
            return False
        if q["writes"] >= 256:
            q["writes"] = 0
            cid = sess.host.submit(qid, NvmOpcode.FLUSH, nsid=0xFFFFFFFF, ring=False)
            q["inflight"][cid] = ("flush", None, None, None)
            return True
        nsid = 1 + (rng.random() < 0.5)
        for _ in range(8):
            slot = rng.randrange(nslots[nsid])
            if (nsid, slot) not in busy:
                break
        else:
            return False
        b = q["free"].pop()
        addr = sess.bufs[qid][b]
        busy.add((nsid, slot))
        if rng.random() < 0.7:
            cid = sess.host.submit(qid, NvmOpcode.READ, nsid=nsid, prp1=addr, cdw10=slot * (SLOT // 512), cdw12=SLOT // 512 - 1, ring=False)
            q["inflight"][cid] = ("read", nsid, slot, b)
        else:
            gen += 1
            fua = rng.random() < 0.125
            sess.mem.write(addr, stamp(gen, nsid, slot))
            cid = sess.host.submit(
                qid, NvmOpcode.WRITE, nsid=nsid, prp1=addr, cdw10=slot * (SLOT // 512), cdw12=(SLOT // 512 - 1) | (1 << 30 if fua else 0), ring=False
            )
            q["inflight"][cid] = ("write", nsid, slot, (b, gen, fua))
            q["writes"] += 1
        return True

    def complete(qid: int) -> int:
        q = qstate[qid]
        done = sess.host.reap(qid)
        for c in done:
            kind, nsid, slot, extra = q["inflight"].pop(c.cid)
            if c.status != Status.SUCCESS:
                totals["errors"] += 1
            if kind == "flush":
                totals["flushes"] += 1
                continue
            busy.discard((nsid, slot))
            if kind == "read":
                q["free"].append(extra)
                totals["reads"] += 1
                data = sess.mem.read(sess.bufs[qid][extra], 16)
                want = gen_done.get((nsid, slot))
                if want is not None:
                    totals["verified_reads"] += 1
                    if data != stamp(want, nsid, slot)[:16]:
                        totals["mismatches"] += 1
            else:
                b, g, fua = extra
                q["free"].append(b)
                totals["writes"] += 1
                totals["fua_writes"] += fua
                if c.status == Status.SUCCESS:
                    gen_done[(nsid, slot)] = g
        return len(done)

    try:
        while True:
            now = time.monotonic()
            if now >= next_sample or now >= end:
                io = totals["reads"] + totals["writes"]
                cpu = srv.cpu_seconds()
                rss = srv.memory_kb()
                samples.append({
                    "t": round(now - start, 2),
                    "rss_kb": rss["VmRSS"],
                    "anon_kb": rss["RssAnon"],
                    "shmem_kb": rss["RssShmem"],
                    "fds": srv.fd_count(),
                    "guest_mappings": srv.guest_mappings(),
                    "iops": round((io - io_at_last) / max(1e-9, now - t_last)),
                    "server_cpu": round((cpu - cpu_last) / max(1e-9, now - t_last), 3),
                    "io_total": io,
                })
                print(
                    f"[soak] t={samples[-1]['t']:7.1f}s iops={samples[-1]['iops']:6d} rss={samples[-1]['rss_kb'] // 1024} MiB "
                    f"anon={samples[-1]['anon_kb'] // 1024} MiB fds={samples[-1]['fds']} maps={samples[-1]['guest_mappings']} io={io} "
                    f"errors={totals['errors']} mismatches={totals['mismatches']}",
                    flush=True,
                )
                io_at_last, t_last, cpu_last = io, now, cpu
                next_sample = now + args.sample
                if now >= end:
                    break
            if now >= reconnect_at:
                reconnect_at = float("inf")
                # drain, then leave and come back: teardown and rebuild under load
                deadline = time.monotonic() + 30
                while any(qstate[q]["inflight"] for q in qstate) and time.monotonic() < deadline:
                    for qid in qstate:
                        complete(qid)
                if any(qstate[q]["inflight"] for q in qstate):
                    failures.append("commands never completed (before the reconnect)")
                sess.close()
                totals["reconnects"] += 1
                time.sleep(0.2)
                sess, qstate = attach()
                continue
            for qid in qstate:
                while submit(qid):
                    pass
                sess.host.ring_sq(qid)
            for qid in qstate:
                complete(qid)
            if srv.proc.poll() is not None:
                failures.append(f"server died with status {srv.proc.returncode}")
                break
        deadline = time.monotonic() + 30
        while any(qstate[q]["inflight"] for q in qstate) and time.monotonic() < deadline:
            for qid in qstate:
                complete(qid)
        if any(qstate[q]["inflight"] for q in qstate):
            failures.append("commands never completed (at the end)")
        stalls = sum(1 for x in samples[1:-1] if x["iops"] == 0)
        if stalls:
            failures.append(f"{stalls} sample intervals without a single completion")
    finally:
        sess.close()
    time.sleep(0.5)
    fds_after = srv.fd_count()
    maps_after = srv.guest_mappings()
    rc = srv.stop()
    warm = [s for s in samples if s["t"] >= args.warmup] or samples
    rss_growth_mib = (warm[-1]["anon_kb"] - warm[0]["anon_kb"]) / 1024
    fd_values = sorted({s["fds"] for s in samples})
    if totals["errors"]:
        failures.append(f"{totals['errors']} commands failed")
    if totals["mismatches"]:
        failures.append(f"{totals['mismatches']} reads returned the wrong data")
    if fds_after != base_fds:
        failures.append(f"server holds {fds_after} fds after the client left (baseline {base_fds})")
    if maps_after:
        failures.append(f"server still maps {maps_after} guest-memory ranges after the client left")
    if rss_growth_mib > args.rss_slack:
        failures.append(f"server anonymous RSS grew {rss_growth_mib:.1f} MiB after warm-up (slack {args.rss_slack})")
    if rc != 0:
        failures.append(f"server exit status {rc} on SIGTERM")
    return {
        "benchmark": "soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": common.machine(),
        "config": {k: v for k, v in vars(args).items()},
        "namespaces": {"1": f"ram {NS_BYTES[1] >> 20} MiB", "2": f"file {NS_BYTES[2] >> 20} MiB (tmp)"},
        "totals": totals,
        "baseline_fds": base_fds,
        "fds_during_run": fd_values,
        "fds_after_client_left": fds_after,
        "guest_mappings_after_client_left": maps_after,
        "anon_rss_growth_after_warmup_mib": round(rss_growth_mib, 1),
        "server_exit_status": rc,
        "samples": samples,
        "failures": failures,
        "passed": not failures,
        "server_log": log,
    }


def write_results(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    s = res["samples"]
    t = res["totals"]
    cfg = res["config"]
    lines = [
        "# Soak run",
        "",
        f"{res['when']}: `python bench/soak.py --duration {cfg['duration']} --queues {cfg['queues']} --qd {cfg['qd']}` "
        f"({cfg['queues']} I/O queue pairs x QD{cfg['qd']}, 4 KiB, 70/30 read/write, 1/8 writes FUA, Flush every 256 writes per queue, "
        "RAM + file namespaces, trapped doorbells, one client reconnect halfway).",
        "",
        f"Result: **{'PASS' if res['passed'] else 'FAIL'}**" + ("" if res["passed"] else ": " + "; ".join(res["failures"])),
        "",
        "| | |",
        "|---|---|",
        f"| commands | {t['reads']} reads ({t['verified_reads']} verified against the last write), {t['writes']} writes ({t['fua_writes']} FUA), "
        f"{t['flushes']} flushes |",
        f"| errors / data mismatches | {t['errors']} / {t['mismatches']} |",
        f"| mean IOPS | {round(s[-1]['io_total'] / max(1e-9, s[-1]['t'])) if s else 0} (Python host driver and server sharing "
        f"{res['machine'].get('cpus', '?')} CPUs) |",
        f"| server fds | baseline {res['baseline_fds']}, during run {res['fds_during_run']}, after client left {res['fds_after_client_left']} |",
        f"| guest mappings after client left | {res['guest_mappings_after_client_left']} |",
        f"| server RSS | {s[0]['rss_kb'] // 1024 if s else 0} MiB at start, {s[-1]['rss_kb'] // 1024 if s else 0} MiB at end, of which "
        f"RAM-namespace memfd {s[-1]['shmem_kb'] // 1024 if s else 0} MiB (fills as LBAs are first written) |",
        f"| server anonymous RSS (heap) | {s[0]['anon_kb'] // 1024 if s else 0} MiB at start, {s[-1]['anon_kb'] // 1024 if s else 0} MiB at end; "
        f"growth after warm-up {res['anon_rss_growth_after_warmup_mib']} MiB (limit {cfg['rss_slack']}) |",
        f"| reconnects under load | {t['reconnects']} |",
        f"| SIGTERM exit status | {res['server_exit_status']} |",
        "",
        "| t (s) | IOPS | server CPU | RSS (MiB) | anon RSS (MiB) | fds | guest maps |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in s:
        lines.append(
            f"| {x['t']} | {x['iops']} | {x['server_cpu']} | {x['rss_kb'] / 1024:.1f} | {x['anon_kb'] / 1024:.1f} | {x['fds']} | {x['guest_mappings']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (the run stops by itself)")
    p.add_argument("--queues", type=int, default=8)
    p.add_argument("--qd", type=int, default=128)
    p.add_argument("--sample", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=20.0, help="RSS growth is measured from the first sample after this")
    p.add_argument("--rss-slack", type=float, default=24.0, help="MiB of RSS growth tolerated after warm-up")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "soak"), help="results path without suffix (.json and .md are written)")
    args = p.parse_args(argv)
    res = run(args)
    write_results(res, Path(args.out))
    print(f"[soak] {'PASS' if res['passed'] else 'FAIL'}: " + ("; ".join(res["failures"]) or "fds, mappings and RSS stable, all data verified"))
    print(f"[soak] results: {Path(args.out).with_suffix('.md')}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
