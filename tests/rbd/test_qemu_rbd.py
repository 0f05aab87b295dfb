"""QEMU's own rbd block driver (Debian's qemu-block-extra in the QEMU chroot, installed by
qemu-configs/provide-qemu.sh) on the session's cluster: the peer bench/netstore_fio.py measures
the ``rbd:`` namespaces against. The chroot's QEMU must load block-rbd.so, read the cluster's
conf and keyring under /tmp and reach the monitor on 127.0.0.1; what it writes librbd reads
back, and what librbd wrote it reads (qemu_rbd.qemu_io)."""

from __future__ import annotations

import pytest

from ..support.ceph import CephCluster
from .qemu_rbd import qemu_io, rbd_node

#: Bytes from here on belong to this test (test_cluster.py writes at 0, 4 MiB - 128 KiB and the
#: image's last bytes).
OFFSET = 64 << 20
BLOCK = 4096


@pytest.fixture(scope="module")
def qemu() -> str:
    from nvme_emu import guest

    try:
        return guest.ensure_qemu()
    except guest.GuestError as e:
        if "needs root" in str(e):
            print("skipped: building the QEMU chroot needs root")
            pytest.skip("building the QEMU chroot needs root")
        raise


def test_qemu_rbd_driver_reads_and_writes_the_image(ceph_cluster: CephCluster, qemu: str) -> None:
    import rbd

    c = ceph_cluster
    node = rbd_node(c, "img")
    cluster = c.rados()
    try:
        with cluster.open_ioctx(c.pool) as ioctx, rbd.Image(ioctx, c.image) as image:
            image.write(b"\xa5" * BLOCK, OFFSET)
            image.flush()
        out = qemu_io(qemu, node, [f"read -P 0xa5 {OFFSET} {BLOCK}", f"read -P 0x11 {OFFSET} {BLOCK}",
                                   f"write -P 0x5a {OFFSET + BLOCK} {BLOCK}", "flush"])
        assert f"read {BLOCK}/{BLOCK} bytes at offset {OFFSET}" in out[0] and "verification failed" not in out[0], out[0]
        # the check can fail: a pattern that is not there is reported
        assert "Pattern verification failed" in out[1], out[1]
        assert f"wrote {BLOCK}/{BLOCK} bytes at offset {OFFSET + BLOCK}" in out[2], out[2]
        with cluster.open_ioctx(c.pool) as ioctx, rbd.Image(ioctx, c.image, read_only=True) as image:
            assert image.read(OFFSET + BLOCK, BLOCK) == b"\x5a" * BLOCK
    finally:
        cluster.shutdown()
