"""Every control-plane method refuses wrong parameters with Invalid params and changes nothing.

An outside fuzz run (issue 22, findings 9 and 10): ``fault_add`` took a latency of NaN,
Infinity or 1e300 us; the next I/O raised in the timer and the controller went fatal, and
even after ``fault_clear`` and a reset a legitimate 100 us latency fault's completion was
never posted (the timer heap stayed poisoned). ``ns_add`` with a non-string ``spec`` failed
with an internal error. Here one real server process (``nvme-emu serve``; the control plane
does not depend on the vfio-user backend, so the Python one) gets a table of wrong-typed and
out-of-range parameters for every method: each must get -32602 and leave controllers,
namespaces and faults exactly as they were. Then the finding's exact sequence must work.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import pytest

from ..support.host import Host
from ..support.server import ServerProcess
from .ctrl_helpers import RAM_SIZE
from nvme_emu.control import METHODS
from nvme_emu.ctl import default_control_socket
from nvme_emu.jsonrpc import INVALID_PARAMS, RpcError
from nvme_emu.rpc_socket import RpcClient
from nvme_emu.spec.registers import Csts, Reg

NAN, INF = math.nan, math.inf

#: (method, params) that must be refused: wrong JSON types (bool is not an integer), values
#: that are not finite, out of range, unknown or missing names.
BAD: list[tuple[str, dict[str, Any]]] = [
    *[(name, {"verbose": 1}) for name in ("controllers", "namespaces", "queues", "stats", "latency", "latency_reset", "fault_list")],
    ("ns_add", {}),
    *[("ns_add", {"spec": bad}) for bad in (None, True, False, [], ["ram:size=1M"], {}, 5, 1.5)],
    *[("ns_add", {"spec": "ram:size=1M", "nsid": bad}) for bad in (True, "4", 4.0, [], -1, 0, 0xFFFF_FFFF, 2**32, NAN)],
    ("ns_add", {"spec": "ram:size=1M", "colour": "red"}),
    *[(name, {"nsid": bad}) for name in ("ns_remove", "ns_attach", "ns_detach")
      for bad in (True, "1", 1.0, None, [1], {}, -1, 2**64, INF)],
    *[(name, {}) for name in ("ns_remove", "ns_attach", "ns_detach")],
    ("fault_add", {}),
    *[("fault_add", {"kind": bad}) for bad in (None, 5, True, ["drop"], "meteor")],
    *[("fault_add", {"kind": "latency", "us": bad}) for bad in (NAN, INF, -INF, 1e300, -1, -1e-9, True, "5", None, [5])],
    *[("fault_add", {"kind": "latency", "dist": "uniform", "min_us": 0, "max_us": bad}) for bad in (NAN, INF, 1e300, False)],
    *[("fault_add", {"kind": "latency", "dist": "uniform", "min_us": bad, "max_us": 10}) for bad in (NAN, -INF, "1")],
    *[("fault_add", {"kind": "latency", "dist": "normal", "us": 10, "stddev_us": bad}) for bad in (NAN, INF, 1e300, -1)],
    *[("fault_add", {"kind": "delay", "delay_ms": bad}) for bad in (NAN, INF, 1e300, -5, True, "45000")],
    *[("fault_add", {"kind": "media", key: bad}) for key in ("nsid", "slba", "nlb")
      for bad in (True, "1", 1.5, -1, 2**64, NAN, None)],
    *[("fault_add", {"kind": "drop", "remaining": bad}) for bad in (True, 0, -1, 1.5, "1", NAN, 2**64)],
    *[("fault_add", {"kind": "drop", key: bad}) for key in ("op", "dist") for bad in (1, None, True, "sideways")],
    *[("fault_clear", {"id": bad}) for bad in (True, "1", 1.0, [], 0, -1, 2**64, NAN)],
    *[("fatal", {"reason": bad}) for bad in (5, True, None, [], {"why": "x"})],
    ("zone_fault", {}),
    ("zone_fault", {"nsid": 1, "zone": 0}),
    *[("zone_fault", {"nsid": bad, "zone": 0, "state": "offline"}) for bad in (True, "1", 1.0, None, 0, 2**32, NAN)],
    *[("zone_fault", {"nsid": 1, "zone": bad, "state": "offline"}) for bad in (True, "0", 0.0, None, -1, 2**64, INF)],
    *[("zone_fault", {"nsid": 1, "zone": 0, "state": bad}) for bad in (None, 1, True, "full", "READ_ONLY", ["offline"])],
    ("zone_fault", {"nsid": 1, "zone": 0, "state": "offline", "count": 2}),
    ("zone_fault", {"nsid": 1, "zone": 0, "state": "offline"}),  # not a zoned namespace
    ("zone_fault", {"nsid": 9, "zone": 0, "state": "read_only"}),  # no such namespace
    *[("pi_corrupt", {"nsid": 1, "slba": bad, "nlb": 1, "field": "guard"}) for bad in (True, "0", None, -1, 2**64, INF)],
    *[("pi_corrupt", {"nsid": 1, "slba": 0, "nlb": bad, "field": "guard"}) for bad in (0, True, None, -1)],
    *[("pi_corrupt", {"nsid": 1, "slba": 0, "nlb": 1, "field": bad}) for bad in (None, 1, "GUARD", "crc", ["guard"])],
    ("pi_corrupt", {"nsid": 1, "slba": 0, "nlb": 1}),
    ("pi_corrupt", {"nsid": 1, "slba": 0, "nlb": 1, "field": "guard"}),  # no protection information
    ("pi_corrupt", {"nsid": 9, "slba": 0, "nlb": 1, "field": "guard"}),  # no such namespace
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("control-params")
    srv = ServerProcess.serve(str(d / "s.sock"), d / "server.log", ["ram:size=16M", "ram:size=8M"], backend="python",
                              extra=["--queues", "4"])
    srv.settle()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def rpc(server):
    with RpcClient(default_control_socket(server.path)) as client:
        yield client


def _state(rpc: RpcClient) -> dict[str, Any]:
    return {"controllers": rpc.call("controllers"), "namespaces": rpc.call("namespaces"), "faults": rpc.call("fault_list")}


def test_every_method_is_in_the_table():
    assert {name for name, _ in BAD} == set(METHODS)


@pytest.mark.parametrize("method, params", BAD, ids=[f"{m}-{p!r}" for m, p in BAD])
def test_wrong_params_are_invalid_params_and_change_nothing(rpc, server, method, params):
    before = _state(rpc)
    with pytest.raises(RpcError) as err:
        rpc.call(method, **params)
    assert err.value.code == INVALID_PARAMS, err.value.message
    assert _state(rpc) == before
    assert server.alive()


def test_the_findings_sequence_now_works(rpc, server):
    """A NaN latency fault is refused; I/O goes on; after fault_clear and a reset, a 100 us
    latency fault holds a write's completion and the completion is posted."""
    n = Host(server.path, ram_size=RAM_SIZE)
    try:
        n.set_queues(4)
        n.create_pair(1, 64)
        for bad in (NAN, INF, 1e300):
            with pytest.raises(RpcError) as err:
                rpc.call("fault_add", kind="latency", us=bad)
            assert err.value.code == INVALID_PARAMS
        n.write_ok(1, 1, 0, os.urandom(512))
        assert not n.reg32(Reg.CSTS) & Csts.CFS
        assert rpc.call("fault_clear") == 0
        n.host.disable()
        n.enable()
        n.set_queues(4)
        n.create_pair(1, 64)
        fault = rpc.call("fault_add", kind="latency", us=100, remaining=1)
        started = time.monotonic()
        n.write_ok(1, 1, 8, os.urandom(512))
        assert time.monotonic() - started >= 100e-6
        assert rpc.call("fault_list")["counters"]["delayed"] == 1
        assert rpc.call("fault_list")["faults"][0]["id"] == fault["id"]
        assert not n.reg32(Reg.CSTS) & Csts.CFS
        assert not rpc.call("controllers")[0]["fatal"]
    finally:
        n.close()
        rpc.call("fault_clear")
