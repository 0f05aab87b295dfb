"""Server CPU per I/O in process: the doorbell-to-CQE path without a socket, a loop or a
second process, so that a change to the hot path shows as a few percent, not as noise.

A real :class:`NvmeFunction` (a prefilled 256 MiB RAM namespace, or with ``--namespace
file`` a file one whose page cache is warm; memfd guest RAM DMA-mapped; MSI-X eventfds) is
driven by :class:`NvmeHost` over an in-process bus. The timed part is what the server
runs per doorbell, called the way the event loop would call it:

``shadow``           the SQ tail's shadow slot is written, then the slot's eventfd
                     callback runs (eventfd read, O(1) slot act, queue loop, interrupt)
``ioeventfd+dbbuf``  the tail goes to the shadow doorbell buffer, then the eventfd callback
``trap``             a trapped REGION_WRITE of the tail (the message already decoded)
``poll``             the doorbell page is written, then one poll round scans it

``QD1`` is one 4 KiB random read per doorbell, ``QD128`` a batch of 128 per doorbell; the
host's work between doorbells (SQEs, doorbell values, reaping) is outside the clock. Both
report microseconds of server CPU per I/O, best of ``--repeat`` runs and of ``--rounds``.
The other trees run in child interpreters, interleaved; they need issue 13's internals.

    ./dev bench hot_path [--namespace file] [--ios 20000] [--repeat 7] [--compare-tree main=DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import RESULTS, format_table, machine, write_json

HERE = Path(__file__).resolve()
PATHS = ["shadow", "ioeventfd+dbbuf", "trap", "poll"]
QDS = [1, 128]
NS_SIZE = 256 << 20


#: ``--clock``: wall time (the default), or this thread's CPU time, which a busy machine's other
#: processes do not inflate (a loaded 2-vCPU VM made wall-clock A/B ratios swing +-20 %);
#: a CPU-time read costs ~0.3 us more, the same in every tree, so ratios are slightly diluted.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_CLOCK = ["wall"]


#: ``--format``: the namespace's LBA format and what each command's PRINFO asks (issue 26;
#: bench/pi_io.py compares them). ``plain``: 512-byte blocks, no metadata, the only one the
#: other trees (--compare-tree) know. The others: 512 + MS bytes of metadata with Type 1 PI;
#: ``pract`` = the controller inserts (write) or strips (read) the PI, so the host moves no
#: metadata; ``pract0`` = the host's metadata goes through MPTR; every PRCHK bit is set.
FORMATS: dict[str, dict] = {
    "plain": {},
    "pi16-pract": {"ms": 8, "guard": 16, "pract": True},
    "pi16-pract0": {"ms": 8, "guard": 16, "pract": False},
    "pi64-pract": {"ms": 16, "guard": 64, "pract": True},
}


def _measure_here(paths: list[str], qds: list[int], ios: int, repeat: int, namespace: str = "ram", fmt: str = "plain",
                  rw: str = "read") -> list[dict]:
    """Run every (path, QD) point with the code this interpreter imports."""
    import mmap

    import numpy as np
    import uvloop

    from nvme_emu.doorbell import DoorbellMode
    from nvme_emu.function import NvmeFunction
    from nvme_emu.namespace import Namespace
    # --child runs other trees' nvme_emu too: where each tree keeps these (issue 24 moved them)
    try:
        from nvme_emu.backends.file import FileBackend
        from nvme_emu.backends.ram import RamBackend
    except ImportError:  # a tree from before nvme_emu/backends/
        from nvme_emu.namespace import FileBackend, RamBackend
    try:
        from nvme_emu.testing.host import HostDoorbells, HostMemory, NvmeHost
    except ImportError:  # a tree from before nvme_emu/testing/
        from nvme_emu.host import HostDoorbells, HostMemory, NvmeHost  # type: ignore[import-not-found, no-redef]
    try:  # the spec's numbers where this tree keeps them: --child runs other trees' nvme_emu too
        from nvme_emu.spec.commands import AdminOpcode, NvmOpcode
        from nvme_emu.spec.registers import Reg
    except ImportError:  # a tree from before nvme_emu/spec.py became a package (issue 24)
        from nvme_emu.spec import AdminOpcode, NvmOpcode, Reg  # type: ignore[attr-defined, no-redef]
    from vfio_user.constants import IRQ_ACTION_TRIGGER, IRQ_DATA_EVENTFD, IrqIndex, RegionIndex
    from vfio_user.device import DeviceContext
    from vfio_user.dma import DMA_FLAG_READ, DMA_FLAG_WRITE, DmaTable, GuestMemory
    from vfio_user.irq import IrqState

    iova, ram_size, page, qsize = 0x1000_0000, 16 << 20, 4096, 256

    class Bus:
        """Region accesses straight into the device, as the transport makes them."""

        def __init__(self, fn: NvmeFunction) -> None:
            self.fn = fn
            if fn.config_written not in fn.config.write_hooks:  # as the transport wires it
                fn.config.write_hooks.append(fn.config_written)

        def region_read(self, index: int, offset: int, count: int) -> bytes:
            if index == RegionIndex.CONFIG:
                return self.fn.config.read(offset, count)
            return self.fn.regions[index].do_read(offset, count)

        def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
            if index == RegionIndex.CONFIG:
                self.fn.config.write(offset, data)
                return
            self.fn.regions[index].do_write(offset, data)

    def one(path: str, qd: int) -> dict:
        mode = {"shadow": "shadow", "ioeventfd+dbbuf": "ioeventfd", "trap": "trap", "poll": "poll"}[path]
        backend: FileBackend | RamBackend
        if namespace == "file":  # its page cache warm: every read is an RWF_NOWAIT hit on the loop
            backend = FileBackend(os.path.join(tmpdir, f"ns-{path}-{qd}.img"), NS_SIZE)
        else:
            backend = RamBackend(NS_SIZE)
        chunk = memoryview(bytes(range(256)) * 4096)
        for off in range(0, NS_SIZE, len(chunk)):  # every page in, as a prefilled namespace
            backend.write_from(off, [chunk])
        pi = FORMATS[fmt]
        ns = Namespace(1, backend) if not pi else _pi_namespace(Namespace, backend, pi)
        fn = NvmeFunction([ns], doorbell=DoorbellMode(mode), spin_us=0.0)
        fd = os.memfd_create("hot-path-guest", os.MFD_ALLOW_SEALING)
        irq_fds: list[int] = []
        loop = None
        try:
            os.ftruncate(fd, ram_size)
            # sealed as QEMU's guest RAM (the server refuses a memfd it could shrink)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            ram = mmap.mmap(fd, ram_size)
            table = DmaTable()
            table.add(iova, ram_size, DMA_FLAG_READ | DMA_FLAG_WRITE, fd, 0)
            irqs = IrqState(dict(fn.irq_counts))
            irq_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
            irqs.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IrqIndex.MSIX, 0, 2, [os.dup(f) for f in irq_fds], b"")
            loop = uvloop.new_event_loop()  # for add_reader; it never runs: RAM needs no later
            fn.attached(DeviceContext(GuestMemory(table), irqs, loop))
            mem = HostMemory(memoryview(ram), iova)
            host = NvmeHost(Bus(fn), mem, doorbells=HostDoorbells(Bus(fn)), poll=lambda: None)
            host.enable()
            host.set_features(0x07, 0)
            dbbuf = None
            if path.endswith("+dbbuf"):
                shadow, eventidx = mem.alloc(page), mem.alloc(page)
                host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=eventidx)
                dbbuf = mem.buf(shadow, page).cast("I")
            q = host.create_io_queue_pair(1, qsize)
            sq, cq = mem.buf(q.sq, qsize * 64), mem.buf(q.cq, qsize * 16)
            bufs = np.asarray([mem.alloc(page) for _ in range(qd)], dtype=np.uint64)
            nsze = NS_SIZE // 512
            n = max(qd, ios // qd * qd)
            rng = np.random.default_rng(qd)
            # the SQE layout written out here, not nvme_emu.sqe.SQE_DTYPE: this runs other trees'
            # nvme_emu too (--child), older ones without it (the layout is the spec's, in every tree)
            dt = np.dtype([("opc", "u1"), ("flags", "u1"), ("cid", "<u2"), ("nsid", "<u4"), ("pad", "<u8"), ("mptr", "<u8"), ("prp1", "<u8"),
                           ("prp2", "<u8"), ("cdw10", "<u4"), ("cdw11", "<u4"), ("cdw12", "<u4"), ("rest", "<u4", 3)])
            a = np.zeros(n, dtype=dt)
            a["opc"], a["cid"], a["nsid"] = NvmOpcode.READ if rw == "read" else NvmOpcode.WRITE, np.arange(n) & 0xFFFF, 1
            a["prp1"] = bufs[np.arange(n) % qd]
            slba = rng.integers(0, nsze // 8, n, dtype=np.uint64) * 8
            a["cdw10"], a["cdw11"], a["cdw12"] = slba & 0xFFFFFFFF, slba >> 32, 7
            if pi:  # PRINFO: every PRCHK bit, PRACT as the format says; Type 1's ILBRT is the SLBA
                a["cdw12"] |= (0b1111 if pi["pract"] else 0b0111) << 26
                a["rest"][:, 1] = slba & 0xFFFFFFFF
                if not pi["pract"]:  # the host's metadata buffer, one per command slot
                    metas = np.asarray([mem.alloc(page) for _ in range(qd)], dtype=np.uint64)
                    a["mptr"] = metas[np.arange(n) % qd]
            blob = a.tobytes()
            dev = fn.doorbells
            sq_slot, cq_slot = 2, 3
            words = dbbuf if dbbuf is not None else getattr(dev.page, "value_words", None)

            if path == "trap":
                sq_db, cq_db = Reg.DOORBELLS + 4 * sq_slot, Reg.DOORBELLS + 4 * cq_slot

                def kick(cq_head: int, tail: int) -> None:
                    dev.trapped_write(cq_db, cq_head.to_bytes(4, "little"))
                    dev.trapped_write(sq_db, tail.to_bytes(4, "little"))
            elif path == "poll":
                assert words is not None

                def kick(cq_head: int, tail: int) -> None:
                    words[cq_slot] = cq_head
                    words[sq_slot] = tail
                    dev._run()
            else:
                # a ShadowPath (ioeventfds a list) or an IoEventFdPath (a dict), by slot either way;
                # not narrowed by class: the harness also runs other trees' nvme_emu (--child)
                efd = dev.ioeventfds[sq_slot]  # type: ignore[attr-defined]
                signalled = dev._signalled  # type: ignore[attr-defined]
                args = (sq_slot,) if path == "shadow" else (sq_slot, efd)
                # the host's eventfd write is not server CPU: it happens before the clock starts

                def kick(cq_head: int, tail: int) -> None:
                    signalled(*args)

            state = [0, 0, 1]  # SQ tail, CQ head, phase

            def run() -> float:
                """Seconds the server spent on one pass over ``blob``."""
                tail, head, phase = state
                spent = 0.0
                clock = CLOCKS[_CLOCK[0]]
                step = qd * 64
                for pos in range(0, len(blob), step):
                    sq[tail * 64 : tail * 64 + step] = blob[pos : pos + step]
                    tail = (tail + qd) % qsize
                    if path in ("shadow", "ioeventfd+dbbuf"):
                        assert words is not None
                        words[cq_slot] = head
                        words[sq_slot] = tail
                        os.eventfd_write(efd.fd, 1)
                    t0 = clock()
                    kick(head, tail)
                    spent += clock() - t0
                    last = ((head + qd - 1) % qsize) * 16 + 14
                    if cq[last] & 1 != phase:
                        raise RuntimeError(f"{path} QD{qd}: the batch did not complete in the call")
                    for i in range(head, head + qd):  # every status Success (outside the clock)
                        status = int.from_bytes(cq[(i % qsize) * 16 + 14 : (i % qsize) * 16 + 16], "little") >> 1
                        if status:
                            raise RuntimeError(f"{path} QD{qd} {fmt} {rw}: a command completed with status {status:#x}")
                    head = (head + qd) % qsize
                    if head == 0:
                        phase ^= 1
                for f in irq_fds:
                    try:
                        os.eventfd_read(f)
                    except BlockingIOError:
                        pass
                state[:] = tail, head, phase
                return spent

            best = min(run() for _ in range(repeat))
            return {"path": path, "qd": qd, "namespace": namespace, "format": fmt, "rw": rw, "ios": n, "server_us_per_io": best / n * 1e6}
        finally:
            if loop is not None:
                fn.detached()
                loop.close()
            fn.close()
            for f in irq_fds:
                os.close(f)
            os.close(fd)

    with tempfile.TemporaryDirectory(prefix="nvme-hot-path-", dir="/tmp") as tmpdir:
        return [one(p, q) for p in paths for q in qds]


def _pi_namespace(namespace_cls, backend, pi: dict):
    """A Type 1 PI namespace over the prefilled ``backend`` whose stored PI is real (generated
    as a PRACT write would: guard of each block's data, application tag 0, reference tag the
    LBA), so that every read checks a computed guard, not an escape."""
    from nvme_emu.pi.format import GuardKind, PiCommand, Prinfo, ProtectionType

    guard = GuardKind.GUARD_16 if pi["guard"] == 16 else GuardKind.GUARD_64
    ns = namespace_cls(1, backend, ms=pi["ms"], pi_type=ProtectionType.TYPE1, guard=guard)
    step = 4096  # blocks per insert
    for first in range(0, ns.nsze, step):
        count = min(step, ns.nsze - first)
        data = bytes(backend.memory[first * 512 : (first + count) * 512])
        meta = bytearray(count * pi["ms"])
        assert ns.pi_engine.insert(PiCommand(slba=first, prinfo=Prinfo.PRACT, ilbrt=first), data, meta) is None
        ns.write_meta(first, meta)
    return ns


def _measure_tree(tree: str, paths: list[str], qds: list[int], ios: int, repeat: int, namespace: str, fmt: str = "plain",
                  rw: str = "read") -> list[dict]:
    """The same measurement with another copy of the code, in a child interpreter."""
    argv = [sys.executable, str(HERE), "--child", tree, "--paths", ",".join(paths), "--qd", ",".join(map(str, qds)), "--ios", str(ios), "--repeat", str(repeat),
            "--namespace", namespace, "--clock", _CLOCK[0]]
    if fmt != "plain" or rw != "read":  # only trees with issue 26 know these
        argv += ["--format", fmt, "--rw", rw]
    out = subprocess.run(argv, cwd=tree, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree}: the measurement failed (the harness needs this tree's NvmeFunction API, issue 13's):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--qd", default=",".join(map(str, QDS)))
    ap.add_argument("--namespace", choices=["ram", "file"], default="ram", help="a RAM namespace, or a file one with its page cache warm")
    ap.add_argument("--ios", type=int, default=20_000, help="I/Os per run")
    ap.add_argument("--repeat", type=int, default=7, help="runs per point; the best is reported")
    ap.add_argument("--rounds", type=int, default=3, help="alternate the trees this many times; the best round counts")
    ap.add_argument("--compare-tree", metavar="LABEL=DIR", action="append", default=[], help="also measure the code in DIR, interleaved")
    ap.add_argument("--child", metavar="TREE", help=argparse.SUPPRESS)
    ap.add_argument("--label", default="")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall", help="time the server's calls by wall clock or by this thread's CPU time")
    ap.add_argument("--format", choices=list(FORMATS), default="plain", help="the namespace's metadata and PI (bench/pi_io.py)")
    ap.add_argument("--rw", choices=["read", "write"], default="read")
    args = ap.parse_args(argv)
    _CLOCK[0] = args.clock
    paths, qds = args.paths.split(","), [int(q) for q in args.qd.split(",")]
    if args.child:
        sys.path.insert(0, args.child)  # before common's REPO: nvme_emu and vfio_user from that tree
        print(json.dumps(_measure_here(paths, qds, args.ios, args.repeat, args.namespace, args.format, args.rw)))
        return 0
    trees = [("", str(common.REPO))] + [tuple(c.split("=", 1)) for c in args.compare_tree]
    best: dict[tuple[str, int, str], dict] = {}
    per_round: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(args.rounds):
        for label, tree in trees:
            for r in _measure_tree(tree, paths, qds, args.ios, args.repeat, args.namespace):
                key = (r["path"], r["qd"], label)
                per_round.setdefault(key, []).append(r["server_us_per_io"])
                if key not in best or r["server_us_per_io"] < best[key]["server_us_per_io"]:
                    best[key] = dict(r, tree=label or "this")
    rows = []
    for p in paths:
        for q in qds:
            here = best[(p, q, "")]["server_us_per_io"]
            for label, _ in trees:
                r = best[(p, q, label)]
                # the ratio of each round (the trees ran back to back in it): median and spread
                ratios = sorted(a / b for a, b in zip(per_round[(p, q, "")], per_round[(p, q, label)], strict=True)) if label else []
                rows.append({"path": p + (f"@{label}" if label else ""), "qd": q, "server_us_per_io": r["server_us_per_io"],
                             "this_vs_tree": here / r["server_us_per_io"] if label else None,
                             "round_ratio_median": ratios[len(ratios) // 2] if ratios else None,
                             "round_ratio_min": ratios[0] if ratios else None, "round_ratio_max": ratios[-1] if ratios else None,
                             "rounds_us_per_io": per_round[(p, q, label)]})
    print(format_table(rows, [("path", "path", ""), ("qd", "QD", "d"), ("server_us_per_io", "server us/IO", ".2f"),
                              ("this_vs_tree", "this / tree", ".3f"), ("round_ratio_median", "median round ratio", ".3f"),
                              ("round_ratio_min", "min", ".3f"), ("round_ratio_max", "max", ".3f")]))
    name = "hot_path" + (f"-{args.label}" if args.label else "")
    write_json(RESULTS / f"{name}.json", {"benchmark": "hot_path", "machine": machine(), "config": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
