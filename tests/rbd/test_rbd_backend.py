"""The rbd: backend on the fixture's real cluster (tests/support/ceph.py): every command's
round trip through a Namespace and through the NVM command set on a real event loop and I/O
pool, read-only images, IDs across opens, the counters, a quiesce with reads in flight, and
the OSD paused (a hung OSD) or killed and restarted mid-run."""

from __future__ import annotations

import os
import struct
import time
from typing import Any, Iterator

import pytest

from ..nvme_areas.area_helpers import BUF, Guest, make_area
from ..nvme_areas.loop_area import Loop
from ..support.ns_io import read, write
from ..support.ceph import CephCluster, missing
from nvme_emu.backends import rbd as rbd_backend
from nvme_emu.backends.errors import ReadOnlyError
from nvme_emu.backends.rbd import RbdBackend
from nvme_emu.namespace_spec import open_namespace, parse_namespace_spec
from nvme_emu.outcome import DEFERRED, finish_here
from nvme_emu.spec.commands import STATUS_DNR, DsmAttr, NvmOpcode, NvmeError, RwCdw12, Status
from nvme_emu.spec.identify import DLFEAT_READ_ZEROES

#: librados' timeouts for the failure tests (the backend's default is 20 s).
TIMEOUT_S = 2
#: A command against a paused OSD must have failed by then: its timeout and some slack for
#: two CPUs shared with other jobs (it measured TIMEOUT_S + 0.00-0.01 s).
FAIL_WITHIN_S = TIMEOUT_S + 3.0


def cluster_bytes(ceph: CephCluster, offset: int, length: int) -> bytes:
    """What the image holds, through a librbd connection of the test's own."""
    import rbd

    cluster = ceph.rados()
    try:
        with cluster.open_ioctx(ceph.pool) as ioctx, rbd.Image(ioctx, ceph.image, read_only=True) as image:
            return bytes(image.read(offset, length))
    finally:
        cluster.shutdown()


def cluster_write(ceph: CephCluster, offset: int, data: bytes) -> None:
    """Write the image through a librbd connection of the test's own (then closed, so its
    exclusive lock goes back): data on the OSD that no other client has in its cache."""
    import rbd

    cluster = ceph.rados()
    try:
        with cluster.open_ioctx(ceph.pool) as ioctx, rbd.Image(ioctx, ceph.image) as image:
            image.write(data, offset)
            image.flush()
    finally:
        cluster.shutdown()


# -- the spec ---------------------------------------------------------------------------------------


def test_spec_names_pool_image_and_keys(ceph_cluster: CephCluster) -> None:
    spec = parse_namespace_spec(ceph_cluster.spec + ",ro,lba=4096")
    assert (spec.kind, spec.path, spec.readonly, spec.lba_size) == ("rbd", f"{ceph_cluster.pool}/{ceph_cluster.image}", True, 4096)
    assert spec.options == {"conf": str(ceph_cluster.conf), "id": "admin"}
    assert parse_namespace_spec("rbd:p/i,timeout=3").options == {"timeout": "3"}
    for bad in ("rbd:img", "rbd:/img", "rbd:p/", "rbd:p/i/x", "rbd:p/i@snap", "rbd:p/i,size=1G", "rbd:p/i,timeout=0",
                "rbd:p/i,timeout=x", "rbd:p/i,timeout=2.5", "rbd:p/i,user=x", "ram:size=1M,conf=/x"):
        with pytest.raises(ValueError):
            parse_namespace_spec(bad)


def test_unreachable_cluster_refuses_to_open(tmp_path: Any) -> None:
    """A conf naming a monitor nobody serves: the open fails (ValueError, within its
    timeout), it does not hang."""
    if missing():
        pytest.skip(f"no Ceph bindings: {missing()}")
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon_host = v2:127.0.0.1:1\nauth_client_required = none\n")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="cannot open"):
        open_namespace(f"rbd:rbd/img,conf={conf},timeout=1", 1)
    assert time.monotonic() - t0 < 10


# -- through a Namespace (blocking forms) ------------------------------------------------------------


def test_round_trips_through_a_namespace(ceph_cluster: CephCluster) -> None:
    """Reads and writes (one view and several, an object boundary crossed), FUA, Flush,
    Write Zeroes, Deallocate: what the namespace did is what the cluster holds."""
    ns = open_namespace(ceph_cluster.spec, 1)
    try:
        assert ns.nsze * 512 == ceph_cluster.image_size and not ns.write_protected and ns.blocking
        data = os.urandom(64 << 10)
        boundary = ((4 << 20) - (16 << 10)) // 512  # 4 MiB objects: this write spans two
        write(ns, boundary, data, pages=16)
        assert read(ns, boundary, len(data) // 512, pages=7) == data
        assert cluster_bytes(ceph_cluster, boundary * 512, len(data)) == data
        write(ns, 8, b"\x5a" * 4096, fua=True)
        ns.flush()
        assert cluster_bytes(ceph_cluster, 8 * 512, 4096) == b"\x5a" * 4096
        finish_here(ns.write_zeroes(boundary, 64, fua=True))
        assert read(ns, boundary, 64) == bytes(64 * 512)
        assert read(ns, boundary + 64, 8) == data[64 * 512 : 72 * 512]
        # Deallocate is a discard: DLFEAT promises nothing, and a small one leaves the data
        assert not ns.dlfeat & DLFEAT_READ_ZEROES
        finish_here(ns.deallocate([(boundary + 64, 2)]))
        assert read(ns, boundary + 64, 2) == data[64 * 512 : 66 * 512]
        # a whole 4 MiB object discarded does read zeros (not that the host may count on it)
        write(ns, (8 << 20) // 512, b"\x11" * 4096)
        finish_here(ns.deallocate([((8 << 20) // 512, (4 << 20) // 512)]))
        assert read(ns, (8 << 20) // 512, 8) == bytes(4096)
        with pytest.raises(NvmeError) as e:
            read(ns, ns.nsze - 1, 2)
        assert e.value.status == Status.LBA_OUT_OF_RANGE
    finally:
        ns.close()


def test_read_only_image_is_write_protected(ceph_cluster: CephCluster) -> None:
    ns = open_namespace(ceph_cluster.spec + ",ro", 1)
    try:
        assert ns.write_protected and ns.identify_fields()["nsattr"] & 1
        assert len(read(ns, 0, 8)) == 4096
        with pytest.raises(ReadOnlyError) as e:
            ns.backend.write_from(0, [memoryview(bytes(512))])
        assert e.value.status == Status.NAMESPACE_WRITE_PROTECTED
    finally:
        ns.close()


def test_identity_is_the_images_across_opens(ceph_cluster: CephCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two opens (the second with the seed cache emptied, as another process or host would
    start) give the same NGUID, EUI-64 and UUID; another image, other IDs; the seed is the
    cluster's fsid, the pool's id and the image's id."""
    import rbd

    first = open_namespace(ceph_cluster.spec, 1)
    ids = (first.nguid, first.eui64, first.uuid)
    backend = first.backend
    assert isinstance(backend, RbdBackend)
    assert backend.fsid == ceph_cluster.fsid
    first.close()
    monkeypatch.setattr(rbd_backend, "_SEEDS", {})
    again = open_namespace(ceph_cluster.spec, 1)
    try:
        assert (again.nguid, again.eui64, again.uuid) == ids
    finally:
        again.close()
    cluster = ceph_cluster.rados()
    try:
        with cluster.open_ioctx(ceph_cluster.pool) as ioctx:
            rbd.RBD().create(ioctx, "other", 8 << 20)
    finally:
        cluster.shutdown()
    other = open_namespace(ceph_cluster.spec.replace(f"/{ceph_cluster.image},", "/other,"), 1)
    try:
        assert other.nguid != ids[0] and other.uuid != ids[2]
    finally:
        other.close()


def test_metadata_goes_the_blocking_way_with_a_sidecar_by_name(served: tuple[Loop, Guest], ceph_cluster: CephCluster,
                                                               tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An rbd: namespace with metadata (Type 1 PI): I/O is not plain, so its Reads and Writes
    take the blocking forms on the pool's workers (the metadata handlers compose blocking
    calls), correctly; the sidecar is in the state directory, named by POOL/IMAGE whatever the
    working directory."""
    monkeypatch.setenv("NVME_EMU_STATE_DIR", str(tmp_path / "state"))
    lp, guest = served
    lp.area.state.namespaces[3] = ns = open_namespace(f"{ceph_cluster.spec},ms=8,pi=1,ext", 3)
    path = ns.describe_storage()["meta_path"]
    assert path is not None and path.startswith(str(tmp_path / "state" / "meta" / "rbd-img-")) and os.path.exists(path)
    assert not ns.plain_rw
    data = os.urandom(512) + bytes(8)  # one extended block; PRACT inserts its PI
    guest.write(BUF, data)
    pract = 1 << 29
    assert lp.command(NvmOpcode.WRITE, nsid=3, prp1=BUF, cdw10=4000, cdw11=0, cdw12=pract) == (Status.SUCCESS, 0)
    guest.write(BUF, bytes(520))
    assert lp.command(NvmOpcode.READ, nsid=3, prp1=BUF, cdw10=4000, cdw11=0, cdw12=pract) == (Status.SUCCESS, 0)
    assert guest.read(BUF, 512) == data[:512] == cluster_bytes(ceph_cluster, 4000 * 512, 512)


# -- through the NVM command set on a loop ----------------------------------------------------------


@pytest.fixture
def served(ceph_cluster: CephCluster) -> Iterator[tuple[Loop, Guest]]:
    """NSID 1 RAM, NSID 2 the image (timeouts of TIMEOUT_S), on a loop; closed after."""
    guest = Guest()
    area = make_area(guest)
    area.state.namespaces[2] = open_namespace(f"{ceph_cluster.spec},timeout={TIMEOUT_S}", 2)
    lp = Loop(area)
    try:
        yield lp, guest
    finally:
        lp.close()
        for ns in area.state.namespaces.values():
            ns.close()
        guest.close()


def rw(nsid: int, slba: int, nlb: int, **more: int) -> dict[str, int]:
    """Read/Write fields for ``nlb`` blocks at BUF (PRP2 the next page: up to 8 KiB)."""
    return dict(nsid=nsid, prp1=BUF, prp2=BUF + 4096, cdw10=slba, cdw11=0, cdw12=(nlb - 1) | more.pop("cdw12", 0), **more)


def test_every_command_through_the_nvm_set_on_a_loop(served: tuple[Loop, Guest], ceph_cluster: CephCluster) -> None:
    """Read, Write (FUA too), Flush, Write Zeroes, Dataset Management, Compare, Verify and Copy
    on an rbd: namespace: each completes through the loop (Reads and Writes deferred with
    no worker thread), with the right status and data."""
    lp, guest = served
    data = os.urandom(8192)
    guest.write(BUF, data)
    threads = {t.ident for t in lp.pool._threads}
    assert lp.command(NvmOpcode.WRITE, **rw(2, 128, 16)) == (Status.SUCCESS, 0)
    guest.write(BUF, bytes(8192))
    assert lp.command(NvmOpcode.READ, **rw(2, 128, 16)) == (Status.SUCCESS, 0)
    assert guest.read(BUF, 8192) == data == cluster_bytes(ceph_cluster, 128 * 512, 8192)
    assert lp.pool.pending == 0 and {t.ident for t in lp.pool._threads} == threads
    ns = lp.area.state.namespaces[2]
    assert ns.stats.read_commands == 1 and ns.stats.write_commands == 1 and ns.stats.bytes_read == 8192

    guest.write(BUF, b"\x77" * 4096)
    assert lp.command(NvmOpcode.WRITE, **rw(2, 300, 8, cdw12=RwCdw12.FUA)) == (Status.SUCCESS, 0)
    assert cluster_bytes(ceph_cluster, 300 * 512, 4096) == b"\x77" * 4096  # FUA: on the OSD before the CQE
    assert lp.command(NvmOpcode.FLUSH, nsid=2) == (Status.SUCCESS, 0)
    assert lp.command(NvmOpcode.COMPARE, **rw(2, 300, 8)) == (Status.SUCCESS, 0)
    guest.write(BUF, b"\x78" * 4096)
    status, _ = lp.command(NvmOpcode.COMPARE, **rw(2, 300, 8))
    assert status & 0x7FF == Status.COMPARE_FAILURE
    assert lp.command(NvmOpcode.VERIFY, nsid=2, cdw10=0, cdw11=0, cdw12=63) == (Status.SUCCESS, 0)

    assert lp.command(NvmOpcode.WRITE_ZEROES, nsid=2, cdw10=128, cdw11=0, cdw12=7) == (Status.SUCCESS, 0)
    assert cluster_bytes(ceph_cluster, 128 * 512, 8192) == bytes(4096) + data[4096:]
    # Copy (the pool, blocking forms): blocks 136..143 to 400
    desc = bytearray(32)
    struct.pack_into("<QH", desc, 8, 136, 7)
    guest.write(BUF, bytes(desc))
    assert lp.command(NvmOpcode.COPY, nsid=2, prp1=BUF, cdw10=400, cdw11=0, cdw12=0) == (Status.SUCCESS, 0)
    assert cluster_bytes(ceph_cluster, 400 * 512, 4096) == data[4096:]
    # Dataset Management, two ranges deallocated (a discard: accepted, nothing promised)
    ranges = struct.pack("<IIQ", 0, 8, 400) + struct.pack("<IIQ", 0, 8, 128)
    guest.write(BUF, ranges)
    assert lp.command(NvmOpcode.DATASET_MANAGEMENT, nsid=2, prp1=BUF, cdw10=1, cdw11=DsmAttr.AD) == (Status.SUCCESS, 0)
    # out of range: refused before anything starts
    status, _ = lp.command(NvmOpcode.READ, **rw(2, ns.nsze - 1, 2))
    assert status & 0x7FF == Status.LBA_OUT_OF_RANGE
    assert ns.backend.storage_stats()["in_flight"] == 0


def test_queue_depth_32_on_the_loop(served: tuple[Loop, Guest]) -> None:
    """32 Reads and 32 Writes in flight at once: all deferred, all succeed, each page its data."""
    lp, guest = served
    pages = [os.urandom(4096) for _ in range(32)]
    for i, page in enumerate(pages):
        guest.write(BUF + i * 4096, page)
    before = len(lp.finished())
    writes = [(NvmOpcode.WRITE, dict(cid=i, nsid=2, prp1=BUF + i * 4096, cdw10=i * 8, cdw11=0, cdw12=7)) for i in range(32)]
    assert lp.execute_all(writes) == [DEFERRED] * 32  # all in flight at once (some may have completed since)
    lp.run_until(lambda: len(lp.finished()) == before + 32)
    assert all(f[2] == Status.SUCCESS for f in lp.finished()[before:])
    guest.write(BUF, bytes(32 * 4096))
    reads = [(NvmOpcode.READ, dict(cid=i, nsid=2, prp1=BUF + i * 4096, cdw10=i * 8, cdw11=0, cdw12=7)) for i in range(32)]
    assert lp.execute_all(reads) == [DEFERRED] * 32
    lp.run_until(lambda: len(lp.finished()) == before + 64)
    assert all(f[2] == Status.SUCCESS for f in lp.finished()[before:])
    assert [guest.read(BUF + i * 4096, 4096) for i in range(32)] == pages


def test_read_only_through_the_dispatch(ceph_cluster: CephCluster) -> None:
    guest = Guest()
    area = make_area(guest)
    area.state.namespaces[2] = open_namespace(ceph_cluster.spec + ",ro", 2)
    lp = Loop(area)
    try:
        status, _ = lp.command(NvmOpcode.WRITE, **rw(2, 0, 8))
        assert status & 0x7FF == Status.NAMESPACE_WRITE_PROTECTED
        assert lp.command(NvmOpcode.READ, **rw(2, 0, 8)) == (Status.SUCCESS, 0)
    finally:
        lp.close()
        area.state.namespaces[2].close()
        guest.close()


def test_quiesce_cancels_reads_in_flight(served: tuple[Loop, Guest], ceph_cluster: CephCluster) -> None:
    """Reads in flight (the OSD paused under them) when the controller quiesces (as for a DMA
    unmap or a reset): each completes at once with the quiesce's status; when the OSD answers
    later, librbd's data is dropped, never copied into guest memory."""
    lp, guest = served
    sentinel = b"\xee" * (8 * 4096)
    guest.write(BUF, sentinel)
    ceph_cluster.pause()
    try:
        before = len(lp.finished())
        for i in range(8):  # blocks never read by this client: not in librbd's cache
            fields = dict(nsid=2, prp1=BUF + i * 4096, cdw10=(100 << 20) // 512 + i * 8, cdw11=0, cdw12=7)
            assert lp.execute(NvmOpcode.READ, cid=i, **fields) is DEFERRED
        lp.run_until(lambda: ns_stats(lp)["in_flight"] == 8)
        cancelled = lp.pool.quiesce(lambda views: True, lambda: NvmeError(Status.DATA_TRANSFER_ERROR, "quiesced"))
        assert cancelled == 8 and lp.pool.pending == 0
        statuses = [f[2] for f in lp.finished()[before:]]
        assert statuses == [Status.DATA_TRANSFER_ERROR | STATUS_DNR] * 8
    finally:
        ceph_cluster.resume()
    lp.run_until(lambda: ns_stats(lp)["in_flight"] == 0)  # librbd's completions came, and went nowhere
    lp.pool.drain()
    assert guest.read(BUF, len(sentinel)) == sentinel
    assert len(lp.finished()) == before + 8
    assert lp.command(NvmOpcode.READ, **rw(2, 0, 8)) == (Status.SUCCESS, 0)


def ns_stats(lp: Loop) -> dict[str, Any]:
    return lp.area.state.namespaces[2].describe_storage()["storage"]


def test_paused_osd_fails_commands_then_io_resumes(served: tuple[Loop, Guest], ceph_cluster: CephCluster) -> None:
    """The OSD paused mid-run (SIGSTOP: it holds its sockets and answers nothing): Reads,
    Writes with FUA and Flushes in flight complete with Namespace Not Ready, DNR clear, within
    the timeout; the RAM namespace keeps serving meanwhile; once the OSD is back the next
    command connects again and I/O resumes, and what was flushed before reads back."""
    lp, guest = served
    # Reads of blocks another client wrote: on the OSD, not in this client's cache, and (with
    # the image's object map) known to exist, so librbd must ask the OSD; never-written blocks
    # it answers with zeros by itself
    fresh = (120 << 20) // 512
    cluster_write(ceph_cluster, fresh * 512, os.urandom(1 << 20))
    flushed = os.urandom(4096)
    guest.write(BUF, flushed)
    assert lp.command(NvmOpcode.WRITE, **rw(2, 2048, 8, cdw12=RwCdw12.FUA)) == (Status.SUCCESS, 0)
    ceph_cluster.pause()
    try:
        before = len(lp.finished())
        t0 = time.monotonic()
        assert lp.execute(NvmOpcode.READ, cid=1, **rw(2, fresh, 8)) is DEFERRED
        assert lp.execute(NvmOpcode.WRITE, cid=2, **rw(2, fresh + 64, 8, cdw12=RwCdw12.FUA)) is DEFERRED
        assert lp.execute(NvmOpcode.READ, cid=3, **rw(2, fresh + 128, 8)) is DEFERRED
        # the RAM namespace answers at once, on the same loop, while those wait
        assert lp.execute(NvmOpcode.READ, cid=4, **rw(1, 0, 8)) == (Status.SUCCESS, 0)
        lp.run_until(lambda: len(lp.finished()) == before + 3, timeout=FAIL_WITHIN_S + 5)
        took = time.monotonic() - t0
        assert took < FAIL_WITHIN_S, took
        for f in lp.finished()[before:]:
            status = f[2]
            assert status == Status.NAMESPACE_NOT_READY, (f, lp.finished()[before:])  # DNR clear: the host retries
        stats = ns_stats(lp)
        assert stats["transient_errors"] >= 3 and stats["timeouts"] >= 3 and not stats["connected"]
        # still paused: the next command waits for a new connection, which fails, within bounds
        t0 = time.monotonic()
        status, _ = lp.command(NvmOpcode.READ, **rw(2, fresh + 256, 8))
        assert status == Status.NAMESPACE_NOT_READY and time.monotonic() - t0 < 3 * TIMEOUT_S + 5
    finally:
        ceph_cluster.resume()
    status, _ = lp.command(NvmOpcode.READ, **rw(2, 2048, 8))
    assert status == Status.SUCCESS and guest.read(BUF, 4096) == flushed
    guest.write(BUF, b"\x42" * 4096)
    assert lp.command(NvmOpcode.WRITE, **rw(2, 4096, 8, cdw12=RwCdw12.FUA)) == (Status.SUCCESS, 0)
    stats = ns_stats(lp)
    assert stats["reconnects"] >= 1 and stats["connected"] and stats["in_flight"] == 0
    assert set(stats) >= {"in_flight", "connects", "reconnects", "transient_errors", "timeouts", "errors"}


def test_killed_osd_restarted_on_its_data(tmp_path: Any) -> None:
    """A cluster of its own whose OSD keeps its objects on disk (bluestore, a sparse file):
    the OSD SIGKILLed under the namespace, each command completes with Namespace Not Ready
    within the timeout (none hangs), the OSD started again on the same data, and the next
    command reconnects: I/O resumes and what was written with FUA and flushed before the kill
    reads back. A write on the new connection waits for the image's exclusive lock, which the
    dropped connection still holds: without breaking it, the command's deadline ends it (Not
    Ready, no hang); broken (the backend's fence on reconnect), writes go through. (The session's memstore OSD cannot do this: its objects die with the process,
    so there only a pause is tested.)"""
    why = missing()
    if why:
        pytest.skip(f"no Ceph cluster: {why}")
    ceph = CephCluster(objectstore="bluestore", image_size=64 << 20, base=tmp_path / "ceph").start()
    guest = Guest()
    area = make_area(guest)
    lp = None
    try:
        area.state.namespaces[2] = open_namespace(f"{ceph.spec},timeout={TIMEOUT_S}", 2)
        lp = Loop(area)
        durable = os.urandom(8192)
        guest.write(BUF, durable)
        assert lp.command(NvmOpcode.WRITE, **rw(2, 64, 16, cdw12=RwCdw12.FUA)) == (Status.SUCCESS, 0)
        assert lp.command(NvmOpcode.FLUSH, nsid=2) == (Status.SUCCESS, 0)
        ceph.kill("osd")
        for opc, fields in ((NvmOpcode.WRITE, rw(2, 1024, 8)), (NvmOpcode.FLUSH, dict(nsid=2)), (NvmOpcode.READ, rw(2, 2048, 8))):
            t0 = time.monotonic()
            status, _ = lp.command(opc, **fields)
            assert status == Status.NAMESPACE_NOT_READY, (opc, hex(status))
            assert time.monotonic() - t0 < 3 * TIMEOUT_S + 5  # the op's timeout, or a reconnect's
        ceph.restart("osd")
        backend = area.state.namespaces[2].backend
        assert isinstance(backend, RbdBackend)
        backend._fence = lambda conn: None  # type: ignore[method-assign] # first without breaking the old lock
        guest.write(BUF, bytes(8192))
        assert lp.command(NvmOpcode.READ, **rw(2, 64, 16)) == (Status.SUCCESS, 0)  # a new connection
        assert guest.read(BUF, 8192) == durable
        # a write needs the exclusive lock the dropped connection holds until the OSD's watch
        # timeout (30 s): the command's deadline completes it, Not Ready, rather than a hang
        guest.write(BUF, b"\x33" * 4096)
        t0 = time.monotonic()
        status, _ = lp.command(NvmOpcode.WRITE, **rw(2, 1024, 8, cdw12=RwCdw12.FUA))
        assert status == Status.NAMESPACE_NOT_READY and time.monotonic() - t0 < TIMEOUT_S + rbd_backend.DEADLINE_GRACE_S + 2
        del backend._fence  # the next connection breaks the dropped ones' lock: writes go through
        assert lp.command(NvmOpcode.WRITE, **rw(2, 1024, 8, cdw12=RwCdw12.FUA)) == (Status.SUCCESS, 0)
        guest.write(BUF, bytes(4096))
        assert lp.command(NvmOpcode.READ, **rw(2, 1024, 8)) == (Status.SUCCESS, 0)
        assert guest.read(BUF, 4096) == b"\x33" * 4096
        def storage() -> dict:
            return area.state.namespaces[2].describe_storage()["storage"]

        # a call the deadline gave up on may still be librbd's on the dropped connection until
        # librados' own op timeout ends it: it must end, within bounds
        lp.run_until(lambda: storage()["in_flight"] == 0, timeout=FAIL_WITHIN_S + 5)
        stats = storage()
        assert stats["reconnects"] >= 1 and stats["transient_errors"] >= 3
    finally:
        if lp is not None:
            lp.close()
        for ns in area.state.namespaces.values():
            ns.close()
        guest.close()
        ceph.stop()
