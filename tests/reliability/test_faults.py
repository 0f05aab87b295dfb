"""Faults: the server killed mid-write, asked to stop, out of space, read-only.

SIGKILL: a host driver (NvmeHost over the vfio-user client) writes a unique pattern per
write to distinct LBAs of a file namespace at queue depth 32, a third of them FUA, with a
Flush now and then, and records which writes it saw complete (durability.py, shared with
the power-cut test). The server is SIGKILLed with writes in flight and restarted on the same
file; every write that completed with FUA, or completed before a Flush that completed was
submitted, must read back intact, and no LBA may hold anything but its own write's pattern
or its old contents (zeros).
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time


from .durability import SLOT, AckRecord, WriteRun, check_image, pattern, read_namespace, read_record, slot_order
from ..support.host import Host, PAGE, status_name
from ..support.server import DEADLINE
from nvme_emu.spec.commands import NvmOpcode, Status


def test_sigkill_mid_write_keeps_every_durable_write(spawn, tmp_path):
    disk = tmp_path / "disk.img"
    nslots = (64 << 20) // SLOT
    srv = spawn(f"file:{disk},size=64M", check_exit=False)
    h = Host(srv.path, ram_size=16 << 20)
    h.set_queues(1)
    h.create_pair(1, 64)
    seed = 1234
    rec = AckRecord(str(tmp_path / "acks.rec"))
    run = WriteRun(h, 1, rec, slot_order(nslots, seed), random.Random(seed), honest=True)
    deadline = time.monotonic() + 4.0
    limit = nslots - 64  # room for the writes posted last
    run.run(limit, until=lambda: time.monotonic() > deadline or run.next_wid >= limit)  # stops with 32 in flight
    run.post_without_reaping(8)  # more queued behind the 32 in flight when the kill lands
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(DEADLINE)
    assert srv.proc.returncode == -signal.SIGKILL
    h.close()
    rec.close()
    acks = read_record(str(tmp_path / "acks.rec"))
    assert len(acks.durable) > 100, f"only {len(acks.durable)} durable writes of {len(acks.slot_of)}: the workload did not run"
    assert acks.in_flight >= 8, acks.in_flight
    print(f"SIGKILL: {len(acks.completed)} writes acked ({len(acks.completed & acks.fua)} FUA), {acks.flushes} flushes, "
          f"{len(acks.durable)} durable, {acks.in_flight} in flight at the kill")
    # restart on the same file (the dead server's socket path is stale and is replaced), read
    # it through the fresh server and straight from the file: both must pass, and agree
    srv2 = spawn(f"file:{disk}", sock=srv.path)
    h2 = Host(srv2.path, ram_size=16 << 20)
    h2.set_queues(1)
    h2.create_pair(1, 64)
    image = read_namespace(h2, 1, nslots)
    h2.close()
    v = check_image(image, acks, seed)
    assert not v.lost, f"{len(v.lost)} of {len(acks.durable)} durable writes lost, e.g. {v.lost[:5]}"
    assert not v.foreign, f"slots holding foreign data: {v.foreign[:10]}"
    assert disk.read_bytes() == image


def test_sigterm_flushes_and_exits_cleanly(spawn, tmp_path):
    """Non-FUA writes with a volatile write cache, no Flush, a client still attached with
    I/O in flight: SIGTERM -> exit status 0, the data is in the file, the socket is gone."""
    disk = tmp_path / "disk.img"
    srv = spawn(f"file:{disk},size=16M", check_exit=False)
    h = Host(srv.path, ram_size=8 << 20)
    h.set_queues(1)
    h.create_pair(1, 64)
    buf = h.alloc(64 * SLOT)
    for i in range(48):
        h.mem.write(buf + i * SLOT, pattern(i + 1, i))
        h.host.submit(1, NvmOpcode.WRITE, nsid=1, prp1=buf + i * SLOT, cdw10=i * 8, cdw12=7, ring=False)
    h.host.ring_sq(1)
    got = 0
    deadline = time.monotonic() + DEADLINE
    while got < 48 and time.monotonic() < deadline:
        got += len(h.host.reap(1))
    assert got == 48
    # more in flight when the signal lands
    for i in range(48, 60):
        h.mem.write(buf + i * SLOT, pattern(i + 1, i))
        h.host.submit(1, NvmOpcode.WRITE, nsid=1, prp1=buf + i * SLOT, cdw10=i * 8, cdw12=7, ring=False)
    h.host.ring_sq(1)
    rc = srv.stop(signal.SIGTERM)
    h.close()
    assert rc == 0, srv.log()[-2000:]
    assert "shutting down" in srv.log()
    assert not os.path.exists(srv.path)
    with open(disk, "rb") as f:
        for i in range(48):
            f.seek(i * SLOT)
            assert f.read(SLOT) == pattern(i + 1, i)


def test_backing_file_full_gives_capacity_exceeded(spawn, small_tmpfs):
    """A sparse 16 MiB file on a 1 MiB filesystem: writes past the space -> Capacity
    Exceeded; the server keeps serving, earlier data intact, space freed is usable again."""
    disk = small_tmpfs / "disk.img"
    srv = spawn(f"file:{disk},size=16M")
    h = Host(srv.path, ram_size=8 << 20)
    h.set_queues(1)
    h.create_pair(1, 64)
    chunk = 128 << 10
    buf = h.alloc(chunk)
    plist = h.alloc(PAGE)
    h.mem.write(plist, struct.pack("<31Q", *(buf + PAGE * i for i in range(1, 32))))
    statuses = []
    for i in range(16):
        h.mem.write(buf, bytes([i + 1]) * chunk)
        c = h.wait_cid(1, h.host.submit(1, NvmOpcode.WRITE, nsid=1, prp1=buf, prp2=plist, cdw10=i * 256, cdw12=255 | 1 << 30))
        statuses.append(c.status)
    assert Status.SUCCESS in statuses
    assert statuses[-1] == Status.CAPACITY_EXCEEDED, [status_name(s) for s in statuses]
    assert set(statuses) <= {Status.SUCCESS, Status.CAPACITY_EXCEEDED}
    ok = statuses.index(Status.CAPACITY_EXCEEDED)
    # still serving: reads of what was written work
    c, data = h.read(1, 1, 0, 8)
    assert c.status == Status.SUCCESS and data == b"\x01" * 4096
    # deallocating frees space: then a write that failed succeeds
    rng = h.alloc(PAGE)
    h.mem.write(rng, struct.pack("<IIQ", 0, ok * 256, 0))
    h.ok(1, NvmOpcode.DATASET_MANAGEMENT, nsid=1, prp1=rng, cdw10=0, cdw11=4)
    h.mem.write(buf, b"\x77" * chunk)
    c = h.wait_cid(1, h.host.submit(1, NvmOpcode.WRITE, nsid=1, prp1=buf, prp2=plist, cdw10=ok * 256, cdw12=255))
    assert c.status == Status.SUCCESS, status_name(c.status)
    h.close()
    assert srv.answers()


def test_read_only_namespace_refuses_writes(spawn, tmp_path):
    disk = tmp_path / "ro.img"
    with open(disk, "wb") as f:
        f.write(b"\x42" * (4 << 20))
    srv = spawn(f"file:{disk},ro")
    h = Host(srv.path, ram_size=8 << 20)
    h.set_queues(1)
    h.create_pair(1, 64)
    c = h.write(1, 1, 0, b"\x00" * 4096)
    assert c.status == Status.NAMESPACE_WRITE_PROTECTED, status_name(c.status)
    c = h.wait_cid(1, h.host.submit(1, NvmOpcode.WRITE_ZEROES, nsid=1, cdw10=0, cdw12=7))
    assert c.status == Status.NAMESPACE_WRITE_PROTECTED, status_name(c.status)
    rng = h.alloc(PAGE)
    h.mem.write(rng, struct.pack("<IIQ", 0, 8, 0))
    c = h.wait_cid(1, h.host.submit(1, NvmOpcode.DATASET_MANAGEMENT, nsid=1, prp1=rng, cdw10=0, cdw11=4))
    assert c.status == Status.NAMESPACE_WRITE_PROTECTED, status_name(c.status)
    h.ok(1, NvmOpcode.FLUSH, nsid=1)
    c, data = h.read(1, 1, 0, 8)
    assert c.status == Status.SUCCESS and data == b"\x42" * 4096
    h.close()
    with open(disk, "rb") as f:
        assert f.read() == b"\x42" * (4 << 20)
