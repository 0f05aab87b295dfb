"""The L1 side of the power-cut test (``test_power_cut.py``), run inside the nested rig.

``write``: mount the two ext4 disks L1 was given (/dev/vda: the *honest* disk, /dev/vdb: the
*control*), serve one namespace file on each with ``nvme-emu serve``, and drive it with the
project's host driver over vfio-user:

* control (namespace 2): writes that the record calls FUA but that are sent without FUA
  and never flushed, i.e. what a server that ignored FUA would leave; the test requires
  the check to find them lost, which shows the cut really loses L1's page cache;
* honest (namespace 1): QD32, unique pattern per write, distinct slots (a seeded
  permutation), a third with FUA, a Flush every 20-80 writes; once enough writes are
  durable it prints the ARMED marker, on which the host pulls the plug, and it goes on
  writing until it does.

Each record (``durability.AckRecord``) is on a host directory shared over 9p, fsynced after
every batch of completions; an event is logged only after it was seen.

``verify`` (the next boot, same disks): mount them (ext4 replays its journal), serve the
files read-only, read every slot through NVMe and straight from the file, check both against
the records and write the verdict to ``verdict.json`` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .durability import SLOT, AckRecord, WriteRun, check_image, read_namespace, read_record, slot_order
from ..support.host import Host
from ..support.server import ServerProcess

ARMED = "=====POWER-CUT-" + "ARMED====="  # split: the marker appears on the console only when printed
DISKS = {"honest": ("/dev/vda", 1), "control": ("/dev/vdb", 2)}
NS_FILE = "ns.img"


def log(msg: str) -> None:
    print(f"power-cut job: {msg}", flush=True)


def mount_disks(root: str, readonly: bool) -> dict[str, str]:
    """Mount each disk under ``root``; the mount point of each by name."""
    out = {}
    for name, (dev, _nsid) in DISKS.items():
        mnt = os.path.join(root, name)
        os.makedirs(mnt, exist_ok=True)
        subprocess.run(["mount", "-t", "ext4", *(["-o", "ro"] if readonly else []), dev, mnt], check=True)
        out[name] = mnt
    return out


def create_ns_file(path: str, size: int) -> None:
    """A sparse namespace file whose existence is durable before any write (else a cut could
    lose the file itself, and with it every write the check expects)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def keep_page_cache_dirty() -> None:
    """No background writeback in L1: a write reaches the disk only when someone syncs it,
    so a missing fdatasync cannot be hidden by the flusher thread."""
    Path("/proc/sys/vm/dirty_writeback_centisecs").write_text("0\n")
    Path("/proc/sys/vm/dirty_expire_centisecs").write_text("3600000\n")


def start_server(mounts: dict[str, str], run_dir: str, out: str, *, readonly: bool) -> ServerProcess:
    specs = [f"file:{os.path.join(mounts[name], NS_FILE)}{',ro' if readonly else ''}"
             for name in sorted(DISKS, key=lambda n: DISKS[n][1])]
    return ServerProcess.serve(os.path.join(run_dir, "nvme.sock"), Path(out) / f"server-{'verify' if readonly else 'write'}.log", specs)


def open_host(srv: ServerProcess) -> Host:
    h = Host(srv.path, ram_size=16 << 20)
    h.set_queues(1)
    h.create_pair(1, 64)
    return h


def cmd_write(a: argparse.Namespace) -> int:
    keep_page_cache_dirty()
    run_dir = tempfile.mkdtemp(prefix="power-cut-")
    mounts = mount_disks(run_dir, readonly=False)
    for mnt in mounts.values():
        create_ns_file(os.path.join(mnt, NS_FILE), a.ns_mib << 20)
    nslots = (a.ns_mib << 20) // SLOT
    srv = start_server(mounts, run_dir, a.out, readonly=False)
    try:
        h = open_host(srv)
        try:
            return write_until_cut(h, nslots, a)
        finally:
            h.close()
    finally:
        srv.stop()


def write_until_cut(h: Host, nslots: int, a: argparse.Namespace) -> int:
    """The control run, then the honest one, which prints ARMED once enough is durable and
    goes on until the plug is pulled (returns 3 only if the slots run out first)."""
    rng = random.Random(a.seed)
    # control first: its page cache stays dirty for the whole honest run
    ctl = WriteRun(h, DISKS["control"][1], AckRecord(os.path.join(a.out, "control.rec")),
                   slot_order(nslots, a.seed + 1), rng, honest=False)
    ctl.run(a.control_writes)
    ctl.rec.close()
    log(f"control: {ctl.acked} writes acked, recorded as FUA, sent without FUA, never flushed")
    run = WriteRun(h, DISKS["honest"][1], AckRecord(os.path.join(a.out, "honest.rec")),
                   slot_order(nslots, a.seed), rng, honest=True)
    t0 = time.monotonic()
    armed = [False]

    def arm(r: WriteRun) -> None:
        if not armed[0] and r.durable >= a.arm_after and r.flushes >= 3:
            armed[0] = True
            log(f"{r.acked} writes acked ({r.fua_acked} FUA), {r.flushes} flushes, {r.durable} durable "
                f"after {time.monotonic() - t0:.1f} s")
            print(ARMED, flush=True)

    run.run(nslots, on_batch=arm)
    run.rec.close()
    log(f"ran out of slots before the plug was pulled: {run.acked} writes acked in {time.monotonic() - t0:.1f} s")
    time.sleep(120)
    return 3


def cmd_verify(a: argparse.Namespace) -> int:
    run_dir = tempfile.mkdtemp(prefix="power-cut-")
    mounts = mount_disks(run_dir, readonly=True)
    try:
        srv = start_server(mounts, run_dir, a.out, readonly=True)
        try:
            h = open_host(srv)
            try:
                verdict = {name: verify_one(h, nsid, os.path.join(mounts[name], NS_FILE),
                                            os.path.join(a.out, f"{name}.rec"), a.seed + (name == "control"))
                           for name, (_dev, nsid) in DISKS.items()}
            finally:
                h.close()
        finally:
            srv.stop()
    finally:
        for mnt in mounts.values():
            subprocess.run(["umount", mnt], check=False)
    for name, v in verdict.items():
        log(f"{name}: {json.dumps(v)}")
    Path(a.out, "verdict.json").write_text(json.dumps(verdict, indent=1))
    return 0


def verify_one(h: Host, nsid: int, path: str, record: str, seed: int) -> dict:
    """The figures and the check of one namespace, read through NVMe and from its file."""
    nslots = os.path.getsize(path) // SLOT
    acks = read_record(record)
    image = read_namespace(h, nsid, nslots)
    with open(path, "rb") as f:
        direct = f.read()
    v = check_image(image, acks, seed)
    return {
        "submitted": len(acks.slot_of), "acked": len(acks.completed),
        "fua_acked": len(acks.completed & acks.fua), "flushes": acks.flushes,
        "durable": len(acks.durable), "in_flight": acks.in_flight, "torn_record": acks.torn,
        "lost": len(v.lost), "lost_examples": v.lost[:10], "foreign": len(v.foreign),
        "foreign_examples": v.foreign[:10], "present": v.present, "unacked_present": v.unacked_present,
        "slots": v.checked, "nvme_matches_file": bytes(image) == direct,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=("write", "verify"))
    p.add_argument("--out", required=True, help="host directory (9p) for the records and the verdict")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--ns-mib", type=int, default=64)
    p.add_argument("--control-writes", type=int, default=1000)
    p.add_argument("--arm-after", type=int, default=300, help="durable writes before the ARMED marker")
    a = p.parse_args(argv)
    return cmd_write(a) if a.phase == "write" else cmd_verify(a)


if __name__ == "__main__":
    sys.exit(main())
