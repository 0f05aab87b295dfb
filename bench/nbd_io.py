"""nbd: namespaces: what the I/O pool costs, and what driving libnbd's aio from the event loop
would buy instead (issue 27 asks for the latter; nvme_emu/backends/nbd.py built the former).

4 KiB random reads and writes against nbdkit's memory plugin (started here, Unix socket), into
an mmapped "guest memory" region, on the server's event loop (uvloop), closed loop at QD1 and
QD16:

- ``inline``: :class:`~nvme_emu.backends.nbd.NbdBackend` called on the loop thread (the floor:
  what one NBD round trip costs through the backend, and what nvme-emu must not do in
  production: a stopped server would freeze the loop for the command timeout);
- ``pool``: the backend on :class:`nvme_emu.aio.IoPool` (4 workers, 4 connections with
  multi-conn): what nvme-emu does;
- ``aio-loop``: a prototype of the other design, not the backend: one libnbd handle whose fd
  the loop watches (``aio_get_fd``, ``aio_notify_read``/``write``), ``aio_pwrite`` from the
  slot, ``aio_pread`` into an ``nbd.Buffer`` copied into the slot, completions checked on each
  wake-up, no thread. With libnbd 1.14.2 every ``aio_pread`` leaks its buffer (the backend's
  docstring), so this variant's reads leak 4 KiB each: fine for a measurement, not a server.

Usage: ``./dev bench nbd_io [--ios N]``. Writes ``results/nbd_io.json``. Server CPU is this
process's (workers included); nbdkit's is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from async_io import ROUND_COLUMNS, Slots, best_of_rounds, run_backend_on_pool, run_closed_loop as closed_loop
from common import RESULTS, format_table, machine, write_json

from nvme_emu.backends.nbd import NbdBackend

BLOCK = 4096
SIZE = 256 << 20


async def run_inline(uri: str, w: Slots, qd: int, rw: str, lat: list[float]) -> None:
    b = NbdBackend(uri)
    try:
        op = b.read_into if rw == "read" else b.write_from
        await closed_loop(w, qd, lat, lambda s, off, done: op(off, [w.slots[s]]) or True)
    finally:
        b.close()


async def run_pool(uri: str, w: Slots, qd: int, rw: str, lat: list[float]) -> None:
    b = NbdBackend(uri)
    try:
        await run_backend_on_pool(b, w, qd, rw, lat)
    finally:
        b.close()


async def run_aio_loop(uri: str, w: Slots, qd: int, rw: str, lat: list[float]) -> None:
    import nbd

    loop = asyncio.get_running_loop()
    h = nbd.NBD()
    h.connect_uri(uri)
    fd = h.aio_get_fd()
    waiting: dict[int, tuple[int, Any, Callable[[], None]]] = {}  # cookie -> (slot, read buffer, done)
    writer = [False]

    def want_write() -> None:
        wants = bool(h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE)
        if wants and not writer[0]:
            loop.add_writer(fd, on_write)
        elif not wants and writer[0]:
            loop.remove_writer(fd)
        writer[0] = wants

    def reap() -> None:
        for cookie in [c for c in waiting if h.aio_command_completed(c)]:
            slot, buf, done = waiting.pop(cookie)
            if buf is not None:
                w.slots[slot][:] = buf.to_buffer()
            done()
        want_write()

    def on_read() -> None:
        h.aio_notify_read()
        reap()

    def on_write() -> None:
        h.aio_notify_write()
        reap()

    def start(s: int, off: int, done: Callable[[], None]) -> bool:
        buf = None
        if rw == "read":  # into a buffer of libnbd's, then copied (what it would cost without the leak)
            buf = nbd.Buffer(BLOCK)
            cookie = h.aio_pread(buf, off)
        else:
            cookie = h.aio_pwrite(w.slots[s], off)
        waiting[cookie] = (s, buf, done)
        want_write()
        return False

    loop.add_reader(fd, on_read)
    try:
        await closed_loop(w, qd, lat, start)
    finally:
        loop.remove_reader(fd)
        if writer[0]:
            loop.remove_writer(fd)
        h.shutdown()


async def run_link(uri: str, w: Slots, qd: int, rw: str, lat: list[float]) -> None:
    from nvme_emu.backends.libnbd_ffi import ffi
    from nvme_emu.backends.nbd_link import NbdLink, Op, buffer

    link = NbdLink(uri, asyncio.get_running_loop(), timeout=20.0, on_ready=lambda flags: None, lost=OSError)

    def start(s: int, off: int, done: Callable[[], None]) -> bool:
        slot = w.slots[s]
        buf = buffer(BLOCK)  # the link's own buffer, copied to or from the slot as the backend does
        if rw == "read":
            def read_done(err: BaseException | None) -> None:
                assert err is None, err
                slot[:] = ffi.buffer(buf, BLOCK)
                done()

            link.submit(Op.READ, off, BLOCK, buf, read_done)
        else:
            ffi.memmove(buf, slot, BLOCK)
            link.submit(Op.WRITE, off, BLOCK, buf, lambda err: done())
        return False

    try:
        await closed_loop(w, qd, lat, start)
    finally:
        link.close()


VARIANTS = {"inline": run_inline, "pool": run_pool, "aio-loop": run_aio_loop, "link": run_link}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ios", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every variant, interleaved; the best round is reported")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    args = ap.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise SystemExit("nbdkit is not installed (./dev test installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="nbd-bench-"))
    sock = tmp / "m.sock"
    proc = subprocess.Popen([nbdkit, "--foreground", "--exit-with-parent", "-U", str(sock), "memory", str(SIZE)])
    try:
        while not sock.exists():
            time.sleep(0.01)
        uri = f"nbd+unix:///?socket={sock}"
        table = best_of_rounds(variants, uri, size=SIZE, ios=args.ios, qds=(1, 16), rounds=args.rounds)
        print(format_table(table, ROUND_COLUMNS))
        print("wrote", write_json(RESULTS / "nbd_io.json", {"machine": machine(), "ios": args.ios, "rows": table}))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
