"""Tests of the LD_PRELOAD ioeventfd agent (nvme_emu/agent) and its client
(vfio_user/ioeventfd_agent.py) against the real /dev/kvm.

Each test starts a CHILD process (``python -c CHILD_SOURCE``) with the agent preloaded
(``LD_PRELOAD``) and ``NVME_EMU_AGENT_SOCKET`` set. The child is the "VMM": it creates a
KVM VM with :mod:`vfio_user.vmm.kvm` (whose ``fcntl.ioctl`` goes through libc's ``ioctl``, so
the agent sees KVM_CREATE_VM) and then obeys JSON-line commands on stdin, e.g. "write V to
GPA X N times", answering with every MMIO/IO exit its vCPU took. The test process plays
nvme-emu: it creates eventfds and memfd shadows, connects to the agent, and checks that
registered doorbell writes no longer reach the VMM (0 MMIO exits, the eventfd counts
them) and that everything else still does.

On the development machine /dev/kvm is PVM: plain ioeventfds work and POST_WRITE is not
supported (the agent reports ``caps.post_write`` False and refuses POST_WRITE records with
ENOTSUP). Where the kernel has POST_WRITE (the nested rig) the same test registers the
record and checks the shadow; ``NVME_EMU_EXPECT_POST_WRITE`` pins the expectation.

Skipped (with the reason printed) only when /dev/kvm is unusable or gcc is missing; the
QEMU smoke test also needs a QEMU with KVM already provided (provide-qemu.sh's cache or the
host's) and otherwise skips.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from vfio_user import ioeventfd_agent as A
from vfio_user.vmm import kvm as K
from vfio_user.vmm.post_write import EXPECT_POST_WRITE_ENV, post_write_expectation

from ..support.fds import efd_count

REPO = Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "nvme_emu" / "agent" / "build.sh"

BAR_GPA = 0xFEB0_0000
BAR_SIZE = 0x4000
SQ_DB = 0x1008          # "SQ 1 tail" doorbell offset
CQ_DB = 0x100C          # "CQ 1 head"
OTHER = 0x1010          # never registered
NOBODY = 65534

# --------------------------------------------------------------------------------------
# The child VMM
# --------------------------------------------------------------------------------------
CHILD_SOURCE = r'''
import ctypes, json, os, sys
from vfio_user.vmm import kvm as K
from vfio_user.vmm import x86

RAM_SIZE, CODE_GPA = 0x10000, 0x1000
st = {}

def reply(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

def create_vm(via):
    kvm = st.get("kvm") or K.Kvm()
    st["kvm"] = kvm
    if via == "fcntl":
        vm = kvm.create_vm()
    else:
        if via == "ctypes":
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.ioctl(kvm.fd, ctypes.c_ulong(K.KVM_CREATE_VM), ctypes.c_ulong(0))
        elif via == "cffi":
            import cffi
            ffi = cffi.FFI()
            ffi.cdef("int ioctl(int fd, unsigned long request, ...);")
            fd = ffi.dlopen(None).ioctl(kvm.fd, ffi.cast("unsigned long", K.KVM_CREATE_VM),
                                        ffi.cast("unsigned long", 0))
        else:
            raise ValueError(via)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "KVM_CREATE_VM via " + via)
        vm = K.VirtualMachine(fd, kvm.vcpu_mmap_size)
    st.setdefault("vms", []).append(vm)
    if "vm" not in st:
        st["vm"], st["ram"], st["vcpu"] = vm, vm.add_memory(0, RAM_SIZE, slot=0), vm.create_vcpu(0)
    return vm.fd

def run_write(addr, value, n, width):
    x86.prog_write_loop(addr, value, n, width=width).load(st["vcpu"], st["ram"], CODE_GPA)
    exits = []
    def handler(ex):
        if ex.kind == "MMIO":
            exits.append(["MMIO", ex.phys_addr, ex.length, ex.is_write, ex.value])
            return True
        if ex.kind in ("IO", "INTR"):
            exits.append([ex.kind, ex.port, ex.length, ex.is_write, ex.value])
            return True
        return False
    last = st["vcpu"].run_until(handler, max_exits=100000)
    return exits, last.kind

reply(ready=True, pid=os.getpid(), env_socket=os.environ.get("NVME_EMU_AGENT_SOCKET"))
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    try:
        if op == "create_vm":
            reply(ok=True, vm_fd=create_vm(cmd.get("via", "fcntl")))
        elif op == "write":
            exits, last = run_write(cmd["addr"], cmd["value"], cmd["n"], cmd.get("width", 4))
            reply(ok=True, exits=exits, last=last)
        elif op == "quit":
            reply(ok=True)
            break
        else:
            reply(ok=False, error="unknown op " + op)
    except Exception as e:
        reply(ok=False, error=repr(e))
'''


class Child:
    """The preloaded child VMM; ``stderr`` (the agent's log) goes to a file."""

    def __init__(self, so: str, sock_path: Optional[str], tmp: Path, *, with_env: bool = True) -> None:
        env = dict(os.environ)
        env["LD_PRELOAD"] = so
        env.pop(A.AGENT_SOCKET_ENV, None)
        if with_env and sock_path is not None:
            env[A.AGENT_SOCKET_ENV] = sock_path
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.sock_path = sock_path
        self.log_path = tmp / f"child-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD_SOURCE], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
                                     close_fds=True)
        hello = self._read()
        assert hello.get("ready"), hello
        self.pid: int = hello["pid"]
        self.env_socket = hello["env_socket"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited ({self.proc.poll()}); log:\n{self.log()}")
        return json.loads(line)

    def cmd(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        assert r.get("ok"), f"child {op} failed: {r}; log:\n{self.log()}"
        return r

    def create_vm(self, via: str = "fcntl") -> int:
        return self.cmd("create_vm", via=via)["vm_fd"]

    def write(self, off: int, value: int, n: int, *, width: int = 4, gpa: Optional[int] = None) -> list:
        """Run the write loop at BAR_GPA + off (or ``gpa``); the MMIO exits AT that address."""
        addr = BAR_GPA + off if gpa is None else gpa
        r = self.cmd("write", addr=addr, value=value, n=n, width=width)
        assert r["last"] == "HLT", r
        others = [e for e in r["exits"] if e[0] != "MMIO" or e[1] != addr]
        assert not others, f"unexpected exits {others}"
        return r["exits"]

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def fd_list(self) -> dict:
        out = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out[fd] = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                pass
        return out

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def settled_fd_count(self, expected: int, timeout: float = 1.0) -> int:
        """The child's fd count once it equals ``expected`` (or after ``timeout``): the
        agent closes a disconnected peer's socket asynchronously."""
        deadline = time.monotonic() + timeout
        while (n := self.fd_count()) != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return n

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()
        self._log.close()


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------
def _skip(reason: str) -> None:
    print(f"skipping agent tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def agent_so() -> str:
    ok, why = K.Kvm.available()
    if not ok:
        _skip(f"KVM unusable: {why}")
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        _skip("gcc not found: cannot build the agent")
    proc = subprocess.run([str(BUILD_SH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, f"build.sh failed:\n{proc.stderr}"
    so = proc.stdout.split()[-1]
    assert os.path.isfile(so), so
    return so


@pytest.fixture(autouse=True)
def no_fd_leaks():
    """The test process must hold the same fds after each test as before."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    after = set(os.listdir("/proc/self/fd"))
    leaked = {fd: _fd_target(fd) for fd in after - before}
    leaked = {fd: t for fd, t in leaked.items() if t is not None}
    assert not leaked, f"fds leaked by the test: {leaked}"


def _fd_target(fd: str) -> Optional[str]:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # the listdir fd itself, already closed


@pytest.fixture
def sockdir():
    # Not under pytest's tmp_path (0700): the "nobody" test must be able to reach the socket.
    d = tempfile.mkdtemp(prefix="nvme-emu-agent-")
    os.chmod(d, 0o711)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def spawn(agent_so, sockdir, tmp_path):
    """spawn(create_vm=True, with_env=True) -> Child; all closed (and logs printed) at teardown."""
    children: list[Child] = []

    def start(*, create_vm: bool = True, with_env: bool = True) -> Child:
        c = Child(agent_so, str(sockdir / f"agent{len(children)}.sock"), tmp_path, with_env=with_env)
        children.append(c)
        if create_vm:
            c.create_vm()
        return c

    yield start
    for c in children:
        c.close()
        print(f"---- child {c.pid} log ----\n{c.log()}")


@pytest.fixture
def child(spawn) -> Child:
    return spawn()


@pytest.fixture
def agent(child):
    with A.IoeventfdAgent(child.sock_path, timeout=3) as a:
        a.hello()  # the agent has accepted the connection (its fd exists in the child)
        yield a


class Efds:
    """Eventfds created by a test, closed at teardown."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def new(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds.append(fd)
        return fd

    def track(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    count = staticmethod(efd_count)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@pytest.fixture
def efds():
    e = Efds()
    yield e
    e.close()


def _memfd(efds: Efds, size: int = mmap.PAGESIZE) -> int:
    fd = efds.track(os.memfd_create("shadow", os.MFD_CLOEXEC))
    os.ftruncate(fd, size)
    return fd


def _wait_cleared(child: Child) -> None:
    """After a disconnect: the agent serves one peer at a time, so once a new connection's
    HELLO is answered, the previous peer's disconnect (and its CLEAR) has been handled."""
    with A.IoeventfdAgent(child.sock_path, timeout=3) as a:
        a.hello()


# --------------------------------------------------------------------------------------
# Interposition and start-up
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["fcntl", "ctypes", "cffi"])
def test_agent_learns_vm_fd_from_any_ioctl_caller(spawn, via):
    """KVM_CREATE_VM issued through Python's fcntl.ioctl, ctypes or cffi reaches the
    interposer (all three call libc's ioctl through the dynamic symbol table)."""
    c = spawn(create_vm=False)
    # No VM, no socket: a process that only passes LD_PRELOAD on (a wrapper, a helper)
    # never listens; the socket appearing tells the server the VMM and its VM exist.
    assert c.env_socket == c.sock_path
    assert not os.path.exists(c.sock_path)
    vm_fd = c.create_vm(via)
    with A.IoeventfdAgent(c.sock_path, timeout=3) as a:
        caps = a.hello()
        assert caps.vm_known and caps.ioeventfd, caps
        second = c.create_vm(via)  # only the first VM counts, logged once
        assert second != vm_fd
    log = c.log()
    assert f"nvme-emu agent: VM fd {vm_fd}\n" in log, log
    assert log.count("agent: VM fd ") == 1, log


def test_without_socket_env_agent_only_passes_ioctls_through(spawn, sockdir, efds):
    c = spawn(with_env=False)
    assert not any(sockdir.iterdir()), list(sockdir.iterdir())
    exits = c.write(SQ_DB, 1, 5)
    assert len(exits) == 5
    log = c.log()
    assert "listening" not in log and "VM fd" in log, log


def test_stale_socket_is_replaced(agent_so, sockdir, tmp_path):
    path = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(path))
    s.close()  # leaves the socket file behind, nobody listening
    c = Child(agent_so, str(path), tmp_path)
    try:
        c.create_vm()
        assert (path.stat().st_mode & 0o777) == 0o600
        with A.IoeventfdAgent(str(path), timeout=3) as a:
            assert a.hello().vm_known
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# Registration semantics
# --------------------------------------------------------------------------------------
def test_registered_doorbells_do_not_exit(child, agent, efds):
    caps = agent.hello()
    assert caps.vm_known and caps.ioeventfd
    sq, cq = efds.new(), efds.new()
    assert agent.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, sq), A.AgentRecord(CQ_DB, 4, cq)]) == [0, 0]
    assert child.write(SQ_DB, 7, 20) == []
    assert efds.count(sq) == 20 and efds.count(cq) == 0
    assert child.write(CQ_DB, 3, 10) == []
    assert efds.count(cq) == 10
    exits = child.write(OTHER, 9, 4)  # not registered: traps as before
    assert exits == [["MMIO", BAR_GPA + OTHER, 4, True, 9]] * 4
    assert efds.count(sq) == 0 and efds.count(cq) == 0
    assert "SET bar 0xfeb00000+0x4000: 2 registered, 0 refused, POST_WRITE not used" in child.log()


def test_clear_traps_again_and_set_after_clear_works(child, agent, efds):
    sq = efds.new()
    agent.hello()  # a round trip: the agent has accepted our connection (its fd counts in base)
    base = child.fd_count()
    assert agent.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, sq)]) == [0]
    assert child.fd_count() == base + 1, " ".join(f"{k}={v}" for k, v in sorted(child.fd_list().items()))  # the agent keeps one dup of the eventfd
    assert child.write(SQ_DB, 1, 5) == []
    agent.clear()
    assert child.fd_count() == base
    assert len(child.write(SQ_DB, 1, 5)) == 5
    assert efds.count(sq) == 5
    assert agent.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, sq)]) == [0]
    assert child.write(SQ_DB, 1, 6) == []
    assert efds.count(sq) == 6
    agent.clear()
    agent.clear()  # idempotent
    assert child.fd_count() == base
    assert "CLEAR: 1 deregistered, 0 failed" in child.log()


def test_set_replaces_the_previous_set(child, agent, efds):
    a, b = efds.new(), efds.new()
    assert agent.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, a)]) == [0]
    # The same registration again (would be EEXIST in KVM) is fine: SET clears first.
    assert agent.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, a)]) == [0]
    assert agent.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(CQ_DB, 4, b)]) == [0]
    assert len(child.write(SQ_DB, 1, 3)) == 3
    assert child.write(CQ_DB, 1, 3) == []
    assert efds.count(a) == 0 and efds.count(b) == 3
    # The BAR moved: same offsets, new base.
    moved = BAR_GPA + 0x10_0000
    assert agent.set(moved, BAR_SIZE, [A.AgentRecord(CQ_DB, 4, b)]) == [0]
    assert len(child.write(CQ_DB, 1, 2)) == 2
    assert child.write(0, 1, 2, gpa=moved + CQ_DB) == []
    assert efds.count(b) == 2


def test_disconnect_clears(child, efds):
    sq = efds.new()
    base = child.fd_count()
    with A.IoeventfdAgent(child.sock_path, timeout=3) as a:
        assert a.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, sq)]) == [0]
        assert child.write(SQ_DB, 2, 3) == []
    _wait_cleared(child)
    assert len(child.write(SQ_DB, 2, 3)) == 3
    assert efds.count(sq) == 3
    assert child.settled_fd_count(base) == base, child.fd_list()
    assert "disconnected: CLEAR, 1 deregistered, 0 failed" in child.log()


def test_datamatch(child, agent, efds):
    fd = efds.new()
    assert agent.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, fd, datamatch=5)]) == [0]
    assert child.write(SQ_DB, 5, 4) == []
    assert efds.count(fd) == 4
    assert child.write(SQ_DB, 6, 3) == [["MMIO", BAR_GPA + SQ_DB, 4, True, 6]] * 3
    assert efds.count(fd) == 0


@pytest.mark.parametrize("width", [1, 2, 8])
def test_other_widths(child, agent, efds, width):
    fd = efds.new()
    value = {1: 0x5B, 2: 0xBEEF, 8: 0x0123_4567_89AB_CDEF}[width]
    assert agent.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(0x2000, width, fd)]) == [0]
    assert child.write(0x2000, value, 3, width=width) == []
    assert efds.count(fd) == 3


def test_invalid_records_are_refused_alone(child, agent, efds):
    fd = efds.new()
    recs = [
        A.AgentRecord(BAR_SIZE - 2, 4, fd),     # straddles the end of the BAR
        A.AgentRecord(BAR_SIZE, 4, fd),         # just past it
        A.AgentRecord(0x5000, 4, fd),           # far outside
        A.AgentRecord(2**64 - 2, 4, fd),        # offset + size wraps
        A.AgentRecord(0x2000, 3, fd),           # size not 1/2/4/8
        A.AgentRecord(0x2010, 0, fd),           # size 0
        A.AgentRecord(SQ_DB, 4, fd),            # valid: registered regardless
        A.AgentRecord(BAR_SIZE - 4, 4, fd),     # valid: the last dword
    ]
    assert agent.set(BAR_GPA, BAR_SIZE, recs) == [errno.EINVAL] * 6 + [0, 0]
    assert len(child.write(0x5000, 1, 2)) == 2          # not registered
    assert len(child.write(BAR_SIZE, 1, 2)) == 2
    assert len(child.write(0x2000, 1, 2)) == 2
    assert child.write(SQ_DB, 1, 2) == []
    assert child.write(BAR_SIZE - 4, 1, 2) == []
    assert efds.count(fd) == 4
    assert "2 registered, 6 refused" in child.log()


def test_non_eventfds_are_refused(child, agent, efds):
    good = efds.new()
    r, w = os.pipe()
    efds.track(r), efds.track(w)
    mfd = _memfd(efds)
    recs = [A.AgentRecord(SQ_DB, 4, r), A.AgentRecord(CQ_DB, 4, mfd), A.AgentRecord(OTHER, 4, good)]
    assert agent.set(BAR_GPA, BAR_SIZE, recs) == [errno.EBADF, errno.EBADF, 0]
    assert len(child.write(SQ_DB, 1, 2)) == 2
    assert len(child.write(CQ_DB, 1, 2)) == 2
    assert child.write(OTHER, 1, 2) == []


def test_fd_index_out_of_range(child, agent, efds):
    fd = efds.new()
    body = A.SET_BODY.pack(BAR_GPA, BAR_SIZE) + b"".join([
        A.RECORD.pack(SQ_DB, 4, 0, 0, 1, -1, 0),     # only fd 0 is sent
        A.RECORD.pack(CQ_DB, 4, 0, 0, -1, -1, 0),
        A.RECORD.pack(OTHER, 4, 0, 0, 0, -1, 0),     # valid
        A.RECORD.pack(0x2000, 4, A.REC_FLAG_POST_WRITE, 0, 0, 7, 0),  # shadow index out of range
        A.RECORD.pack(0x2008, 4, 0, 0, 0, 0, 0),     # a shadow without POST_WRITE
        A.RECORD.pack(0x2010, 4, 1 << 7, 0, 0, -1, 0),  # unknown flag
    ])
    op, count, rbody = agent.transact_raw(A.pack_header(A.OP_SET, 6) + body, [fd])
    assert (op, count) == (A.OP_REPLY | A.OP_SET, 6)
    assert struct.unpack("<7i", rbody) == (0, errno.EBADF, errno.EBADF, 0, errno.EBADF, errno.EINVAL,
                                           errno.EINVAL)
    assert child.write(OTHER, 1, 2) == []


def test_malformed_messages_get_error_replies(child, agent, efds):
    fd = efds.new()
    agent.hello()  # a round trip: the agent has accepted our connection (its fd counts in base)
    base = child.fd_count()

    def expect(data: bytes, op: int, status: int, fds=()) -> None:
        rop, count, body = agent.transact_raw(data, fds)
        assert (rop, count, struct.unpack_from("<i", body)[0]) == (op, 0, status), data[:16].hex()

    good = A.pack_set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, fd)])[0]
    expect(b"\x01\x02\x03\x04\x05", A.OP_REPLY, errno.EINVAL)                       # short
    expect(b"", A.OP_REPLY, errno.EINVAL)                                            # empty datagram
    expect(A.pack_header(A.OP_HELLO, magic=0x12345678), A.OP_REPLY, errno.EINVAL)    # bad magic
    expect(A.pack_header(A.OP_HELLO, version=2), A.OP_REPLY, errno.EINVAL)           # bad version
    expect(A.pack_header(A.OP_SET, A.MAX_RECORDS + 1) + good[16:] + b"\0" * 40 * A.MAX_RECORDS, 0x82, errno.EINVAL, [fd])  # count > max
    expect(A.pack_header(A.OP_SET, 2) + good[16:], 0x82, errno.EINVAL, [fd])        # count vs size
    expect(good[:-1], 0x82, errno.EINVAL, [fd])                                      # short record
    expect(good + b"\0", 0x82, errno.EINVAL, [fd])                                   # trailing byte
    expect(A.pack_header(A.OP_SET, 0), 0x82, errno.EINVAL)                           # no body
    expect(A.pack_header(A.OP_CLEAR, 1), 0x83, errno.EINVAL)                         # CLEAR with count
    expect(A.pack_header(9), 0x89, errno.EOPNOTSUPP)                                 # unknown op
    expect(good + b"\0" * 8192, 0x82, errno.EINVAL, [fd])                            # truncated datagram
    with pytest.raises(A.AgentError) as ei:                                          # BAR of size 0
        agent.set(BAR_GPA, 0, [A.AgentRecord(SQ_DB, 4, fd)])
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(A.AgentError) as ei:                                          # BAR wraps
        agent.set(2**64 - 0x1000, BAR_SIZE, [])
    assert ei.value.errno == errno.EINVAL
    assert child.fd_count() == base, f"received fds not closed: {child.fd_list()}"
    # Still working, same connection.
    assert agent.hello().vm_known
    assert agent.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, fd)]) == [0]
    assert child.write(SQ_DB, 1, 3) == []
    assert efds.count(fd) == 3


def test_many_records_and_fds(child, agent, efds):
    # an NVMe controller with 64 I/O queue pairs: 130 doorbells, each its own eventfd
    fds = [efds.new() for _ in range(130)]
    recs = [A.AgentRecord(0x1000 + 4 * i, 4, fds[i % len(fds)]) for i in range(A.MAX_RECORDS)]
    assert agent.set(BAR_GPA, BAR_SIZE, recs) == [0] * A.MAX_RECORDS
    assert child.write(0x1000 + 4 * 129, 1, 2) == []
    assert efds.count(fds[129]) == 2
    with pytest.raises(ValueError):
        agent.set(BAR_GPA, BAR_SIZE, recs + recs[:1])


def test_post_write(child, agent, efds):
    """ENOTSUP where the kernel lacks KVM_IOEVENTFD_FLAG_POST_WRITE (this host); registered
    with the value landing in the shadow where it has it (the nested rig)."""
    caps = agent.hello()
    expected = post_write_expectation()
    if expected is not None:
        assert caps.post_write == expected, f"{EXPECT_POST_WRITE_ENV}={int(expected)} but agent caps {caps}"
    print(f"POST_WRITE supported by the kernel: {caps.post_write}")
    fd = efds.new()
    shadow = _memfd(efds)
    r, w = os.pipe()
    efds.track(r), efds.track(w)
    small = _memfd(efds, 16)
    recs = [
        A.AgentRecord(SQ_DB, 4, fd, shadow_fd=shadow, shadow_offset=0x40, post_write=True),
        A.AgentRecord(CQ_DB, 4, fd, shadow_fd=shadow, shadow_offset=0x42, post_write=True),   # misaligned
        A.AgentRecord(0x2000, 4, fd, shadow_fd=small, shadow_offset=16, post_write=True),     # past the end
        A.AgentRecord(0x2008, 4, fd, shadow_fd=r, shadow_offset=0, post_write=True),          # not a file
        A.AgentRecord(0x2010, 4, fd, post_write=True),                                        # no shadow
    ]
    errs = agent.set(BAR_GPA, BAR_SIZE, recs)
    assert errs[1:] == [errno.EINVAL] * 4
    if not caps.post_write:
        assert errs[0] == errno.ENOTSUP
        assert len(child.write(SQ_DB, 0xDEADBEEF, 3)) == 3
        assert efds.count(fd) == 0
        return
    assert errs[0] == 0
    base = child.fd_count()
    with mmap.mmap(shadow, mmap.PAGESIZE) as m:
        assert child.write(SQ_DB, 0xDEADBEEF, 3) == []
        assert efds.count(fd) == 3
        assert m[0x40:0x44] == (0xDEADBEEF).to_bytes(4, "little")
        assert m[0x3C:0x40] == b"\0" * 4 and m[0x44:0x48] == b"\0" * 4
        # Two records on one shadow share one mapping.
        assert agent.set(BAR_GPA, BAR_SIZE, [
            A.AgentRecord(SQ_DB, 4, fd, shadow_fd=shadow, shadow_offset=0x40, post_write=True),
            A.AgentRecord(CQ_DB, 4, fd, shadow_fd=shadow, shadow_offset=0x48, post_write=True),
        ]) == [0, 0]
        assert child.write(CQ_DB, 0x1234, 2) == []
        assert m[0x48:0x4C] == (0x1234).to_bytes(4, "little")
        assert efds.count(fd) == 2
    assert "POST_WRITE used" in child.log()
    agent.clear()
    assert child.fd_count() <= base


def test_peer_with_another_uid_is_refused(child):
    if os.geteuid() != 0:
        _skip("needs root to connect as another uid")
    os.chmod(child.sock_path, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the forked peer
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(2)
            s.connect(child.sock_path)
            try:
                s.send(A.pack_header(A.OP_HELLO))
            except OSError:
                pass  # already closed by the agent: fine
            try:
                data = s.recv(4096)
                os.write(w, b"EOF" if data == b"" else b"REPLY")
            except socket.timeout:
                os.write(w, b"TIMEOUT")
            except ConnectionResetError:
                os.write(w, b"EOF")
            code = 0
        except BaseException as e:
            os.write(w, f"ERROR {e!r}".encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        result = b""
        while chunk := os.read(r, 256):
            result += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert result == b"EOF", result
    assert os.waitstatus_to_exitcode(status) == 0
    # The agent goes on serving peers of its own uid.
    with A.IoeventfdAgent(child.sock_path, timeout=3) as a:
        assert a.hello().vm_known
    assert f"refused peer pid {pid} uid {NOBODY}" in child.log()


# --------------------------------------------------------------------------------------
# The real target: QEMU
# --------------------------------------------------------------------------------------
def _cached_qemu() -> Optional[list[str]]:
    """A command prefix running a QEMU with KVM support that is already there (never builds)."""
    cache = Path(os.environ.get("NVME_EMU_CACHE", str(Path.home() / ".cache" / "nvme-emu")))
    run = cache / "bin" / "chroot-run"
    if run.exists() and (cache / "trixie-root" / "usr" / "bin" / "qemu-system-x86_64").exists():
        return [str(run), "env"]
    host = shutil.which("qemu-system-x86_64")
    return ["env"] if host else None


def test_qemu_with_agent_registers_ioeventfds(agent_so, sockdir, tmp_path, efds):
    """The agent in an unmodified QEMU (the provide-qemu.sh chroot's, if cached): it sees
    QEMU's KVM_CREATE_VM and registers an ioeventfd on QEMU's VM."""
    prefix = _cached_qemu()
    if prefix is None:
        _skip("no QEMU available without building one (run qemu-configs/provide-qemu.sh)")
    path = sockdir / "qemu.sock"
    log_path = tmp_path / "qemu.log"
    with open(log_path, "wb") as log:
        q = subprocess.Popen(prefix + [f"LD_PRELOAD={agent_so}", f"{A.AGENT_SOCKET_ENV}={path}",
                                       "qemu-system-x86_64" if prefix == ["env"] else "/usr/bin/qemu-system-x86_64",
                                       "-machine", "pc,accel=kvm", "-m", "16", "-nodefaults",
                                       "-display", "none", "-monitor", "none", "-serial", "none", "-S"],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        caps = None
        while time.monotonic() < deadline and q.poll() is None:
            if path.exists():
                with A.IoeventfdAgent(str(path), timeout=3) as a:
                    caps = a.hello()
                    if caps.vm_known:
                        fd = efds.new()
                        assert a.set(BAR_GPA, BAR_SIZE, [A.AgentRecord(SQ_DB, 4, fd),
                                                         A.AgentRecord(0x5000, 4, fd)]) == [0, errno.EINVAL]
                        a.clear()
                        break
            time.sleep(0.05)
        text = log_path.read_text(errors="replace")
        assert caps is not None and caps.vm_known, f"QEMU exited {q.poll()} / no VM fd; log:\n{text}"
        print(f"QEMU agent caps: {caps}")
    finally:
        if q.poll() is None:
            os.killpg(q.pid, signal.SIGTERM)
        try:
            q.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(q.pid, signal.SIGKILL)
            q.wait()
        print(f"---- qemu log ----\n{log_path.read_text(errors='replace')}")
    text = log_path.read_text(errors="replace")
    assert "nvme-emu agent: VM fd" in text and "1 registered, 1 refused" in text, text
