"""Memory shared by fd must not be able to kill the server (issue 22, an outside fuzz).

A client can ``ftruncate`` any memfd it holds. For the memfds the server hands out (the
doorbell shadow page of GET_REGION_IO_FDS, the doorbell page of a ``--doorbell poll`` region)
the server's next store into them would SIGBUS it, so they are sealed before they leave. For
guest RAM (DMA_MAP) the client owns the memfd: the server wants it sealed against shrinking,
and for what cannot be sealed (an opt-out, a sparse file on a full tmpfs) a fault in a data
copy fails that command with Data Transfer Error instead of the process.

Servers are separate processes, on both vfio-user backends (``spawn``).
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from ..support.host import Host
from nvme_emu.spec import Reg
from vfio_user.constants import REGION_FLAG_MMAP

BAR0 = 0
SQ0_TAIL = Reg.DOORBELLS  # BAR0 + 0x1000


def _handed_out_memfd(h: Host, doorbell: str) -> int:
    """The memfd the server shares for its doorbell page: shadow (auto) or region (poll)."""
    if doorbell == "poll":
        info = h.client.region_info(BAR0)
        assert info.flags & REGION_FLAG_MMAP and info.fd is not None, info
        return info.fd
    iofds = h.client.region_io_fds(BAR0)
    shadows = {f.shadow_fd for f in iofds if f.shadow_fd is not None}
    assert shadows, iofds
    return shadows.pop()


@pytest.mark.parametrize("doorbell", ["auto", "poll"])
def test_truncating_a_handed_out_memfd_is_refused_and_the_doorbell_served(spawn, doorbell):
    srv = spawn(extra=["--doorbell", doorbell])
    h = Host(srv.path)
    try:
        assert h.identify(1)[0].status == 0
        fd = _handed_out_memfd(h, doorbell)
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 0)
        assert e.value.errno == errno.EPERM
        assert os.fstat(fd).st_size > 0
        # A non-posted doorbell write of the tail the controller already has: the store into
        # the shared page that used to SIGBUS the server, answered here.
        h.client.region_write(BAR0, SQ0_TAIL, struct.pack("<I", h.host.queues[0].tail))
        c, data = h.identify(1)
        assert c.status == 0 and data[:2] != b"\xa5\xa5"
        assert srv.alive()
    finally:
        h.close()
