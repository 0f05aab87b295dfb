"""Helpers for the doorbell-path tests.

* :class:`ServeProcess`: ``python -m nvme_emu serve --doorbell MODE`` as a separate process,
  with its counters read from what the CLI prints on SIGUSR1.
* :class:`InProcServer`: the same :class:`~vfio_user.server.Server` + :class:`NvmeFunction`
  on an event loop in a daemon thread, for tests that need the internal counters or must
  hold the server still (``paused()``) while the host rings.
* :class:`HostSession`: the real :class:`VfioUserClient` + :class:`NvmeHost` with memfd guest
  RAM DMA-mapped into the server, and one constructor per host doorbell strategy.

Nothing here asserts on time: every wait is bounded by :data:`DEADLINE` and only fails a test
that would otherwise hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from nvme_emu.controller import ControllerConfig
from nvme_emu.function import NvmeFunction
from nvme_emu.host import (
    HostDoorbells,
    HostMemory,
    MappedDoorbells,
    NvmeHost,
    ShadowBufferDoorbells,
    ShadowIoEventFdDoorbells,
)
from nvme_emu.namespace import open_namespace
from nvme_emu.spec import AdminOpcode, NvmOpcode, Reg, Status
from vfio_user.vmm.client import GuestRam, IoFd, VfioUserClient
from vfio_user.constants import IO_FD_TYPE_IOEVENTFD, IO_FD_TYPE_IOEVENTFD_SHADOW, REGION_FLAG_MMAP
from vfio_user.server import Server, new_event_loop

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 10.0
PAGE = 4096
LBA = 512
IOVA = 0x1000_0000
RAM_SIZE = 8 << 20
MAX_IO_QUEUES = 8
NS_SIZE = 16 << 20

#: The host doorbell strategies every path test runs with: (server --doorbell mode, host kind).
PATHS = {
    "trap": ("trap", "trap"),
    "shadow": ("shadow", "shadow"),
    "poll": ("poll", "poll"),
    "dbbuf-trap": ("trap", "dbbuf-trap"),
    "dbbuf-ioeventfd": ("ioeventfd", "dbbuf-ioeventfd"),
    # dbbuf works with the other paths too: the kick goes by shadow ioeventfd / mapped page
    "dbbuf-shadow": ("shadow", "dbbuf-shadow"),
    "dbbuf-poll": ("poll", "dbbuf-poll"),
}


# --------------------------------------------------------------------------------------
# stats as the CLI prints them
# --------------------------------------------------------------------------------------
_HEADER = re.compile(r"doorbell path (\w+): (.*)")
_KV = re.compile(r"([\w/]+)=([0-9./]+)s?")


def parse_stats(block: str) -> dict:
    """The SIGUSR1 block -> {"mode": str, "doorbells": {...}, "queues": {"sq0": {...}}}."""
    lines = block.splitlines()
    m = _HEADER.match(lines[0].strip())
    assert m, f"not a stats block: {block!r}"
    db: dict[str, float] = {}
    for k, v in _KV.findall(m.group(2)):
        if k == "spin_hits":
            hits, spins = v.split("/")
            db["spin_hits"], db["spins"] = int(hits), int(spins)
        elif k == "poll_cpu":
            db["poll_cpu_seconds"] = float(v)
        else:
            db[k] = int(v)
    queues: dict[str, dict[str, float]] = {}
    for line in lines[1:]:
        line = line.strip()
        if not line.startswith("sq"):
            break
        name, rest = line.split(":", 1)
        queues[name] = {k: float(v) if "." in v else int(v) for k, v in _KV.findall(rest)}
    return {"mode": m.group(1), "doorbells": db, "queues": queues}


# --------------------------------------------------------------------------------------
# the server as a separate process
# --------------------------------------------------------------------------------------
class ServeProcess:
    """``python -m nvme_emu serve --socket PATH --doorbell MODE [--spin-us N]``."""

    def __init__(self, tmp_path: Path, mode: str, *, namespace: str = f"ram:size={NS_SIZE}", spin_us: float | None = None, name: str = "nvme",
                 extra: Sequence[str] = ()) -> None:
        self.path = str(tmp_path / f"{name}.sock")
        self.mode = mode
        self.queues = MAX_IO_QUEUES
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "nvme_emu", "serve", "--socket", self.path, "--doorbell", mode, "--namespace", namespace, "--queues", str(MAX_IO_QUEUES)]
        if spin_us is not None:
            cmd += ["--spin-us", str(spin_us)]
        cmd += extra
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        self._out = ""
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        try:
            self.wait_stdout("serving", 1)
        except BaseException:
            self.kill()
            raise
        assert os.path.exists(self.path)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            # one SIGUSR1 block is one write below PIPE_BUF: it arrives in one read
            chunk = os.read(fd, 65536)
            with self._cond:
                if not chunk:
                    self._out += "\0EOF"
                    self._cond.notify_all()
                    return
                self._out += chunk.decode(errors="replace")
                self._cond.notify_all()

    def stdout(self) -> str:
        with self._cond:
            return self._out

    def wait_stdout(self, text: str, count: int) -> str:
        deadline = time.monotonic() + DEADLINE
        with self._cond:
            while self._out.count(text) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or "\0EOF" in self._out:
                    raise AssertionError(f"server never printed {text!r} x{count}:\n{self._out}\n{self.stderr()}")
                self._cond.wait(remaining)
            return self._out

    def stats(self) -> dict:
        """SIGUSR1 -> the CLI prints its counters -> parsed."""
        n = self.stdout().count("doorbell path ")
        self.proc.send_signal(signal.SIGUSR1)
        out = self.wait_stdout("doorbell path ", n + 1)
        block = out[out.rindex("doorbell path ") :]
        return parse_stats(block)

    def stderr(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM: the server flushes its namespaces and exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(DEADLINE)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(DEADLINE)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._log.closed:
            self._log.close()


# --------------------------------------------------------------------------------------
# the server in this process, on a loop in a thread
# --------------------------------------------------------------------------------------
class InProcServer:
    """Server(NvmeFunction(...), path) on ``new_event_loop()`` in a daemon thread."""

    def __init__(self, path: str, mode: str, *, spin_us: float = 0.0, namespace: str = f"ram:size={NS_SIZE}", **options: float) -> None:
        self.path = path
        ns = open_namespace(namespace, 1)
        self.function = NvmeFunction([ns], ControllerConfig(max_io_queues=MAX_IO_QUEUES), doorbell=mode, spin_us=spin_us, **options)
        self.ctrl = self.function.controller
        self.server = Server(self.function, path)
        self.loop = new_event_loop()
        self.error: BaseException | None = None
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.server.start())
            except BaseException as e:  # reported by the constructor
                self.error = e
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.loop.set_exception_handler(self._loop_exception)
        self.thread = threading.Thread(target=run, name="nvme-server", daemon=True)
        self.thread.start()
        if not started.wait(DEADLINE) or self.error is not None:
            raise RuntimeError(f"in-process server did not start: {self.error}")

    def _loop_exception(self, loop, context) -> None:
        # a callback that raised: remember it, the test's teardown fails on it
        self.error = context.get("exception") or RuntimeError(context.get("message"))
        loop.default_exception_handler(context)

    @property
    def doorbells(self):
        return self.function.doorbells

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the server's loop thread and return its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def cb() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(cb)
        return fut.result(DEADLINE)

    def stats(self) -> dict:
        return self.call(self.function.stats)  # type: ignore[return-value]

    def doorbell_stats(self) -> dict:
        return self.stats()["doorbells"]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Block the server's loop (it is inside a callback) until the block ends."""
        entered, release = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            release.wait(DEADLINE)

        self.loop.call_soon_threadsafe(hold)
        assert entered.wait(DEADLINE), "server loop did not pause"
        try:
            yield
        finally:
            release.set()

    def settle(self) -> None:
        """Let the loop run every ready callback (eventfds included) at least once."""
        for _ in range(3):
            self.call(lambda: None)
            time.sleep(0.005)

    def close(self) -> None:
        if self.thread.is_alive():
            try:
                self.call(self.server.close)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(DEADLINE)
        if not self.thread.is_alive():
            self.loop.close()
        self.function.close()


# --------------------------------------------------------------------------------------
# the host side
# --------------------------------------------------------------------------------------
class HostSession:
    """A negotiated client, memfd guest RAM mapped at :data:`IOVA`, and an NvmeHost on it."""

    def __init__(self, path: str, *, ram: object | None = None, ram_size: int = RAM_SIZE, iova: int = IOVA, mem_offset: int = 0) -> None:
        self.client = VfioUserClient(path, timeout=DEADLINE)
        self.own_ram = ram is None
        self.ram = GuestRam(ram_size) if ram is None else ram
        try:
            self.client.negotiate()
            self.client.dma_map(iova, ram_size, self.ram)
        except BaseException:
            self.close()
            raise
        self.view = self.ram.view[mem_offset:ram_size]
        self.mem = HostMemory(self.view, iova + mem_offset)
        self.host = NvmeHost(self.client, self.mem, poll=lambda: time.sleep(0.0002))
        self.iofds: list[IoFd] = []
        self.kind = "trap"
        self.dbbuf: tuple[int, int] | None = None
        self.kicks_by_slot: dict[int, int] = {}

    # -- doorbell strategies -----------------------------------------------------------

    def use(self, kind: str) -> None:
        """Select the host doorbell strategy for ``kind`` (see :data:`PATHS`); call after
        :meth:`enable` for the dbbuf kinds (Doorbell Buffer Config is an admin command)."""
        self.kind = kind
        if kind == "trap":
            self.host.doorbells = HostDoorbells(self.client)
        elif kind == "shadow":
            self.iofds = self.client.region_io_fds(0)
            assert self.iofds and all(f.type == IO_FD_TYPE_IOEVENTFD_SHADOW for f in self.iofds)
            self.host.doorbells = ShadowIoEventFdDoorbells(self.client, self.iofds)
        elif kind == "poll":
            self.host.doorbells = MappedDoorbells(self.client, self.mapped_doorbell_page())
        elif kind == "dbbuf-trap":
            self.host.doorbells = self.shadow_buffer(HostDoorbells(self.client), kick=None)
        elif kind == "dbbuf-shadow":
            self.iofds = self.client.region_io_fds(0)
            self.host.doorbells = self.shadow_buffer(ShadowIoEventFdDoorbells(self.client, self.iofds), kick=None)
        elif kind == "dbbuf-poll":
            self.host.doorbells = self.shadow_buffer(MappedDoorbells(self.client, self.mapped_doorbell_page()), kick=None)
        elif kind == "dbbuf-ioeventfd":
            self.iofds = self.client.region_io_fds(0)
            assert self.iofds and all(f.type == IO_FD_TYPE_IOEVENTFD and f.shadow is None for f in self.iofds)
            by_slot = {(f.gpa_offset - Reg.DOORBELLS) // 4: f for f in self.iofds}
            # What KVM does with a plain ioeventfd: signal, drop the value (it is in the shadow).
            self.host.doorbells = self.shadow_buffer(HostDoorbells(self.client), kick=lambda slot, value: by_slot[slot].signal())
        else:
            raise ValueError(kind)

    def mapped_doorbell_page(self):
        info = self.client.region_info(0)
        assert info.flags & REGION_FLAG_MMAP and info.areas == [(Reg.DOORBELLS, PAGE)], info
        maps = self.client.mmap_region(info)
        return maps[Reg.DOORBELLS]

    def shadow_buffer(self, inner: HostDoorbells, kick) -> ShadowBufferDoorbells:
        """Doorbell Buffer Config with fresh zeroed pages (as Linux after every enable)."""
        shadow, eventidx = self.mem.alloc(PAGE), self.mem.alloc(PAGE)
        self.mem.write(shadow, bytes(PAGE))
        self.mem.write(eventidx, bytes(PAGE))
        self.host.doorbells = inner  # the admin command itself goes through the real doorbell
        self.host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=eventidx)
        self.dbbuf = (shadow, eventidx)
        base_kick = kick or inner.ring

        def counted(slot: int, value: int) -> None:
            self.kicks_by_slot[slot] = self.kicks_by_slot.get(slot, 0) + 1
            base_kick(slot, value)

        return ShadowBufferDoorbells(inner, self.mem, shadow, eventidx, kick=counted)

    def eventidx(self, slot: int) -> int:
        assert self.dbbuf is not None
        return self.mem.u32(self.dbbuf[1] + 4 * slot)

    def shadow_tail(self, slot: int) -> int:
        assert self.dbbuf is not None
        return self.mem.u32(self.dbbuf[0] + 4 * slot)

    # -- bring-up ----------------------------------------------------------------------

    def bring_up(self, kind: str, *, depth: int = 32, qid: int = 1) -> None:
        """Enable, pick the doorbell strategy, create one I/O queue pair."""
        self.host.doorbells = HostDoorbells(self.client)
        self.host.enable()
        self.use(kind)
        self.host.create_io_queue_pair(qid, depth)

    def reset_and_bring_up(self, kind: str, *, depth: int = 32, qid: int = 1) -> None:
        """CC.EN 1 -> 0 -> 1 and the queues again, the way a driver does after a reset."""
        self.host.doorbells = HostDoorbells(self.client)
        self.host.disable()
        self.host.enable()
        self.use(kind)
        self.host.create_io_queue_pair(qid, depth)

    # -- I/O ---------------------------------------------------------------------------

    def submit_io(self, qid: int, opc: int, slba: int, buf: int, nlb: int = PAGE // LBA, *, ring: bool) -> int:
        return self.host.submit(qid, opc, nsid=1, prp1=buf, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=nlb - 1, ring=ring)

    def write_read_check(self, qid: int, first_lba: int, count: int, *, qd: int, seed: int = 0) -> None:
        """Write ``count`` 4 KiB blocks, read them back into other buffers, compare.

        ``qd`` 1: one command at a time (ring, wait). ``qd`` > 1: ``qd`` commands placed with
        ring=False, then one doorbell for the whole batch.
        """
        blocks = [(first_lba + i * (PAGE // LBA), pattern(seed, i)) for i in range(count)]
        wbufs = [self.mem.alloc(PAGE) for _ in blocks]
        rbufs = [self.mem.alloc(PAGE) for _ in blocks]
        for (_lba, data), buf in zip(blocks, wbufs, strict=True):
            self.mem.write(buf, data)
        for rbuf in rbufs:
            self.mem.write(rbuf, b"\xee" * PAGE)
        for opc, bufs in ((NvmOpcode.WRITE, wbufs), (NvmOpcode.READ, rbufs)):
            for start in range(0, count, qd):
                batch = range(start, min(count, start + qd))
                cids = [self.submit_io(qid, opc, blocks[i][0], bufs[i], ring=False) for i in batch]
                self.host.ring_sq(qid)
                done = self.host.wait(qid, len(cids))
                assert sorted(c.cid for c in done) == sorted(cids)
                assert all(c.status == Status.SUCCESS for c in done), done
        for (lba, data), rbuf in zip(blocks, rbufs, strict=True):
            assert self.mem.read(rbuf, PAGE) == data, f"LBA {lba}: data read back differs"

    def read_blocks(self, qid: int, first_lba: int, count: int) -> list[bytes]:
        out = []
        for i in range(count):
            buf = self.mem.alloc(PAGE)
            self.submit_io(qid, NvmOpcode.READ, first_lba + i * (PAGE // LBA), buf, ring=True)
            (c,) = self.host.wait(qid, 1)
            assert c.status == Status.SUCCESS
            out.append(self.mem.read(buf, PAGE))
        return out

    def expect_no_completion(self, qid: int, settle: float = 0.1) -> None:
        """Nothing more arrives on ``qid`` (bounded look, not a timing assertion)."""
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            got = self.host.reap(qid)
            assert not got, f"unexpected completions on queue {qid}: {got}"
            time.sleep(0.005)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            view = getattr(self, "view", None)
            if view is not None:
                view.release()
            if self.own_ram:
                self.ram.close()


def pattern(seed: int, i: int) -> bytes:
    """4 KiB that differ per (seed, block) and per dword."""
    head = struct.pack("<II", seed, i)
    return (head + bytes((seed * 31 + i * 7 + k) & 0xFF for k in range(56))) * (PAGE // 64)


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def eventfd_count(fd: int) -> int:
    ready, _, _ = select.select([fd], [], [], 0)
    if not ready:
        return 0
    return os.eventfd_read(fd)
