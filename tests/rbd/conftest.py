"""The session's Ceph cluster (tests/support/ceph.py): one mon, one memstore OSD, a pool and an
RBD image, started once for the suites that use it and torn down at the end of the session."""

from ..support.ceph import ceph_cluster  # noqa: F401
