"""Issue 25's promise, tested with real kills: "a SIGKILL never leaves a write pointer behind
data that was acknowledged".

A child process (:mod:`tests.zoned.sidecar_crash_child`) runs zone commands on a file image
with its sidecar and acknowledges each on a pipe; it is SIGKILLed at a random moment, or kills
itself at the worst one (the write pointer stored, the data not yet written). The parent
replays the same commands on a model: the acknowledged ones, and the one that may have been
in flight. After each kill, every zone of the sidecar must be the acknowledged zone or the
in-flight one (each zone is one record, stored whole), its write pointer never behind the
acknowledged one (unless the command in flight was that zone's Reset), the data below every
acknowledged write pointer must be in the image, and the sidecar must reopen. The next child
continues from what the last one left, so restores are killed too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nvme_emu.zoned import persist
from nvme_emu.zoned import sidecar as sc
from nvme_emu.zoned.sidecar import ZoneSidecar
from nvme_emu.zoned.zone_set import ZoneSet

from .sidecar_crash_child import IMAGE_SIZE, LBA, ZONES, do_step, make_set

ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 40
CHILD_DEADLINE = 60.0
FRESH_EVERY = 8  # start from empty files now and then: Read Only and Offline zones pile up


def restored(zone_set: ZoneSet) -> list[tuple]:
    """The zones as a restart would see them (no zone open)."""
    again = make_set()
    persist.apply(again, sc.decode(sc.encode(zone_set)))
    return [(z.state, z.attrs, z.wp) for z in again.zones]


def start_model(sidecar: str) -> ZoneSet:
    """The zones the next child starts from: what it restores."""
    zs = make_set()
    if os.path.exists(sidecar):
        persist.apply(zs, sc.decode(Path(sidecar).read_bytes(), sidecar))
    return zs


def run_child(image: str, sidecar: str, seed: int, kill_at: int, acks_before_kill: int, rng: random.Random) -> list[int]:
    """Start the child, SIGKILL it (or let it kill itself), return the steps it acknowledged."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.zoned.sidecar_crash_child", image, sidecar, str(seed), str(kill_at)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = b""
    watchdog = threading.Timer(CHILD_DEADLINE, proc.kill)  # a child that hangs fails, not blocks
    watchdog.start()
    try:
        if kill_at < 0:
            while out.count(b"\n") < acks_before_kill:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
            time.sleep(rng.uniform(0, 0.002))  # the child runs on: the kill lands anywhere
            proc.send_signal(signal.SIGKILL)
        out += proc.stdout.read()
        err = proc.stderr.read()
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    steps = [int(line) for line in out.split(b"\n")[:-1]]  # a torn last line cannot happen
    assert steps == list(range(len(steps)))
    return steps


def check(image: str, sidecar: str, start: ZoneSet, image_before: bytes, seed: int, acked: int) -> tuple[int, int]:
    """Replay ``acked`` steps on ``start`` and check the files; (zones caught with the write
    pointer stored and the data not yet written, zones whose in-flight change was stored)."""
    rng = random.Random(seed)
    model, data = start, bytearray(image_before)
    for step in range(acked):
        for offset, payload in do_step(model, rng, step):
            data[offset : offset + len(payload)] = payload
    acked_zones = restored(model)
    acked_wps = [z.wp for z in model.zones]
    do_step(model, rng, acked)  # the command that may have been in flight
    flight_zones = restored(model)

    persisted = sc.decode(Path(sidecar).read_bytes(), sidecar)
    raw_wps = [z.zslba + offset for z, (_s, _a, offset) in zip(model.zones, persisted.zones, strict=True)]
    actual = make_set()
    persist.apply(actual, persisted)  # states valid, geometry and write pointers in range
    now = [(z.state, z.attrs, z.wp) for z in actual.zones]
    on_disk = Path(image).read_bytes()
    ahead = in_flight = 0
    for i in range(ZONES):
        assert now[i] in (acked_zones[i], flight_zones[i]), (i, now[i], acked_zones[i], flight_zones[i])
        reset_in_flight = flight_zones[i][2] < acked_zones[i][2]
        if not reset_in_flight:
            assert raw_wps[i] >= acked_wps[i], f"zone {i}: write pointer {raw_wps[i]} behind acknowledged {acked_wps[i]}"
            lo, hi = actual.zones[i].zslba * LBA, acked_wps[i] * LBA
            assert on_disk[lo:hi] == data[lo:hi], f"zone {i}: acknowledged data lost"
        if now[i] != acked_zones[i]:
            in_flight += 1
            wp = now[i][2] * LBA
            if wp > acked_wps[i] * LBA and on_disk[acked_wps[i] * LBA : wp] == data[acked_wps[i] * LBA : wp]:
                ahead += 1  # the write pointer moved, the data had not been written (reads zeros)
    return ahead, in_flight


def test_sigkill_never_leaves_a_write_pointer_behind_acknowledged_data(tmp_path):
    rng = random.Random(0x25)
    image, sidecar = str(tmp_path / "disk.img"), str(tmp_path / "disk.img.zones")
    ahead = in_flight = self_kills = 0
    total_steps = 0
    for iteration in range(ITERATIONS):
        if iteration % FRESH_EVERY == 0:
            Path(sidecar).unlink(missing_ok=True)
            Path(image).write_bytes(bytes(IMAGE_SIZE))
        start, image_before = start_model(sidecar), Path(image).read_bytes()
        seed = rng.getrandbits(32)
        kill_at = rng.randrange(400) if iteration % 3 == 0 else -1
        steps = run_child(image, sidecar, seed, kill_at, rng.randrange(600), rng)
        if kill_at >= 0:
            assert len(steps) >= kill_at
            self_kills += 1
        total_steps += len(steps)
        if not os.path.exists(sidecar):  # killed before it made one: nothing was acknowledged
            assert not steps
            continue
        a, f = check(image, sidecar, start, image_before, seed, len(steps))
        ahead += a
        in_flight += f
        with ZoneSidecar.open(sidecar, make_set()):  # and the real open takes it
            pass
    print(f"{ITERATIONS} kills ({self_kills} at the worst moment), {total_steps} acknowledged commands, "
          f"{in_flight} zones holding an unacknowledged change, {ahead} with the write pointer ahead of the data")
    assert self_kills and total_steps > ITERATIONS * 100
    assert ahead, "no kill caught a write pointer stored and its data not yet written"
