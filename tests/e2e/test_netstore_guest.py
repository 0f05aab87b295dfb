"""Issue 27 in a Linux guest: nvme-emu's namespaces on network storage, beside QEMU's own
nvme on the same kinds of storage, in ONE boot of the test guest (netstore_checks has the
script).

The test starts every server itself, each NBD server on a Unix socket in its temp directory:
nbdkit's memory plugin and qemu-nbd serving a file for nvme-emu (``nbd:`` namespaces 1 and 2),
a second nvme-emu with ``--crdt1 0`` on another qemu-nbd (the retry delay's "before"), and
another nbdkit for a QEMU ``-device nvme`` on ``-blockdev driver=nbd`` (QEMU's NBD client), the
nbd peer. It also starts a Ceph cluster of its own (tests/support/ceph.py: one mon, one memstore
OSD, ``rbd_cache = false`` for every client as bench/netstore_fio.py has it) with two images:
one for nvme-emu's ``rbd:`` namespace 3, the other for a QEMU ``-device nvme`` on ``-blockdev
driver=rbd`` (QEMU's rbd driver, ``cache.direct``), the rbd peer. Its own cluster, not the
session's ``ceph_cluster``: that one keeps librbd's cache on and has one image, which the
peer must not share (two writers of one region would fail each other's verify). Where the
machine has no Ceph (``ceph.missing()``), or QEMU no rbd driver, the rbd checks are left out
with the reason printed, and every nbd check still runs. Checks:

* fio write + verify (4 KiB random, QD16, crc32c; 4-128 KiB sequential, md5; the verify a
  separate pass) on each namespace and on each peer: whatever passes on a peer passes on our
  namespaces of its kind;
* qemu-nbd SIGKILLed under fio: fio ends with an I/O error in bounded time, no controller
  reset, the nbdkit namespace serves meanwhile, and after the restart I/O resumes without
  restarting nvme-emu and the pattern written and flushed before the kill reads back;
* the Command Retry Delay: Linux enabled ACRE (CRDT1 = 1 s), so its five retries of a
  Namespace Not Ready command span about 5 s; on the controller with CRDT1 = 0 they take
  milliseconds.

Another kind of storage is one more function like :func:`rbd_storage`: its namespaces (with
their peer's label), its peer, what it leaves out and why; its labels in ``LABELS`` and
``PEER_LABELS``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from nvme_emu import guest
from nvme_emu.ctl import ControlClient, default_control_socket
from nvme_emu.spec.commands import STATUS_CRD_SHIFT, Status

from ..nbd.nbd_servers import NbdServer, need_libnbd, nbdkit, qemu_nbd
from ..rbd.qemu_rbd import driver_problem, rbd_node
from ..support import ceph
from ..support.server import ServerProcess
from . import netstore_checks as nc
from .zoned_checks import Step, parse_steps

pytestmark = pytest.mark.e2e

SERIAL = "NVMEEMUNETSTORE"
#: The second nvme-emu, CRDT1 = 0.
SERIAL_NOCRDT = "NVMEEMUNOCRDT"
VICTIM, VICTIM_NOCRDT = "qemu_nbd", "qemu_nbd_nocrdt"
RBD = "rbd"
#: The labels of nvme-emu's network namespaces, in NSID order (the fio checks' parameters).
LABELS = ("nbdkit", VICTIM, RBD)
PEER_NBD, PEER_RBD = "peer_nbd", "peer_rbd"
PEER_LABELS = (PEER_NBD, PEER_RBD)
PEER_SERIALS = {PEER_NBD: "NETPEERNBD", PEER_RBD: "NETPEERRBD"}
#: The rbd peer's image, beside the cluster's own (nvme-emu's).
PEER_IMAGE = "peer"
#: The module took 37-59 s here with the nbd checks alone (7 runs), 48-75 s with the rbd ones
#: (6 runs; interleaved with 2 of the former at the same load: 38 / 39 s before, 54 / 59 s
#: after): each rbd fio step 5-11 s, the cluster, its second image and the probe of QEMU's rbd
#: driver 1.0 s (2 vCPUs, TCG, as loaded as the shared machine was, load 1-3); a hang must not
#: take the suite with it.
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
    peers: list[nc.Peer]
    #: the labels this machine cannot run, and why
    left_out: dict[str, str]
    kills: nc.KillSwitch
    seconds: float
    server_log: str = ""

    def disk(self, label: str) -> str:
        return nc.values(self.steps["find"])[label].removeprefix("/dev/")


def nbd_storage(d: Path, servers: list[NbdServer]) -> tuple[list[nc.NetworkNamespace], nc.Peer]:
    """nvme-emu's namespaces on NBD exports, their peer, and their servers (started here)."""
    image = d / "disk.img"
    with open(image, "wb") as f:
        f.truncate(nc.NAMESPACE_BYTES)
    memory = nbdkit(d, "memory", str(nc.NAMESPACE_BYTES)).start()
    servers.append(memory)
    file = qemu_nbd(d, image).start()
    servers.append(file)
    peer = nbdkit(d, "memory", str(nc.NAMESPACE_BYTES), name="peer").start()
    servers.append(peer)
    node = {"driver": "nbd", "node-name": PEER_NBD, "server": {"type": "unix", "path": str(peer.socket)}, "cache": {"direct": True}}
    return ([nc.NetworkNamespace("nbdkit", f"nbd:{memory.uri},nsid=1", 1, SERIAL, peer=PEER_NBD),
             nc.NetworkNamespace(VICTIM, f"nbd:{file.uri},nsid=2", 2, SERIAL, killable=file, peer=PEER_NBD)],
            nc.Peer(PEER_NBD, PEER_SERIALS[PEER_NBD], node))


def rbd_storage(qemu: str, clusters: list[ceph.CephCluster]) -> tuple[list[nc.NetworkNamespace], list[nc.Peer], dict[str, str]]:
    """nvme-emu's ``rbd:`` namespace on one image of a cluster started here (appended to
    ``clusters``, for the caller to stop), QEMU's rbd driver on another as its peer, and what
    this machine cannot run of them (label -> why)."""
    why = ceph.missing()
    if why:
        return [], [], {RBD: f"no Ceph cluster: {why}", PEER_RBD: f"no Ceph cluster: {why}"}
    cluster = ceph.CephCluster(image_size=nc.NAMESPACE_BYTES, extra_conf={"rbd_cache": "false"})
    clusters.append(cluster)
    cluster.start()
    cluster.create_image(PEER_IMAGE, nc.NAMESPACE_BYTES)
    node = rbd_node(cluster, PEER_RBD, PEER_IMAGE)
    problem = driver_problem(qemu, node)
    ours = nc.NetworkNamespace(RBD, f"{cluster.spec},nsid=3", 3, SERIAL, peer=None if problem else PEER_RBD)
    if problem:
        return [ours], [], {PEER_RBD: f"QEMU's rbd driver cannot open an image of the cluster (qemu-block-extra missing?): {problem}"}
    return [ours], [nc.Peer(PEER_RBD, PEER_SERIALS[PEER_RBD], node)], {}


def skip_left_out(boot: Boot, label: str) -> None:
    """Skip a check of ``label`` where this machine cannot run it, saying why."""
    if label in boot.left_out:
        print(f"\nskipped {label}: {boot.left_out[label]}")
        pytest.skip(f"{label}: {boot.left_out[label]}")


@pytest.fixture(scope="module")
def boot(guest_infra, tmp_path_factory) -> Iterator[Boot]:
    need_libnbd()
    t0 = time.monotonic()
    d = tmp_path_factory.mktemp("netstore")  # under /tmp: the chroot QEMU sees the sockets
    servers: list[NbdServer] = []
    clusters: list[ceph.CephCluster] = []
    emus: list[ServerProcess] = []
    try:
        ours, nbd_peer = nbd_storage(d, servers)
        t_ceph = time.monotonic()
        rbd_ours, rbd_peers, left_out = rbd_storage(guest_infra["qemu"], clusters)
        t_ceph = time.monotonic() - t_ceph
        ours += rbd_ours
        peers = [nbd_peer, *rbd_peers]
        for label, why in left_out.items():
            print(f"\nnetstore: left out {label}: {why}")
        image = d / "nocrdt.img"
        with open(image, "wb") as f:
            f.truncate(nc.NAMESPACE_BYTES)
        nocrdt_server = qemu_nbd(d, image, name="qemu-nbd-nocrdt").start()
        servers.append(nocrdt_server)
        nocrdt = nc.NetworkNamespace(VICTIM_NOCRDT, f"nbd:{nocrdt_server.uri},nsid=1", 1, SERIAL_NOCRDT, killable=nocrdt_server)
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
        res = guest.run_guest(socket_path=emus[0].path, extra_sockets=[emus[1].path],
                              command=nc.guest_script(ours, kills, peers, [nocrdt]), timeout=TIMEOUT,
                              extra_qemu_args=[a for p in peers for a in p.qemu_args()], on_console_line=switch)
        steps = parse_steps(res.output)
        (d / "guest-output.txt").write_text(res.output)  # kept with the temp dir, for a look at every step
        run = Boot(res, steps, ours, peers, left_out, switch, 0.0)
        run.server_log = "".join(emu.stop_clean() for emu in emus)  # no ERROR: a lost server is a WARNING
        emus.clear()
        run.seconds = time.monotonic() - t0
        print(f"\nnetstore: module boot {run.seconds:.1f} s (guest {res.elapsed:.1f} s, accel {res.accel}; "
              f"Ceph cluster, its second image and QEMU's rbd probe {t_ceph:.1f} s)")
        for s in steps.values():
            print(f"  step {s.name:<14} {s.seconds:6.1f} s")
        assert res.returncode == 0 and "end" in steps, res.describe_failure()
        yield run
    finally:
        for emu in emus:
            emu.stop()
        for srv in servers:
            srv.kill()
        for cluster in clusters:
            cluster.stop()


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
    # every network namespace and peer this machine can run has its fio check
    assert tuple(labels(boot)) == tuple(label for label in LABELS if label not in boot.left_out)
    assert tuple(p.label for p in boot.peers) == tuple(label for label in PEER_LABELS if label not in boot.left_out)
    v = nc.values(boot.steps["find"])
    for label in (*labels(boot), *(p.label for p in boot.peers)):
        assert v.get(label, "").startswith("/dev/nvme"), boot.steps["find"].output
    assert f"serial={SERIAL}" in boot.steps["find"].output


@pytest.mark.parametrize("label", [*LABELS, *PEER_LABELS])
def test_fio_verify(boot: Boot, label: str):
    skip_left_out(boot, label)
    problems = fio_problems(boot.steps[f"fio_{label}"])
    assert not problems, boot.steps[f"fio_{label}"].output


@pytest.mark.parametrize("peer", PEER_LABELS)
def test_nvme_emu_passes_what_the_peer_passes(boot: Boot, peer: str):
    skip_left_out(boot, peer)
    held = [ns.label for ns in boot.ours if ns.peer == peer]
    assert held, f"no namespace of nvme-emu is held to {peer}"
    wc = {f"/dev/{b}": w for b, w in re.findall(r"^block (\S+) .*wc=(\S+)", boot.steps["find"].output, re.M)}
    found = nc.values(boot.steps["find"])
    print(f"\n{'namespace':<10} {'fio':>5} {'s':>6}  write cache")
    for label in (*held, peer):
        step = boot.steps[f"fio_{label}"]
        print(f"{label:<10} {'pass' if not fio_problems(step) else 'FAIL':>5} {step.seconds:6.1f}  {wc.get(found.get(label, ''), '?')}")
    if not fio_problems(boot.steps[f"fio_{peer}"]):
        failed = [label for label in held if fio_problems(boot.steps[f"fio_{label}"])]
        assert not failed, f"pass on QEMU's nvme ({peer}), not on nvme-emu: {failed}"


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
