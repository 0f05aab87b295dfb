"""Zone Append at QD32 against Write at QD1 per zone: the reason appends exist.

A zone must be written sequentially, at its write pointer. A host that uses Write can keep
only one command in flight per zone (a second Write for the same zone could reach the device
first, land off the write pointer and fail with Zone Invalid Write), so one zone's writes go
at QD1. Zone Append names the zone, not the LBA: the controller places the data at the write
pointer and says where in the completion (ALBA, CQE DW1:DW0), so any number of appends to one
zone may be in flight. This benchmark fills the same zones both ways on a RAM (and optionally
``file:``) zoned namespace served by ``nvme-emu serve``:

``write-qd1``       Write at the write pointer, one in flight, zones one after another (QD1)
``write-qd1xN``     Write, one in flight per zone, the N zones at once (QD N in total)
``append-qd32``     Zone Append, 32 in flight to one zone, zones one after another (QD32)
``append-qd32/N``   Zone Append, 32 in flight spread over the N zones (32/N per zone)

Each append variant is read against the write variant that schedules zones the same way
(one zone at a time, or N at once): ``B/A`` is that IOPS ratio, taken within each round and
reported as the median of rounds with its min and max.

The client is the real vfio-user client with :class:`NvmeHost` for bring-up (the rig of
``server_throughput``: memfd guest RAM DMA-mapped into the server, one I/O queue pair of 256,
every doorbell path) and a purpose-built loop: it keeps each zone's commands in flight up to
its per-zone limit, spins on the next CQE's phase bit, reaps every posted CQE, refills, and
rings CQ head and SQ tail together. Latency is per command, from its SQE store to the reap
that saw its CQE. Client pinned to CPU 0, server(s) to CPU 1; server CPU per I/O is the server
process's utime+stime (/proc, 10 ms ticks).

Every point fills every zone to capacity and is then checked, so a broken append cannot look
fast: each command's data carries a stamp (a tag for the point, the command's sequence number)
at both ends of an otherwise fixed pattern; the ALBAs the completions returned must tile each
zone exactly (no gaps, no overlaps); Report Zones must say Full for every zone; and a sample of
chunks per zone (``--verify-all``: every chunk) is read back and must hold exactly the data of
the command whose completion named that LBA. Then Zone Management Send Reset (Select All)
empties the zones for the next point and Report Zones must say Empty. A Reset deallocates (on
RAM: MADV_REMOVE), so every point's writes fault their pages in again; all variants pay that.

    ./dev bench zone_append                                   # RAM, 8 zones of 16 MiB, 4k and 64k, 5 rounds
    ./dev bench zone_append --backends ram,file --paths trap,trap+dbbuf
    ./dev bench zone_append --rounds 1 --zone-size 1M --label smoke
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import common
import server_throughput as st

from nvme_emu.atomics import fence
from nvme_emu.namespace_spec import parse_size
from nvme_emu.queue import CQE
from nvme_emu.spec.commands import NvmOpcode
from nvme_emu.spec.zns import ZnsOpcode, ZoneState
from nvme_emu.sqe import SQE
from nvme_emu.testing.host import HostDoorbells, NvmeHost

LBA = 512
PAGE = 4096
QSIZE = st.QSIZE
STAMP = struct.Struct("<QQ")  #: (point tag, command sequence number) at both ends of a chunk
MAGIC = 0x5A4E5300 << 32  #: "ZNS\0" in the tag's high half


@dataclass(frozen=True)
class Variant:
    """How a fill drives the zones: which command, how many zones at once, how deep each."""

    name: str
    append: bool
    active: int  #: zones filled at the same time (1: one after another)
    per_zone: int  #: commands in flight per zone
    pair: str  #: the write variant this one is read against ('' for the writes themselves)
    label: str

    @property
    def qd(self) -> int:
        return self.active * self.per_zone


def variants(zones: int, qd: int) -> list[Variant]:
    per = max(1, qd // zones)
    return [
        Variant("write-qd1", False, 1, 1, "", "Write, QD1, one zone at a time"),
        Variant("write-qd1xN", False, zones, 1, "", f"Write, QD1 per zone, {zones} zones at once (QD{zones})"),
        Variant(f"append-qd{qd}", True, 1, qd, "write-qd1", f"Zone Append, QD{qd}, one zone at a time"),
        Variant(f"append-qd{qd}/N", True, zones, per, "write-qd1xN", f"Zone Append, QD{per * zones} over {zones} zones ({per}/zone)"),
    ]


def prps_for(buf: int, plist: int, length: int) -> tuple[int, int]:
    """PRP1/PRP2 for ``length`` bytes of the page-aligned ``buf`` whose later pages ``plist``
    lists: no PRP2 within one page, the second page for two, the list for more."""
    if length <= PAGE:
        return buf, 0
    if length <= 2 * PAGE:
        return buf, buf + PAGE
    return buf, plist


class Stall(RuntimeError):
    pass


class RigDoorbells(HostDoorbells):
    """The driver's doorbells on I/O queue 1 through the rig's doorbell path (so a check made
    with :class:`NvmeHost` between fills uses the same path as the measured loop); the admin
    queue keeps the driver's own trapped writes."""

    def __init__(self, rig: st.Rig, inner: HostDoorbells) -> None:
        super().__init__(inner.bus)
        self.rig = rig
        self.inner = inner

    def ring(self, slot: int, value: int) -> None:
        if slot < 2:
            self.inner.ring(slot, value)
        elif slot == st.SQ_SLOT:
            self.rig.ring(None, value)
        else:
            self.rig.ring(value, self.rig.host.queues[1].tail)


class ZoneRig:
    """One server with one zoned namespace of ``zones`` zones, a ``server_throughput`` rig on
    it, data buffers (one per command in flight) and the check of a fill."""

    def __init__(self, key: str, path: str, server: common.ServerProcess, zones: int, zone_lbas: int, max_qd: int, max_chunk: int) -> None:
        self.key = key
        self.server = server
        self.rig = st.Rig(path, server)
        self.rig.label = key
        self.host: NvmeHost = self.rig.host
        self.host.doorbells = RigDoorbells(self.rig, self.host.doorbells)
        self.zones = zones
        self.zone_lbas = zone_lbas
        mem = self.rig.mem
        self.pattern = np.frombuffer(random.Random(25).randbytes(max_chunk), dtype=np.uint8)
        self.slots: list[tuple[int, int, int]] = []  # (iova, prp1, prp2)
        self.views: list[memoryview] = []
        for _ in range(max_qd):
            buf = mem.alloc(max_chunk)
            mem.write(buf, self.pattern.tobytes())
            self.slots.append((buf, *self._prps(buf, max_chunk)))
            self.views.append(mem.buf(buf, max_chunk))
        self.read_buf = mem.alloc(max_chunk)
        self.read_prps = self._prps(self.read_buf, max_chunk)

    def _prps(self, buf: int, length: int) -> tuple[int, int]:
        """PRP1/PRP2 of a page-aligned buffer: a PRP list for the pages after the first (used
        for every transfer length up to ``length``: the controller reads only what it needs)."""
        pages = -(-length // PAGE)
        if pages == 1:
            return buf, 0
        plist = self.rig.mem.alloc(PAGE)
        self.rig.mem.write(plist, struct.pack(f"<{pages - 1}Q", *(buf + PAGE * i for i in range(1, pages))))
        return buf, plist

    def _queue_synced(self):
        """The driver's view of queue 1 set to where the loop left it (the loop keeps its own)."""
        q = self.host.queues[1]
        q.tail, q.head, q.phase, q.inflight = self.rig.tail, self.rig.head, self.rig.phase, 0
        return q

    def _queue_back(self, q) -> None:
        self.rig.tail, self.rig.head, self.rig.phase = q.tail, q.head, q.phase

    def close(self) -> None:
        self.views = []
        self.rig.close()

    # -- a fill ------------------------------------------------------------------------------

    def fill(self, v: Variant, chunk: int, tag: int, *, limit: int | None = None, lat: list[int] | None = None) -> dict[str, Any]:
        """Fill every zone with ``chunk``-byte commands as ``v`` says (``limit``: stop issuing
        after that many, for a warm-up). Returns the counts, times and, per command, its zone
        and the LBA its data went to."""
        rig = self.rig
        sq, cq, ring = rig.sq, rig.cq, rig.ring
        assert sq is not None and cq is not None, "rig closed"
        nlb = chunk // LBA
        per_zone_cmds = self.zone_lbas // nlb
        total = self.zones * per_zone_cmds if limit is None else min(limit, self.zones * per_zone_cmds)
        opc = ZnsOpcode.ZONE_APPEND if v.append else NvmOpcode.WRITE
        pack_sqe, unpack_cqe, pack_stamp = SQE.pack_into, CQE.unpack_from, STAMP.pack_into
        end = chunk - STAMP.size
        views = self.views
        prps = [prps_for(buf, plist, chunk) for buf, _p1, plist in self.slots]
        body = self.pattern[:chunk].tobytes()
        for view in views[: v.qd]:  # the pattern again where an earlier fill's stamps were
            view[:chunk] = body
        clock = time.perf_counter_ns
        issued = [0] * self.zones
        completed = [0] * self.zones
        rec_zone = np.zeros(total, dtype=np.int32)
        rec_lba = np.zeros(total, dtype=np.uint64)
        slot_seq = [0] * v.qd
        slot_zone = [0] * v.qd
        slot_t = [0] * v.qd
        free = list(range(v.qd - 1, -1, -1))
        # credits: one entry per command a zone may have in flight now (round robin)
        ready: collections.deque[int] = collections.deque()
        next_zone = min(v.active, self.zones)  # zones below it have started
        for _ in range(v.per_zone):
            ready.extend(range(next_zone))
        tail, head, phase = rig.tail, rig.head, rig.phase
        seq = done = 0
        waited = 0
        cq_head = None
        t_start = clock()
        while done < total:
            while ready and free and seq < total:
                z = ready.popleft()
                k = issued[z]
                if k >= per_zone_cmds:
                    continue  # a credit left over from a zone with nothing more to issue
                issued[z] = k + 1
                slot = free.pop()
                view = views[slot]
                pack_stamp(view, 0, tag, seq)
                pack_stamp(view, end, tag, seq)
                slba = z * self.zone_lbas + (0 if v.append else k * nlb)
                prp1, prp2 = prps[slot]
                pack_sqe(sq, tail << 6, opc, 0, slot, 1, 0, 0, 0, prp1, prp2, slba & 0xFFFFFFFF, slba >> 32, nlb - 1, 0, 0, 0)
                tail = (tail + 1) & (QSIZE - 1)
                slot_seq[slot], slot_zone[slot] = seq, z
                rec_zone[seq] = z
                if not v.append:
                    rec_lba[seq] = slba
                seq += 1
                slot_t[slot] = clock()
            ring(cq_head, tail)
            cq_head = None
            off = (head << 4) + 14
            t_w = clock()
            spins = 0
            while cq[off] & 1 != phase:
                spins += 1
                if spins & 0xFFFFF == 0 and clock() - t_w > st.STALL_NS:
                    raise Stall(f"{self.key} {v.name}: no completion for {st.STALL_NS / 1e9:.0f} s; {done}/{total} done, "
                                f"sq tail {tail} cq head {head} phase {phase}\n{rig.stall_report(head, tail, 1, phase)}")
            fence()  # the phase load before the CQE's other fields (acquire; x86 keeps it anyway)
            t = clock()
            waited += t - t_w
            while cq[off] & 1 == phase:
                dw0, dw1, _sqhd, _sqid, cid, sf = unpack_cqe(cq, head << 4)
                if sf >> 1:
                    raise RuntimeError(f"{self.key} {v.name}: command {slot_seq[cid]} failed, status {(sf >> 1) & 0x7FF:#x}")
                s, z = slot_seq[cid], slot_zone[cid]
                if v.append:
                    rec_lba[s] = dw1 << 32 | dw0
                if lat is not None:
                    lat.append(t - slot_t[cid])
                free.append(cid)
                completed[z] += 1
                done += 1
                if issued[z] < per_zone_cmds:
                    ready.append(z)
                elif completed[z] == per_zone_cmds and next_zone < self.zones:
                    ready.extend([next_zone] * v.per_zone)  # a zone is full: the next one starts
                    next_zone += 1
                head += 1
                if head == QSIZE:
                    head = 0
                    phase ^= 1
                off = (head << 4) + 14
            cq_head = head
        elapsed = (clock() - t_start) / 1e9
        ring(cq_head, tail)  # hand the last CQ head back
        rig.tail, rig.head, rig.phase = tail, head, phase
        return {"ios": done, "seconds": elapsed, "waited": waited / 1e9, "zone": rec_zone, "lba": rec_lba, "nlb": nlb,
                "per_zone_cmds": per_zone_cmds}

    # -- the checks --------------------------------------------------------------------------

    def check(self, fill: dict[str, Any], chunk: int, tag: int, sample: int | None, rng: random.Random) -> dict[str, Any]:
        """That the fill did what it says (module docstring); raises on the first fault.
        ``sample``: chunks read back per zone besides its first and last (None: all)."""
        nlb, per = fill["nlb"], fill["per_zone_cmds"]
        zone, lba = fill["zone"], fill["lba"].astype(np.int64)
        where: dict[int, int] = {}  # LBA -> the command whose data the completions put there
        for z in range(self.zones):
            seqs = np.flatnonzero(zone == z)
            got = np.sort(lba[seqs])
            want = z * self.zone_lbas + np.arange(per, dtype=np.int64) * nlb
            if len(got) != per or not np.array_equal(got, want):
                bad: list[int] = np.flatnonzero(got != want)[:5].tolist() if len(got) == per else []
                raise AssertionError(f"{self.key}: zone {z}: {len(got)} commands at LBAs that do not tile the zone "
                                     f"(want {per} x {nlb} from {z * self.zone_lbas}; first bad {[int(got[i]) for i in bad]})")
            where.update(zip(lba[seqs].tolist(), seqs.tolist(), strict=True))
        q = self._queue_synced()
        try:
            report = self.host.report_zones(1, 1, size=min(4 * PAGE, 64 + 64 * self.zones))
            states = [z.state for z in report.zones]
            if report.nr_zones != self.zones or states != [ZoneState.FULL] * self.zones:
                raise AssertionError(f"{self.key}: Report Zones after the fill: {report.nr_zones} zones, states {[s.name for s in states]}")
            read = 0
            read_prps = prps_for(self.read_buf, self.read_prps[1], chunk)
            for z in range(self.zones):
                picks = list(range(per)) if sample is None else sorted({0, per - 1, *rng.sample(range(per), min(sample, per))})
                for k in picks:
                    slba = z * self.zone_lbas + k * nlb
                    self.host.read(1, 1, slba, nlb, self.read_buf, chunk, prps=read_prps)
                    data = self.rig.mem.buf(self.read_buf, chunk)
                    s = where[slba]
                    if STAMP.unpack_from(data, 0) != (tag, s) or STAMP.unpack_from(data, chunk - STAMP.size) != (tag, s) \
                            or data[STAMP.size : chunk - STAMP.size] != self.pattern[STAMP.size : chunk - STAMP.size].tobytes():
                        raise AssertionError(f"{self.key}: LBA {slba} (zone {z}) does not hold command {s}'s data: stamps "
                                             f"{STAMP.unpack_from(data, 0)} / {STAMP.unpack_from(data, chunk - STAMP.size)}, want {(tag, s)}")
                    read += 1
        finally:
            self._queue_back(q)
        return {"chunks_read_back": read, "zones_full": self.zones}

    def reset(self) -> None:
        """Every zone Empty again (Reset, Select All), and Report Zones says so."""
        q = self._queue_synced()
        try:
            self.host.zone_reset(1, 1, select_all=True)
            report = self.host.report_zones(1, 1, size=min(4 * PAGE, 64 + 64 * self.zones))
            bad = [(z.zslba, z.state.name, z.wp) for z in report.zones if z.state != ZoneState.EMPTY or z.wp != z.zslba]
            if bad:
                raise AssertionError(f"{self.key}: zones not Empty after Reset: {bad[:4]}")
        finally:
            self._queue_back(q)


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------


def run_delay(pid: int | str) -> float:
    """Seconds the thread ``pid`` has waited on a run queue (runnable, not running:
    /proc/PID/schedstat field 2): what other work on the machine took from it."""
    fields = common.read_file(f"/proc/{pid}/schedstat").split()
    return int(fields[1]) / 1e9 if len(fields) > 1 else 0.0


def measure(zr: ZoneRig, v: Variant, chunk: int, tag: int, args, rng: random.Random) -> dict[str, Any]:
    srv = zr.server
    st0, cpu0, ctx0 = srv.stats(), srv.cpu_seconds(), srv.ctx_switches()
    mb0 = common._cpu_busy_times()
    rq0, crq0 = run_delay(srv.pid), run_delay("thread-self")
    lat: list[int] = []
    gc.disable()
    try:
        f = zr.fill(v, chunk, tag, lat=lat)
    finally:
        gc.enable()
    cpu1, ctx1, st1 = srv.cpu_seconds(), srv.ctx_switches(), srv.stats()
    mb1 = common._cpu_busy_times()
    rq1, crq1 = run_delay(srv.pid), run_delay("thread-self")
    t0 = time.perf_counter()
    checked = zr.check(f, chunk, tag, None if args.verify_all else args.verify_sample, rng)
    zr.reset()
    q0, q1 = st0["queues"].get("sq1", {}), st1["queues"].get("sq1", {})
    batches = q1.get("batches", 0) - q0.get("batches", 0)
    commands = q1.get("commands", 0) - q0.get("commands", 0)
    done, elapsed = f["ios"], f["seconds"]
    lat_us = np.asarray(lat, dtype=float) / 1000
    return {
        "server": zr.key,
        "variant": v.name,
        "size": chunk,
        "qd": v.qd,
        "zones_at_once": v.active,
        "per_zone_qd": v.per_zone,
        "ios": done,
        "seconds": elapsed,
        "iops": done / elapsed,
        "mb_s": done * chunk / elapsed / 1e6,
        "lat_p50_us": float(np.percentile(lat_us, 50)),
        "lat_p99_us": float(np.percentile(lat_us, 99)),
        "lat_mean_us": float(lat_us.mean()),
        "server_cpu_us_per_io": (cpu1 - cpu0) / done * 1e6,
        "server_util": (cpu1 - cpu0) / elapsed,
        "wakeups_per_io": (ctx1[0] - ctx0[0]) / done,
        "cmds_per_batch": commands / batches if batches else None,
        "client_busy_fraction": 1 - f["waited"] / elapsed,
        # the share of the fill the server's loop thread / the client waited for a CPU while
        # runnable: near 0 on a quiet machine; large means the numbers are mostly the load's
        "server_runq_fraction": (rq1 - rq0) / elapsed,
        "client_runq_fraction": (crq1 - crq0) / elapsed,
        "machine_busy_cpus": (mb1[0] - mb0[0]) / max(mb1[1] - mb0[1], 1) * (os.cpu_count() or 1),
        "check_seconds": time.perf_counter() - t0,
        **checked,
    }


def summarize(rows_all: list[dict], keys: list[str], sizes: list[int], vs: list[Variant]) -> list[dict]:
    """Per (server, size, variant): the median round (by IOPS) with min/max over rounds; per
    append variant the B/A IOPS ratio to its paired write variant taken within each round."""
    out = []
    for key in keys:
        for size in sizes:
            for v in vs:
                rs = [r for r in rows_all if r["server"] == key and r["size"] == size and r["variant"] == v.name]
                if not rs:
                    continue
                med = sorted(rs, key=lambda r: r["iops"])[len(rs) // 2]
                row = dict(med, rounds=len(rs), label=v.label, iops_all_rounds=[r["iops"] for r in rs],
                           iops_min=min(r["iops"] for r in rs), iops_max=max(r["iops"] for r in rs),
                           server_cpu_us_per_io=statistics.median(r["server_cpu_us_per_io"] for r in rs))
                if v.pair:
                    ratios = []
                    for r in rs:
                        a = [x for x in rows_all if x["server"] == key and x["size"] == size and x["variant"] == v.pair and x["round"] == r["round"]]
                        if a:
                            ratios.append(r["iops"] / a[0]["iops"])
                    if ratios:
                        row.update(ratio_vs=v.pair, ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                                   ratio_all_rounds=ratios)
                out.append(row)
    return out


COLUMNS = [
    ("server", "server", ""),
    ("size_k", "size", ""),
    ("variant", "variant", ""),
    ("qd", "QD", "d"),
    ("iops", "IOPS", ",.0f"),
    ("iops_range", "IOPS min-max", ""),
    ("mb_s", "MB/s", ",.1f"),
    ("lat_p50_us", "p50 us", ".1f"),
    ("lat_p99_us", "p99 us", ".1f"),
    ("server_cpu_us_per_io", "srv CPU us/IO", ".1f"),
    ("cmds_per_batch", "cmds/batch", ".1f"),
    ("client_busy_fraction", "client busy", ".2f"),
    ("server_runq_fraction", "srv runq", ".2f"),
    ("ratio_text", "B/A (min-max)", ""),
]


def table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        c = dict(r, size_k=f"{r['size'] // 1024}k", iops_range=f"{r['iops_min']:,.0f}-{r['iops_max']:,.0f}")
        c["ratio_text"] = f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})" if "ratio" in r else ""
        cells.append(c)
    return common.format_table(cells, COLUMNS)


def plot(rows: list[dict], path: Path, title: str, vs: list[Variant]) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    keys = list(dict.fromkeys(r["server"] for r in rows))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(len(keys), len(sizes), figsize=(5.2 * len(sizes), 3.9 * len(keys)), squeeze=False)
    colors = ["#8da0cb", "#5a6fa8", "#fc8d62", "#c8553d"]
    for i, key in enumerate(keys):
        for j, size in enumerate(sizes):
            ax = axes[i][j]
            pts = [next((r for r in rows if r["server"] == key and r["size"] == size and r["variant"] == v.name), None) for v in vs]
            xs = range(len(vs))
            vals = [p["iops"] / 1000 if p else 0 for p in pts]
            lo = [(p["iops"] - p["iops_min"]) / 1000 if p else 0 for p in pts]
            hi = [(p["iops_max"] - p["iops"]) / 1000 if p else 0 for p in pts]
            ax.bar(xs, vals, yerr=[lo, hi], capsize=4, color=colors[: len(vs)])
            for x, p in zip(xs, pts, strict=True):
                if p and "ratio" in p:
                    ax.annotate(f"{p['ratio']:.2f}x", (x, p["iops_max"] / 1000), textcoords="offset points", xytext=(0, 4),
                                ha="center", fontsize=9, fontweight="bold")
            ax.set_ylim(0, max([p["iops_max"] / 1000 for p in pts if p] or [1]) * 1.18)  # room for the ratios
            ax.set_xticks(list(xs), [v.name for v in vs], rotation=15, fontsize=8)
            ax.set_ylabel(f"kIOPS ({size // 1024} KiB)")
            ax.set_title(f"{key}, {size // 1024} KiB: median of rounds, min-max bars\n(x = Zone Append / its Write pair, per round)", fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default="trap+dbbuf", help=f"doorbell paths, comma separated ({', '.join(st.PATHS)})")
    ap.add_argument("--backends", default="ram", help="ram, file or both (file: under --tmp)")
    ap.add_argument("--zones", type=int, default=8)
    ap.add_argument("--zone-size", default="16M", help="zone size = capacity (a power of two)")
    ap.add_argument("--sizes", default="4k,64k", help="command sizes")
    ap.add_argument("--qd", type=int, default=32, help="Zone Append queue depth (one zone, and spread over the zones)")
    ap.add_argument("--rounds", type=int, default=5, help="every point this often, variant order rotating; median round reported")
    ap.add_argument("--warmup", type=int, default=2000, help="commands of each variant before the first round (then Reset)")
    ap.add_argument("--verify-sample", type=int, default=16, help="chunks read back per zone after each fill, besides the first and last")
    ap.add_argument("--verify-all", action="store_true", help="read back every chunk")
    ap.add_argument("--no-pin", action="store_true", help="do not pin client (CPU 0) and servers (CPU 1)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS", help="first wait up to SECONDS for the machine to be idle")
    ap.add_argument("--compare-tree", metavar="LABEL=DIR", action="append", default=[],
                    help="also run every server from the code in DIR (KEY@LABEL), interleaved; repeatable")
    ap.add_argument("--tmp", default="/tmp", help="where sockets and file: images go")
    ap.add_argument("--label", default="", help="results go to zone_append[-LABEL].json/png")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    backends = [b for b in args.backends.split(",") if b]
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    zone_bytes = parse_size(args.zone_size)
    for p in paths:
        if p not in st.SERVER_MODE:
            ap.error(f"unknown path {p}")
    for b in backends:
        if b not in ("ram", "file"):
            ap.error(f"unknown backend {b}")
    for size in sizes:
        if size % PAGE or zone_bytes % size or size > 512 * 1024:
            ap.error(f"size {size}: a multiple of 4 KiB that divides the zone, at most MDTS (512 KiB)")
    if args.zones < 1 or args.qd < args.zones or args.qd + args.zones > QSIZE - 1:
        ap.error("need 1 <= zones <= qd and qd + zones < 255 (one queue of 256)")
    if zone_bytes // max(sizes) < args.qd:
        print(f"note: a zone holds only {zone_bytes // max(sizes)} commands of {max(sizes) // 1024} KiB: append-qd{args.qd} to one zone "
              "cannot reach its queue depth (use a larger --zone-size)", flush=True)
    vs = variants(args.zones, args.qd)
    zone_lbas = zone_bytes // LBA
    ns_bytes = zone_bytes * args.zones

    mach = common.machine()
    mach["busy_before"] = common.wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else common.machine_busy()
    print(f"machine busy before the run: {mach['busy_before']:.0%}", flush=True)
    print("machine:", common.describe_machine(mach), flush=True)
    tmp = tempfile.mkdtemp(prefix="nvme-bench-zone-append-", dir=args.tmp)
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    zoned = f"zoned,zone_size={zone_bytes},max_open={args.zones},max_active={args.zones}"
    trees = [("", None)] + [(c.partition("=")[0], c.partition("=")[2]) for c in args.compare_tree]
    specs: dict[str, tuple[str, str, str | None]] = {}  # key -> (path, namespace spec, tree)
    for b in backends:
        for p in paths:
            for tag, tree in trees:
                key = f"{b}/{p}" + (f"@{tag}" if tag else "")
                name = key.replace("/", "-").replace("+", "_").replace("@", "-")
                ns = f"ram:size={ns_bytes},{zoned}" if b == "ram" else f"file:{os.path.join(tmp, name + '.img')},size={ns_bytes},{zoned}"
                specs[key] = (p, ns, tree)
    servers: dict[str, common.ServerProcess] = {}
    rigs: dict[str, ZoneRig] = {}
    rows_all: list[dict] = []
    rng = random.Random(2025)
    try:
        for key, (p, ns, tree) in specs.items():
            name = key.replace("/", "-").replace("+", "_").replace("@", "-")
            servers[key] = common.serve(os.path.join(tmp, f"{name}.sock"), ["--doorbell", st.SERVER_MODE[p], "--namespace", ns, "--queues", "4"],
                                        Path(tmp) / f"{name}.log", tree=tree)
        if pin:
            os.sched_setaffinity(0, {0})
            for s in servers.values():
                os.sched_setaffinity(s.pid, {1})
        for key, srv in servers.items():
            rigs[key] = ZoneRig(key, specs[key][0], srv, args.zones, zone_lbas, max(v.qd for v in vs), max(sizes))
            if args.warmup:
                for v in vs:
                    rigs[key].fill(v, sizes[0], MAGIC, limit=args.warmup)
                    rigs[key].reset()
            print(f"{key}: attached ({specs[key][1]}), warmed up", flush=True)
        for rnd in range(args.rounds):
            order = vs[rnd % len(vs):] + vs[: rnd % len(vs)]
            for size in sizes:
                for v in order:
                    for key, zr in rigs.items():
                        tag = MAGIC | rnd << 16 | vs.index(v) << 8 | sizes.index(size)
                        r = measure(zr, v, size, tag, args, rng)
                        r["round"] = rnd
                        rows_all.append(r)
                        print(f"[{rnd}] {key:18} {size // 1024:>3}k {v.name:15} QD{v.qd:<3} {r['iops']:>9,.0f} IOPS {r['mb_s']:8.1f} MB/s  "
                              f"p50 {r['lat_p50_us']:7.1f} us  p99 {r['lat_p99_us']:7.1f} us  cpu {r['server_cpu_us_per_io']:6.1f} us/IO  "
                              f"runq srv/client {r['server_runq_fraction']:.2f}/{r['client_runq_fraction']:.2f}  "
                              f"checked {r['chunks_read_back']} chunks", flush=True)
    finally:
        st.close_all(rigs, servers)

    rows = summarize(rows_all, list(specs), sizes, vs)
    text = table(rows)
    print()
    print(text)
    print("\nB/A = Zone Append IOPS / the IOPS of the Write variant that schedules zones the same way, per round; "
          "median (min-max) of rounds.\nLatency: per command, SQE store to the reap that saw its CQE, median round. "
          "srv runq: share of the fill the server's loop thread waited for a CPU (other work on the machine).")
    name = "zone_append" + (f"-{args.label}" if args.label else "")
    out = Path(args.out)
    data = {
        "benchmark": "zone_append",
        "machine": mach,
        "method": __doc__,
        "config": {
            "paths": paths, "backends": backends, "zones": args.zones, "zone_size": zone_bytes, "sizes": sizes, "qd": args.qd,
            "rounds": args.rounds, "warmup": args.warmup, "verify": "all" if args.verify_all else f"sample {args.verify_sample}+2 per zone",
            "pinned": pin, "compare_tree": args.compare_tree, "namespaces": {k: v[1] for k, v in specs.items()},
            "variants": [v.__dict__ | {"qd": v.qd} for v in vs],
        },
        "results": rows,
        "all_rounds": rows_all,
        "table": text,
    }
    common.write_json(out / f"{name}.json", data)
    plot(rows, out / f"{name}.png", f"nvme-emu: Zone Append vs Write at the write pointer, {args.zones} zones of {zone_bytes >> 20} MiB, "
         f"{args.rounds} round(s)\n{common.describe_machine(mach)}", vs)
    print(f"\nwrote {out / (name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
