"""Issue 26's guest checks: Linux's block integrity, fio and nvme-cli on namespaces with
metadata and end-to-end data protection, on QEMU's own nvme now and on nvme-emu's when it
has them.

One boot of the rich guest per device: the controller carries three namespaces, Type 1 with
the 16b Guard (ms=8), Type 3 (ms=8) and Type 1 with the 64b Guard (ms=16), all with separate
metadata (Linux registers integrity only for that) and the PI in QEMU's default place (the
last bytes of the metadata). The script (pi_checks.pi_guest_script) prints raw results per
step and pi_judges holds them to the spec's values, so a check passes on a peer only if that
peer is right alone:

* integrity: /sys/block/*/integrity: T10-DIF-TYPE1-CRC, T10-DIF-TYPE3-CRC, EXT-DIF-TYPE1-CRC64;
* host_pi: a block written through the block layer holds, as the device stored it, the PI
  Linux generated (16b and 64b Guard layouts);
* fio write + crc32c verify through the block layer (psync, libaio, io_uring; O_DIRECT),
  where Linux generates and checks the PI, on each namespace;
* fio io_uring_cmd on /dev/ngXnY with a metadata buffer, pi_act=1 and pi_act=0 with every
  PRCHK bit (Type 1, and the 64b Guard with pi_act=0);
* ops: nvme-cli writes and reads of one block: PRACT's PI read back, each End-to-end Check
  Error from a PI wrong in one field (the Reference Tag one is the issue's), LBATM, Type 1's
  ILBRT rule, the escape values of Types 1 and 3, Type 3's Reference Tag check bit, the 64b
  Guard's PI and check errors. The judges want the status's SCT/SC and leave DNR to the
  controller (the spec does not require it there; QEMU sets it on none of the End-to-end
  errors);
* format: Format NVM to the plain LBA format and back, Linux's integrity after each;
* corrupt (a device whose host can corrupt stored guards: nvme-emu's control plane): the
  guest's reads fail on exactly the corrupted range (pi_checks.corrupt_step).

Adding nvme-emu is one fixture and its name in PEERS: serve ``[ns.nvme_emu_spec(path) for ns
in pi_checks.NAMESPACES]``, ``boot("nvme_emu", SCRIPT_WITH_CORRUPTION, socket_path=...,
on_console_line=pi_checks.guard_corruption_on_request(CTL_CORRUPT_GUARDS, errors))``; then
one test holds its ``corrupt`` step to ``pi_judges.judge_corrupt`` (QEMU cannot corrupt PI).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pytest

from nvme_emu import guest

from . import pi_checks as pc
from . import pi_judges as pj

pytestmark = pytest.mark.e2e

PEERS = ("qemu",)
#: The boot on QEMU's device took 39 s, its job 27 s (2 vCPUs, TCG).
TIMEOUT = 900
SCRIPT = pc.pi_guest_script()
SCRIPT_WITH_CORRUPTION = pc.pi_guest_script(corrupt=pc.CORRUPT)


@dataclass
class Run:
    """One boot's outcome: the guest's result and its steps."""

    peer: str
    result: guest.GuestResult
    steps: dict[str, pc.Step]


def boot(peer: str, command: str, **target) -> Run:
    """Boot the rich guest on ``target`` (run_guest's device arguments), print the boot's
    and each step's time, and fail unless the job ran to its end."""
    t0 = time.monotonic()
    res = guest.run_guest(rich_root=True, command=command, timeout=TIMEOUT, **target)
    steps = pc.parse_steps(res.output)
    print(f"\n{peer}: boot {time.monotonic() - t0:.1f} s in all, the job began at uptime "
          f"{steps['find'].started if 'find' in steps else '?'} s")
    for s in steps.values():
        print(f"  step {s.name:<28} {s.seconds:6.1f} s")
    assert res.returncode == 0 and "end" in steps, res.describe_failure()
    return Run(peer, res, steps)


@pytest.fixture(scope="module")
def qemu(rich_infra, tmp_path_factory) -> Run:
    """The boot on QEMU's own nvme with the three PI namespaces on one image."""
    image = tmp_path_factory.mktemp("pi-qemu") / "pi.raw"     # under /tmp: the chroot QEMU sees it
    with open(image, "wb") as f:
        f.truncate(pc.image_size())
    return boot("qemu", SCRIPT, builtin_image=str(image), builtin_pi=[ns.qemu() for ns in pc.NAMESPACES])


@pytest.mark.parametrize("check", list(pj.CHECKS))
@pytest.mark.parametrize("peer", PEERS)
def test_check(peer: str, check: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(peer)
    problems = pj.CHECKS[check](run.steps)
    assert not problems, "\n".join(problems)


def test_one_boot_serves_every_format(qemu: Run) -> None:
    """The three namespaces were found by NSID and each ran its steps (no step of the script
    missing: a silent skip would pass the checks that look for nothing)."""
    found = dict(re.findall(r"^ns (\d+) dev=(\S+)", qemu.steps["find"].output, re.M))
    assert sorted(int(n) for n in found) == [ns.nsid for ns in pc.NAMESPACES], qemu.steps["find"].output
    want = ["find", "integrity", "host_pi", *(j.name for j in pc.FIO_JOBS), "ops", "format", "end"]
    assert list(qemu.steps) == want
