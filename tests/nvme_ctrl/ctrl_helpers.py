"""Fixtures for the NVMe controller suite.

Most tests run the real server, ``python -m nvme_emu serve``, in a separate process on a
socket in the test's tmp dir (trapped doorbells), and drive it from the test process with
the real vfio-user client (:class:`VfioUserClient`) and the host driver (:class:`NvmeHost`)
over memfd guest memory and real eventfds. At teardown every server gets SIGTERM and must
exit 0; its log (stdout + stderr) is printed, which pytest shows for failing tests.

A few tests look at controller internals; they use :class:`InProcessServer` (the same
``Server`` + ``NvmeFunction`` on a private event loop in a daemon thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nvme_emu.host import Completion, HostMemory, NvmeHost
from nvme_emu.spec import AdminOpcode, FeatureId, Status
from vfio_user.vmm.client import GuestRam, VfioUserClient
from vfio_user.constants import IrqIndex

REPO = Path(__file__).resolve().parents[2]
IOVA = 0x100000  #: where the guest RAM is DMA-mapped
RAM_SIZE = 64 << 20
PAGE = 4096
#: An admin command with no effect, for tests that only need a completion (Get Features,
#: Arbitration).
NOOP_ADMIN = dict(opc=AdminOpcode.GET_FEATURES, cdw10=FeatureId.ARBITRATION)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

NS1_SIZE = 64 << 20  # ram, 512-byte LBAs
NS2_SIZE = 32 << 20  # ram, 4096-byte LBAs
NS3_SIZE = 64 << 20  # file, 512-byte LBAs


#: The suite runs on both vfio-user server backends (libvfio-user where it is installed).
BACKENDS = ("python", "libvfio-user")


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """One ``python -m nvme_emu`` process with its log file."""

    def __init__(self, args: list[str], sock: str, log_path: Path, *, cwd: str | None = None) -> None:
        self.args = args
        self.sock = sock
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvme_emu", *self.args], stdout=self._log, stderr=subprocess.STDOUT, env=server_env(), cwd=self.cwd or str(REPO)
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not create {self.sock}:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status (None when it had to be killed)."""
        if self.proc is None:
            return None
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = None
            self._log.close()
        return self.returncode


@pytest.fixture(params=BACKENDS)
def spawn(request, tmp_path):
    """Factory: ``spawn(*namespace_specs, sock=..., extra=[...])`` starts a server process,
    on each vfio-user backend in turn."""
    backend = request.param
    if backend != "python":
        from vfio_user.libvfio import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            print(f"libvfio-user not installed: {reason}")
            pytest.skip(f"libvfio-user not installed: {reason}")
    started: list[ServerProcess] = []
    counter = [0]

    def _spawn(*namespaces: str, sock: str | None = None, extra: list[str] | None = None) -> ServerProcess:
        counter[0] += 1
        path = sock or str(tmp_path / f"nvme{counter[0]}.sock")
        args = ["serve", "--socket", path, "--doorbell", "trap", "--backend", backend]
        for ns in namespaces:
            args += ["--namespace", ns]
        args += extra or []
        srv = ServerProcess(args, path, tmp_path / f"server{counter[0]}.log")
        started.append(srv)
        return srv.start()

    yield _spawn
    failures = []
    for srv in started:
        rc = srv.stop()
        print(f"---- server log ({srv.log_path.name}, exit {rc}) ----")
        print(srv.log())
        if rc != 0:
            failures.append(f"{srv.log_path.name}: exit status {rc}")
    assert not failures, failures


@pytest.fixture
def disk(tmp_path) -> Path:
    return tmp_path / "disk.img"


@pytest.fixture
def namespaces(disk) -> list[str]:
    return ["ram:size=64M", "ram:size=32M,lba=4096", f"file:{disk},size=64M"]


@pytest.fixture
def server(spawn, namespaces) -> ServerProcess:
    return spawn(*namespaces)


# ---------------------------------------------------------------------------------------------
# The host side
# ---------------------------------------------------------------------------------------------


def efd_count(fd: int) -> int:
    """Read (and reset) an eventfd's counter; 0 when it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def efd_wait(fd: int, timeout: float = 10.0) -> int:
    """Wait until the eventfd is signalled, then read its counter."""
    select.select([fd], [], [], timeout)
    return efd_count(fd)


def status_name(status: int) -> str:
    return Status(status).name if status in Status._value2member_map_ else hex(status)


class Nvme:
    """A client + guest RAM + host driver, with out-of-order-safe command helpers."""

    def __init__(self, sock: str, *, msix: int = 8, intx: bool = False, enable: bool = True) -> None:
        self.sock = sock
        self.client = VfioUserClient(sock)
        self.client.negotiate()
        self.ram = GuestRam(RAM_SIZE)
        self.client.dma_map(IOVA, RAM_SIZE, self.ram)
        self.efds: list[int] = self.client.enable_irqs(IrqIndex.MSIX, msix) if msix else []
        self.intx_fd: int | None = self.client.enable_irqs(IrqIndex.INTX, 1)[0] if intx else None
        self.mem = HostMemory(self.ram.view, IOVA)
        self.host = NvmeHost(self.client, self.mem)
        self.stash: dict[int, dict[int, Completion]] = {}
        if enable:
            self.enable()

    def close(self) -> None:
        self.client.close()
        self.ram.close()

    # -- registers ------------------------------------------------------------------------

    def reg32(self, off: int) -> int:
        return self.host.reg32(off)

    def reg64(self, off: int) -> int:
        return self.host.reg64(off)

    def set_reg32(self, off: int, value: int) -> None:
        self.host.set_reg32(off, value)

    def sync(self) -> None:
        """A round trip: everything posted before has been handled by the server."""
        self.reg32(0x1C)

    def enable(self) -> None:
        self.host.enable()
        self.stash.clear()

    # -- memory ---------------------------------------------------------------------------

    def alloc(self, size: int, align: int = PAGE) -> int:
        addr = self.mem.alloc(size, align)
        self.mem.write(addr, bytes(size))
        return addr

    def write_mem(self, iova: int, data: bytes) -> None:
        self.mem.write(iova, data)

    def read_mem(self, iova: int, size: int) -> bytes:
        return self.mem.read(iova, size)

    # -- commands -------------------------------------------------------------------------

    def submit(self, qid: int, opc: int, **kw) -> int:
        return self.host.submit(qid, opc, **kw)

    def wait_cid(self, qid: int, cid: int, timeout: float = 10.0) -> Completion:
        stash = self.stash.setdefault(qid, {})
        deadline = time.monotonic() + timeout
        while cid not in stash:
            for c in self.host.reap(qid):
                stash[c.cid] = c
            if cid in stash:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no completion for cid {cid} on queue {qid}")
            time.sleep(0.0002)
        return stash.pop(cid)

    def cmd(self, qid: int, opc: int, **kw) -> Completion:
        return self.wait_cid(qid, self.submit(qid, opc, **kw))

    def ok(self, qid: int, opc: int, **kw) -> Completion:
        c = self.cmd(qid, opc, **kw)
        assert c.status == Status.SUCCESS, f"opcode {opc:#x} on queue {qid}: {status_name(c.status)}"
        return c

    def fails(self, status: int, qid: int, opc: int, **kw) -> Completion:
        c = self.cmd(qid, opc, **kw)
        assert c.status == status, f"opcode {opc:#x}: expected {status_name(status)}, got {status_name(c.status)}"
        return c

    def admin(self, opc: int, **kw) -> Completion:
        return self.cmd(0, opc, **kw)

    def identify(self, cns: int, nsid: int = 0, csi: int = 0) -> tuple[Completion, bytes]:
        buf = self.alloc(PAGE)
        self.write_mem(buf, b"\xa5" * PAGE)  # so zeros in the answer are the controller's
        c = self.admin(AdminOpcode.IDENTIFY, nsid=nsid, prp1=buf, cdw10=cns, cdw11=csi << 24)
        return c, self.read_mem(buf, PAGE)

    def set_features(self, fid: int, cdw11: int = 0, *, save: bool = False, **kw) -> Completion:
        return self.admin(AdminOpcode.SET_FEATURES, cdw10=fid | (1 << 31 if save else 0), cdw11=cdw11, **kw)

    def get_features(self, fid: int, cdw11: int = 0, sel: int = 0, **kw) -> Completion:
        return self.admin(AdminOpcode.GET_FEATURES, cdw10=fid | sel << 8, cdw11=cdw11, **kw)

    def get_log(
        self, lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0, rae: bool = False, lsp: int = 0, csi: int = 0
    ) -> tuple[Completion, bytes]:
        pages = -(-length // PAGE)
        buf = self.alloc(pages * PAGE)
        numd = length // 4 - 1
        prp2 = 0
        if pages == 2:
            prp2 = buf + PAGE
        elif pages > 2:
            plist = self.alloc(PAGE)
            self.write_mem(plist, struct.pack(f"<{pages - 1}Q", *(buf + PAGE * i for i in range(1, pages))))
            prp2 = plist
        c = self.admin(
            AdminOpcode.GET_LOG_PAGE,
            nsid=nsid,
            prp1=buf,
            prp2=prp2,
            cdw10=lid | lsp << 8 | (1 << 15 if rae else 0) | (numd & 0xFFFF) << 16,
            cdw11=numd >> 16,
            cdw12=offset & 0xFFFFFFFF,
            cdw13=offset >> 32,
            cdw14=csi << 24,
        )
        return c, self.read_mem(buf, length)

    def set_queues(self, n: int) -> int:
        c = self.set_features(FeatureId.NUMBER_OF_QUEUES, (n - 1) << 16 | (n - 1))
        assert c.status == Status.SUCCESS, status_name(c.status)
        return c.dw0

    def create_pair(self, qid: int, depth: int = 64, *, vector: int | None = None, ien: bool = True):
        from nvme_emu.host import HostQueue

        q = HostQueue(qid, depth, self.mem)
        iv = qid if vector is None else vector
        self.ok(0, AdminOpcode.CREATE_IO_CQ, prp1=q.cq, cdw10=(depth - 1) << 16 | qid, cdw11=iv << 16 | (2 if ien else 0) | 1)
        self.ok(0, AdminOpcode.CREATE_IO_SQ, prp1=q.sq, cdw10=(depth - 1) << 16 | qid, cdw11=qid << 16 | 1)
        self.host.queues[qid] = q
        self.stash.pop(qid, None)
        return q

    def io(self, qid: int, opc: int, nsid: int, slba: int, nlb: int, *, prp1: int = 0, prp2: int = 0, cdw12: int = 0, flags: int = 0, **kw) -> Completion:
        return self.cmd(
            qid,
            opc,
            nsid=nsid,
            prp1=prp1,
            prp2=prp2,
            cdw10=slba & 0xFFFFFFFF,
            cdw11=(slba >> 32) & 0xFFFFFFFF,
            cdw12=((nlb - 1) & 0xFFFF) | cdw12,
            flags=flags,
            **kw,
        )

    def prps(self, buf: int, length: int) -> tuple[int, int]:
        """PRP1/PRP2 for a contiguous buffer (PRP1 may carry an offset)."""
        first = min(length, PAGE - (buf % PAGE))
        rest = length - first
        if rest == 0:
            return buf, 0
        page2 = buf - buf % PAGE + PAGE
        if rest <= PAGE:
            return buf, page2
        n = -(-rest // PAGE)
        plist = self.alloc(n * 8, align=8)
        self.write_mem(plist, struct.pack(f"<{n}Q", *(page2 + PAGE * i for i in range(n))))
        return buf, plist

    def write(self, qid: int, nsid: int, slba: int, data: bytes, lba_size: int = 512, **kw) -> Completion:
        buf = self.alloc(len(data))
        self.write_mem(buf, data)
        p1, p2 = self.prps(buf, len(data))
        return self.io(qid, 0x01, nsid, slba, len(data) // lba_size, prp1=p1, prp2=p2, **kw)

    def read(self, qid: int, nsid: int, slba: int, nlb: int, lba_size: int = 512, **kw) -> tuple[Completion, bytes]:
        length = nlb * lba_size
        buf = self.alloc(length)
        self.write_mem(buf, b"\xee" * length)
        p1, p2 = self.prps(buf, length)
        c = self.io(qid, 0x02, nsid, slba, nlb, prp1=p1, prp2=p2, **kw)
        return c, self.read_mem(buf, length)

    def write_ok(self, qid: int, nsid: int, slba: int, data: bytes, lba_size: int = 512, **kw) -> None:
        c = self.write(qid, nsid, slba, data, lba_size, **kw)
        assert c.status == Status.SUCCESS, status_name(c.status)

    def read_ok(self, qid: int, nsid: int, slba: int, nlb: int, lba_size: int = 512, **kw) -> bytes:
        c, data = self.read(qid, nsid, slba, nlb, lba_size, **kw)
        assert c.status == Status.SUCCESS, status_name(c.status)
        return data

    # -- completions without consuming them ------------------------------------------------

    def peek_cqe(self, qid: int, timeout: float = 10.0) -> None:
        """Wait until the next CQE of ``qid`` is posted, without consuming it (no head doorbell)."""
        q = self.host.queues[qid]
        off = q.cq + q.head * 16 + 14
        deadline = time.monotonic() + timeout
        while self.mem.view[off - self.mem.iova] & 1 != q.phase:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no completion posted on queue {qid}")
            time.sleep(0.0002)


def no_completion(n: Nvme, qid: int, cid: int) -> bool:
    """After a round trip, the command ``cid`` has still not completed."""
    n.sync()
    for c in n.host.reap(qid):
        n.stash.setdefault(qid, {})[c.cid] = c
    return cid not in n.stash.get(qid, {})


@pytest.fixture
def nvme(server):
    """An enabled controller (admin queue only) on the default three namespaces."""
    n = Nvme(server.sock)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def io(nvme):
    """``nvme`` with 4 queue pairs allowed and I/O queue pair 1 (depth 64, vector 1) made."""
    nvme.set_queues(4)
    nvme.create_pair(1, 64)
    return nvme


# ---------------------------------------------------------------------------------------------
# In-process server (only for tests that must look inside the controller)
# ---------------------------------------------------------------------------------------------


class InProcessServer:
    """``Server(NvmeFunction(...), path)`` on ``new_event_loop()`` in a daemon thread."""

    def __init__(self, function, path: str) -> None:
        from vfio_user.server import Server, new_event_loop

        self.function = function
        self.path = path
        self.loop = new_event_loop()
        self.server = Server(function, path)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="nvme-emu-inproc", daemon=True)
        self.thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:  # reported by the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def call(self, fn, *args):
        """Run ``fn`` on the server's loop thread and return its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(30)

    def stop(self) -> None:
        self.call(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.function.close()
        self.loop.close()


@pytest.fixture
def inproc(tmp_path, disk):
    """Factory for an in-process server on the default namespaces; stopped at teardown."""
    from nvme_emu.controller import ControllerConfig
    from nvme_emu.function import NvmeFunction
    from nvme_emu.namespace import open_namespace

    made: list[InProcessServer] = []

    def _make() -> InProcessServer:
        specs = ["ram:size=64M", "ram:size=32M,lba=4096", f"file:{disk},size=64M"]
        config = ControllerConfig(serial="NVMEEMU00000001", model="nvme-emu")
        namespaces = [open_namespace(s, i, controller_seed=config.serial) for i, s in enumerate(specs, start=1)]
        srv = InProcessServer(NvmeFunction(namespaces, config, doorbell="trap"), str(tmp_path / f"inproc{len(made)}.sock"))
        made.append(srv)
        return srv

    yield _make
    for srv in made:
        srv.stop()
