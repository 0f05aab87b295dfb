"""The process test_sidecar_crash SIGKILLs: a file-backed zone set with its sidecar, doing what
a zoned namespace does per command, as fast as it can.

``python -m tests.zoned.sidecar_crash_child IMAGE SIDECAR SEED KILL_AT``: opens the sidecar
(restoring the zones), then for step 0, 1, 2 ... runs :func:`do_step` (the zone set moves
its write pointer and stores it), writes the data with ``pwrite`` to the image, and
acknowledges the step by writing ``STEP\\n`` to stdout (one ``write``, so a line is whole or
absent). At the first step from ``KILL_AT`` on (-1: never) that has data to write, it kills
itself between the write pointer's store and the data's write: the worst moment (or
:data:`GIVE_UP` steps later if no step writes). The operations come from ``random.Random(SEED)`` and
the zones' state only, so the parent replays them exactly.
"""

from __future__ import annotations

import os
import random
import signal
import sys

from nvme_emu.spec.commands import NvmeError
from nvme_emu.spec.zns import ZoneSendAction
from nvme_emu.zoned.sidecar import ZoneSidecar
from nvme_emu.zoned.zone_set import ZoneSet

ZONES = 8
ZONE_SIZE = 64
ZONE_CAP = 48
LBA = 512
IMAGE_SIZE = ZONES * ZONE_SIZE * LBA
#: Steps after KILL_AT with nothing to write (every zone Full, Read Only or Offline) before
#: the child kills itself anyway.
GIVE_UP = 1000


def make_set() -> ZoneSet:
    return ZoneSet(ZONES * ZONE_SIZE, ZONE_SIZE, ZONE_CAP, max_open=3, max_active=5)


def data(step: int, nlb: int) -> bytes:
    """What step ``step`` writes: its number in every word, so a misplaced block shows."""
    return (step + 1).to_bytes(4, "little") * (nlb * LBA // 4)


def do_step(zs: ZoneSet, rng: random.Random, step: int) -> list[tuple[int, bytes]]:
    """One command on ``zs``; the (byte offset, bytes) writes the namespace would then make:
    data for a Write or Zone Append, zeros for what a Reset deallocates. A refused command
    writes nothing."""
    zone = zs.zones[rng.randrange(ZONES)]
    r = rng.random()
    nlb = rng.randint(1, 8)
    try:
        if r < 0.45:
            return [(zs.write(zone.wp, nlb) * LBA, data(step, nlb))]
        if r < 0.65:
            return [(zs.append(zone.zslba, nlb) * LBA, data(step, nlb))]
        if r < 0.72:
            return [(slba * LBA, bytes(n * LBA)) for slba, n in zs.send(ZoneSendAction.RESET, zone.zslba)]
        if r < 0.76:
            zs.send(ZoneSendAction.FINISH, zone.zslba)
        elif r < 0.84:
            zs.send(ZoneSendAction.OPEN, zone.zslba)
        elif r < 0.92:
            zs.send(ZoneSendAction.CLOSE, zone.zslba)
        elif r < 0.925:
            zs.make_read_only(zone.index)
        elif r < 0.93:
            zs.send(ZoneSendAction.OFFLINE, zone.zslba)
        else:
            zs.write(zone.wp + 1, nlb)  # not at the write pointer: refused
    except (NvmeError, ValueError):
        pass
    return []


def main(image: str, sidecar: str, seed: int, kill_at: int) -> None:
    zs = make_set()
    ZoneSidecar.open(sidecar, zs)
    fd = os.open(image, os.O_RDWR)
    rng = random.Random(seed)
    step = 0
    while True:
        writes = do_step(zs, rng, step)
        if 0 <= kill_at <= step and (writes or step >= kill_at + GIVE_UP):
            os.kill(os.getpid(), signal.SIGKILL)
        for offset, payload in writes:
            os.pwrite(fd, payload, offset)
        os.write(1, b"%d\n" % step)
        step += 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
