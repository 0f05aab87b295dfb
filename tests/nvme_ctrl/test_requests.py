"""The request lifecycle: commands on a blocking backend run on the I/O pool and complete later.

The server runs in process (:class:`InProcessServer`) on two namespaces: 1 is a file whose
backend calls can be held at a gate by the test (and which never serves reads inline, so
every command goes through the pool), 2 is RAM. The host side is the real client over a
socket, memfd guest memory and eventfds. "Nothing was posted" is checked while a gate is
closed, so it can only fail if a completion went out before its backend call returned.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from ..support.host import Host, status_name
from ..support.inproc import InProcessServer
from .ctrl_helpers import PAGE
from nvme_emu.backends.file import FileBackend
from nvme_emu.backends.ram import RamBackend
from nvme_emu.controller import ControllerConfig
from nvme_emu.faults import FaultKind
from nvme_emu.function import NvmeFunction
from nvme_emu.namespace import Namespace
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from vfio_user.constants import RegionIndex
from vfio_user.pci import COMMAND, COMMAND_MASTER
from vfio_user.vmm.client import GuestRam

FILE_NSID, RAM_NSID = 1, 2
NS_SIZE = 16 << 20
GATE_TIMEOUT = 30.0


class GatedFile(FileBackend):
    """A file backend whose calls can be held: :meth:`hold` closes a gate for a kind of call
    (optionally at one byte offset); a call that reaches a closed gate announces itself
    (:meth:`wait_arrived`) and waits until the test opens it. Reads never go inline."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__(path, size)
        self.inline_budget = None  # every call goes to a worker, where its gate can hold it
        self._gates: dict[tuple[str, int | None], threading.Event] = {}
        self._arrived: dict[str, threading.Semaphore] = {k: threading.Semaphore(0) for k in ("read", "write", "zeroes", "flush")}
        self.calls: list[tuple[str, int, bool]] = []

    def hold(self, kind: str, offset: int | None = None) -> threading.Event:
        gate = self._gates[(kind, offset)] = threading.Event()
        return gate

    def open_all(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def wait_arrived(self, kind: str, count: int = 1) -> None:
        for _ in range(count):
            assert self._arrived[kind].acquire(timeout=GATE_TIMEOUT), f"no {kind} call reached its gate"

    def _gate(self, kind: str, offset: int) -> None:
        gate = self._gates.get((kind, offset)) or self._gates.get((kind, None))
        if gate is not None and not gate.is_set():
            self._arrived[kind].release()
            assert gate.wait(GATE_TIMEOUT), f"{kind} gate never opened"

    def read_into_nowait(self, offset, views) -> bool:
        return False

    def read_page_nowait(self, offset, view) -> bool:
        return False

    def read_into(self, offset, views) -> None:
        self._gate("read", offset)
        super().read_into(offset, views)

    def write_from(self, offset, views, *, fua=False) -> None:
        super().write_from(offset, views, fua=fua)  # pwritev, and fdatasync when FUA
        self.calls.append(("write", offset, fua))
        self._gate("write", offset)  # the completion must wait for all of the call

    def write_zeroes(self, offset, length, *, deallocate=False) -> None:
        self._gate("zeroes", offset)
        super().write_zeroes(offset, length, deallocate=deallocate)

    def flush(self) -> None:
        super().flush()
        self.calls.append(("flush", 0, False))
        self._gate("flush", 0)


class Rig:
    def __init__(self, srv: InProcessServer, backend: GatedFile, nvme: Host) -> None:
        self.srv, self.backend, self.nvme = srv, backend, nvme

    @property
    def ctrl(self):
        return self.srv.device.controller

    def posted(self, qid: int) -> bool:
        """Is a new CQE at the host's CQ head (without consuming it)?"""
        q = self.nvme.host.queues[qid]
        mem = self.nvme.mem
        return mem.view[q.cq + q.head * 16 + 14 - mem.iova] & 1 == q.phase

    def read_cmd(self, qid: int, slba: int, nlb: int = 8, nsid: int = FILE_NSID) -> tuple[int, int]:
        """Submit a Read; (cid, buffer iova)."""
        buf = self.nvme.alloc(nlb * 512)
        cid = self.nvme.submit(qid, NvmOpcode.READ, nsid=nsid, prp1=buf, cdw10=slba, cdw12=nlb - 1)
        return cid, buf


@pytest.fixture
def rig(tmp_path):
    backend = GatedFile(str(tmp_path / "gated.img"), NS_SIZE)
    config = ControllerConfig(serial="NVMEEMU00000001", model="nvme-emu")
    namespaces = [Namespace(FILE_NSID, backend, id_seed=config.serial), Namespace(RAM_NSID, RamBackend(NS_SIZE), id_seed=config.serial)]
    srv = InProcessServer(NvmeFunction(namespaces, config, doorbell="trap"), str(tmp_path / "requests.sock"))
    nvme = Host(srv.path)
    try:
        nvme.set_queues(4)
        nvme.create_pair(1, 64)
        nvme.create_pair(2, 64)
        yield Rig(srv, backend, nvme)
    finally:
        backend.open_all()  # no worker may stay parked: stop() joins them
        nvme.close()
        srv.close()


def _submit_blocking(rig: Rig, kind: str) -> int:
    """Submit one command of ``kind`` to the file namespace on queue 1; its cid."""
    n = rig.nvme
    if kind == "read":
        return rig.read_cmd(1, 0)[0]
    if kind == "write_zeroes":
        return n.submit(1, NvmOpcode.WRITE_ZEROES, nsid=FILE_NSID, cdw10=0, cdw12=2047)
    if kind == "dsm":
        ranges = n.alloc(PAGE)
        n.write_mem(ranges, struct.pack("<IIQ", 0, 2048, 0))
        return n.submit(1, NvmOpcode.DATASET_MANAGEMENT, nsid=FILE_NSID, prp1=ranges, cdw10=0, cdw11=1 << 2)
    if kind == "compare":  # against LBAs 0-7 of a new (zero) file: equal
        return n.submit(1, NvmOpcode.COMPARE, nsid=FILE_NSID, prp1=n.alloc(PAGE), cdw10=0, cdw12=7)
    if kind == "verify":
        return n.submit(1, NvmOpcode.VERIFY, nsid=FILE_NSID, cdw10=0, cdw12=7)
    if kind == "copy":  # LBAs 0-7 to 64
        desc = n.alloc(PAGE)
        n.write_mem(desc, struct.pack("<8xQH14x", 0, 7))
        return n.submit(1, NvmOpcode.COPY, nsid=FILE_NSID, prp1=desc, cdw10=64, cdw12=0)
    assert kind == "flush"
    return n.submit(1, NvmOpcode.FLUSH, nsid=FILE_NSID)


@pytest.mark.parametrize("kind,gate", [("read", "read"), ("write_zeroes", "zeroes"), ("dsm", "zeroes"), ("flush", "flush"),
                                       ("compare", "read"), ("verify", "read"), ("copy", "read")])
def test_other_queue_is_served_while_a_backend_call_blocks(rig: Rig, kind: str, gate: str):
    n = rig.nvme
    data = bytes(range(256)) * 16
    n.write_ok(2, RAM_NSID, 0, data)
    rig.backend.hold(gate)
    cid = _submit_blocking(rig, kind)
    rig.backend.wait_arrived(gate)
    for _ in range(20):  # the loop keeps serving queue 2 and the admin queue meanwhile
        assert n.read_ok(2, RAM_NSID, 0, 8) == data
    assert n.identify(1)[0].status == Status.SUCCESS
    assert not rig.posted(1), "completed before its backend call returned"
    rig.backend.open_all()
    c = n.wait_cid(1, cid)
    assert c.status == Status.SUCCESS, status_name(c.status)


def test_read_data_arrives_through_the_pool(rig: Rig):
    n = rig.nvme
    data = (bytes(range(251)) * 17)[:4096]
    n.write_ok(1, FILE_NSID, 16, data)
    assert n.read_ok(1, FILE_NSID, 16, 8) == data
    assert rig.ctrl.namespaces[FILE_NSID].stats.read_commands == 1
    # both went to the workers (a write always; this backend never serves a read inline),
    # and the queue's counter says so; the RAM namespace's commands never do
    n.write_ok(2, RAM_NSID, 0, data)
    assert n.read_ok(2, RAM_NSID, 0, 8) == data
    stats = rig.srv.call(lambda: {q: rig.ctrl.sqs[q].stats.to_workers for q in (1, 2)})
    assert stats == {1: 2, 2: 0}


def test_compare_mismatch_and_counters_through_the_pool(rig: Rig):
    n = rig.nvme
    n.write_ok(1, FILE_NSID, 0, b"\x11" * 4096)
    ns = rig.ctrl.namespaces[FILE_NSID]
    reads_before = rig.srv.call(lambda: ns.stats.read_commands)
    buf = n.alloc(PAGE)
    n.write_mem(buf, b"\x12" * 4096)
    c = n.cmd(1, NvmOpcode.COMPARE, nsid=FILE_NSID, prp1=buf, cdw10=0, cdw12=7)
    assert c.status == Status.COMPARE_FAILURE, status_name(c.status)
    n.write_mem(buf, b"\x11" * 4096)
    n.ok(1, NvmOpcode.COMPARE, nsid=FILE_NSID, prp1=buf, cdw10=0, cdw12=7)
    assert rig.srv.call(lambda: ns.stats.read_commands) == reads_before + 2


def test_completions_post_in_the_order_requests_finish(rig: Rig):
    n = rig.nvme
    a_gate, b_gate = rig.backend.hold("read", 0), rig.backend.hold("read", 4096)
    a, _ = rig.read_cmd(1, 0)
    b, _ = rig.read_cmd(1, 8)
    rig.backend.wait_arrived("read", 2)
    b_gate.set()
    n.peek_cqe(1)
    first = n.host.reap(1)
    assert [c.cid for c in first] == [b]
    assert first[0].sqhd == 2  # both were fetched: the head as of posting
    assert not rig.posted(1)
    a_gate.set()
    n.peek_cqe(1)
    second = n.host.reap(1)
    assert [c.cid for c in second] == [a] and second[0].sqhd == 2
    assert all(c.status == Status.SUCCESS for c in first + second)


def _pair_with_small_cq(n: Host, qid: int, sq_depth: int, cq_depth: int):
    """An SQ deeper than its CQ, so the CQ (not the SQ) limits what may be in flight."""
    from nvme_emu.testing.host import HostQueue

    q = HostQueue(qid, sq_depth, n.mem)  # the host submits with sq_depth; reaping is below
    n.ok(0, AdminOpcode.CREATE_IO_CQ, prp1=q.cq, cdw10=(cq_depth - 1) << 16 | qid, cdw11=qid << 16 | 2 | 1)
    n.ok(0, AdminOpcode.CREATE_IO_SQ, prp1=q.sq, cdw10=(sq_depth - 1) << 16 | qid, cdw11=qid << 16 | 1)
    n.host.queues[qid] = q
    return q


def _reap_small_cq(n: Host, q, cq_depth: int, state: dict) -> list[tuple[int, int]]:
    """(cid, status) of every CQE posted so far on a CQ of ``cq_depth``; rings its head."""
    out = []
    while True:
        entry = q.cq + state["head"] * 16
        if n.mem.load_acquire_u32(entry + 12) >> 16 & 1 != state["phase"]:
            break
        cid, sf = struct.unpack_from("<HH", n.mem.view, entry + 12 - n.mem.iova)
        out.append((cid, (sf >> 1) & 0x7FF))
        state["head"] += 1
        if state["head"] == cq_depth:
            state["head"], state["phase"] = 0, state["phase"] ^ 1
    if out:
        n.host.doorbells.ring(2 * q.qid + 1, state["head"])
    return out


def test_a_full_cq_counts_requests_in_flight(rig: Rig):
    n = rig.nvme
    q = _pair_with_small_cq(n, 3, sq_depth=16, cq_depth=4)  # the CQ holds 3 completions
    rig.backend.hold("read")
    cids = [rig.read_cmd(3, 8 * i)[0] for i in range(8)]
    rig.backend.wait_arrived("read", 3)
    n.sync()
    sq_head, reserved = rig.srv.call(lambda: (rig.ctrl.sqs[3].head, rig.ctrl.cqs[3].reserved))
    assert (sq_head, reserved) == (3, 3), "fetched more commands than the CQ can complete"
    rig.backend.open_all()
    state = {"head": 0, "phase": 1}
    done: dict[int, int] = {}
    deadline = time.monotonic() + GATE_TIMEOUT
    while len(done) < len(cids):  # each reap rings the CQ head, which lets more in
        for cid, status in _reap_small_cq(n, q, 4, state):
            assert cid not in done, f"cid {cid} completed twice"
            done[cid] = status
        assert time.monotonic() < deadline, f"completed {sorted(done)} of {cids}"
    assert sorted(done) == sorted(cids) and set(done.values()) == {Status.SUCCESS}
    assert rig.srv.call(lambda: rig.ctrl.sqs[3].stats.cq_full_stalls) >= 1
    assert rig.srv.call(lambda: rig.ctrl.cqs[3].reserved) == 0


def test_delete_sq_completes_after_its_commands_in_flight(rig: Rig):
    n = rig.nvme
    rig.backend.hold("read")
    read_cid, _ = rig.read_cmd(1, 0)
    rig.backend.wait_arrived("read")
    del_cid = n.submit(0, AdminOpcode.DELETE_IO_SQ, cdw10=1)
    n.sync()
    assert not rig.posted(0), "Delete I/O SQ completed while its command was in flight"
    assert rig.srv.call(lambda: 1 not in rig.ctrl.sqs)  # no more fetches from it
    rig.backend.open_all()
    n.peek_cqe(1)
    assert n.wait_cid(1, read_cid).status == Status.SUCCESS
    assert n.wait_cid(0, del_cid).status == Status.SUCCESS
    n.ok(0, AdminOpcode.DELETE_IO_CQ, cdw10=1)  # the SQ is detached from its CQ now


def test_fua_write_completes_only_after_the_durable_write_returned(rig: Rig):
    n = rig.nvme
    rig.backend.hold("write")
    buf = n.alloc(4096)
    n.write_mem(buf, b"\x42" * 4096)
    cid = n.submit(1, NvmOpcode.WRITE, nsid=FILE_NSID, prp1=buf, cdw10=0, cdw12=7 | 1 << 30)
    rig.backend.wait_arrived("write")
    assert rig.backend.calls[-1] == ("write", 0, True)  # pwritev + fdatasync already ran
    n.sync()
    assert not rig.posted(1)
    rig.backend.open_all()
    assert n.wait_cid(1, cid).status == Status.SUCCESS
    with open(rig.backend.path, "rb") as f:
        assert f.read(4096) == b"\x42" * 4096


def test_flush_completes_after_the_fsync_and_covers_earlier_writes(rig: Rig):
    n = rig.nvme
    n.write_ok(1, FILE_NSID, 0, b"\x13" * 4096)
    assert rig.backend.calls[-1] == ("write", 0, False)  # a cached write: not durable yet
    rig.backend.hold("flush")
    cid = n.submit(1, NvmOpcode.FLUSH, nsid=FILE_NSID)
    rig.backend.wait_arrived("flush")
    assert rig.backend.calls[-1] == ("flush", 0, False)
    n.sync()
    assert not rig.posted(1)
    rig.backend.open_all()
    assert n.wait_cid(1, cid).status == Status.SUCCESS


def test_format_runs_off_the_loop_and_applies_when_done(rig: Rig):
    n = rig.nvme
    rig.backend.hold("zeroes")
    cid = n.submit(0, AdminOpcode.FORMAT_NVM, nsid=FILE_NSID, cdw10=1)  # LBA format 1: 4 KiB
    rig.backend.wait_arrived("zeroes")
    data = b"\x99" * 4096
    n.write_ok(2, RAM_NSID, 0, data)  # I/O and admin commands go on meanwhile
    assert n.read_ok(2, RAM_NSID, 0, 8) == data
    c, ident = n.identify(0, nsid=FILE_NSID)
    assert c.status == Status.SUCCESS and ident[26] & 0xF == 0  # FLBAS: not switched yet
    rig.backend.open_all()
    assert n.wait_cid(0, cid).status == Status.SUCCESS
    c, ident = n.identify(0, nsid=FILE_NSID)
    assert ident[26] & 0xF == 1


def test_shutdown_flush_runs_off_the_loop(rig: Rig):
    from nvme_emu.spec.registers import Cc, Csts, Reg, Shst

    n = rig.nvme
    n.write_ok(1, FILE_NSID, 0, b"\x5a" * 4096)
    rig.backend.hold("flush")
    n.set_reg32(Reg.CC, n.reg32(Reg.CC) | 1 << Cc.SHN_SHIFT)  # normal shutdown
    rig.backend.wait_arrived("flush")
    assert (n.reg32(Reg.CSTS) >> Csts.SHST_SHIFT) & Csts.SHST_MASK == Shst.OCCURRING
    assert n.read_ok(2, RAM_NSID, 0, 8) == bytes(4096)  # the loop is free meanwhile
    rig.backend.open_all()
    deadline = time.monotonic() + GATE_TIMEOUT
    while (n.reg32(Reg.CSTS) >> Csts.SHST_SHIFT) & Csts.SHST_MASK != Shst.COMPLETE:
        assert time.monotonic() < deadline, "shutdown never completed"
        time.sleep(0.001)
    assert ("flush", 0, False) in rig.backend.calls


def test_one_interrupt_per_vector_for_a_drain_of_cqs_sharing_it(rig: Rig):
    """Two CQs on one vector, both completing in the same drain: one interrupt, not two."""
    n = rig.nvme
    vector = 3
    n.create_pair(3, 16, vector=vector)
    n.create_pair(4, 16, vector=vector)
    rig.backend.hold("read")
    a, _ = rig.read_cmd(3, 0)
    b, _ = rig.read_cmd(4, 8)
    rig.backend.wait_arrived("read", 2)
    pool = rig.ctrl.io_pool()
    before = {q: rig.srv.call(lambda q=q: rig.ctrl.state.cqs[q].stats.interrupts) for q in (3, 4)}

    def release_and_wait_for_both() -> None:
        # on the loop thread: no result is reaped until this returns, so both come in one batch
        rig.backend.open_all()
        deadline = time.monotonic() + GATE_TIMEOUT
        while len(pool._inbox.items) < 2:  # delivered to the inbox, not yet reaped
            assert time.monotonic() < deadline, "the workers never finished"
            time.sleep(0.001)

    rig.srv.call(release_and_wait_for_both)
    for qid, cid in ((3, a), (4, b)):
        n.peek_cqe(qid)
        (c,) = n.host.reap(qid)
        assert c.cid == cid and c.status == Status.SUCCESS
    after = {q: rig.srv.call(lambda q=q: rig.ctrl.state.cqs[q].stats.interrupts) for q in (3, 4)}
    assert sum(after.values()) - sum(before.values()) == 1, (before, after)


# -- the host says stop: nothing moves after its answer --------------------------------------
#
# Four reads of the file namespace wait at the read gate (the pool's four workers), a fifth
# is queued behind them. The gate opens 0.3 s after the stop is sent, from a timer thread:
# the stop's answer may only come once the four running reads are done, and the queued one
# is never started (its buffer keeps its 0xEE).

OPEN_AFTER = 0.3
DATA = 0x40000000


def _five_held_reads(rig: Rig, bufs: list[int]) -> list[int]:
    """LBAs 0-39 hold 0x5A; five reads of 4 KiB into ``bufs`` (0xEE), four of them running
    at the gate and one queued; their cids."""
    n = rig.nvme
    n.write_ok(1, FILE_NSID, 0, b"\x5a" * 5 * PAGE)
    rig.backend.hold("read")
    cids = [n.submit(1, NvmOpcode.READ, nsid=FILE_NSID, prp1=buf, cdw10=8 * i, cdw12=7, ring=False) for i, buf in enumerate(bufs)]
    n.host.ring_sq(1)
    rig.backend.wait_arrived("read", 4)
    return cids


def _answered_after_the_gate(rig: Rig, stop) -> float:
    """Run ``stop()`` (a request with a reply) with the gate opening OPEN_AFTER s later."""
    timer = threading.Timer(OPEN_AFTER, rig.backend.open_all)
    timer.start()
    try:
        started = time.monotonic()
        stop()
        return time.monotonic() - started
    finally:
        timer.join()


def _bus_master(n: Host, on: bool) -> None:
    cmd = int.from_bytes(n.client.region_read(RegionIndex.CONFIG, COMMAND, 2), "little")
    cmd = cmd | COMMAND_MASTER if on else cmd & ~COMMAND_MASTER
    n.client.region_write(RegionIndex.CONFIG, COMMAND, cmd.to_bytes(2, "little"))


def _irqs(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_reset_answers_only_when_no_worker_can_write_guest_memory(rig: Rig):
    from nvme_emu.spec.registers import Csts, Reg

    n = rig.nvme
    bufs = [n.alloc(PAGE) for _ in range(5)]
    for buf in bufs:
        n.write_mem(buf, b"\xee" * PAGE)
    _five_held_reads(rig, bufs)
    took = _answered_after_the_gate(rig, lambda: n.set_reg32(Reg.CC, 0))
    assert took >= OPEN_AFTER * 0.8, f"CC.EN=0 answered after {took:.3f} s, while four reads could still write"
    assert not n.reg32(Reg.CSTS) & Csts.RDY  # the reset is over for the host at once
    assert [n.read_mem(b, PAGE)[:1] for b in bufs] == [b"\x5a"] * 4 + [b"\xee"], "the queued read ran after the reset"
    time.sleep(0.1)
    assert [n.read_mem(b, PAGE) for b in bufs][4] == b"\xee" * PAGE
    n.enable()
    n.set_queues(4)
    n.create_pair(1, 64)
    n.sync()
    assert not rig.posted(1), "a request from before the reset posted into the new queue"
    assert n.read_ok(1, FILE_NSID, 0, 8) == b"\x5a" * PAGE


def test_unmap_waits_for_reads_into_it_and_cancels_queued_ones(rig: Rig):
    """Reads into the unmapped range: running ones finish before the reply, the queued one
    completes with Data Transfer Error; a read into other memory queued behind is served."""
    n = rig.nvme
    data = GuestRam(1 << 20, "hostile-data")
    try:
        n.client.dma_map(DATA, 1 << 20, data)
        data.view[:] = b"\xee" * (1 << 20)
        other = n.alloc(PAGE)
        n.write_mem(other, b"\xee" * PAGE)
        cids = _five_held_reads(rig, [DATA + i * PAGE for i in range(5)])
        cid_other = n.submit(1, NvmOpcode.READ, nsid=FILE_NSID, prp1=other, cdw10=0, cdw12=7)
        took = _answered_after_the_gate(rig, lambda: n.client.dma_unmap(DATA, 1 << 20))
        assert took >= OPEN_AFTER * 0.8, f"DMA_UNMAP answered after {took:.3f} s, while four reads could still write"
        assert rig.srv.call(lambda: rig.ctrl.memory.table.open_count()) == 1, "the data mapping is not really unmapped"
        view = data.view
        assert [bytes(view[i * PAGE : i * PAGE + 1]) for i in range(5)] == [b"\x5a"] * 4 + [b"\xee"]
        statuses = [n.wait_cid(1, cid).status for cid in cids]
        assert statuses == [Status.SUCCESS] * 4 + [Status.DATA_TRANSFER_ERROR], [status_name(s) for s in statuses]
        assert n.wait_cid(1, cid_other).status == Status.SUCCESS
        assert n.read_mem(other, PAGE) == b"\x5a" * PAGE
        assert bytes(view[4 * PAGE : 5 * PAGE]) == b"\xee" * PAGE
    finally:
        data.close()


def test_bus_master_clear_waits_for_running_calls_and_holds_completions(rig: Rig):
    """BME cleared: the running reads finish before the reply, the queued one is cancelled;
    no CQE and no interrupt until BME is set again, then all five complete."""
    n = rig.nvme
    bufs = [n.alloc(PAGE) for _ in range(5)]
    for buf in bufs:
        n.write_mem(buf, b"\xee" * PAGE)
    cids = _five_held_reads(rig, bufs)
    took = _answered_after_the_gate(rig, lambda: _bus_master(n, False))
    assert took >= OPEN_AFTER * 0.8, f"BME clear answered after {took:.3f} s, while four reads could still write"
    _irqs(n.efds[1])
    ram = n.submit(1, NvmOpcode.READ, nsid=RAM_NSID, prp1=n.alloc(PAGE), cdw10=0, cdw12=7)  # a doorbell: latched
    n.sync()
    time.sleep(0.1)
    assert not rig.posted(1), "a CQE was posted while Bus Master Enable was clear"
    assert not _irqs(n.efds[1]), "an interrupt while Bus Master Enable was clear"
    assert [n.read_mem(b, PAGE)[:1] for b in bufs] == [b"\x5a"] * 4 + [b"\xee"]
    _bus_master(n, True)
    statuses = [n.wait_cid(1, cid).status for cid in cids]
    assert statuses == [Status.SUCCESS] * 4 + [Status.DATA_TRANSFER_ERROR], [status_name(s) for s in statuses]
    assert n.wait_cid(1, ram).status == Status.SUCCESS
    assert _irqs(n.efds[1])


def test_bus_master_clear_holds_delayed_completions_and_coalesced_interrupts(rig: Rig):
    """A completion the fault injector delays, and the interrupt a coalescing timer would
    raise: neither is posted nor raised while BME is clear, both once it is set again."""
    n = rig.nvme
    rig.srv.call(lambda: rig.ctrl.faults.add({"kind": FaultKind.LATENCY, "nsid": RAM_NSID, "us": 200_000, "op": "read", "remaining": 1}))
    _irqs(n.efds[1])
    delayed = n.submit(1, NvmOpcode.READ, nsid=RAM_NSID, prp1=n.alloc(PAGE), cdw10=0, cdw12=7)
    n.sync()
    _bus_master(n, False)
    time.sleep(0.4)  # twice the injected latency

    def coalescing_timer_expires() -> None:  # what Coalescing's timer calls, with an entry due
        cq = rig.ctrl.cqs[2]
        cq.unsignalled += 1
        rig.ctrl.completions.flush_coalesced(cq)

    rig.srv.call(coalescing_timer_expires)
    assert not rig.posted(1), "the delayed completion was posted while Bus Master Enable was clear"
    assert not _irqs(n.efds[1]) and not _irqs(n.efds[2]), "an interrupt while Bus Master Enable was clear"
    _bus_master(n, True)
    assert n.wait_cid(1, delayed).status == Status.SUCCESS
    assert _irqs(n.efds[1]) and _irqs(n.efds[2]), "the held interrupts are raised when BME is set again"
