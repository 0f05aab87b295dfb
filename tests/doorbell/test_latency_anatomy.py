"""The latency anatomy on a real server: the histograms count what happened, under the right
doorbell-path labels, and ``nvme-emu ctl latency`` shows them over the control socket.

No timing is asserted: only counts, labels and that the table is there (speed lives in
bench/latency_anatomy.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..support.server import child_env
from .db_helpers import LBA, NS_SIZE, PAGE
from nvme_emu.ctl import ControlClient, default_control_socket
from nvme_emu.latency import Stage, Via

N = 24  #: QD1 commands per test


def per_via(snapshot: dict, qid: int) -> dict[str, dict[str, dict]]:
    return {row["via"]: row["stages"] for row in snapshot["queues"] if row["qid"] == qid}


def count(stages: dict, stage: Stage) -> int:
    return stages.get(stage.name.lower(), {}).get("count", 0)


@pytest.mark.parametrize("mode, labels", [("trap", {Via.TRAP}), ("shadow", {Via.EVENTFD, Via.SPIN})])
def test_qd1_commands_are_counted_once_each_under_their_path(inproc, session, mode, labels):
    srv = inproc(mode)
    srv.call(lambda: srv.ctrl.state.latency.set_sampling(1))  # every batch: counts are exact
    s = session(srv.path)
    s.bring_up(mode, depth=32)
    srv.call(srv.ctrl.state.latency.reset)
    irqs = srv.stats()["queues"]["sq1"]["cq_interrupts"]
    s.write_read_check(1, 0, N // 2, qd=1, seed=5)  # N commands, one per doorbell
    vias = per_via(srv.call(srv.ctrl.state.latency.snapshot), 1)
    assert set(vias) <= {v.value for v in labels}, vias.keys()
    for stage in (Stage.DOORBELL, Stage.FETCH, Stage.BACKEND, Stage.CQE, Stage.SERVICE):
        assert sum(count(st, stage) for st in vias.values()) == N, stage
    # IRQ only for batches that raised one (this host polls its CQ: it may set up no vector)
    irqs = srv.stats()["queues"]["sq1"]["cq_interrupts"] - irqs
    assert sum(count(st, Stage.IRQ) for st in vias.values()) == irqs
    # every batch but the first follows an interrupt of the same queue
    assert sum(count(st, Stage.HOST_AND_LOOP) for st in vias.values()) == N - 1
    assert srv.stats()["queues"]["sq1"]["commands"] == N


def test_one_batch_in_n_is_sampled(inproc, session):
    srv = inproc("trap")
    s = session(srv.path)
    s.bring_up("trap", depth=32)
    srv.call(srv.ctrl.state.latency.reset)
    srv.call(lambda: srv.ctrl.state.latency.set_sampling(16))
    s.write_read_check(1, 0, 32, qd=1, seed=6)  # 64 batches of one command
    vias = per_via(srv.call(srv.ctrl.state.latency.snapshot), 1)
    assert count(vias["trap"], Stage.SERVICE) == 4
    # the batch before each sampled one stamps its end: each sample has its host turn
    assert count(vias["trap"], Stage.HOST_AND_LOOP) == 4


def _evicted_file_server(inproc, session, tmp_path, budget_ns: int | None):
    path = tmp_path / "ns.img"
    with open(path, "wb") as f:
        f.write(os.urandom(NS_SIZE))
        f.flush()
        os.fsync(f.fileno())
    srv = inproc("trap", namespace=f"file:{path}")
    if budget_ns is not None:  # as `serve --inline-write-budget-us`: 0 sends every call to the workers
        srv.call(lambda: setattr(srv.ctrl.state.namespaces[1].backend.inline_budget, "budget_ns", budget_ns))
    s = session(srv.path)
    s.bring_up("trap", depth=32)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: evicted
    finally:
        os.close(fd)
    srv.call(srv.ctrl.state.latency.reset)
    return srv, s


def test_at_qd1_page_cache_misses_and_writes_run_inline(inproc, session, tmp_path):
    """Nothing else in flight: the reads that miss and the writes skip the worker hand-off
    (nvme_emu.inline_budget) and are stamped as inline backend calls."""
    srv, s = _evicted_file_server(inproc, session, tmp_path, None)
    srv.call(lambda: srv.ctrl.state.latency.set_sampling(1))
    before = srv.stats()["queues"]["sq1"]["to_workers"]
    s.read_blocks(1, 1024 * (PAGE // LBA), 4)  # 4 MiB in, one command after another: not resident
    s.write_read_check(1, 0, 4, qd=1, seed=7)
    assert srv.stats()["queues"]["sq1"]["to_workers"] == before
    vias = per_via(srv.call(srv.ctrl.state.latency.snapshot), 1)
    assert Via.WORKER.value not in vias
    assert sum(count(st, Stage.BACKEND) for st in vias.values()) >= 4 + 8
    inline = srv.call(lambda: srv.ctrl.state.namespaces[1].backend.inline_budget.stats)
    assert inline.inline >= 4 + 1 and inline.handed_off == 0  # the writes, and a read at least (readahead takes others)


def test_file_reads_that_miss_the_page_cache_show_the_worker_stages(inproc, session, tmp_path):
    srv, s = _evicted_file_server(inproc, session, tmp_path, 0)
    before = srv.stats()["queues"]["sq1"]["to_workers"]
    s.read_blocks(1, 1024 * (PAGE // LBA), 4)  # 4 MiB in: not resident
    s.write_read_check(1, 0, 4, qd=1, seed=7)  # with no inline budget, writes go to the workers
    to_workers = srv.stats()["queues"]["sq1"]["to_workers"] - before
    assert to_workers >= 4 + 1, "the evicted reads were served inline"
    worker = per_via(srv.call(srv.ctrl.state.latency.snapshot), 1)[Via.WORKER.value]
    for stage in (Stage.TO_WORKER, Stage.WORKER, Stage.TO_LOOP, Stage.TO_CQE):
        assert count(worker, stage) == to_workers, stage
    assert 1 <= count(worker, Stage.DRAIN_IRQ) <= to_workers


def test_ctl_latency_over_the_control_socket_of_a_real_server(serve, session):
    srv = serve("shadow", extra=["--latency-sample", "1"])
    s = session(srv.path)
    s.bring_up("shadow", depth=32)
    s.write_read_check(1, 0, 8, qd=1, seed=8)
    with ControlClient(default_control_socket(srv.path)) as ctl:
        snap = ctl.latency()
        assert snap["sample_every"] == 1
        vias = per_via(snap, 1)
        assert set(vias) <= {Via.EVENTFD.value, Via.SPIN.value} and vias
        assert sum(count(st, Stage.SERVICE) for st in vias.values()) == 16
        for st in vias.values():
            for summary in st.values():
                assert summary["p50_ns"] <= summary["p99_ns"] <= summary["max_ns"]
        # the same snapshot is in the stats (--stats-json dumps function.stats())
        assert per_via(srv.stats()["latency"], 1).keys() == vias.keys()
        cmd = [sys.executable, "-m", "nvme_emu", "ctl", "--socket", default_control_socket(srv.path), "latency"]
        table = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=True).stdout
        assert "p50 us" in table and "service" in table and "sq1" in table
        reset = json.loads(subprocess.run(cmd + ["--json", "--reset"], env=child_env(), capture_output=True, text=True, check=True).stdout)
        assert per_via(reset, 1).keys() == vias.keys()
        assert per_via(ctl.latency(), 1) == {}
