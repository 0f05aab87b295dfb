"""Zone faults through the real control socket: ``zone_fault`` (``nvme-emu ctl zone``) makes a
zone of a zoned namespace Read Only or Offline on the device's loop thread, the zone set
tells its descriptor-changed hook (the Zone Descriptor Changed notice) and its sidecar, and
bad requests (no such namespace, not zoned, no such zone, Offline to Read Only) are errors.

The server runs in this process (:class:`~tests.support.inproc.InProcessServer`) with the
control plane ``serve`` starts, so the test can give a namespace its zone set and sidecar
directly, as a zoned namespace spec will.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from ..support.inproc import InProcessServer
from nvme_emu import ctl
from nvme_emu.cli import start_control
from nvme_emu.controller import ControllerConfig
from nvme_emu.ctl import ControlClient
from nvme_emu.function import NvmeFunction
from nvme_emu.jsonrpc import INVALID_PARAMS, RpcError
from nvme_emu.namespace_spec import open_namespace
from nvme_emu.spec.zns import ZoneState
from nvme_emu.zoned.sidecar import ZoneSidecar
from nvme_emu.zoned.zone_set import ZoneSet

ZONE_LBAS = 256  # 8 zones of 128 KiB in a 1 MiB namespace of 512-byte LBAs
ZONES = 8


class Zoned:
    """The in-process server, namespace 1 zoned (with a sidecar), namespace 2 not."""

    def __init__(self, tmp_path) -> None:
        self.notices: list[threading.Thread] = []
        self.zones = ZoneSet(ZONES * ZONE_LBAS, ZONE_LBAS, on_descriptor_changed=lambda: self.notices.append(threading.current_thread()))
        self.sidecar_path = str(tmp_path / "zones")
        self.sidecar = ZoneSidecar.open(self.sidecar_path, self.zones)
        config = ControllerConfig(serial="NVMEEMU00000025", model="nvme-emu")
        zoned, plain = (open_namespace("ram:size=1M", nsid, controller_seed=config.serial) for nsid in (1, 2))
        zoned.zones = self.zones  # Namespace.zones, as a zoned namespace spec sets it
        plain.zones = None
        self.srv = InProcessServer(NvmeFunction([zoned, plain], config, doorbell="trap"), str(tmp_path / "z.sock"))
        self.ctl_path = str(tmp_path / "z.sock.ctl")
        self.rpc = asyncio.run_coroutine_threadsafe(start_control(self.srv.device, self.ctl_path, 0o600), self.srv.loop).result(30)

    def close(self) -> None:
        try:
            if self.rpc is not None:
                self.srv.call(self.rpc.close)
            self.srv.call(self.sidecar.close)
        finally:
            self.srv.close()


@pytest.fixture
def zoned(tmp_path):
    z = Zoned(tmp_path)
    yield z
    error = z.srv.error
    z.close()
    assert error is None, f"server loop callback raised: {error!r}"


@pytest.fixture
def client(zoned):
    with ControlClient(zoned.ctl_path) as c:
        yield c


def test_read_only_then_offline_on_the_loop_thread(zoned, client):
    zoned.srv.call(lambda: zoned.zones.write(2 * ZONE_LBAS, 5))
    result = client.zone_fault(nsid=1, zone=2, state="read_only")
    assert result == {"nsid": 1, "zone": 2, "zslba": 2 * ZONE_LBAS, "state": "READ_ONLY", "wp": 2 * ZONE_LBAS + 5, "changed": True}
    assert zoned.notices == [zoned.srv.thread]  # the notice hook, on the device's loop thread
    assert zoned.zones.open_count == zoned.zones.active_count == 0  # its resources freed
    assert client.zone_fault(nsid=1, zone=2, state="read_only")["changed"] is False
    assert len(zoned.notices) == 1  # nothing changed, nothing told
    assert client.zone_fault(nsid=1, zone=2, state="offline")["state"] == "OFFLINE"
    assert len(zoned.notices) == 1  # zone 2 is listed already: the host has not read the log
    assert client.zone_fault(nsid=1, zone=ZONES - 1, state="offline")["changed"] is True
    assert len(zoned.notices) == 2
    assert zoned.srv.call(zoned.zones.changed.peek)[1] == [2 * ZONE_LBAS, (ZONES - 1) * ZONE_LBAS]  # the log BFh
    with pytest.raises(RpcError, match="zone 2 is offline") as err:
        client.zone_fault(nsid=1, zone=2, state="read_only")  # no transition leaves Offline
    assert err.value.code == INVALID_PARAMS
    assert [z.state for z in zoned.zones.zones] == [ZoneState.EMPTY] * 2 + [ZoneState.OFFLINE] + [ZoneState.EMPTY] * 4 + [ZoneState.OFFLINE]


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(nsid=2, zone=0, state="offline"), "namespace 2 is not zoned"),
        (dict(nsid=9, zone=0, state="offline"), "no namespace 9"),
        (dict(nsid=1, zone=ZONES, state="read_only"), f"zone {ZONES}: namespace 1 has zones 0..{ZONES - 1}"),
        (dict(nsid=1, zone=-1, state="read_only"), "zone must be in 0.."),
        (dict(nsid=1, zone=True, state="read_only"), "zone must be an integer"),
        (dict(nsid=1, zone=0, state="full"), "state must be one of read_only, offline"),
        (dict(nsid=1, zone=0), "state is required"),
        (dict(nsid=1, state="offline"), "zone is required"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(zoned, client, params, message):
    with pytest.raises(RpcError, match=message) as err:
        client.zone_fault(**params)
    assert err.value.code == INVALID_PARAMS
    assert all(z.state == ZoneState.EMPTY for z in zoned.zones.zones)
    assert zoned.notices == []


def test_the_fault_survives_a_restart_in_the_sidecar(zoned, client):
    zoned.srv.call(lambda: zoned.zones.write(ZONE_LBAS, 7))
    client.zone_fault(nsid=1, zone=1, state="read_only")
    client.zone_fault(nsid=1, zone=4, state="offline")
    zoned.srv.call(zoned.sidecar.close)
    again = ZoneSet(ZONES * ZONE_LBAS, ZONE_LBAS)
    with ZoneSidecar.open(zoned.sidecar_path, again):
        assert again.zones[1].state == ZoneState.READ_ONLY and again.zones[1].wp == ZONE_LBAS + 7
        assert again.zones[4].state == ZoneState.OFFLINE


def test_the_command_line(zoned, capsys):
    assert ctl.main(["--socket", zoned.ctl_path, "zone", "--nsid", "1", "--zone", "3", "--read-only"], "unused") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "READ_ONLY"
    assert ctl.main(["--socket", zoned.ctl_path, "zone", "--nsid", "1", "--zone", "3", "--offline"], "unused") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "OFFLINE"
    assert ctl.main(["--socket", zoned.ctl_path, "zone", "--nsid", "2", "--zone", "0", "--offline"], "unused") == 1
    assert "namespace 2 is not zoned" in capsys.readouterr().err
    for incomplete in (["--nsid", "1", "--zone", "0"], ["--nsid", "1", "--zone", "0", "--read-only", "--offline"], ["--zone", "0", "--offline"]):
        with pytest.raises(SystemExit) as exit_:
            ctl.main(["--socket", zoned.ctl_path, "zone", *incomplete], "unused")
        assert exit_.value.code == 2
