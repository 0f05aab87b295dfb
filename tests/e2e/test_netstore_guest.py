"""Issue 27 in a Linux guest: nvme-emu's namespaces on network storage, beside QEMU's own
nvme on an NBD export, in ONE boot of the test guest (netstore_checks has the script).

The test starts every server itself, each on a Unix socket in its temp directory: nbdkit's
memory plugin and qemu-nbd serving a file for nvme-emu (``nbd:`` namespaces 1 and 2), a
second nvme-emu with ``--crdt1 0`` on another qemu-nbd (the retry delay's "before"), and
another nbdkit for QEMU's ``-device nvme`` (``-drive file=nbd+unix://...``: QEMU's NBD
client), the peer. Checks:

* fio write + verify (4 KiB random, QD16, crc32c; 4-128 KiB sequential, md5; the verify a
  separate pass) on each namespace and on the peer: whatever passes on the peer passes on ours;
* qemu-nbd SIGKILLed under fio: fio ends with an I/O error in bounded time, no controller
  reset, the nbdkit namespace serves meanwhile, and after the restart I/O resumes without
  restarting nvme-emu and the pattern written and flushed before the kill reads back;
* the Command Retry Delay: Linux enabled ACRE (CRDT1 = 1 s), so its five retries of a
  Namespace Not Ready command span about 5 s; on the controller with CRDT1 = 0 they take
  milliseconds.

An ``rbd:`` namespace on the Ceph fixture (tests/support/ceph.py) is one more entry of
``network_namespaces``: ``NetworkNamespace("rbd", <the cluster's rbd: spec>, 3, SERIAL)``
(no killable server; an image of at least 32 MiB, fio's two regions) and ``"rbd"`` in
``LABELS``; its fio step then runs in the same boot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from nvme_emu import guest
from nvme_emu.ctl import ControlClient, default_control_socket
from nvme_emu.spec.commands import STATUS_CRD_SHIFT, Status

from ..nbd.nbd_servers import NbdServer, need_libnbd, nbdkit, qemu_nbd
from ..support.server import ServerProcess
from . import netstore_checks as nc
from .zoned_checks import Step, parse_steps

pytestmark = pytest.mark.e2e

SERIAL = "NVMEEMUNETSTORE"
#: The second nvme-emu, CRDT1 = 0.
SERIAL_NOCRDT = "NVMEEMUNOCRDT"
VICTIM, VICTIM_NOCRDT = "qemu_nbd", "qemu_nbd_nocrdt"
#: The labels of ``network_namespaces``, in order (the fio checks' parameters).
LABELS = ("nbdkit", VICTIM)
#: The module took 37-59 s here, its guest 36-57 s (2 vCPUs, TCG, 4 runs, as loaded as the
#: shared machine was); a hang must not take the suite with it.
TIMEOUT = 900
#: fio's error must end its run within this after the kill: Linux's five retries 1 s apart,
#: plus the guest's clock and fio's own exit (well below the run's 90 s and Linux's 30 s I/O
#: timeout, after which it would abort and reset the controller).
FIO_ENDS_WITHIN_S = 15.0
#: Linux's nvme_max_retries (module parameter max_retries, default 5).
LINUX_RETRIES = 5
NOT_READY = int(Status.NAMESPACE_NOT_READY)
NOT_READY_CRD1 = NOT_READY | 1 << STATUS_CRD_SHIFT


@dataclass
class Boot:
    result: guest.GuestResult
    steps: dict[str, Step]
    ours: list[nc.NetworkNamespace]
    kills: nc.KillSwitch
    seconds: float
    server_log: str = ""

    def disk(self, label: str) -> str:
        return nc.values(self.steps["find"])[label].removeprefix("/dev/")


def network_namespaces(d: Path, servers: list[NbdServer]) -> list[nc.NetworkNamespace]:
    """nvme-emu's namespaces on network storage, and their servers (started here)."""
    image = d / "disk.img"
    with open(image, "wb") as f:
        f.truncate(nc.NAMESPACE_BYTES)
    memory = nbdkit(d, "memory", str(nc.NAMESPACE_BYTES)).start()
    servers.append(memory)
    file = qemu_nbd(d, image).start()
    servers.append(file)
    return [nc.NetworkNamespace("nbdkit", f"nbd:{memory.uri},nsid=1", 1, SERIAL),
            nc.NetworkNamespace(VICTIM, f"nbd:{file.uri},nsid=2", 2, SERIAL, killable=file)]


@pytest.fixture(scope="module")
def boot(guest_infra, tmp_path_factory) -> Iterator[Boot]:
    need_libnbd()
    t0 = time.monotonic()
    d = tmp_path_factory.mktemp("netstore")  # under /tmp: the chroot QEMU sees the sockets
    servers: list[NbdServer] = []
    emus: list[ServerProcess] = []
    try:
        ours = network_namespaces(d, servers)
        image = d / "nocrdt.img"
        with open(image, "wb") as f:
            f.truncate(nc.NAMESPACE_BYTES)
        nocrdt_server = qemu_nbd(d, image, name="qemu-nbd-nocrdt").start()
        servers.append(nocrdt_server)
        nocrdt = nc.NetworkNamespace(VICTIM_NOCRDT, f"nbd:{nocrdt_server.uri},nsid=1", 1, SERIAL_NOCRDT, killable=nocrdt_server)
        peer = nbdkit(d, "memory", str(nc.NAMESPACE_BYTES), name="peer").start()
        servers.append(peer)
        emus.append(ServerProcess.serve(str(d / "nvme.sock"), d / "server.log", [ns.spec for ns in ours],
                                        doorbell="auto", extra=["--serial", SERIAL]))
        emus.append(ServerProcess.serve(str(d / "nocrdt.sock"), d / "nocrdt.log", [nocrdt.spec],
                                        doorbell="auto", extra=["--serial", SERIAL_NOCRDT, "--crdt1", "0"]))

        def storage() -> dict:
            out = {}
            for emu in emus:
                with ControlClient(default_control_socket(emu.path)) as ctl:
                    out.update({f"{emu.path}:{ns['nsid']}": ns.get("storage", {}) for ns in ctl.namespaces()})
            return out

        victim = next(ns for ns in ours if ns.killable is not None)
        others = tuple(ns.label for ns in ours if ns is not victim)
        kills = [nc.Kill("kill", victim.label, others), nc.Kill("kill_nocrdt", nocrdt.label, others)]
        switch = nc.KillSwitch({"kill": victim.killable, "kill_nocrdt": nocrdt_server}, storage)  # type: ignore[dict-item]
        peer_args = ["-drive", f"file=nbd+unix:///?socket={peer.socket},if=none,id=peer,format=raw,cache=none",
                     "-device", f"nvme,serial={nc.PEER_SERIAL},drive=peer"]
        res = guest.run_guest(socket_path=emus[0].path, extra_sockets=[emus[1].path],
                              command=nc.guest_script(ours, kills, [nocrdt]), timeout=TIMEOUT,
                              extra_qemu_args=peer_args, on_console_line=switch)
        steps = parse_steps(res.output)
        (d / "guest-output.txt").write_text(res.output)  # kept with the temp dir, for a look at every step
        run = Boot(res, steps, ours, switch, 0.0)
        run.server_log = "".join(emu.stop_clean() for emu in emus)  # no ERROR: a lost server is a WARNING
        emus.clear()
        run.seconds = time.monotonic() - t0
        print(f"\nnetstore: module boot {run.seconds:.1f} s (guest {res.elapsed:.1f} s, accel {res.accel})")
        for s in steps.values():
            print(f"  step {s.name:<14} {s.seconds:6.1f} s")
        assert res.returncode == 0 and "end" in steps, res.describe_failure()
        yield run
    finally:
        for emu in emus:
            emu.stop()
        for srv in servers:
            srv.kill()


def labels(boot: Boot) -> list[str]:
    return [ns.label for ns in boot.ours]


def fio_problems(step: Step) -> list[str]:
    """What went wrong in one fio step (empty: every write and verify ran and passed)."""
    v = nc.values(step)
    problems = []
    for job in ("rand", "seq"):
        for phase in ("write", "verify"):
            if v.get(f"{job}_{phase}_rc") != "0":
                problems.append(f"{job} {phase}: rc {v.get(f'{job}_{phase}_rc')}")
        if int(v.get(f"{job}_verified") or 0) == 0:  # a verify that read nothing cannot fail
            problems.append(f"{job}: the verify pass read nothing")
    return problems


def test_every_namespace_found(boot: Boot):
    assert tuple(labels(boot)) == LABELS  # every network namespace has its fio check
    v = nc.values(boot.steps["find"])
    for label in (*labels(boot), nc.PEER):
        assert v.get(label, "").startswith("/dev/nvme"), boot.steps["find"].output
    assert f"serial={SERIAL}" in boot.steps["find"].output


@pytest.mark.parametrize("label", [*LABELS, nc.PEER])
def test_fio_verify(boot: Boot, label: str):
    problems = fio_problems(boot.steps[f"fio_{label}"])
    assert not problems, boot.steps[f"fio_{label}"].output


def test_nvme_emu_passes_what_the_peer_passes(boot: Boot):
    peer_ok = not fio_problems(boot.steps[f"fio_{nc.PEER}"])
    print(f"\n{'namespace':<10} {'fio':>5} {'s':>6}")
    for label in (*labels(boot), nc.PEER):
        step = boot.steps[f"fio_{label}"]
        print(f"{label:<10} {'pass' if not fio_problems(step) else 'FAIL':>5} {step.seconds:6.1f}")
    if peer_ok:
        failed = [label for label in labels(boot) if fio_problems(boot.steps[f"fio_{label}"])]
        assert not failed, f"pass on QEMU's nvme over NBD, not on nvme-emu: {failed}"


@pytest.mark.parametrize("step", ["kill", "kill_nocrdt"])
def test_kill_fails_io_in_bounded_time_without_resets(boot: Boot, step: str):
    assert not boot.kills.errors, boot.kills.errors
    s = boot.steps[step]
    v = nc.values(s)
    assert v["pattern_write_rc"] == "0" and v["flush_rc"] == "0", s.output
    assert v["fio_rc"] != "0", s.output  # the I/O error ended it...
    assert float(v["fio_after_kill_s"]) < FIO_ENDS_WITHIN_S, s.output  # ...not its 90 s runtime
    assert int(v["resets"]) <= 1, s.output  # no reset storm (none expected: every command completes)
    print(f"\n{step}: fio ended {v['fio_after_kill_s']} s after the kill, rc {v['fio_rc']}, {v['resets']} controller resets")
    print("\n".join(line for line in s.output.splitlines() if line.startswith(("  fio:", "  dmesg:"))))


@pytest.mark.parametrize("step", ["kill", "kill_nocrdt"])
def test_other_namespaces_serve_while_the_server_is_down(boot: Boot, step: str):
    v = nc.values(boot.steps[step])
    others = [label for label in labels(boot) if label != VICTIM]
    for label in others:
        assert v[f"during_read_{label}_rc"] == "0", boot.steps[step].output  # while Linux retried
        assert v[f"down_read_{label}_rc"] == "0", boot.steps[step].output  # after fio gave up


@pytest.mark.parametrize("step", ["kill", "kill_nocrdt"])
def test_io_resumes_after_restart_and_flushed_data_reads_back(boot: Boot, step: str):
    v = nc.values(boot.steps[step])
    print(f"\n{step}: resumed after {v['resumed_after_s']} s, {v['resume_tries']} read(s)")
    assert v["resume_read_rc"] == "0", boot.steps[step].output
    assert v["pattern_intact"] == "yes", boot.steps[step].output
    assert v["resume_write_rc"] == "0" and v["resume_write_intact"] == "yes", boot.steps[step].output
    assert boot.result.returncode == 0  # nvme-emu served to the end: never restarted
    assert "connection to nbd+unix" in boot.server_log


def test_retry_delay_spaces_linux_retries(boot: Boot):
    """What the guest sees of CRD: where CRDT1 = 10, Linux enabled ACRE, the failed
    completions carry CRD = 1 and Linux waits 1 s before each of its five retries; where
    CRDT1 = 0 it did not, the same failures come back without CRD and the retries are spent
    at once."""
    found = nc.values(boot.steps["find"])
    assert (found[f"crdt1_{VICTIM}"], found[f"acre_{VICTIM}"]) == ("10", "1"), boot.steps["find"].output
    assert (found[f"crdt1_{VICTIM_NOCRDT}"], found[f"acre_{VICTIM_NOCRDT}"]) == ("0", "0"), boot.steps["find"].output
    with_crd = nc.failures(boot.steps["kill"], boot.disk(VICTIM))
    without = nc.failures(boot.steps["kill_nocrdt"], boot.disk(VICTIM_NOCRDT))
    for name, f in (("CRDT1 10", with_crd), ("CRDT1 0", without)):
        step = "kill" if f is with_crd else "kill_nocrdt"
        print(f"\n{name}: statuses {sorted(hex(s) for s in f.statuses)}, {f.completions} failed completions, retries up to "
              f"{f.max_retries}, first failure to given up {f.until_given_up} s; fio ended "
              f"{nc.values(boot.steps[step])['fio_after_kill_s']} s after the kill", end="")
    print(f"\nserver counters at the restarts: {boot.kills.counters}")
    assert with_crd.statuses == {NOT_READY_CRD1} and with_crd.max_retries == LINUX_RETRIES, boot.steps["kill"].output
    assert with_crd.until_given_up is not None and with_crd.until_given_up >= 0.9 * LINUX_RETRIES
    assert without.statuses == {NOT_READY} and without.max_retries == LINUX_RETRIES, boot.steps["kill_nocrdt"].output
    assert without.until_given_up is not None and without.until_given_up < 1.0
