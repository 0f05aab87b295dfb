"""Lists of memoryviews and the vectored I/O over them, shared by the backends and
:class:`nvme_emu.namespace.Namespace`.

Data moves between a backend and guest memory through lists of memoryviews (as produced by
:mod:`nvme_emu.prp`) without intermediate copies: the RAM backend copies slice to slice, the
file and block backends hand the views to ``preadv``/``pwritev``.
"""

from __future__ import annotations

import os
from typing import Sequence

Buffers = Sequence[memoryview]

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
ZERO_CHUNK = 1 << 20
ZEROS = bytes(ZERO_CHUNK)


def consume(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a list of views (after a short preadv/pwritev)."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def is_byte_view(v: object) -> bool:
    """What the data pointer code hands over: a flat view of bytes (no cast needed)."""
    return type(v) is memoryview and v.format == "B" and v.ndim == 1


def byte_views(views: Buffers) -> list[memoryview]:
    out = []
    for x in views:
        v = x if type(x) is memoryview else memoryview(x)  # the hot path hands memoryviews
        if v.format != "B" or v.ndim != 1:
            v = v.cast("B")
        if v.nbytes:
            out.append(v)
    return out


def preadv_all(fd: int, views: Buffers, offset: int) -> None:
    """Fill ``views`` from ``fd`` at ``offset``; bytes past end of file read as zeros."""
    pending = byte_views(views)
    while pending:
        n = os.preadv(fd, pending[:IOV_MAX], offset)
        if n == 0:  # the file is shorter than the namespace (truncated behind our back)
            for v in pending:
                v[:] = bytes(len(v))
            return
        offset += n
        pending = consume(pending, n)


def pwritev_all(fd: int, views: Buffers, offset: int) -> None:
    pending = byte_views(views)
    while pending:
        n = os.pwritev(fd, pending[:IOV_MAX], offset)
        offset += n
        pending = consume(pending, n)


def write_zeros(fd: int, offset: int, length: int) -> None:
    """The slow, always-works way to zero a range."""
    while length:
        n = min(length, ZERO_CHUNK)
        pwritev_all(fd, [memoryview(ZEROS)[:n]], offset)
        offset += n
        length -= n


def total_bytes(views: Buffers) -> int:
    return sum(v.nbytes if type(v) is memoryview else memoryview(v).nbytes for v in views)
