"""The session's Ceph cluster (tests/support/ceph.py): one mon, one memstore OSD, a pool and an
RBD image, started once for tests/rbd and torn down at the end of the session whatever happens.
Skipped, saying why, only where the machine lacks the daemons or the bindings."""

from __future__ import annotations

from typing import Iterator

import pytest

from ..support.ceph import CephCluster, missing


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    why = missing()
    if why:
        pytest.skip(f"no Ceph cluster: {why}")
    cluster = CephCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
