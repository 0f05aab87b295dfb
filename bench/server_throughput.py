"""Server throughput without a guest: a Python host drives nvme-emu through each doorbell path.

For every doorbell path a server runs as its own process (``python -m nvme_emu serve
--doorbell MODE --namespace ram:size=1G``); all of them are started up front and measured
interleaved point by point, so background noise hits every path alike. The client is the
real vfio-user client (memfd guest RAM DMA-mapped into the server, MSI-X eventfds) and
:class:`NvmeHost` for bring-up; the I/O loop itself is purpose-built so that the client is not
the bottleneck: SQEs for the whole run are precomputed (one bytes blob), a batch of QD of them
is copied into the SQ with one slice store, the doorbell is rung once, the client spins on the
phase bit of the batch's last CQE, checks all statuses at once, rings the CQ head and refills.

Doorbell paths (host side -> server side):

``trap``             posted REGION_WRITE messages (CQ head + SQ tail in one sendmsg)
``trap+dbbuf``       NVMe shadow doorbells + EventIdx, trapped write only when EventIdx asks
                     (what upstream QEMU + Linux do: ``--doorbell auto`` under QEMU)
``shadow``           shadow ioeventfd, KVM POST_WRITE emulated: store value in the shared
                     page, then eventfd_write (IoFd.emulate_post_write, inlined)
``ioeventfd+dbbuf``  NVMe shadow doorbells + EventIdx; plain eventfd signal when EventIdx asks
``shadow+dbbuf``     NVMe shadow doorbells + EventIdx; when EventIdx asks, the doorbell write is
                     a shadow ioeventfd with POST_WRITE emulated (what Linux does on a POST_WRITE
                     KVM with the doorbell agent)
``poll``             doorbell page mmapped from BAR0 (sparse area), a 4-byte store; the
                     server polls it adaptively

Measured per (path, workload, QD): IOPS; latency p50/p99 (QD1: per I/O; QD>1: per *batch*,
the time from writing the batch's SQEs to reaping its last CQE, i.e. what every I/O of the
batch waited at most); server CPU per I/O (utime+stime of the server process from
/proc/PID/stat, 10 ms ticks); server wake-ups per I/O (voluntary context switches of the server
process: each is the event loop going to sleep and being woken) and the device's own counters
(doorbells acted on, command batches, trapped writes, eventfd signals) from ``--stats-json``.

    ./dev bench server_throughput            # all paths, QD 1 8 32 128, randread+randwrite
    ./dev bench server_throughput --paths trap,poll --qd 128 --rw randread --profile cprofile
"""

from __future__ import annotations

import argparse
import gc
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import common
from tests.support.server import NVME_EMU_READY

from nvme_emu.atomics import fence
from nvme_emu.testing.host import HostDoorbells, HostMemory, NvmeHost
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode
from nvme_emu.spec.registers import Reg
from nvme_emu.sqe import SQE_DTYPE
from vfio_user.vmm.client import GuestRam, VfioUserClient
from vfio_user.constants import FLAG_NO_REPLY, Command, IrqIndex, MsgType
from vfio_user.messages import HEADER, REGION_ACCESS

PATHS = ["trap", "trap+dbbuf", "shadow", "shadow+dbbuf", "ioeventfd+dbbuf", "poll"]
SERVER_MODE = {"trap": "trap", "trap+dbbuf": "trap", "shadow": "shadow", "shadow+dbbuf": "shadow", "ioeventfd+dbbuf": "ioeventfd", "poll": "poll"}
QDS = [1, 8, 32, 128]
IOS = {1: 20_000, 8: 60_000, 32: 100_000, 128: 150_000}
WORKLOADS = {"randread": NvmOpcode.READ, "randwrite": NvmOpcode.WRITE}

IOVA = 0x1000_0000
RAM_SIZE = 64 << 20
PAGE = 4096
LBA = 512
QSIZE = 256  # every QD divides it: a batch never wraps the ring
NS_SIZE = 1 << 30
SQ_SLOT, CQ_SLOT = 2, 3  # doorbell slots of I/O queue pair 1 (DSTRD 0)

STALL_NS = 10 * 10**9  # a batch whose completions take this long is a stall: report, stop


class Stall(RuntimeError):
    pass


class Rig:
    """One client attached to one server, queue pair 1 (depth 256) made, doorbells wired."""

    def __init__(self, path: str, server: common.ServerProcess) -> None:
        self.path = path
        self.label = path  # the key in a run with --compare-tree variants (path@LABEL); main sets it
        self.server = server
        self.client = VfioUserClient(server.path, timeout=30)
        self.client.negotiate()
        self.ram = GuestRam(RAM_SIZE)
        self.ram.view[:] = bytes(RAM_SIZE)  # fault the client's pages in now
        self.client.dma_map(IOVA, RAM_SIZE, self.ram)
        self.irq_fds = self.client.enable_irqs(IrqIndex.MSIX, 2)
        self.mem = HostMemory(self.ram.view, IOVA)
        self.host = NvmeHost(self.client, self.mem, doorbells=HostDoorbells(self.client, posted=False))
        self.host.enable()
        self.host.set_features(0x07, 0)  # Number of Queues: 1 pair
        self.shadow: int | None = None
        self.eventidx: int | None = None
        if path.endswith("+dbbuf"):
            self.shadow, self.eventidx = self.mem.alloc(PAGE), self.mem.alloc(PAGE)
            self.host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=self.shadow, prp2=self.eventidx)
        self.q = self.host.create_io_queue_pair(1, QSIZE)
        # None once closed (the views must go before the guest RAM can be closed)
        self.sq: memoryview | None = self.mem.buf(self.q.sq, QSIZE * 64)
        self.cq: memoryview | None = self.mem.buf(self.q.cq, QSIZE * 16)
        self.cq_status: np.ndarray | None = np.frombuffer(self.cq, dtype="<u2")[7::8]
        self.bufs = [self.mem.alloc(PAGE) for _ in range(128)]
        # 128 KiB buffer + PRP list for the prefill writes
        self.big = self.mem.alloc(32 * PAGE)
        self.big_list = self.mem.alloc(PAGE)
        self.mem.write(self.big_list, struct.pack("<31Q", *(self.big + PAGE * i for i in range(1, 32))))
        self._keep: tuple[object, ...] = ()  # what the doorbell closures use (mmaps, views)
        self.ring = self._make_ring()
        self.tail = self.head = 0
        self.phase = 1
        self.nsze = NS_SIZE // LBA

    # -- doorbells: ring(cq_head or None, sq_tail) -----------------------------------------

    def _make_ring(self):
        client = self.client
        sock = client.sock
        path = self.path
        if path in ("trap", "trap+dbbuf"):
            conn = client.conn
            hdr_size = HEADER.size + REGION_ACCESS.size + 4
            flags = MsgType.REQUEST | FLAG_NO_REPLY
            pack_hdr, pack_acc = HEADER.pack, REGION_ACCESS.pack
            sq_off, cq_off = Reg.DOORBELLS + 4 * SQ_SLOT, Reg.DOORBELLS + 4 * CQ_SLOT

            def trapped(offset: int, value: int) -> bytes:
                msg_id = conn._next_id
                conn._next_id = (msg_id + 1) & 0xFFFF
                return pack_hdr(msg_id, Command.REGION_WRITE, hdr_size, flags, 0) + pack_acc(offset, 0, 4) + value.to_bytes(4, "little")

        if path == "trap":

            def ring(cq_head, sq_tail):
                data = trapped(sq_off, sq_tail)
                if cq_head is not None:
                    data = trapped(cq_off, cq_head) + data
                sock.sendall(data)

            return ring
        if path == "poll":
            info = client.region_info(0)
            page = client.mmap_region(info)[Reg.DOORBELLS]
            db = memoryview(page).cast("I")
            self._keep = (page, db)

            def ring(cq_head, sq_tail):
                if cq_head is not None:
                    db[CQ_SLOT] = cq_head
                db[SQ_SLOT] = sq_tail

            return ring
        if path == "shadow":
            iofds = {(f.gpa_offset - Reg.DOORBELLS) // 4: f for f in client.region_io_fds(0)}
            sqf, cqf = iofds[SQ_SLOT], iofds[CQ_SLOT]
            assert sqf.shadow is not None and sqf.size == 4
            shadow = memoryview(sqf.shadow).cast("I")
            self._keep = (shadow,)
            sq_i, cq_i = sqf.shadow_offset // 4, cqf.shadow_offset // 4
            sq_efd, cq_efd = sqf.eventfd, cqf.eventfd
            write = os.eventfd_write

            def ring(cq_head, sq_tail):
                if cq_head is not None:
                    shadow[cq_i] = cq_head
                    write(cq_efd, 1)
                shadow[sq_i] = sq_tail
                write(sq_efd, 1)

            return ring
        # NVMe shadow doorbell buffer + EventIdx (nvme_dbbuf_need_event as Linux does it)
        assert self.shadow is not None and self.eventidx is not None
        shadow = self.mem.buf(self.shadow, PAGE).cast("I")
        eventidx = self.mem.buf(self.eventidx, PAGE).cast("I")
        self._keep = (shadow, eventidx)
        stats = self.kicks = [0, 0]  # kicks, suppressed
        if path == "trap+dbbuf":

            def kick(slot, value):
                sock.sendall(trapped(Reg.DOORBELLS + 4 * slot, value))

        elif path == "shadow+dbbuf":
            iofds = {(f.gpa_offset - Reg.DOORBELLS) // 4: f for f in client.region_io_fds(0)}
            post = {}
            for s, f in iofds.items():
                assert f.shadow is not None
                post[s] = (memoryview(f.shadow).cast("I"), f.shadow_offset // 4, f.eventfd)
            self._keep += tuple(v for v, _, _ in post.values())
            write = os.eventfd_write

            def kick(slot, value):
                page, index, efd = post[slot]
                page[index] = value  # what KVM's POST_WRITE stores before it signals
                write(efd, 1)

        else:
            iofds = {(f.gpa_offset - Reg.DOORBELLS) // 4: f for f in client.region_io_fds(0)}
            efds = {s: f.eventfd for s, f in iofds.items()}
            write = os.eventfd_write

            def kick(slot, value):
                write(efds[slot], 1)

        def update(slot, value):
            old = shadow[slot]
            shadow[slot] = value
            fence()  # the shadow store must be visible before we load EventIdx
            if (value - eventidx[slot] - 1) & 0xFFFF < (value - old) & 0xFFFF:
                stats[0] += 1
                kick(slot, value)
            else:
                stats[1] += 1

        def ring_dbbuf(cq_head, sq_tail):
            if cq_head is not None:
                update(CQ_SLOT, cq_head)
            update(SQ_SLOT, sq_tail)

        return ring_dbbuf

    # -- I/O ---------------------------------------------------------------------------

    def sqes(self, opc: int, n: int, qd: int, seed: int) -> bytes:
        """``n`` 4 KiB commands at random 4 KiB-aligned LBAs; command i uses buffer i % qd."""
        rng = np.random.default_rng(seed)
        a = np.zeros(n, dtype=SQE_DTYPE)
        idx = np.arange(n)
        a["opc"] = opc
        a["cid"] = idx & 0xFFFF
        a["nsid"] = 1
        a["prp1"] = np.asarray(self.bufs, dtype=np.uint64)[idx % qd]
        slba = rng.integers(0, self.nsze // 8, n, dtype=np.uint64) * 8
        a["cdw10"] = slba & 0xFFFFFFFF
        a["cdw11"] = slba >> 32
        a["cdw12"] = PAGE // LBA - 1
        return a.tobytes()

    def run(self, blob: bytes, qd: int, *, max_seconds: float, lat: list | None) -> tuple[int, float, float]:
        """Batches of ``qd`` commands from ``blob`` until it is used up or time runs out.

        Returns (I/Os done, elapsed seconds, seconds the client spent waiting for the CQ).
        """
        if self.tail % qd:  # a batch must not wrap the ring: single commands up to a multiple of qd
            k = qd - self.tail % qd
            self.run(self.sqes(NvmOpcode.READ, k, 1, 7), 1, max_seconds=10, lat=None)
        sq, cq, cq_status = self.sq, self.cq, self.cq_status
        assert sq is not None and cq is not None and cq_status is not None, "rig closed"
        ring = self.ring
        tail, head, phase = self.tail, self.head, self.phase
        step = qd * 64
        nbatch = len(blob) // step
        clock = time.perf_counter_ns
        cq_head = None
        waited = 0
        done = 0
        t_end = clock() + int(max_seconds * 1e9)
        t_start = clock()
        pos = 0
        for _ in range(nbatch):
            t0 = clock()
            sq[tail * 64 : tail * 64 + step] = blob[pos : pos + step]
            pos += step
            tail = (tail + qd) & (QSIZE - 1)
            ring(cq_head, tail)
            off = ((head + qd - 1) << 4) + 14
            t_w = clock()
            spins = 0
            while cq[off] & 1 != phase:
                spins += 1
                if spins & 0xFFFFF == 0 and clock() - t_w > STALL_NS:
                    raise Stall(self.stall_report(head, tail, qd, phase))
            fence()  # the phase load before the status loads (acquire; x86 keeps it anyway)
            t1 = clock()
            waited += t1 - t_w
            if qd == 1:
                if cq[off] & 0xFE or cq[off + 1]:
                    raise RuntimeError(f"{self.path}: command failed, status {int.from_bytes(cq[off : off + 2], 'little') >> 1:#x}")
            elif (cq_status[head : head + qd] & 0xFFFE).any():
                raise RuntimeError(f"{self.path}: a command failed")
            head += qd
            if head == QSIZE:
                head = 0
                phase ^= 1
            cq_head = head
            done += qd
            if lat is not None:
                lat.append(t1 - t0)
            if t1 > t_end:
                break
        elapsed = (clock() - t_start) / 1e9
        ring(cq_head, tail)  # hand the last CQ head back (no new commands: tail unchanged)
        self.tail, self.head, self.phase = tail, head, phase
        return done, elapsed, waited / 1e9

    def stall_report(self, head: int, tail: int, qd: int, phase: int) -> str:
        """What the host sees when a batch's completions never arrive (for the bug report)."""
        lines = [f"{self.path}: no completion for {STALL_NS / 1e9:.0f} s: host sq tail {tail}, cq head {head}, qd {qd}, phase {phase}"]
        cq = self.cq
        assert cq is not None
        posted = sum(1 for i in range(qd) if cq[((head + i) % QSIZE) * 16 + 14] & 1 == phase)
        lines.append(f"  CQEs of this batch posted: {posted}/{qd}")
        if self.shadow is not None:
            assert self.eventidx is not None  # set together with the shadow page
            sh = self.mem.buf(self.shadow, 16).cast("I")
            ev = self.mem.buf(self.eventidx, 16).cast("I")
            lines.append(f"  dbbuf shadow sq/cq {sh[SQ_SLOT]}/{sh[CQ_SLOT]}, eventidx sq/cq {ev[SQ_SLOT]}/{ev[CQ_SLOT]}, host kicks/suppressed {self.kicks}")
        try:
            lines.append(f"  server stats: {self.server.stats(timeout=3)}")
        except Exception as e:
            lines.append(f"  server stats unavailable: {e}")
        return "\n".join(lines)

    def prefill(self) -> float:
        """Write the whole namespace once (128 KiB sequential writes, QD 32): the server's
        memfd pages are faulted in before anything is measured."""
        n = NS_SIZE // (32 * PAGE)
        a = np.zeros(n, dtype=SQE_DTYPE)
        a["opc"] = NvmOpcode.WRITE
        a["cid"] = np.arange(n) & 0xFFFF
        a["nsid"] = 1
        a["prp1"] = self.big
        a["prp2"] = self.big_list
        slba = np.arange(n, dtype=np.uint64) * (32 * PAGE // LBA)
        a["cdw10"] = slba & 0xFFFFFFFF
        a["cdw11"] = slba >> 32
        a["cdw12"] = 32 * PAGE // LBA - 1
        t0 = time.perf_counter()
        self.run(a.tobytes(), 32, max_seconds=600, lat=None)
        return time.perf_counter() - t0

    def close(self) -> None:
        self._keep = ()
        self.sq = self.cq = self.cq_status = None
        self.client.close()
        try:
            self.ram.close()
        except BufferError:
            pass


def measure(rig: Rig, rw: str, qd: int, ios: int, max_seconds: float, seed: int) -> dict:
    blob = rig.sqes(WORKLOADS[rw], ios, qd, seed)
    warm = rig.sqes(WORKLOADS[rw], max(qd * 8, min(ios // 10, 5000)) // qd * qd, qd, seed + 1)
    rig.run(warm, qd, max_seconds=1.0, lat=None)
    srv = rig.server
    st0, cpu0, ctx0 = srv.stats(), srv.cpu_seconds(), srv.ctx_switches()
    mb0 = common._cpu_busy_times()
    kicks0 = list(getattr(rig, "kicks", [0, 0]))
    lat: list[int] = []
    gc.disable()
    try:
        done, elapsed, waited = rig.run(blob, qd, max_seconds=max_seconds, lat=lat)
    finally:
        gc.enable()
    cpu1, ctx1, st1 = srv.cpu_seconds(), srv.ctx_switches(), srv.stats()
    mb1 = common._cpu_busy_times()
    kicks1 = list(getattr(rig, "kicks", [0, 0]))
    db0, db1 = st0["doorbells"], st1["doorbells"]
    q0, q1 = st0["queues"].get("sq1", {}), st1["queues"].get("sq1", {})
    d = {k: db1[k] - db0[k] for k in ("trapped", "signals", "wakeups", "doorbells", "coalesced", "polls")}
    batches = q1.get("batches", 0) - q0.get("batches", 0)
    commands = q1.get("commands", 0) - q0.get("commands", 0)
    lat_us = np.asarray(lat, dtype=float) / 1000
    return {
        "path": rig.path,
        "rw": rw,
        "qd": qd,
        "ios": done,
        "seconds": elapsed,
        "iops": done / elapsed,
        "lat_kind": "per I/O" if qd == 1 else "per batch",
        "lat_p50_us": float(np.percentile(lat_us, 50)),
        "lat_p99_us": float(np.percentile(lat_us, 99)),
        "lat_mean_us": float(lat_us.mean()),
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_us_per_io": (cpu1 - cpu0) / done * 1e6,
        "server_util": (cpu1 - cpu0) / elapsed,
        "wakeups_per_io": (ctx1[0] - ctx0[0]) / done,
        "involuntary_ctx_per_io": (ctx1[1] - ctx0[1]) / done,
        "cmds_per_batch": commands / batches if batches else None,
        # None for a tree older than the counter
        "to_workers_per_io": (q1["to_workers"] - q0.get("to_workers", 0)) / done if "to_workers" in q1 else None,
        "device_batches": batches,
        "device_counters": d,
        "device_wakeups_per_io": d["wakeups"] / done,
        "doorbells_per_io": d["doorbells"] / done,
        "trapped_per_io": d["trapped"] / done,
        "signals_per_io": d["signals"] / done,
        "host_kicks_per_io": (kicks1[0] - kicks0[0]) / done,
        "client_busy_fraction": 1 - waited / elapsed,
        # CPUs busy during the point, in CPUs: the spinning client is ~1, the server its util;
        # anything beyond that is other work on the machine
        "machine_busy_cpus": (mb1[0] - mb0[0]) / max(mb1[1] - mb0[1], 1) * (os.cpu_count() or 1),
    }


def start_servers(paths: list[str], tmp: str, args, tree: str | None = None, tag: str = "") -> dict[str, common.ServerProcess]:
    servers = {}
    for p in paths:
        if tag:  # a comparison variant: same path, code from ``tree``
            extra = ["--doorbell", SERVER_MODE[p], "--namespace", args.namespace, "--queues", "4"]
            servers[p] = common.serve(os.path.join(tmp, f"{p}@{tag}.sock"), extra, Path(tmp) / f"{p}@{tag}.log", tree=tree)
            continue
        extra = ["--doorbell", SERVER_MODE[p], "--namespace", args.namespace, "--queues", "4"]
        if args.spin_us is not None:  # else each path's own default (adaptive on shadow)
            extra += ["--spin-us", str(args.spin_us)]
        if args.profile == "cprofile" and p == args.profile_path:
            servers[p] = _profiled_server(p, tmp, extra, args.server_tree)
            continue
        servers[p] = common.serve(os.path.join(tmp, f"{p}.sock"), extra, Path(tmp) / f"{p}.log", tree=args.server_tree)
    return servers


def close_all(rigs: dict[str, Any], servers: dict[str, common.ServerProcess]) -> None:
    """End a run: every host rig closed, every server stopped, and the log tail of any
    server that did not exit cleanly printed (a bench run's teardown, zone_append's too)."""
    for rig in rigs.values():
        try:
            rig.close()
        except Exception as e:
            print(f"close: {e}", file=sys.stderr)
    for key, server in servers.items():
        rc = server.stop()
        if rc not in (0, None):
            print(f"server {key} exited {rc}:\n{server.log()[-3000:]}", file=sys.stderr)


def _profile_path(tmp: str, p: str) -> str:
    return os.path.join(tmp, f"{p}.prof")


def _profiled_server(p: str, tmp: str, extra: list[str], args_tree: str | None = None) -> common.ServerProcess:
    """The server under cProfile (python -m cProfile -o OUT -m nvme_emu serve ...); the
    profile is written to :func:`_profile_path` when the server exits."""
    sock = os.path.join(tmp, f"{p}.sock")
    stats = sock + ".stats.json"
    argv = [sys.executable, "-m", "cProfile", "-o", _profile_path(tmp, p), "-m", "nvme_emu", "serve", "--socket", sock, "--stats-json", stats, *extra]
    return common.ServerProcess(argv, sock, Path(tmp) / f"{p}.log", ready=NVME_EMU_READY, root=args_tree or common.REPO, stats_path=stats)


def plot(results: list[dict], path: Path, title: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    rws = sorted({r["rw"] for r in results}, key=list(WORKLOADS).index)
    fig, axes = plt.subplots(1, len(rws), figsize=(6.5 * len(rws), 4.6), squeeze=False)
    for ax, rw in zip(axes[0], rws, strict=True):
        keys = sorted({r["path"] for r in results}, key=lambda k: (PATHS.index(k.split("@")[0]), k))
        for k in keys:
            pts = sorted((r["qd"], r["iops"]) for r in results if r["rw"] == rw and r["path"] == k)
            if pts:
                ax.plot([q for q, _ in pts], [i / 1000 for _, i in pts], marker="o", linestyle="--" if "@" in k else "-", label=k)
        ax.axhline(150, color="grey", linestyle=":", linewidth=1, label="target 150k (reads, QD128)" if rw == "randread" else None)
        ax.set_xscale("log", base=2)
        ax.set_xticks(QDS, [str(q) for q in QDS])
        ax.set_xlabel("queue depth")
        ax.set_ylabel("kIOPS (4 KiB)")
        ax.set_title(f"4k {rw}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = [
    ("path", "path", ""),
    ("rw", "rw", ""),
    ("qd", "QD", "d"),
    ("iops", "IOPS", ",.0f"),
    ("lat_p50_us", "lat p50 us", ".1f"),
    ("lat_p99_us", "lat p99 us", ".1f"),
    ("server_cpu_us_per_io", "srv CPU us/IO", ".2f"),
    ("server_util", "srv util", ".2f"),
    ("wakeups_per_io", "wakeups/IO", ".3f"),
    ("cmds_per_batch", "cmds/batch", ".1f"),
    ("doorbells_per_io", "doorbells/IO", ".3f"),
    ("client_busy_fraction", "client busy", ".2f"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--qd", default=",".join(map(str, QDS)))
    ap.add_argument("--rw", default=",".join(WORKLOADS))
    ap.add_argument("--namespace", default=f"ram:size={NS_SIZE}", metavar="SPEC",
                    help="the servers' namespace (default a 1 GiB RAM one; e.g. nbd:URI of a server you started, at least 1 GiB)")
    ap.add_argument("--ios-scale", type=float, default=1.0, help="multiply the I/O count of every point")
    ap.add_argument("--max-seconds", type=float, default=3.0, help="cap per point")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every point; the median round is reported")
    ap.add_argument("--spin-us", type=float, default=None, help="the servers' --spin-us (default: theirs; not for --compare-tree servers)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin client (CPU 0) and servers (CPU 1)")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--profile", choices=["cprofile"], help="run one path's server under cProfile")
    ap.add_argument("--profile-path", default="trap")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS", help="first wait up to SECONDS for the machine to be idle")
    ap.add_argument("--server-tree", metavar="DIR", help="run the servers from another copy of the code (before/after comparisons)")
    ap.add_argument("--compare-tree", metavar="LABEL=DIR", action="append", default=[],
                    help="also run every path from the code in DIR (path@LABEL), interleaved point by point; repeatable")
    ap.add_argument("--label", default="", help="results go to server_throughput[-LABEL].json/png")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    qds = [int(q) for q in args.qd.split(",")]
    rws = [w for w in args.rw.split(",") if w]
    for p in paths:
        if p not in SERVER_MODE:
            ap.error(f"unknown path {p}")

    mach = common.machine()
    mach["busy_before"] = common.wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else common.machine_busy()
    print(f"machine busy before the run: {mach['busy_before']:.0%}", flush=True)
    print("machine:", common.describe_machine(mach), flush=True)
    tmp = tempfile.mkdtemp(prefix="nvme-bench-", dir="/tmp")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    servers = start_servers(paths, tmp, args)
    variants = [""]
    for compare in args.compare_tree:
        vlabel, _, vdir = compare.partition("=")
        variants.append(vlabel)
        for p, srv in start_servers(paths, tmp, args, vdir, vlabel).items():
            servers[f"{p}@{vlabel}"] = srv
    rigs: dict[str, Rig] = {}
    rows_all: list[dict] = []
    try:
        if pin:
            os.sched_setaffinity(0, {0})
            for s in servers.values():
                os.sched_setaffinity(s.pid, {1})
        for key in servers:
            rigs[key] = Rig(key.split("@")[0], servers[key])
            rigs[key].label = key
            if not args.no_prefill:
                t = rigs[key].prefill()
                print(f"{key}: attached, namespace prefilled in {t:.1f}s", flush=True)
        for rnd in range(args.rounds):
            for rw in rws:
                for qd in qds:
                    for p in [f"{p}@{v}" if v else p for p in paths for v in variants]:
                        ios = max(qd, int(IOS.get(qd, 100_000) * args.ios_scale) // qd * qd)
                        r = measure(rigs[p], rw, qd, ios, args.max_seconds, seed=1000 * rnd + qd)
                        r["path"] = p
                        r["round"] = rnd
                        rows_all.append(r)
                        print(
                            f"[{rnd}] {p:16} {rw:9} QD{qd:<4} {r['iops']:>9,.0f} IOPS  p50 {r['lat_p50_us']:8.1f} us  "
                            f"cpu {r['server_cpu_us_per_io']:6.2f} us/IO  wake {r['wakeups_per_io']:.3f}/IO  batch {r['cmds_per_batch'] or 0:.1f}",
                            flush=True,
                        )
    finally:
        close_all(rigs, servers)
        if args.profile:
            for p in servers:
                prof = _profile_path(tmp, p)
                if os.path.exists(prof):
                    import pstats

                    print(f"\n== cProfile of the {p} server (tottime) ==")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                    dest = Path(args.out) / "tmp"
                    dest.mkdir(parents=True, exist_ok=True)
                    os.replace(prof, dest / f"server-{p}{'-' + args.label if args.label else ''}.prof")

    # median round per point
    rows = []
    for rw in rws:
        for qd in qds:
            for p in [f"{p}@{v}" if v else p for p in paths for v in variants]:
                rs = [r for r in rows_all if r["path"] == p and r["rw"] == rw and r["qd"] == qd]
                if rs:
                    med = sorted(rs, key=lambda r: r["iops"])[len(rs) // 2]
                    rows.append(dict(med, rounds=len(rs), iops_all_rounds=[r["iops"] for r in rs]))
    base = {(r["rw"], r["qd"]): r["iops"] for r in rows if r["path"] == "trap"}
    for r in rows:
        b = base.get((r["rw"], r["qd"]))
        r["iops_vs_trap"] = r["iops"] / b if b else None
    table = common.format_table(rows, COLUMNS + [("iops_vs_trap", "vs trap", ".2f")])
    print()
    print(table)
    name = "server_throughput" + (f"-{args.label}" if args.label else "")
    out = Path(args.out)
    best = max((r["iops"] for r in rows if r["rw"] == "randread" and r["qd"] == 128), default=None)
    data = {
        "benchmark": "server_throughput",
        "machine": mach,
        "method": __doc__,
        "config": {
            "server_tree": args.server_tree or str(common.REPO),
            "compare_tree": args.compare_tree,
            "paths": paths,
            "qds": qds,
            "rw": rws,
            "max_seconds": args.max_seconds,
            "rounds": args.rounds,
            "pinned": pin,
            "spin_us": args.spin_us,
            "namespace": args.namespace,
            "queue_size": QSIZE,
            "profiled": args.profile_path if args.profile else None,
        },
        "target": {"randread_qd128_iops": 150_000, "best_randread_qd128_iops": best, "met": bool(best and best >= 150_000)},
        "results": rows,
        "all_rounds": rows_all,
        "table": table,
    }
    common.write_json(out / f"{name}.json", data)
    plot(rows, out / f"{name}.png", f"nvme-emu server throughput, 4 KiB, RAM namespace, one server core\n{common.describe_machine(mach)}")
    print(f"\nwrote {out / (name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
