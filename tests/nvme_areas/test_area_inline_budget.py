"""Blocking calls on the loop thread (nvme_emu.inline_budget): with nothing in flight, a Write
without FUA, or a Read the page cache missed, to a file namespace completes at once while
such calls stay quick; FUA, calls while others are in flight, and the calls after one that
overran the budget go to the I/O pool; one quick call brings inline calls back."""

from __future__ import annotations

import dataclasses

import pytest

from .area_helpers import BUF, Area, KeptPool, sqe

from nvme_emu.backends.file import FileBackend
from nvme_emu.inline_budget import MAX_SKIP, InlineBudget
from nvme_emu.namespace import Namespace
from nvme_emu import nvm as nvm_module
from nvme_emu.nvm import NvmCommands
from nvme_emu.outcome import DEFERRED
from nvme_emu.spec.commands import NvmOpcode, RwCdw12, Status


def write(slba: int, *, nsid: int = 2, cdw12: int = 0) -> tuple:
    return sqe(NvmOpcode.WRITE, cid=7, nsid=nsid, prp1=BUF, cdw10=slba, cdw12=cdw12)


#: The clock nvm.py times inline calls with, in this test: it moves only when a SlowFile
#: write says so, so "slow" and "quick" do not depend on how busy the machine is.
CLOCK = [0]


class SlowFile(FileBackend):
    """A file whose writes take ``delay`` seconds more (a journal commit, dirty throttling),
    on the test's clock."""

    delay = 0.0

    def write_from(self, offset, views, *, fua=False) -> None:
        CLOCK[0] += int(self.delay * 1e9)
        super().write_from(offset, views, fua=fua)


@pytest.fixture
def file_area(area: Area, tmp_path, monkeypatch):
    monkeypatch.setattr(nvm_module, "clock_ns", lambda: CLOCK[0])
    backend = SlowFile(str(tmp_path / "disk"), 1 << 20)
    backend.inline_budget.budget_ns = 2_000_000  # 2 ms: a 20 ms write overruns it
    ns = area.state.namespaces[2] = Namespace(2, backend)
    pool = KeptPool()
    nvm = NvmCommands(area.state, dataclasses.replace(area.hooks, io_pool=lambda: pool))
    yield area, nvm, pool, backend, tmp_path / "disk"
    ns.close()


def test_a_write_without_fua_completes_inline_and_lands_in_the_file(file_area):
    area, nvm, pool, backend, path = file_area
    area.guest.write(BUF, b"\xa5" * 512)
    assert nvm.execute(area.admin_sq, write(3)) == (Status.SUCCESS, 0)
    assert pool.jobs == [] and area.record.named("begin_request") == []
    assert path.read_bytes()[3 * 512 : 4 * 512] == b"\xa5" * 512
    assert area.state.namespaces[2].stats.write_commands == 1
    assert dataclasses.asdict(backend.inline_budget.stats) == {"inline": 1, "overruns": 0, "handed_off": 0}


def test_fua_still_goes_to_the_pool(file_area):
    area, nvm, pool, backend, path = file_area
    area.guest.write(BUF, b"\x11" * 512)
    assert nvm.execute(area.admin_sq, write(0, cdw12=RwCdw12.FUA)) is DEFERRED
    assert len(pool.jobs) == 1 and backend.inline_budget.stats.inline == 0
    pool.finish_one()
    assert path.read_bytes()[:512] == b"\x11" * 512


def test_an_overrun_sends_the_next_writes_to_the_pool_and_a_quick_one_ends_that(file_area):
    area, nvm, pool, backend, path = file_area
    backend.delay = 0.02
    area.guest.write(BUF, b"\x01" * 512)
    assert nvm.execute(area.admin_sq, write(0)) == (Status.SUCCESS, 0)  # inline, and too slow
    assert nvm.execute(area.admin_sq, write(1)) is DEFERRED  # the back-off: 1 write
    backend.delay = 0.0
    pool.finish_one()
    assert nvm.execute(area.admin_sq, write(2)) == (Status.SUCCESS, 0)  # inline again, quick
    assert nvm.execute(area.admin_sq, write(3)) == (Status.SUCCESS, 0)
    assert path.read_bytes()[:4 * 512] == b"\x01" * 2048
    assert dataclasses.asdict(backend.inline_budget.stats) == {"inline": 3, "overruns": 1, "handed_off": 1}


def test_back_off_doubles_while_inline_writes_keep_overrunning():
    budget = InlineBudget(budget_ns=1000)
    runs = []
    for _ in range(14):
        assert budget.admit()
        budget.took(5000)  # over
        n = 0
        while not budget.admit():
            n += 1
        runs.append(n)
        budget.took(5000)  # the call admitted after the run overran too
        while not budget.admit():
            pass
    assert runs[:4] == [1, 4, 16, 64] and max(runs) == MAX_SKIP
    budget.took(10)  # within: the back-off starts over
    assert budget.admit() and budget.backoff == 0


def test_a_zero_budget_never_runs_inline(file_area):
    area, nvm, pool, backend, path = file_area
    backend.inline_budget.budget_ns = 0
    area.guest.write(BUF, b"\x22" * 512)
    assert nvm.execute(area.admin_sq, write(0)) is DEFERRED
    pool.finish_one()
    assert path.read_bytes()[:512] == b"\x22" * 512


def test_a_call_with_work_in_flight_or_behind_it_goes_to_the_pool(file_area):
    """Inline only when nothing would wait for it: a command in the pool, or another command
    already in its SQ behind it (a burst), sends it to the pool too."""
    area, nvm, pool, backend, path = file_area
    area.guest.write(BUF, b"\x33" * 512)
    assert nvm.execute(area.admin_sq, write(0, cdw12=RwCdw12.FUA)) is DEFERRED
    assert nvm.execute(area.admin_sq, write(1)) is DEFERRED  # the FUA write is in flight
    pool.finish_one()
    pool.finish_one()
    sq = area.admin_sq
    sq.tail = (sq.head + 1) % sq.size  # one more command waits behind this one
    try:
        assert nvm.execute(sq, write(2)) is DEFERRED
    finally:
        sq.tail = sq.head
    pool.finish_one()
    assert nvm.execute(sq, write(3)) == (Status.SUCCESS, 0)
    assert path.read_bytes()[: 4 * 512] == b"\x33" * 2048
    assert backend.inline_budget.stats.inline == 1


def test_a_read_the_page_cache_missed_runs_inline_when_idle(file_area):
    area, nvm, pool, backend, path = file_area
    with open(path, "r+b") as f:
        f.write(b"\x77" * 4096)
    backend.read_page_nowait = lambda offset, view: False  # as if the page cache missed
    backend.read_into_nowait = lambda offset, views: False
    read = sqe(NvmOpcode.READ, cid=9, nsid=2, prp1=BUF, cdw10=0, cdw12=7)
    assert nvm.execute(area.admin_sq, read) == (Status.SUCCESS, 0)
    assert area.guest.read(BUF, 4096) == b"\x77" * 4096 and pool.jobs == []
    assert area.state.namespaces[2].stats.read_commands == 1
    assert backend.inline_budget.stats.inline == 1
