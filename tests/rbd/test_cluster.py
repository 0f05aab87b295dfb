"""The fixture's cluster is real: librbd (python3-rbd, imported in the test's interpreter)
writes and reads back the image, librados sees the pool, and the daemons run in their own
process groups and are gone, with the directory, after stop()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..support.ceph import CephCluster, missing
from ..support.server import REPO, child_env, wait_until


def write_read_back(ceph: CephCluster) -> None:
    """librbd writes the image (across an object boundary, at its end) and reads it back;
    unwritten and discarded ranges read as zeros."""
    import rbd

    cluster = ceph.rados()
    try:
        assert ceph.pool in cluster.list_pools()
        with cluster.open_ioctx(ceph.pool) as ioctx:
            assert ceph.image in rbd.RBD().list(ioctx)
            with rbd.Image(ioctx, ceph.image) as image:
                assert image.size() == ceph.image_size
                pattern = os.urandom(4096) * 64  # 256 KiB
                offsets = [0, (4 << 20) - (128 << 10), ceph.image_size - len(pattern)]
                for off in offsets:
                    assert image.write(pattern, off) == len(pattern)
                image.flush()
                for off in offsets:
                    assert image.read(off, len(pattern)) == pattern
                assert image.read(1 << 20, 4096) == bytes(4096)
                image.discard(0, len(pattern))
                assert image.read(0, 4096) == bytes(4096)
    finally:
        cluster.shutdown()


def test_image_write_read_back(ceph_cluster: CephCluster) -> None:
    write_read_back(ceph_cluster)


def test_daemons_own_process_groups(ceph_cluster: CephCluster) -> None:
    pids = ceph_cluster.pids()
    assert set(pids) == {"mon", "osd"}
    for pid in pids.values():
        assert os.getpgid(pid) == pid
        assert os.getpgid(pid) != os.getpgrp()


@pytest.mark.parametrize(("auth", "objectstore"), [("none", "memstore"), ("cephx", "memstore"), ("cephx", "bluestore")])
def test_start_stop(auth: str, objectstore: str) -> None:
    """A second cluster beside the session's (own port, fsid, dir), with either auth and either
    object store, serves the image; stop() leaves nothing."""
    why = missing()
    if why:
        pytest.skip(f"no Ceph cluster: {why}")
    c = CephCluster(auth=auth, objectstore=objectstore, image_size=8 << 20).start()
    try:
        write_read_back(c)
    except BaseException:
        c.stop()
        raise
    pids = list(c.pids().values())
    base = c.base
    try:
        assert len(pids) == 2 and base.is_dir()
        assert set(c.timings) >= {"osd_up", "image", "total"}
    finally:
        c.stop()
    assert not base.exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_daemons_die_with_a_killed_parent(tmp_path: Path) -> None:
    """A test process SIGKILLed mid-session runs no finalizer: its daemons still die with it
    (PR_SET_PDEATHSIG), so no cluster outlives a crashed pytest."""
    why = missing()
    if why:
        pytest.skip(f"no Ceph cluster: {why}")
    script = (
        "import json, time\n"
        "from pathlib import Path\n"
        "from tests.support.ceph import CephCluster\n"
        f"c = CephCluster(image_size=4 << 20, base=Path({str(tmp_path / 'ceph')!r})).start()\n"
        "print(json.dumps(c.pids()), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline() or "{}")
        assert set(pids) == {"mon", "osd"}
    finally:
        parent.kill()
        parent.wait()

    def gone() -> bool:
        for pid in pids.values():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    wait_until(gone, "the daemons to die with their parent")


def test_failed_start_tears_down(tmp_path: Path) -> None:
    """A start that fails (here the OSD's mkfs: its data directory cannot be made) raises with
    the daemons' logs and leaves no daemon and no directory behind."""
    why = missing()
    if why:
        pytest.skip(f"no Ceph cluster: {why}")
    c = CephCluster(base=tmp_path / "ceph", extra_conf={"osd_data": "/proc/no-such-dir"})
    with pytest.raises(RuntimeError, match="ceph-osd") as failure:
        c.start()
    assert "mon.a.log" in str(failure.value)
    assert not c.procs and not c.base.exists()
