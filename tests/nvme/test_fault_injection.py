"""The fault table without a server: parameters, matching, distributions, and that the
NVM dispatch is untouched while no fault is configured."""

from __future__ import annotations

import random

import pytest

from nvme_emu.backends.ram import RamBackend
from nvme_emu.controller import Controller
from nvme_emu.faults import Fault, FaultKind, parse_fault
from nvme_emu.namespace import Namespace
from nvme_emu.nvm import NvmCommands
from nvme_emu.spec.commands import NvmOpcode


def test_parse_defaults_and_refusals():
    f = parse_fault(1, {"kind": "media", "nsid": 2, "slba": 10, "nlb": 4})  # the control plane's strings
    assert (f.kind, f.op, f.remaining) == (FaultKind.MEDIA, "rw", None) and f.kind is FaultKind.MEDIA
    assert parse_fault(2, {"kind": "delay", "delay_ms": 40}).us == 40_000
    assert parse_fault(3, {"kind": "delay", "delay_ms": 1}).remaining == 1
    for bad in ({"kind": "x"}, {"kind": "media", "op": "trim"}, {"kind": "latency", "dist": "zipf"},
                {"kind": "media", "slba": -1}, {"kind": "drop", "remaining": 0}, {"kind": "drop", "when": 1}):
        with pytest.raises(ValueError):
            parse_fault(9, bad)


def test_matching_ranges_ops_and_counts():
    f = Fault(1, FaultKind.MEDIA, nsid=1, slba=100, nlb=8, op="read", remaining=2)
    assert f.matches(NvmOpcode.READ, 1, 96, 8) and f.first_lba(96) == 100
    assert f.matches(NvmOpcode.VERIFY, 1, 107, 1)
    assert not f.matches(NvmOpcode.READ, 1, 108, 8)  # just past
    assert not f.matches(NvmOpcode.READ, 1, 92, 8)  # just before
    assert not f.matches(NvmOpcode.WRITE, 1, 100, 1)
    assert not f.matches(NvmOpcode.READ, 2, 100, 1)
    f.hit()
    f.hit()
    assert not f.matches(NvmOpcode.READ, 1, 100, 1)  # used up
    whole = Fault(2, FaultKind.DROP)
    assert whole.matches(NvmOpcode.WRITE, 5, 1 << 40, 1)


def test_distributions_stay_in_bounds():
    rng = random.Random(1)
    uniform = parse_fault(1, {"kind": "latency", "dist": "uniform", "min_us": 100, "max_us": 200})
    assert all(100e-6 <= uniform.delay_seconds(rng) <= 200e-6 for _ in range(200))
    normal = parse_fault(2, {"kind": "latency", "dist": "normal", "us": 10, "stddev_us": 100})
    assert min(normal.delay_seconds(rng) for _ in range(200)) == 0.0  # clipped, never negative
    expo = parse_fault(3, {"kind": "latency", "dist": "exponential", "us": 50})
    samples = [expo.delay_seconds(rng) for _ in range(2000)]
    assert 35e-6 < sum(samples) / len(samples) < 65e-6
    assert parse_fault(4, {"kind": "latency", "us": 7}).delay_seconds(rng) == 7e-6


def test_dispatch_untouched_without_faults():
    ctrl = Controller([Namespace(1, RamBackend(1 << 20))])
    try:
        hooks = ctrl.nvm.hooks
        assert ctrl.io is ctrl.nvm and not ctrl.faults.active
        first = ctrl.faults.add({"kind": FaultKind.DROP})
        second = ctrl.faults.add({"kind": FaultKind.MEDIA, "nsid": 1})
        assert ctrl.io is ctrl.faults and ctrl.nvm.hooks is ctrl.faults.hooks is not hooks
        ctrl.faults.remove(first.id)
        assert ctrl.io is ctrl.faults  # one is left
        ctrl.faults.remove(second.id)
        assert ctrl.io is ctrl.nvm and ctrl.nvm.hooks is hooks
        assert ctrl.nvm.execute.__func__ is NvmCommands.execute  # never patched
        with pytest.raises(ValueError):
            ctrl.faults.remove(second.id)
        ctrl.faults.add({"kind": FaultKind.DROP})
        assert ctrl.faults.remove() == 1 and ctrl.io is ctrl.nvm  # cleared all at once
    finally:
        ctrl.close()
