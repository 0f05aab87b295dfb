"""The latency anatomy's histograms (nvme_emu.latency): buckets, percentiles, sampling."""

from __future__ import annotations

import random

import pytest

from nvme_emu.latency import Histogram, LatencyRecorder, Stage, Via, format_table


def exact_percentile(values: list[int], p: float) -> int:
    """The ceil(n*p/100)-th smallest value: what the histogram approximates."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def test_every_value_lands_in_the_bucket_that_holds_it():
    h = Histogram()
    for ns in [0, 1, 7, 8, 9, 15, 16, 1000, 4095, 4096, 123_456_789, (1 << 63) + 5]:
        h.counts = [0] * len(h.counts)
        h.add(ns)
        (i,) = [i for i, c in enumerate(h.counts) if c]
        low, high = Histogram.bounds(i)
        assert low <= ns < high, (ns, i, low, high)
        assert high - low <= max(1, low // 4), "a bucket is wider than a quarter of its low end"


@pytest.mark.parametrize("dist", ["lognormal", "bimodal", "uniform"])
def test_percentiles_from_buckets_are_within_the_stated_resolution(dist):
    rng = random.Random(23)
    if dist == "lognormal":
        values = [int(rng.lognormvariate(9, 1.2)) for _ in range(20_000)]
    elif dist == "bimodal":  # inline hits at ~6 us, worker hand-offs at ~40 us
        values = [int(rng.gauss(6_000, 300)) if rng.random() < 0.9 else int(rng.gauss(40_000, 4_000)) for _ in range(20_000)]
    else:
        values = [rng.randrange(100, 1_000_000) for _ in range(20_000)]
    h = Histogram()
    for v in values:
        h.add(v)
    assert h.n == len(values) and h.max == max(values)
    for p in (1, 50, 90, 99, 99.9):
        exact = exact_percentile(values, p)
        got = h.percentile(p)
        assert abs(got - exact) <= exact / 8 + 1, (p, got, exact)  # 12.5 %: half a bucket
    assert h.percentile(100) <= h.max


def test_percentiles_of_small_values_are_exact_and_empty_is_zero():
    h = Histogram()
    assert h.percentile(50) == 0.0 and h.summary()["count"] == 0
    for v in [1, 2, 2, 3, 7]:
        h.add(v)
    assert [h.percentile(p) for p in (20, 60, 80, 100)] == [1.0, 2.0, 3.0, 7.0]


def test_one_batch_in_every_is_sampled_and_its_arrival_is_stamped_only_then():
    rec = LatencyRecorder(every=4)
    sampled = []
    for batch in range(12):
        rec.arrive(Via.TRAP)  # a doorbell before each batch
        stamped = rec.arrived != 0
        rec.left -= 1
        s = rec.begin(1) if rec.left <= 0 else None
        if s is not None:
            assert stamped and s[2] is Via.TRAP
            rec.end(1, s, s[1] + 100, s[1] + 1100, 1, True)
            rec.left = rec.every
            sampled.append(batch)
        else:
            assert not stamped
    assert sampled == [3, 7, 11]
    h = rec.hists[(1, Via.TRAP)]
    assert h[Stage.DOORBELL].n == h[Stage.SERVICE].n == h[Stage.IRQ].n == 3
    assert h[Stage.DOORBELL].max == 100 and h[Stage.SERVICE].max == 1000
    snap = rec.snapshot()
    assert snap["sample_every"] == 4
    assert [(r["qid"], r["via"]) for r in snap["queues"]] == [(1, "trap")]
    assert "service" in format_table(snap)
    rec.reset()
    assert rec.snapshot()["queues"] == []


def test_deferred_stamps_record_the_hand_off_stages():
    rec = LatencyRecorder()
    rec.deferred_done(3, [1_000, 3_000, 13_000, 20_000], 21_000)
    rec.deferred_done(3, [1_000], 2_000)  # never ran on a worker: nothing recorded
    h = rec.hists[(3, Via.WORKER)]
    assert [h[s].max for s in (Stage.TO_WORKER, Stage.WORKER, Stage.TO_LOOP, Stage.TO_CQE)] == [2_000, 10_000, 7_000, 1_000]
    assert all(h[s].n == 1 for s in (Stage.TO_WORKER, Stage.WORKER, Stage.TO_LOOP, Stage.TO_CQE))
