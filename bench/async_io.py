"""How should file I/O leave the event loop? The candidates, side by side in one loop.

4 KiB random reads from a file whose pages are cached (what a warm file namespace serves),
into an mmapped "guest memory" region, on the server's event loop (uvloop), at QD1 and QD32:

- ``sync``: preadv on the loop thread (what the server did before requests went async);
- ``pool``: :class:`nvme_emu.aio.IoPool`, worker threads, completions batched through one eventfd;
- ``nowait+pool``: ``preadv(..., RWF_NOWAIT)`` on the loop thread first (the kernel serves it
  from the page cache or refuses with EAGAIN, it never blocks), the pool only on a miss;
- ``executor``: ``loop.run_in_executor`` on a ``ThreadPoolExecutor`` (the stock way);
- ``io_uring``: the ``liburing`` PyPI binding, completions via a registered eventfd. It takes
  bytearrays only (memoryviews of guest memory are refused), so it reads into a bounce buffer
  and copies; only measured when ``liburing`` imports.

Usage: ``./dev bench async_io [--ios N] [--file-mib M]``. Writes ``results/async_io.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import mmap
import os
import random
import resource
import time
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence

from common import RESULTS, format_table, machine, percentile, write_json

from nvme_emu.aio import IoPool
from vfio_user.server import new_event_loop

BLOCK = 4096


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class HasOffsets(Protocol):
    """What the closed loop needs of a workload (this one, bench/nbd_io.py's)."""

    offsets: list[int]


class Slots:
    """Precomputed random offsets into ``size`` bytes and one guest buffer per slot (QD of
    them), shared by every variant (bench/nbd_io.py's too)."""

    def __init__(self, size: int, ios: int, qd: int) -> None:
        rng = random.Random(qd)
        self.offsets = [rng.randrange(size // BLOCK) * BLOCK for _ in range(ios)]
        self.mm = mmap.mmap(-1, qd * BLOCK)
        self.mv = memoryview(self.mm)
        self.slots = [self.mv[i * BLOCK : (i + 1) * BLOCK] for i in range(qd)]

    def close(self) -> None:
        self.slots.clear()
        self.mv.release()
        self.mm.close()


class Workload(Slots):
    """:class:`Slots` over a file, opened for the variants that read it by fd."""

    def __init__(self, path: str, size: int, ios: int, qd: int) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        super().__init__(size, ios, qd)

    def close(self) -> None:
        super().close()
        os.close(self.fd)


async def run_sync(w: Workload, qd: int, lat: list[float]) -> None:
    fd = w.fd

    def start(s: int, off: int, done) -> bool:
        os.preadv(fd, [w.slots[s]], off)
        return True

    await run_closed_loop(w, qd, lat, start)


async def run_closed_loop(w: HasOffsets, qd: int, lat: list[float], start_one: Callable[[int, int, Callable[[], None]], bool]) -> None:
    """Keep ``qd`` reads in flight. ``start_one(slot, offset, done)`` returns True when the
    read completed inline, else it calls ``done()`` later on the loop thread."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    it = iter(w.offsets)
    outstanding = [0]

    def launch(slot: int) -> None:
        while True:
            off = next(it, None)
            if off is None:
                if outstanding[0] == 0 and not finished.done():
                    finished.set_result(None)
                return
            t = time.perf_counter()

            def done(t: float = t) -> None:
                lat.append(time.perf_counter() - t)
                outstanding[0] -= 1
                launch(slot)

            outstanding[0] += 1
            if not start_one(slot, off, done):
                return
            lat.append(time.perf_counter() - t)
            outstanding[0] -= 1

    for s in range(qd):
        launch(s)
    await finished


async def run_pool(w: Workload, qd: int, lat: list[float]) -> None:
    pool = IoPool(asyncio.get_running_loop())
    try:
        fd = w.fd

        def start(s: int, off: int, done) -> bool:
            pool.submit(lambda: os.preadv(fd, [w.slots[s]], off), lambda r, e: done())
            return False

        await run_closed_loop(w, qd, lat, start)
    finally:
        pool.close()


async def run_nowait(w: Workload, qd: int, lat: list[float]) -> None:
    """preadv(RWF_NOWAIT) on the loop: served inline from the page cache, EAGAIN (or a short
    read) instead of blocking; only then the read goes to the pool."""
    pool = IoPool(asyncio.get_running_loop())
    try:
        fd = w.fd

        def start(s: int, off: int, done) -> bool:
            try:
                if os.preadv(fd, [w.slots[s]], off, os.RWF_NOWAIT) == BLOCK:
                    return True
            except BlockingIOError:
                pass
            pool.submit(lambda: os.preadv(fd, [w.slots[s]], off), lambda r, e: done())
            return False

        await run_closed_loop(w, qd, lat, start)
    finally:
        pool.close()


async def run_executor(w: Workload, qd: int, lat: list[float]) -> None:
    loop = asyncio.get_running_loop()
    ex = concurrent.futures.ThreadPoolExecutor(4)
    try:
        fd = w.fd

        def start(s: int, off: int, done) -> bool:
            loop.run_in_executor(ex, os.preadv, fd, [w.slots[s]], off).add_done_callback(lambda f: done())
            return False

        await run_closed_loop(w, qd, lat, start)
    finally:
        ex.shutdown()


async def run_uring(w: Workload, qd: int, lat: list[float]) -> None:
    import liburing as L

    loop = asyncio.get_running_loop()
    ring, cqe = L.Ring(), L.Cqe()
    L.io_uring_queue_init(max(qd, 8) * 2, ring)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    L.io_uring_register_eventfd(ring, efd)
    bounce = [bytearray(BLOCK) for _ in range(qd)]
    waiting: dict[int, Callable[[], None]] = {}

    def reap() -> None:
        try:
            os.eventfd_read(efd)
        except BlockingIOError:
            pass
        while True:
            try:
                L.io_uring_peek_cqe(ring, cqe)
            except BlockingIOError:
                return
            c = cqe[0]
            slot, res = c.user_data, c.res
            L.io_uring_cqe_seen(ring, c)
            assert res == BLOCK, res
            w.slots[slot][:] = bounce[slot]
            waiting.pop(slot)()

    def start(s: int, off: int, done) -> bool:
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_read(sqe, w.fd, bounce[s], off)
        L.io_uring_sqe_set_data64(sqe, s)
        waiting[s] = done
        L.io_uring_submit(ring)
        return False

    loop.add_reader(efd, reap)
    try:
        await run_closed_loop(w, qd, lat, start)
    finally:
        loop.remove_reader(efd)
        L.io_uring_queue_exit(ring)
        os.close(efd)


VARIANTS = {"sync": run_sync, "pool": run_pool, "nowait+pool": run_nowait, "executor": run_executor, "io_uring": run_uring}


async def run_backend_on_pool(backend: Any, w: Slots, qd: int, rw: str, lat: list[float]) -> None:
    """A backend's blocking ``read_into``/``write_from`` on an :class:`IoPool` of this loop
    (what a blocking backend costs; the network backends' benches compare with it)."""
    pool = IoPool(asyncio.get_running_loop())
    try:
        op = backend.read_into if rw == "read" else backend.write_from

        def start(s: int, off: int, done: Callable[[], None]) -> bool:
            pool.submit(lambda: op(off, [w.slots[s]]), lambda r, e: done(), [w.slots[s]])
            return False

        await run_closed_loop(w, qd, lat, start)
    finally:
        pool.close()


def best_of_rounds(variants: Mapping[str, Callable[..., Awaitable[None]]], target: Any, *, size: int, ios: int, qds: Sequence[int], rounds: int) -> list[dict]:
    """Every variant (``fn(target, slots, qd, "read" | "write", latencies)``) at every
    (read/write, QD) point, ``rounds`` times interleaved (a noisy
    moment hits every variant alike), each on a fresh loop and slots; the best round of each
    point: IOPS, latency p50/p99 and this process's CPU per I/O (worker threads included)."""
    rows: dict[tuple[str, str, int], dict] = {}
    for _round in range(rounds):
        for rw in ("read", "write"):
            for qd in qds:
                for name, fn in variants.items():
                    w = Slots(size, ios, qd)
                    lat: list[float] = []
                    loop = new_event_loop()
                    c0, t0 = cpu_seconds(), time.perf_counter()
                    loop.run_until_complete(fn(target, w, qd, rw, lat))
                    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                    loop.close()
                    w.close()
                    p50, p99 = percentile(lat, 50) or 0.0, percentile(lat, 99) or 0.0
                    row = {"rw": rw, "qd": qd, "variant": name, "iops": round(ios / wall), "p50_us": round(p50 * 1e6, 1),
                           "p99_us": round(p99 * 1e6, 1), "cpu_us_per_io": round(cpu / ios * 1e6, 1)}
                    best = rows.get((rw, name, qd))
                    if best is None or row["iops"] > best["iops"]:
                        rows[(rw, name, qd)] = row
    return list(rows.values())


#: The columns of :func:`best_of_rounds`'s rows, for ``format_table``.
ROUND_COLUMNS = [("rw", "rw", "s"), ("qd", "QD", "d"), ("variant", "variant", "s"), ("iops", "IOPS", "d"),
                 ("p50_us", "p50 us", ".1f"), ("p99_us", "p99 us", ".1f"), ("cpu_us_per_io", "CPU us/IO", ".1f")]


def uring_available() -> str | None:
    try:
        import liburing  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def measure(loop, path: str, size: int, variant: str, qd: int, ios: int) -> dict:
    w = Workload(path, size, ios, qd)
    lat: list[float] = []
    try:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        loop.run_until_complete(VARIANTS[variant](w, qd, lat))
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    finally:
        w.close()
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    assert p50 is not None and p99 is not None  # a latency per read, ios of them
    return {
        "variant": variant,
        "qd": qd,
        "iops": ios / wall,
        "cpu_us_per_io": cpu / ios * 1e6,
        "lat_p50_us": p50 * 1e6,
        "lat_p99_us": p99 * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ios", type=int, default=40000, help="reads per point")
    ap.add_argument("--file-mib", type=int, default=256, help="size of the (page-cached) file")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median round per point is reported")
    ap.add_argument("--dir", default="/tmp", help="where the test file goes")
    args = ap.parse_args()
    size = args.file_mib << 20
    path = os.path.join(args.dir, f"nvme-emu-async-io-{os.getpid()}.img")
    variants = [v for v in VARIANTS if v != "io_uring" or uring_available() is None]
    if "io_uring" not in variants:
        print(f"io_uring: liburing not importable ({uring_available()}); pip install liburing to compare")
    loop = new_event_loop()
    results = []
    try:
        with open(path, "wb") as f:
            for _ in range(args.file_mib):
                f.write(os.urandom(1 << 20))
        with open(path, "rb") as f:  # warm the page cache
            while f.read(8 << 20):
                pass
        points = [(v, qd) for qd in (1, 32) for v in variants]
        rounds: dict[tuple, list[dict]] = {p: [] for p in points}
        for _ in range(args.rounds):
            for v, qd in points:  # interleaved, so machine load hits every variant alike
                rounds[(v, qd)].append(measure(loop, path, size, v, qd, args.ios))
        for p in points:
            rs = sorted(rounds[p], key=lambda r: r["iops"])
            results.append(rs[len(rs) // 2])
    finally:
        loop.close()
        os.unlink(path)
    base = {r["qd"]: r["iops"] for r in results if r["variant"] == "sync"}
    for r in results:
        r["vs_sync"] = r["iops"] / base[r["qd"]]
    cols = [("variant", "variant", ""), ("qd", "QD", "d"), ("iops", "IOPS", ",.0f"), ("cpu_us_per_io", "CPU us/IO", ".2f"),
            ("lat_p50_us", "p50 us", ".1f"), ("lat_p99_us", "p99 us", ".1f"), ("vs_sync", "vs sync", ".2f")]
    print(format_table(results, cols))
    out = write_json(RESULTS / "async_io.json", {"machine": machine(), "args": vars(args), "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
