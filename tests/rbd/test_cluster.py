"""The fixture's cluster is real: librbd (python3-rbd, imported in the test's interpreter)
writes and reads back the image, librados sees the pool, and the daemons run in their own
process groups and are gone, with the directory, after stop()."""

from __future__ import annotations

import os

import pytest

from ..support.ceph import CephCluster, missing


def test_image_write_read_back(ceph_cluster: CephCluster) -> None:
    import rbd

    cluster = ceph_cluster.rados()
    try:
        assert ceph_cluster.pool in cluster.list_pools()
        with cluster.open_ioctx(ceph_cluster.pool) as ioctx:
            assert ceph_cluster.image in rbd.RBD().list(ioctx)
            with rbd.Image(ioctx, ceph_cluster.image) as image:
                assert image.size() == ceph_cluster.image_size
                pattern = os.urandom(4096) * 64  # 256 KiB, across an object boundary below
                offsets = [0, (4 << 20) - (128 << 10), ceph_cluster.image_size - len(pattern)]
                for off in offsets:
                    assert image.write(pattern, off) == len(pattern)
                image.flush()
                for off in offsets:
                    assert image.read(off, len(pattern)) == pattern
                # never written: zeros
                assert image.read(1 << 20, 4096) == bytes(4096)
                image.discard(0, len(pattern))
                assert image.read(0, 4096) == bytes(4096)
    finally:
        cluster.shutdown()


def test_daemons_own_process_groups(ceph_cluster: CephCluster) -> None:
    pids = ceph_cluster.pids()
    assert set(pids) == {"mon", "osd"}
    for pid in pids.values():
        assert os.getpgid(pid) == pid
        assert os.getpgid(pid) != os.getpgrp()


@pytest.mark.parametrize("auth", ["none", "cephx"])
def test_start_stop(auth: str) -> None:
    """A second cluster beside the session's (own port, fsid, dir), with either auth; stop() leaves nothing."""
    why = missing()
    if why:
        pytest.skip(f"no Ceph cluster: {why}")
    c = CephCluster(auth=auth, image_size=4 << 20).start()
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
