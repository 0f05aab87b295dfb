"""nvme-emu's side of the doorbell agent, on the host, with the NVMe device.

A real ``nvme-emu serve --doorbell shadow --agent-socket PATH`` process, the real vfio-user
client (:class:`HostSession`) and, at PATH, a *fake agent*: a Python SEQPACKET server that
speaks the agent's wire protocol (the layouts of :mod:`vfio_user.ioeventfd_agent`), checks
every fd it receives, records each SET/CLEAR, and can play KVM: store a doorbell value in a
POST_WRITE shadow and signal the eventfd, or signal a plain eventfd. The nested e2e test
runs the real agent inside QEMU; this one pins down what the server sends and when, which
the nested rig only shows through its end result:

- nothing while memory decoding is off; a SET at the BAR's address once it is on;
- a new SET when the BAR moves, a CLEAR when decoding goes off, again a SET when it is on;
- with POST_WRITE: every doorbell, each with its eventfd and a memfd shadow slot; without:
  only I/O queue doorbells, and only while Doorbell Buffer Config holds their values;
- after a controller reset the plain set is withdrawn (the buffer is gone);
- doorbells signalled through the registered eventfds carry I/O, with no trapped write;
- a client that goes away withdraws everything.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
from dataclasses import dataclass, field

import pytest

from ..support.server import DEADLINE, wait_until
from .db_helpers import MAX_IO_QUEUES, PAGE
from nvme_emu.spec.registers import Reg
from vfio_user import ioeventfd_agent as A
from vfio_user.constants import RegionIndex
from vfio_user.pci import BAR0, COMMAND, COMMAND_MEMORY

BAR_A = 0xFE00_0000
BAR_B = 0xFD00_0000


@dataclass
class Registration:
    """One record of a SET, with the fds it came with (still open: owned by the fake)."""

    offset: int
    size: int
    flags: int
    eventfd: int
    shadow: int | None
    shadow_offset: int


@dataclass
class FakeAgent:
    """The agent's protocol, served from a thread; see the module docstring."""

    path: str
    post_write: bool
    events: list[tuple] = field(default_factory=list)
    current: dict[int, Registration] = field(default_factory=dict)
    gpa: int | None = None
    bad_fds: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.listen(1)
        self.sock.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="fake-agent", daemon=True)
        self.thread.start()

    # -- the server thread ----------------------------------------------------------------

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                self._session(conn)
            self._note(("disconnect",))

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        while not self.stopping:
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, A.MAX_MESSAGE, A.MAX_FDS)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            magic, version, op, count, _ = A.HEADER.unpack_from(data)
            assert (magic, version) == (A.AGENT_MAGIC, A.AGENT_VERSION)
            if op == A.OP_HELLO:
                caps = A.CAP_VM_KNOWN | A.CAP_IOEVENTFD | (A.CAP_POST_WRITE if self.post_write else 0)
                conn.send(A.pack_header(A.OP_REPLY | op) + A.HELLO_REPLY.pack(0, caps))
            elif op == A.OP_SET:
                self._set(data, count, fds)
                conn.send(A.pack_header(A.OP_REPLY | op, count) + A.STATUS.pack(0) + bytes(A.STATUS.size * count))
            elif op == A.OP_CLEAR:
                self._replace(None, {})
                self._note(("clear",))
                conn.send(A.pack_header(A.OP_REPLY | op) + A.STATUS.pack(0))

    def _set(self, data: bytes, count: int, fds: list[int]) -> None:
        gpa, size = A.SET_BODY.unpack_from(data, A.HEADER.size)
        regs: dict[int, Registration] = {}
        for i in range(count):
            off, rsize, flags, _dm, efd_i, shadow_i, shadow_off = A.RECORD.unpack_from(data, A.HEADER.size + A.SET_BODY.size + i * A.RECORD.size)
            efd = fds[efd_i]
            shadow = fds[shadow_i] if shadow_i >= 0 else None
            if os.readlink(f"/proc/self/fd/{efd}") != "anon_inode:[eventfd]":
                self.bad_fds.append(f"record {i}: eventfd index {efd_i} is {os.readlink(f'/proc/self/fd/{efd}')}")
            if shadow is not None and not os.readlink(f"/proc/self/fd/{shadow}").startswith("/memfd:"):
                self.bad_fds.append(f"record {i}: shadow is {os.readlink(f'/proc/self/fd/{shadow}')}")
            regs[off] = Registration(off, rsize, flags, efd, shadow, shadow_off)
        used = {r.eventfd for r in regs.values()} | {r.shadow for r in regs.values() if r.shadow is not None}
        for fd in set(fds) - used:
            os.close(fd)
        self._replace(gpa, regs)
        self._note(("set", gpa, size, len(regs)))

    def _replace(self, gpa: int | None, regs: dict[int, Registration]) -> None:
        with self.cond:
            old, self.current, self.gpa = self.current, regs, gpa
        for fd in {r.eventfd for r in old.values()} | {r.shadow for r in old.values() if r.shadow is not None}:
            os.close(fd)

    def _note(self, event: tuple) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    # -- the test's side ------------------------------------------------------------------

    def wait_event(self, index: int) -> tuple:
        """The ``index``-th event (0-based), waiting for it."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.events) > index, DEADLINE), f"no event #{index}: {self.events}"
            return self.events[index]

    def kvm_write(self, offset: int, value: int) -> None:
        """What KVM does for a registered doorbell write: POST_WRITE stores the value first."""
        with self.cond:
            reg = self.current[offset]
        if reg.flags & A.REC_FLAG_POST_WRITE:
            assert reg.shadow is not None
            with mmap.mmap(reg.shadow, reg.shadow_offset + PAGE - reg.shadow_offset % PAGE) as m:
                struct.pack_into("<I", m, reg.shadow_offset, value)
        os.eventfd_write(reg.eventfd, 1)

    def die(self) -> None:
        """The VMM and its agent are gone: the connection closes, registrations with it."""
        self.stopping = True
        self.thread.join(DEADLINE)
        self._replace(None, {})

    def close(self) -> None:
        self.die()
        self.sock.close()
        os.unlink(self.path)


class AgentDoorbells:
    """The host's doorbell writes as the guest would make them with the agent's registrations:
    registered offsets go to the fake KVM, the rest are trapped (REGION_WRITE)."""

    def __init__(self, agent: FakeAgent, trapped) -> None:
        self.agent = agent
        self.trapped = trapped

    def ring(self, slot: int, value: int) -> None:
        offset = Reg.DOORBELLS + 4 * slot
        if offset in self.agent.current:
            self.agent.kvm_write(offset, value)
        else:
            self.trapped.ring(slot, value)


def _config_write(s, offset: int, value: int) -> None:
    s.client.region_write(RegionIndex.CONFIG, offset, value.to_bytes(4, "little"))


def _place_bar(s, gpa: int) -> None:
    _config_write(s, BAR0, gpa & 0xFFFF_FFFF)
    _config_write(s, BAR0 + 4, gpa >> 32)


def _memory_decoding(s, on: bool) -> None:
    cmd = int.from_bytes(s.client.region_read(RegionIndex.CONFIG, COMMAND, 2), "little")
    cmd = cmd | COMMAND_MEMORY if on else cmd & ~COMMAND_MEMORY
    s.client.region_write(RegionIndex.CONFIG, COMMAND, cmd.to_bytes(2, "little"))


@pytest.fixture
def agent(tmp_path):
    made: list[FakeAgent] = []

    def make(post_write: bool) -> FakeAgent:
        a = FakeAgent(str(tmp_path / "nvme.sock.agent"), post_write)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()
        assert not a.bad_fds, a.bad_fds


@pytest.mark.parametrize("post_write", [True, False], ids=["post_write", "plain"])
def test_registrations_follow_bar_decoding_dbbuf_and_reset(serve, session, agent, post_write):
    fake = agent(post_write)
    srv = serve("shadow", extra=["--agent-socket", fake.path])
    s = session(srv.path)
    nslots = 2 * (MAX_IO_QUEUES + 1)
    io_sq1 = Reg.DOORBELLS + 8

    # decoding off: nothing is sent; on: a SET at the BAR's address
    _place_bar(s, BAR_A)
    assert fake.events == []
    _memory_decoding(s, True)
    _, gpa, size, n = fake.wait_event(0)
    assert gpa == BAR_A and size == s.client.region_info(0).size
    if post_write:
        assert n == nslots  # every SQ tail and CQ head, each with its shadow slot
        assert all(r.flags & A.REC_FLAG_POST_WRITE and r.shadow is not None and r.shadow_offset == r.offset - Reg.DOORBELLS
                   for r in fake.current.values())
    else:
        assert n == 0  # a plain ioeventfd carries no value: nothing until dbbuf holds them

    # the BAR moves: the same set at the new address; decoding off: CLEAR; on again: SET
    _place_bar(s, BAR_B)
    assert fake.wait_event(1)[:2] == ("set", BAR_B)
    _memory_decoding(s, False)
    assert fake.wait_event(2) == ("clear",)
    _memory_decoding(s, True)
    assert fake.wait_event(3)[:2] == ("set", BAR_B)

    # bring-up with Doorbell Buffer Config; the admin queue's doorbells stay trapped
    kind = "dbbuf-trap"
    s.bring_up(kind, depth=16)
    if post_write:
        assert len(fake.events) == 4, fake.events  # POST_WRITE carries values: nothing changes
    else:
        ev = fake.wait_event(4)
        assert ev[0] == "set" and ev[3] == nslots - 2  # I/O queue doorbells only, plain
        assert all(not r.flags & A.REC_FLAG_POST_WRITE and r.shadow is None for r in fake.current.values())
    assert io_sq1 in fake.current

    # I/O through the registered eventfds (the fake plays KVM), never a trapped I/O tail:
    # the host's kicks (EventIdx said "ring") become guest writes to registered offsets
    s.host.doorbells.kick = AgentDoorbells(fake, s.host.doorbells.inner).ring
    before = srv.stats()["doorbells"]
    s.write_read_check(1, 0, 8, qd=4, seed=5)
    st = srv.stats()["doorbells"]
    assert st["trapped_io_sq"] == before["trapped_io_sq"]
    assert st["signals"] > before["signals"]

    # a controller reset drops the doorbell buffer: the plain set is withdrawn
    events = len(fake.events)
    s.reset_and_bring_up("trap", depth=16)
    if not post_write:
        ev = fake.wait_event(events)
        assert ev[0] == "set" and ev[3] == 0

    # the client goes away: the registrations go with it
    s.close()
    wait_until(lambda: not fake.current and fake.events[-1] in (("clear",), ("disconnect",)), "the registrations withdrawn")


def test_agent_vanishing_leaves_doorbells_trapped(serve, session, agent):
    """The VMM (and its agent) die mid-session: the server notices at its next message to
    the agent, counts it, and the device goes on with trapped doorbells."""
    fake = agent(True)
    srv = serve("shadow", extra=["--agent-socket", fake.path])
    s = session(srv.path)
    _place_bar(s, BAR_A)
    _memory_decoding(s, True)
    assert fake.wait_event(0)[0] == "set"
    fake.die()
    _memory_decoding(s, False)  # the server's CLEAR finds no peer
    s.bring_up("trap", depth=16)
    s.write_read_check(1, 0, 4, qd=2, seed=9)
    assert srv.stats()["doorbells"]["trapped_io_sq"] > 0
    out = srv.log()
    line = out[out.rindex("ioeventfd agent "):].splitlines()[0]
    assert "connected=False" in line and "registered=0" in line, line
