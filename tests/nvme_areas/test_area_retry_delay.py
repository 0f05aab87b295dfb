"""Command Retry Delay in-process: Identify Controller CRDT1, the Host Behavior Support
feature's ACRE bit, and the CQE's CRD field on a command whose storage is unreachable
(Namespace Not Ready, the NBD backend's NotReadyError): set only where the host enabled
Advanced Command Retry, never on a failure a retry cannot cure."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from .area_helpers import BUF, Area, KeptPool, sqe

from nvme_emu import structures as st
from nvme_emu.backends.file import FileBackend
from nvme_emu.backends.iov import Buffers
from nvme_emu.backends.nbd import NotReadyError
from nvme_emu.features import reset, set_features
from nvme_emu.identify import identify_controller
from nvme_emu.namespace import Namespace
from nvme_emu.nvm import NvmCommands
from nvme_emu.outcome import DEFERRED
from nvme_emu.spec.commands import STATUS_CRD_SHIFT, STATUS_DNR, AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.features import HOST_BEHAVIOR_SIZE, FeatureId
from nvme_emu.state import ControllerConfig

#: The Status Field of Namespace Not Ready with DNR clear, without and with CRD = 1.
NOT_READY = int(Status.NAMESPACE_NOT_READY)
NOT_READY_CRD1 = NOT_READY | 1 << STATUS_CRD_SHIFT


class GoneBackend(FileBackend):
    """A file whose every data call fails as an NBD namespace's does while its server is
    down (the backend's own exception, so the test follows what nbd.py raises)."""

    def read_into_nowait(self, offset: int, views: Buffers) -> bool:
        return False

    def read_page_nowait(self, offset: int, view: memoryview) -> bool:
        return False  # the page cache of the file under it must not answer

    def read_into(self, offset: int, views: Buffers) -> None:
        raise NotReadyError(f"read {offset}: the server is gone")

    def write_from(self, offset: int, views: Buffers, *, fua: bool = False) -> None:
        raise NotReadyError(f"write {offset}: the server is gone")

    def flush(self) -> None:
        raise NotReadyError("flush: the server is gone")


@pytest.fixture
def gone(area: Area, tmp_path: Path) -> Area:
    """The area with namespace 2 on a :class:`GoneBackend` (namespace 1 stays RAM)."""
    area.state.namespaces[2] = Namespace(2, GoneBackend(str(tmp_path / "disk"), 1 << 20))
    return area


def set_acre(area: Area, enabled: bool) -> None:
    """Set Features Host Behavior Support with ACRE as ``enabled`` (byte 0), as Linux does."""
    area.guest.write(BUF, bytes([int(enabled)]) + bytes(HOST_BEHAVIOR_SIZE - 1))
    area.run(set_features, opc=AdminOpcode.SET_FEATURES, prp1=BUF, cdw10=FeatureId.HOST_BEHAVIOR_SUPPORT)


def rw(opc: int, slba: int = 0, *, nsid: int = 2) -> tuple:
    return sqe(opc, nsid=nsid, prp1=BUF, cdw10=slba)


def status(area: Area, e: tuple) -> int:
    result = NvmCommands(area.state, area.hooks).execute(area.admin_sq, e)
    assert result is not DEFERRED
    return result[0]  # type: ignore[index]


def test_identify_controller_reports_crdt1_and_only_it(area: Area):
    ident = st.IdentifyController.parse(identify_controller(area.state))
    assert (ident.crdt1, ident.crdt2, ident.crdt3) == (10, 0, 0)  # 1 s: ControllerConfig says why
    area.state.config = ControllerConfig(command_retry_delay_100ms=3)
    assert st.IdentifyController.parse(identify_controller(area.state)).crdt1 == 3


def test_without_acre_not_ready_has_no_retry_delay(gone: Area):
    assert not gone.state.features.acre  # a Controller Level Reset's default
    for opc in (NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.FLUSH):
        assert status(gone, rw(opc)) == NOT_READY  # DNR clear, CRD 0: retry at once
    assert gone.state.error_log.entries[0]["status_field"] == NOT_READY


def test_with_acre_not_ready_asks_for_crdt1(gone: Area):
    set_acre(gone, True)
    assert gone.state.features.acre
    for opc in (NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.FLUSH):
        assert status(gone, rw(opc)) == NOT_READY_CRD1
    # the Error Information entry holds the Status Field the CQE carried
    assert gone.state.error_log.entries[0]["status_field"] == NOT_READY_CRD1
    set_acre(gone, False)  # the host may take it back
    assert status(gone, rw(NvmOpcode.READ)) == NOT_READY


def test_failures_a_retry_cannot_cure_get_no_delay(gone: Area):
    set_acre(gone, True)
    last = gone.state.namespaces[1].nsze
    out_of_range = status(gone, rw(NvmOpcode.READ, last, nsid=1))
    assert out_of_range == Status.LBA_OUT_OF_RANGE | STATUS_DNR  # no CRD bits
    assert status(gone, rw(NvmOpcode.READ, nsid=9)) & ~STATUS_DNR == Status.INVALID_NAMESPACE_OR_FORMAT


def test_controller_level_reset_disables_acre(gone: Area):
    set_acre(gone, True)
    reset(gone.state)  # the host must enable it again (Linux does, after every reset)
    assert not gone.state.features.acre
    assert status(gone, rw(NvmOpcode.READ)) == NOT_READY


def test_a_command_in_flight_gets_the_delay_when_it_completes(gone: Area):
    """The blocking path: the call fails on the I/O pool, the request completes later with
    the retry delay (nvm.py's one place for a failed command's status)."""
    set_acre(gone, True)
    pool = KeptPool()
    nvm = NvmCommands(gone.state, dataclasses.replace(gone.hooks, io_pool=lambda: pool))
    pool.jobs.append((lambda: None, lambda r, e: None))  # something in flight: no inline run
    assert nvm.execute(gone.admin_sq, rw(NvmOpcode.WRITE)) is DEFERRED
    pool.jobs.pop(0)
    fn, done = pool.jobs.pop(0)
    try:
        fn()
    except NotReadyError as e:
        done(None, e)
    else:
        pytest.fail("the gone backend's write succeeded")
    [(_sq, _cid, st_field, _dw0, _stamps)] = gone.record.named("finish_request")
    assert st_field == NOT_READY_CRD1


def test_serve_crdt1_option(tmp_path: Path):
    """``nvme-emu serve --crdt1 N`` is what Identify Controller reports; out of 16 bits it is
    refused at parse time."""
    from nvme_emu.cli import build_function, make_parser

    def crdt1(*extra: str) -> int:
        args = make_parser().parse_args(["serve", "--socket", str(tmp_path / "s.sock"), "--namespace", "ram:size=1M", *extra])
        function = build_function(args)
        try:
            return st.IdentifyController.parse(identify_controller(function.controller.state)).crdt1
        finally:
            for ns in function.controller.state.namespaces.values():
                ns.close()

    assert crdt1() == ControllerConfig.command_retry_delay_100ms
    assert crdt1("--crdt1", "0") == 0
    assert crdt1("--crdt1", "0x20") == 32
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--crdt1", "65536"])
