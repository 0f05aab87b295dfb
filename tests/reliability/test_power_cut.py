"""Power cut: the machine under the server loses power during a QD32 write run with FUA
and Flush; every write acknowledged as durable must be on the disk afterwards.

The SIGKILL test (``test_faults.py``) kills the server *process*: the kernel's page cache
survives that, so it cannot tell an fdatasync from none. Here the whole machine goes: in
the nested rig (``nvme_emu.nested``) an L1 guest runs ``nvme-emu serve`` with file
namespaces on ext4 on its own virtio-blk disks (raw images on the host), driven by the
project's host driver over vfio-user (``power_cut_job.py``); the host SIGKILLs L1's QEMU
at a random moment once the run is in full swing, so L1's page cache and everything L1 had
not flushed to its disks is gone. A second boot on the same images mounts them (ext4
replays its journal) and checks each namespace against the acknowledgement record the job
kept on the host (9p, fsynced per batch of completions, an event logged only after it was
seen): every write completed with FUA, or completed before a completed Flush was
submitted, must read back intact (through a new server and from the file), and no slot
may hold foreign data (durability.py).

The same cut must *fail* the check for a control namespace on a second disk, written with
the FUA bit left out and never flushed while the record claims FUA: that shows the cut
really loses what was not synced (in L1, background writeback is turned off for the run),
so the passing namespace passes on its fdatasyncs and not by luck. The checker's rules
have their own tests below, with synthetic records and images.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest

from .durability import SLOT, ZEROS, Acks, check_image, parse_record, pattern, slot_order
from nvme_emu import guest as g
from nvme_emu import nested
from .power_cut_job import ARMED
from ..support.server import REPO

#: The L1 side, run as a module of this checkout (cwd is REPO in L1 too).
JOB = "tests.reliability.power_cut_job"
DISK_MIB = 128
NS_MIB = 64
ARM_AFTER = 300  # durable writes before the plug may be pulled
#: One boot takes about a minute under TCG; a boot that hangs costs at most this.
BOOT_TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------------
# The checker on its own: it must find what it is there to find.
# ---------------------------------------------------------------------------------------------


def _record(*lines: str) -> Acks:
    return parse_record([line + "\n" for line in lines])


def _image(nslots: int, writes: dict[int, int]) -> bytearray:
    """slot -> wid written there; other slots zero."""
    img = bytearray(nslots * SLOT)
    for slot, wid in writes.items():
        img[slot * SLOT:(slot + 1) * SLOT] = pattern(wid, slot)
    return img


def test_record_replay_durability_rules():
    """FUA completion is durable; a Flush covers exactly the writes completed before it was
    submitted, and only once it completes; an unacknowledged write is never durable."""
    acks = _record("S 1 10 1", "S 2 11 0", "S 3 12 0", "S 4 13 0", "C 1", "C 2", "F 1", "C 3",
                   "FC 1", "F 2", "S 5 14 1")
    assert acks.durable == {10: 1, 11: 2}  # 3 completed after Flush 1 was submitted; 4 never completed
    assert acks.flushes == 1 and acks.in_flight == 2 and acks.fua == {1, 5}
    # Flush 2 submitted with 3 completed before it, but never completed: 3 stays volatile
    assert 12 not in acks.durable


def test_record_ends_at_its_first_damaged_line():
    """A cut mid-append leaves a torn last line, or a page of zeros followed by a later page:
    only the intact prefix counts (each fact in it is true), the rest is reported as torn."""
    lines = ["S 1 10 1\n", "C 1\n", "S 2 11 1\n", "C 2\n"]
    assert parse_record(lines + ["C"]).durable == {10: 1, 11: 2}
    acks = parse_record(lines[:2] + ["\0\0\0\0S 2 11 1\n", "C 2\n"])
    assert acks.durable == {10: 1} and acks.torn == 2
    with pytest.raises(ValueError):
        parse_record(["S 1 10 1\n", "C 2\n"])  # well-formed but impossible: a bug, not a tear
    with pytest.raises(ValueError):
        parse_record(["S 1 10 1\n", "S 2 10 0\n"])  # two writes to one slot


def test_checker_finds_lost_torn_and_foreign_writes():
    nslots, seed = 64, 7
    order = slot_order(nslots, seed)
    # writes 1..6: 1, 2 FUA; 3, 4 covered by a Flush; 5 completed after it; 6 never completed
    rec = [f"S {w} {order[w - 1]} {int(w <= 2)}" for w in range(1, 7)]
    acks = _record(*rec, "C 1", "C 2", "C 3", "C 4", "F 1", "C 5", "FC 1")
    durable = {order[w - 1]: w for w in (1, 2, 3, 4)}
    assert acks.durable == durable
    good = _image(nslots, {order[w - 1]: w for w in range(1, 7)})
    v = check_image(good, acks, seed)
    assert v.ok and v.present == 6 and v.unacked_present == 1, v
    # the volatile writes may be gone: still fine
    assert check_image(_image(nslots, durable), acks, seed).ok
    # a durable write lost (the slot reads zeros): found
    lost = _image(nslots, {s: w for s, w in durable.items() if w != 3})
    v = check_image(lost, acks, seed)
    assert not v.ok and v.lost == [(order[2], 3)] and not v.foreign
    # a torn write (half of it): lost and foreign
    torn = bytearray(good)
    s = order[0]
    torn[s * SLOT + SLOT // 2:(s + 1) * SLOT] = bytes(SLOT // 2)
    v = check_image(torn, acks, seed)
    assert v.lost == [(s, 1)] and v.foreign == [s]
    # another write's data in a slot (misdirected), and a write past the record's end that
    # landed in the wrong slot: foreign
    bad = bytearray(good)
    free = order[10]
    bad[free * SLOT:(free + 1) * SLOT] = pattern(4, order[3])
    v = check_image(bad, acks, seed)
    assert v.foreign == [free] and not v.lost
    bad = bytearray(good)
    bad[free * SLOT:(free + 1) * SLOT] = pattern(99, free)  # the seed says write 11 goes there
    assert check_image(bad, acks, seed).foreign == [free]
    assert check_image(bad, acks).foreign == []  # without the seed, any write of its own slot
    bad[free * SLOT:free * SLOT + 16] = struct.pack("<QQ", 11, free + 1)
    assert check_image(bad, acks).foreign == [free]


def test_checker_on_a_file_written_with_fua_ignored(tmp_path):
    """The 'server that ignores FUA' case in miniature: the record says FUA, the data never
    reached the file (a cut took the page cache): every such write is reported lost."""
    nslots, seed = 256, 3
    order = slot_order(nslots, seed)
    lines = []
    for w in range(1, 101):
        lines += [f"S {w} {order[w - 1]} 1", f"C {w}"]
    acks = _record(*lines)
    path = tmp_path / "ns.img"
    with open(path, "wb") as f:
        f.truncate(nslots * SLOT)
    v = check_image(path.read_bytes(), acks, seed)
    assert len(v.lost) == 100 and not v.foreign and v.present == 0
    assert ZEROS == bytes(SLOT)


# ---------------------------------------------------------------------------------------------
# The power cut, in the nested rig.
# ---------------------------------------------------------------------------------------------


def _require_rig() -> None:
    if os.geteuid() != 0:
        print("power-cut test skipped: the nested rig needs root (mount namespaces, 9p export of /)")
        pytest.skip("the nested rig needs root")
    if shutil.which("mkfs.ext4") is None:
        print("power-cut test skipped: no mkfs.ext4 (e2fsprogs) to format the L1 disks")
        pytest.skip("no mkfs.ext4")


def _make_disk(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(DISK_MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", path],
                   check=True, capture_output=True)


def _boot(phase: str, seed: int, out: str, disks: list[str], kill_when: g.KillWhen | None) -> g.GuestResult:
    return nested.run_nested(
        [sys.executable, "-m", JOB, phase, "--out", out, "--seed", str(seed), "--ns-mib", str(NS_MIB),
         "--arm-after", str(ARM_AFTER)],
        kvm=None, cwd=str(REPO), out_dirs=[out], disks=disks, kill_when=kill_when, memory_mb=1536,
        timeout=BOOT_TIMEOUT_S, env={"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
    )


def test_power_cut_keeps_every_durable_write(tmp_path):
    _require_rig()
    seed = int(os.environ.get("NVME_EMU_POWER_CUT_SEED") or random.SystemRandom().randrange(1 << 30))
    delay = random.Random(seed).uniform(0.3, 3.0)
    print(f"power cut: seed {seed} (NVME_EMU_POWER_CUT_SEED to repeat), plug pulled {delay:.2f} s after {ARMED}")
    out = tmp_path / "out"
    out.mkdir()
    disks = [str(tmp_path / "honest.img"), str(tmp_path / "control.img")]
    for d in disks:
        _make_disk(d)

    cut = _boot("write", seed, str(out), disks, g.KillWhen(ARMED, delay))
    print(f"--- write boot: killed at {cut.killed_at} s, qemu rc {cut.qemu_returncode} ---\n{cut.output[-3000:]}")
    assert cut.killed_at is not None, f"the run never armed the cut:\n{cut.describe_failure()}"
    assert cut.returncode is None, f"the job finished before the cut:\n{cut.output[-3000:]}"

    check = _boot("verify", seed, str(out), disks, None)
    print(f"--- verify boot: rc {check.returncode} in {check.elapsed:.0f} s ---\n{check.output[-3000:]}")
    assert check.returncode == 0, check.describe_failure()
    verdict = json.loads((out / "verdict.json").read_text())
    honest, control = verdict["honest"], verdict["control"]
    print(f"power cut figures: {json.dumps(verdict, indent=1)}")

    assert honest["durable"] >= ARM_AFTER and honest["flushes"] >= 3, honest
    assert honest["lost"] == 0, f"durable writes lost across the power cut: {honest}"
    assert honest["foreign"] == 0, f"slots with foreign data after the power cut: {honest}"
    assert honest["nvme_matches_file"] and control["nvme_matches_file"], verdict
    # the control must fail the same check: the cut did take L1's unsynced data
    assert control["acked"] > 0 and control["lost"] > 0, f"the control lost nothing: the cut was no power cut {control}"
    assert control["foreign"] == 0, control
