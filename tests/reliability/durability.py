"""What a crash or power cut may and may not do to written data, and how we check it.

Shared by the SIGKILL test (``test_faults.py``) and the power-cut test (``test_power_cut.py``
with its L1 job ``power_cut_job.py``): the workload (:class:`WriteRun`, the project's host
driver over vfio-user), its record, and the check.

Each write puts a unique pattern (its id and its slot) in one 4 KiB slot; slots are distinct
(a permutation), so after the fault every slot must hold zeros, or exactly its own write.
Which writes must have survived is decided from an *acknowledgement record*: a text file the
driver appends to only after it has seen an event happen, and flushes to stable storage after
each batch, so whatever survives of it is a subset of the truth and the check stays sound:

* ``S <wid> <slot> <fua>``  write ``wid`` submitted to ``slot`` (fua 1: with Force Unit Access)
* ``C <wid>``               write ``wid`` completed successfully
* ``F <fid>``               Flush ``fid`` submitted
* ``FC <fid>``              Flush ``fid`` completed successfully

A write is *durable* when it completed with FUA, or completed (``C`` before ``F``) before a
Flush that then completed. A torn last line (the power went mid-append) is ignored.
"""

from __future__ import annotations

import os
import random
import select
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, TextIO

from ..support.host import Host, PAGE, status_name
from nvme_emu.spec.commands import NvmOpcode, Status

SLOT = 4096  # one write = 8 LBAs of 512 bytes
LBA = 512
ZEROS = bytes(SLOT)
QD = 32
READ_SLOTS = 16  # slots per read of a whole namespace (64 KiB, one PRP list)


def pattern(write_id: int, slot: int) -> bytes:
    """The contents of write ``write_id`` to ``slot`` (both in every 16 bytes, so a torn or
    misplaced write shows)."""
    return struct.pack("<QQ", write_id, slot) * (SLOT // 16)


def slot_order(nslots: int, seed: int) -> list[int]:
    """The slots in the order writes use them: write ``i`` (id ``i + 1``) goes to ``order[i]``."""
    order = list(range(nslots))
    random.Random(seed).shuffle(order)
    return order


class AckRecord:
    """Writer of an acknowledgement record (see the module docstring). ``sync`` makes what
    was logged so far durable (fsync; over 9p that reaches the host's file)."""

    def __init__(self, path: str) -> None:
        self._f: TextIO = open(path, "w")

    def submitted(self, wid: int, slot: int, fua: bool) -> None:
        self._f.write(f"S {wid} {slot} {int(fua)}\n")

    def completed(self, wid: int) -> None:
        self._f.write(f"C {wid}\n")

    def flush_submitted(self, fid: int) -> None:
        self._f.write(f"F {fid}\n")

    def flush_completed(self, fid: int) -> None:
        self._f.write(f"FC {fid}\n")

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()


@dataclass
class Acks:
    """What an acknowledgement record proves."""

    slot_of: dict[int, int] = field(default_factory=dict)  # wid -> slot, every submitted write
    completed: set[int] = field(default_factory=set)
    fua: set[int] = field(default_factory=set)  # submitted with FUA
    durable: dict[int, int] = field(default_factory=dict)  # slot -> wid
    flushes: int = 0  # completed Flushes
    torn: int = 0  # lines after the end of the intact prefix (cut mid-append)

    @property
    def in_flight(self) -> int:
        """Writes submitted and not seen complete when the record ends."""
        return len(self.slot_of) - len(self.completed)


def parse_record(lines: Iterable[str]) -> Acks:
    """Replay a record. It ends at its first damaged line: one without a newline, or with
    NUL bytes (a page of the file that never reached the disk before a later one did), so
    what is replayed is a prefix of what the driver wrote, and every fact in it is true.
    A well-formed line that contradicts the ones before it raises ValueError (a bug)."""
    acks = Acks()
    unflushed: list[int] = []  # completed non-FUA writes no Flush submitted yet covers
    covers: dict[int, list[int]] = {}
    slots: set[int] = set()
    items = list(lines)
    for n, line in enumerate(items):
        if not line.endswith("\n") or "\0" in line:
            acks.torn = len(items) - n
            break
        f = line.split()
        if f and f[0] == "S" and len(f) == 4 and f[3] in "01":
            wid, slot = int(f[1]), int(f[2])
            if wid in acks.slot_of or slot in slots:
                raise ValueError(f"record line {n + 1}: write {wid} or slot {slot} used twice")
            acks.slot_of[wid] = slot
            slots.add(slot)
            if f[3] == "1":
                acks.fua.add(wid)
        elif f and f[0] == "C" and len(f) == 2:
            wid = int(f[1])
            if wid not in acks.slot_of or wid in acks.completed:
                raise ValueError(f"record line {n + 1}: completion of unknown or completed write {wid}")
            acks.completed.add(wid)
            if wid in acks.fua:
                acks.durable[acks.slot_of[wid]] = wid
            else:
                unflushed.append(wid)
        elif f and f[0] == "F" and len(f) == 2:
            covers[int(f[1])] = unflushed
            unflushed = []
        elif f and f[0] == "FC" and len(f) == 2:
            fid = int(f[1])
            if fid not in covers:
                raise ValueError(f"record line {n + 1}: completion of unknown Flush {fid}")
            for wid in covers.pop(fid):
                acks.durable[acks.slot_of[wid]] = wid
            acks.flushes += 1
        else:
            raise ValueError(f"record line {n + 1} not understood: {line!r}")
    return acks


def read_record(path: str) -> Acks:
    with open(path, errors="replace") as f:
        return parse_record(f.readlines())


@dataclass
class Verdict:
    """The outcome of checking a namespace image against a record."""

    lost: list[tuple[int, int]]  # (slot, wid): durable writes not intact
    foreign: list[int]  # slots holding neither zeros nor their own write
    present: int  # slots holding their write (durable or not)
    unacked_present: int  # of those, writes never seen complete (in flight at the fault)
    checked: int  # slots looked at

    @property
    def ok(self) -> bool:
        return not self.lost and not self.foreign


def check_slots(read_slot: Callable[[int], bytes], nslots: int, acks: Acks, seed: int | None = None) -> Verdict:
    """Every durable write intact; every slot zeros or its own write.

    A slot's own write is the one the record shows submitted there; slots past the record
    (submitted after its last sync) are identified by ``seed`` (``slot_order``), without
    it such a slot may hold any well-formed write of its own slot."""
    wid_of = {slot: wid for wid, slot in acks.slot_of.items()}
    if seed is not None:
        for i, slot in enumerate(slot_order(nslots, seed)):
            wid_of.setdefault(slot, i + 1)
    lost: list[tuple[int, int]] = []
    foreign: list[int] = []
    present = unacked_present = 0
    for slot in range(nslots):
        got = read_slot(slot)
        wid = wid_of.get(slot)
        own = wid is not None and got == pattern(wid, slot)
        if wid is None and got != ZEROS:
            w, s = struct.unpack_from("<QQ", got)
            own = s == slot and got == pattern(w, slot)
        if own:
            present += 1
            unacked_present += wid is not None and wid not in acks.completed
        elif got != ZEROS:
            foreign.append(slot)
        if slot in acks.durable and got != pattern(acks.durable[slot], slot):
            lost.append((slot, acks.durable[slot]))
    return Verdict(lost, foreign, present, unacked_present, nslots)


def check_image(data: bytes | memoryview, acks: Acks, seed: int | None = None) -> Verdict:
    """:func:`check_slots` over a whole namespace image in memory."""
    view = memoryview(data)
    return check_slots(lambda s: bytes(view[s * SLOT:(s + 1) * SLOT]), len(view) // SLOT, acks, seed)


class WriteRun:
    """Distinct-slot writes at queue depth ``QD`` on one namespace, each event recorded after
    it was seen. ``honest=False``: the record says FUA, the command has none, no Flush."""

    def __init__(self, h: Host, nsid: int, rec: AckRecord, order: list[int], rng: random.Random, *, honest: bool) -> None:
        self.h, self.nsid, self.rec, self.order, self.rng, self.honest = h, nsid, rec, order, rng, honest
        self.bufs = h.alloc(QD * SLOT)
        self.free = list(range(QD))
        self.inflight: dict[int, tuple[str, int, int]] = {}  # cid -> ("W", wid, buffer) | ("F", fid, covered)
        self.fua_of: dict[int, bool] = {}
        self.next_wid = 0
        self.next_flush = rng.randint(20, 80)
        self.fid = 0
        self.acked = self.fua_acked = self.flushes = 0
        self.flushed = 0  # non-FUA writes covered by a completed Flush (they completed before it was sent)

    @property
    def durable(self) -> int:
        return self.fua_acked + self.flushed

    def _submit(self, limit: int) -> None:
        while len(self.inflight) < QD and self.free and self.next_wid < limit:
            if self.honest and self.next_wid >= self.next_flush:
                self.next_flush += self.rng.randint(20, 80)
                self.fid += 1
                self.rec.flush_submitted(self.fid)
                cid = self.h.host.submit(1, NvmOpcode.FLUSH, nsid=self.nsid, ring=False)
                self.inflight[cid] = ("F", self.fid, self.acked - self.fua_acked)
                continue
            slot = self.order[self.next_wid]
            wid = self.next_wid + 1
            fua = self.rng.random() < 1 / 3 if self.honest else True
            b = self.free.pop()
            addr = self.bufs + b * SLOT
            self.h.mem.write(addr, pattern(wid, slot))
            self.rec.submitted(wid, slot, fua)
            self.fua_of[wid] = fua
            cid = self.h.host.submit(1, NvmOpcode.WRITE, nsid=self.nsid, prp1=addr, cdw10=slot * (SLOT // 512),
                                     cdw12=(SLOT // 512 - 1) | (1 << 30 if fua and self.honest else 0), ring=False)
            self.inflight[cid] = ("W", wid, b)
            self.next_wid += 1
        self.h.host.ring_sq(1)

    def _reap(self, irq: int) -> None:
        done = self.h.host.reap(1)
        if not done:
            select.select([irq], [], [], 0.05)
            try:
                os.eventfd_read(irq)
            except BlockingIOError:
                pass
            done = self.h.host.reap(1)
        for c in done:
            kind, ident, extra = self.inflight.pop(c.cid)
            if c.status != Status.SUCCESS:
                raise RuntimeError(f"{kind} {ident} failed: {status_name(c.status)}")
            if kind == "W":
                self.rec.completed(ident)
                self.free.append(extra)
                self.acked += 1
                self.fua_acked += self.fua_of.pop(ident)
            else:
                self.rec.flush_completed(ident)
                self.flushes += 1
                self.flushed = max(self.flushed, extra)
        if done:
            self.rec.sync()

    def run(self, limit: int, *, until: Callable[[], bool] | None = None,
            on_batch: Callable[["WriteRun"], None] | None = None) -> None:
        """Keep ``QD`` commands in flight until ``limit`` writes were submitted and all
        completed, or ``until()`` says stop (commands stay in flight then); ``on_batch(self)``
        after each recorded batch of completions."""
        irq = self.h.efds[1]
        while (self.next_wid < limit or self.inflight) and not (until is not None and until()):
            self._submit(limit)
            self._reap(irq)
            if on_batch is not None:
                on_batch(self)

    def post_without_reaping(self, n: int) -> None:
        """``n`` more (non-FUA) writes, doorbell rung, never reaped: in flight at a fault."""
        for _ in range(n):
            slot = self.order[self.next_wid]
            wid = self.next_wid + 1
            addr = self.h.alloc(SLOT)  # its own buffer: those of writes in flight stay untouched
            self.h.mem.write(addr, pattern(wid, slot))
            self.rec.submitted(wid, slot, False)
            self.h.host.submit(1, NvmOpcode.WRITE, nsid=self.nsid, prp1=addr, cdw10=slot * (SLOT // 512),
                               cdw12=SLOT // 512 - 1, ring=False)
            self.next_wid += 1
        self.h.host.ring_sq(1)
        self.rec.sync()


def read_namespace(h: Host, nsid: int, nslots: int) -> bytearray:
    """The whole namespace through NVMe Reads of ``READ_SLOTS`` slots (one PRP list)."""
    length = READ_SLOTS * SLOT
    buf = h.alloc(length)
    plist = h.alloc(PAGE)
    h.mem.write(plist, struct.pack(f"<{length // PAGE - 1}Q", *(buf + PAGE * i for i in range(1, length // PAGE))))
    out = bytearray(nslots * SLOT)
    for first in range(0, nslots, READ_SLOTS):
        c = h.wait_cid(1, h.host.submit(1, NvmOpcode.READ, nsid=nsid, prp1=buf, prp2=plist,
                                        cdw10=first * (SLOT // 512), cdw12=READ_SLOTS * (SLOT // 512) - 1))
        if c.status != Status.SUCCESS:
            raise RuntimeError(f"read of slots {first}+{READ_SLOTS}: {status_name(c.status)}")
        out[first * SLOT:(first + READ_SLOTS) * SLOT] = h.mem.read(buf, length)
    return out
