"""rbd: namespaces: 4 KiB random reads and writes, QD1 and QD32, through the design
nvme_emu/backends/rbd.py built, against the blocking design nbd.py uses.

The cluster is the tests' (tests/support/ceph.py: one monitor, one memstore OSD, pool size 1,
on 127.0.0.1, started here), the image 256 MiB, written in full first so that reads go to the
OSD (a never-written block librbd answers with zeros by itself, from the object map). Into an
mmapped "guest memory" region, on the server's event loop (uvloop), closed loop:

- ``loop``: what the NVM command set does (:meth:`NvmCommands._start_async
  <nvme_emu.nvm.NvmCommands._start_async>`): the namespace's Work (``Namespace.read`` /
  ``write``: librbd's ``aio_read`` / ``aio_write``) started with :meth:`IoPool.start
  <nvme_emu.aio.IoPool.start>` on the loop thread, its completion back through the pool's
  inbox, ``done`` (the copy into the slot, the counters) on the loop thread; no worker;
- ``pool``: the same backend's blocking forms (start and wait) on :class:`nvme_emu.aio.IoPool`'s
  four workers, as a blocking backend runs: what the design would cost without the seam.

Usage: ``./dev bench rbd_io [--ios N] [--rounds R]``. Writes ``results/rbd_io.json``. Server CPU
is this process's (librbd's threads included); the OSD's and the monitor's are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, Callable

from async_io import ROUND_COLUMNS, Slots, best_of_rounds, run_backend_on_pool, run_closed_loop as closed_loop
from common import RESULTS, format_table, machine, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' cluster

from nvme_emu.aio import IoPool  # noqa: E402
from nvme_emu.namespace import Namespace  # noqa: E402
from nvme_emu.namespace_spec import open_namespace  # noqa: E402
from nvme_emu.outcome import Work  # noqa: E402
from tests.support.ceph import CephCluster, missing  # noqa: E402

BLOCK = 4096
SIZE = 256 << 20
QDS = (1, 32)


async def run_loop(ns: Namespace, w: Slots, qd: int, rw: str, lat: list[float]) -> None:
    pool = IoPool(asyncio.get_running_loop())
    try:
        def start(s: int, off: int, done: Callable[[], None]) -> bool:
            view = w.slots[s]
            work = ns.read(off // 512, BLOCK // 512, [view]) if rw == "read" else ns.write(off // 512, BLOCK // 512, [view])
            assert isinstance(work, Work) and work.start is not None

            def finished(result: Any, error: BaseException | None) -> None:
                if error is not None:
                    raise error
                if work.done is not None:
                    work.done(result)
                done()

            pool.start(work.start, finished, work.views)
            return False

        await closed_loop(w, qd, lat, start)
    finally:
        pool.close()


async def run_pool(ns: Namespace, w: Slots, qd: int, rw: str, lat: list[float]) -> None:
    await run_backend_on_pool(ns.backend, w, qd, rw, lat)


VARIANTS = {"loop": run_loop, "pool": run_pool}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ios", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every variant, interleaved; the best round is reported")
    args = ap.parse_args()
    why = missing()
    if why:
        raise SystemExit(f"no Ceph cluster: {why}")
    cluster = CephCluster(image_size=SIZE).start()
    try:
        ns = open_namespace(cluster.spec, 1)
        try:
            fill = bytes(range(256)) * (4 << 20 >> 8)
            for off in range(0, SIZE, len(fill)):  # every object exists: reads go to the OSD
                ns.backend.write_from(off, [memoryview(fill)])
            rows = best_of_rounds(VARIANTS, ns, size=SIZE, ios=args.ios, qds=QDS, rounds=args.rounds)
        finally:
            ns.close()
    finally:
        cluster.stop()
    table = sorted(rows, key=lambda r: (r["rw"], r["qd"], r["variant"]))
    print(format_table(table, ROUND_COLUMNS))
    print("wrote", write_json(RESULTS / "rbd_io.json", {"machine": machine(), "ios": args.ios, "rows": table}))


if __name__ == "__main__":
    main()
