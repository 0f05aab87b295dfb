"""Read and write through a namespace's door without a loop (the Work finished here), in
``pages`` views as a PRP list would give them: what the backends' tests share."""

from __future__ import annotations

from nvme_emu.namespace import Namespace
from nvme_emu.outcome import finish_here


def _split(buf: memoryview, pages: int) -> list[memoryview]:
    step = len(buf) // pages
    return [buf[i * step : (i + 1) * step if i < pages - 1 else len(buf)] for i in range(pages)]


def read(ns: Namespace, slba: int, nlb: int, *, pages: int = 1) -> bytes:
    """``nlb`` blocks from ``slba``, read into ``pages`` views."""
    buf = memoryview(bytearray(nlb * ns.lba_size))
    finish_here(ns.read(slba, nlb, _split(buf, pages)))
    return bytes(buf)


def write(ns: Namespace, slba: int, data: bytes, *, fua: bool = False, pages: int = 1) -> None:
    """``data`` at ``slba``, from ``pages`` views."""
    finish_here(ns.write(slba, len(data) // ns.lba_size, _split(memoryview(data), pages), fua=fua))
