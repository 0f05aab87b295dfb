"""A namespace with metadata, as small as nvme_emu.metadata_io needs (its MetadataNamespace):
data and metadata in two bytearrays, every call recorded, and, when ``blocking``, each call
handed back as a Work the way a file or block namespace hands it back."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from nvme_emu import prp
from nvme_emu.inline_budget import InlineBudget
from nvme_emu.lba_ranges import LbaRanges
from nvme_emu.outcome import Work
from nvme_emu.pi.engine import PiEngine
from nvme_emu.pi.format import PiFormat
from nvme_emu.pi.guards import native_guards
from nvme_emu.spec.commands import NvmeError, Status
from nvme_emu.spec.identify import DLFEAT_READ_ZEROES, Csi


class FakeNamespace:
    def __init__(self, *, lbads: int = 512, ms: int = 8, pi: PiFormat | None = None, extended: bool = False,
                 nlbas: int = 64, blocking: bool = False, dlfeat: int = DLFEAT_READ_ZEROES) -> None:
        self.lba_size = lbads
        self.ms = ms
        self.extended = extended
        self.pi = pi
        self.pi_engine = None if pi is None else PiEngine(pi, native_guards(pi.guard))
        self.blocking = blocking
        #: what a file namespace's Read and Write Work carry: they may run inline at QD1
        self.inline_budget = InlineBudget()
        self.dlfeat = dlfeat
        self.nlbas = nlbas
        self.data = bytearray(nlbas * lbads)
        self.meta = bytearray(nlbas * ms)
        self.calls: list[tuple] = []
        # what the NVM dispatch looks at, so NvmCommands can serve it as namespace 1
        self.nsid, self.csi, self.write_protected, self.formatting = 1, Csi.NVM, False, False
        self.plain_rw = False  # metadata: never the one-page fast path
        self.lba_shift = lbads.bit_length() - 1
        self.uncorrectable = LbaRanges()
        self.counted: list[str] = []  # the done() parts that ran (counters, on the loop thread)
        self.zero_meta(0, nlbas)  # never written: reads as deallocated
        self.calls.clear()

    # -- helpers -------------------------------------------------------------------------------

    def check_range(self, slba: int, nlb: int) -> None:
        if slba < 0 or slba + nlb > self.nlbas:
            raise NvmeError(Status.LBA_OUT_OF_RANGE, f"{slba}+{nlb}")

    def _now_or_work(self, name: str, run: Callable[[], Any], views: Sequence[memoryview] = ()) -> Work | None:
        if self.blocking:
            inline = self.inline_budget if name in ("read", "write") else None
            return Work(run, views, lambda _r: self.counted.append(name), inline)
        run()
        self.counted.append(name)
        return None

    def block_meta(self, lba: int) -> bytes:
        return bytes(self.meta[lba * self.ms : (lba + 1) * self.ms])

    def block_data(self, lba: int) -> bytes:
        return bytes(self.data[lba * self.lba_size : (lba + 1) * self.lba_size])

    # -- the door ------------------------------------------------------------------------------

    def read(self, slba: int, nlb: int, views: Sequence[memoryview]) -> Work | None:
        self.check_range(slba, nlb)
        self.calls.append(("read", slba, nlb))
        n = self.lba_size
        return self._now_or_work("read", lambda: prp.scatter(views, self.data[slba * n : (slba + nlb) * n]), views)

    def write(self, slba: int, nlb: int, views: Sequence[memoryview], *, fua: bool = False) -> Work | None:
        self.check_range(slba, nlb)
        self.calls.append(("write", slba, nlb, fua))
        n = self.lba_size

        def run() -> None:
            self.data[slba * n : (slba + nlb) * n] = prp.gather(views)

        return self._now_or_work("write", run, views)

    def write_zeroes(self, slba: int, nlb: int, *, deallocate: bool = False, fua: bool = False) -> Work | None:
        self.check_range(slba, nlb)
        self.calls.append(("write_zeroes", slba, nlb, deallocate, fua))
        n = self.lba_size

        def run() -> None:
            self.data[slba * n : (slba + nlb) * n] = bytes(nlb * n)

        return self._now_or_work("write_zeroes", run)

    def verify(self, slba: int, nlb: int) -> Work | None:
        self.check_range(slba, nlb)
        self.calls.append(("verify", slba, nlb))
        return self._now_or_work("verify", lambda: None)

    def read_meta(self, slba: int, nlb: int) -> memoryview:
        self.check_range(slba, nlb)
        self.calls.append(("read_meta", slba, nlb))
        return memoryview(bytes(self.meta[slba * self.ms : (slba + nlb) * self.ms]))

    def write_meta(self, slba: int, data: bytes | bytearray | memoryview) -> None:
        nlb = len(data) // self.ms
        self.check_range(slba, nlb)
        self.calls.append(("write_meta", slba, nlb))
        self.meta[slba * self.ms : (slba + nlb) * self.ms] = data

    def zero_meta(self, slba: int, nlb: int) -> None:
        """Zeroed metadata reads as a deallocated block's (DLFEAT): the PI escape with PI."""
        self.check_range(slba, nlb)
        self.calls.append(("zero_meta", slba, nlb))
        meta = bytearray(nlb * self.ms)
        if self.pi_engine is not None:
            self.pi_engine.fill_deallocated(self.dlfeat, bytearray(nlb * self.lba_size), meta)
        self.meta[slba * self.ms : (slba + nlb) * self.ms] = meta
