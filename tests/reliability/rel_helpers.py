"""Fixtures for the reliability suite: hostile clients, hostile guests, faults, access.

Servers run as separate processes (``python -m nvme_emu serve``) so that what we count is
the server's own state: its fds (``/proc/<pid>/fd``) and its guest-memory mappings
(``/proc/<pid>/maps``, the memfds the client maps in are named ``guest-ram``). Every wait
is bounded; a test that hits a bound fails rather than hangs.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nvme_emu.host import Completion, HostMemory, HostQueue, NvmeHost  # noqa: E402
from nvme_emu.spec import AdminOpcode, FeatureId, Status  # noqa: E402
from vfio_user.vmm.client import GuestRam, VfioUserClient  # noqa: E402
from vfio_user.constants import IrqIndex  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
IOVA = 0x100000
RAM_SIZE = 16 << 20
PAGE = 4096
DEADLINE = 10.0


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """One ``python -m nvme_emu serve`` process, its socket and its log."""

    def __init__(
        self, sock: str, log_path: Path, namespaces: list[str], extra: list[str] | None = None, preexec_fn: Callable[[], object] | None = None
    ) -> None:
        self.sock = sock
        self.log_path = log_path
        args = [sys.executable, "-m", "nvme_emu", "serve", "--socket", sock]
        for ns in namespaces:
            args += ["--namespace", ns]
        args += extra or []
        if "--doorbell" not in args:
            args += ["--doorbell", "trap"]
        self.args = args
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=server_env(), cwd=str(REPO), preexec_fn=preexec_fn
        )
        self.returncode: int | None = None
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode} at start-up:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not listen:\n{self.log()}")
            time.sleep(0.02)
        self.baseline_fds: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            self._log.flush()
        except ValueError:
            pass
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- what the server holds ------------------------------------------------------------

    def fds(self) -> list[str]:
        d = f"/proc/{self.pid}/fd"
        out = []
        for name in os.listdir(d):
            try:
                out.append(f"{name} -> {os.readlink(os.path.join(d, name))}")
            except OSError:
                pass
        return sorted(out)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def guest_mappings(self) -> int:
        """Mappings of client memfds (guest RAM) in the server's address space."""
        with open(f"/proc/{self.pid}/maps") as f:
            return sum(1 for line in f if "memfd:guest" in line or "memfd:hostile" in line)

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def settle(self) -> None:
        """Take the baseline after one full client session (lazy event-loop fds exist then)."""
        c = VfioUserClient(self.sock, timeout=DEADLINE)
        c.negotiate()
        c.close()
        self.wait_log("client gone", 1)
        time.sleep(0.05)
        self.baseline_fds = self.fd_count()

    def wait_fds(self, expected: int | None = None, timeout: float = DEADLINE) -> int:
        expected = self.baseline_fds if expected is None else expected
        deadline = time.monotonic() + timeout
        while True:
            n = self.fd_count()
            if n == expected or time.monotonic() > deadline:
                return n
            time.sleep(0.01)

    def wait_log(self, text: str, count: int = 1, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline or not self.alive():
                raise AssertionError(f"server never logged {text!r} x{count}:\n{self.log()[-4000:]}")
            time.sleep(0.01)

    def wait_idle(self) -> None:
        """Until the previous client is gone (the server refuses a second one meanwhile)."""
        self.wait_log("client gone", self.log().count("client connected"))

    def answers(self) -> bool:
        """A fresh client can negotiate and read a register."""
        self.wait_idle()
        c = VfioUserClient(self.sock, timeout=DEADLINE)
        try:
            c.negotiate()
            cap = c.region_read(0, 0, 8)
            return len(cap) == 8 and cap != bytes(8)
        finally:
            c.close()

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.returncode is not None or self.proc.poll() is not None:
            self.returncode = self.proc.poll()
        else:
            self.proc.send_signal(sig)
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = None
        if not self._log.closed:
            self._log.close()
        return self.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.returncode = self.proc.returncode
        if not self._log.closed:
            self._log.close()


@pytest.fixture
def spawn(tmp_path):
    """``spawn(*namespace_specs, extra=[...], sock=...)``: a server process; checked at teardown.

    Teardown sends SIGTERM: a server that was not killed on purpose must exit 0.
    """
    started: list[tuple[ServerProcess, bool]] = []
    n = [0]

    def _spawn(*namespaces: str, extra: list[str] | None = None, sock: str | None = None, check_exit: bool = True) -> ServerProcess:
        n[0] += 1
        path = sock or str(tmp_path / f"s{n[0]}.sock")
        srv = ServerProcess(path, tmp_path / f"server{n[0]}.log", list(namespaces) or ["ram:size=16M"], extra)
        started.append((srv, check_exit))
        return srv

    yield _spawn
    bad = []
    for srv, check in started:
        was_running = srv.returncode is None and srv.alive()
        rc = srv.stop()
        if check and was_running and rc != 0:
            bad.append((srv.log_path.name, rc, srv.log()[-3000:]))
    assert not bad, bad


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def status_name(status: int) -> str:
    return Status(status).name if status in Status._value2member_map_ else hex(status)


class Host:
    """Client + memfd guest RAM + host driver; completions collected by CID (any order)."""

    def __init__(self, sock: str, *, ram_size: int = RAM_SIZE, msix: int = 4, timeout: float = DEADLINE, enable: bool = True) -> None:
        self.client = VfioUserClient(sock, timeout=timeout)
        self.client.negotiate()
        self.ram = GuestRam(ram_size)
        self.client.dma_map(IOVA, ram_size, self.ram)
        self.efds = self.client.enable_irqs(IrqIndex.MSIX, msix) if msix else []
        self.mem = HostMemory(self.ram.view, IOVA)
        self.host = NvmeHost(self.client, self.mem)
        self.stash: dict[int, dict[int, Completion]] = {}
        if enable:
            self.host.enable()

    def close(self) -> None:
        self.client.close()
        self.ram.close()

    def alloc(self, size: int, align: int = PAGE) -> int:
        addr = self.mem.alloc(size, align)
        self.mem.write(addr, bytes(size))
        return addr

    def sync(self) -> int:
        """A round trip; everything posted before has been handled."""
        return self.host.reg32(0x1C)

    def csts(self) -> int:
        return self.host.reg32(0x1C)

    def reap_all(self, qid: int) -> None:
        for c in self.host.reap(qid):
            self.stash.setdefault(qid, {})[c.cid] = c

    def wait_cid(self, qid: int, cid: int, timeout: float = DEADLINE) -> Completion:
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

    def cmd(self, qid: int, opc: int, timeout: float = DEADLINE, **kw) -> Completion:
        return self.wait_cid(qid, self.host.submit(qid, opc, **kw), timeout)

    def ok(self, qid: int, opc: int, **kw) -> Completion:
        c = self.cmd(qid, opc, **kw)
        assert c.status == Status.SUCCESS, f"opcode {opc:#x} on queue {qid}: {status_name(c.status)}"
        return c

    def set_queues(self, n: int) -> None:
        self.ok(0, AdminOpcode.SET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES, cdw11=(n - 1) << 16 | (n - 1))

    def create_pair(self, qid: int, depth: int = 64, vector: int | None = None) -> HostQueue:
        q = HostQueue(qid, depth, self.mem)
        iv = qid if vector is None else vector
        self.ok(0, AdminOpcode.CREATE_IO_CQ, prp1=q.cq, cdw10=(depth - 1) << 16 | qid, cdw11=iv << 16 | 0b11)
        self.ok(0, AdminOpcode.CREATE_IO_SQ, prp1=q.sq, cdw10=(depth - 1) << 16 | qid, cdw11=qid << 16 | 1)
        self.host.queues[qid] = q
        return q

    def prps(self, buf: int, length: int) -> tuple[int, int]:
        pages = -(-length // PAGE)
        if pages <= 1:
            return buf, 0
        if pages == 2:
            return buf, buf + PAGE
        plist = self.alloc(PAGE)
        self.mem.write(plist, struct.pack(f"<{pages - 1}Q", *(buf + PAGE * i for i in range(1, pages))))
        return buf, plist

    def rw(self, qid: int, opc: int, nsid: int, slba: int, nlb: int, buf: int, length: int, *, fua: bool = False, ring: bool = True) -> int:
        p1, p2 = self.prps(buf, length)
        return self.host.submit(
            qid, opc, nsid=nsid, prp1=p1, prp2=p2, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=(nlb - 1) | (1 << 30 if fua else 0), ring=ring
        )

    def write(self, qid: int, nsid: int, slba: int, data: bytes, lba: int = 512, **kw) -> Completion:
        buf = self.alloc(len(data))
        self.mem.write(buf, data)
        return self.wait_cid(qid, self.rw(qid, 0x01, nsid, slba, len(data) // lba, buf, len(data), **kw))

    def read(self, qid: int, nsid: int, slba: int, nlb: int, lba: int = 512) -> tuple[Completion, bytes]:
        buf = self.alloc(nlb * lba)
        c = self.wait_cid(qid, self.rw(qid, 0x02, nsid, slba, nlb, buf, nlb * lba))
        return c, self.mem.read(buf, nlb * lba)


def efd_wait(fd: int, timeout: float = DEADLINE) -> int:
    select.select([fd], [], [], timeout)
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
