"""Fixtures for the NVMe controller suite.

Most tests run the real server, ``python -m nvme_emu serve``, in a separate process on a
socket in the test's tmp dir (trapped doorbells), on each vfio-user backend, and drive it from
the test process with :class:`~tests.support.host.Host` (the real client and host driver over
memfd guest memory and real eventfds). At teardown every server gets SIGTERM and must exit 0;
its log is printed, which pytest shows for failing tests.

A few tests look at controller internals; they use :func:`inproc` (the same ``Server`` +
``NvmeFunction`` on a private event loop in a daemon thread).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nvme_emu.spec.commands import AdminOpcode
from nvme_emu.spec.features import FeatureId
from vfio_user.server_api import ServerBackend

from ..support.host import Host
from ..support.inproc import InProcessServer
from ..support.server import ServerProcess

IOVA = 0x100000  #: where the guest RAM is DMA-mapped (tests.support.host.IOVA)
RAM_SIZE = 64 << 20
PAGE = 4096
#: An admin command with no effect, for tests that only need a completion (Get Features,
#: Arbitration).
NOOP_ADMIN = dict(opc=AdminOpcode.GET_FEATURES, cdw10=FeatureId.ARBITRATION)

NS1_SIZE = 64 << 20  # ram, 512-byte LBAs
NS2_SIZE = 32 << 20  # ram, 4096-byte LBAs
NS3_SIZE = 64 << 20  # file, 512-byte LBAs


#: The suite runs on both vfio-user server backends (libvfio-user where it is installed).
BACKENDS = (ServerBackend.PYTHON, ServerBackend.LIBVFIO_USER)


@pytest.fixture(params=BACKENDS)
def spawn(request, tmp_path):
    """Factory: ``spawn(*namespace_specs, sock=..., extra=[...])`` starts a server process,
    on each vfio-user backend in turn."""
    backend = request.param
    if backend != ServerBackend.PYTHON:
        from vfio_user.libvfio.library import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            print(f"libvfio-user not installed: {reason}")
            pytest.skip(f"libvfio-user not installed: {reason}")
    started: list[ServerProcess] = []

    def _spawn(*namespaces: str, sock: str | None = None, extra: list[str] | None = None) -> ServerProcess:
        n = len(started) + 1
        path = sock or str(tmp_path / f"nvme{n}.sock")
        srv = ServerProcess.serve(path, tmp_path / f"server{n}.log", namespaces, backend=backend, extra=extra or ())
        started.append(srv)
        return srv

    yield _spawn
    failures = []
    for srv in started:
        rc = srv.stop()
        print(f"---- server log ({srv.log_path.name}, exit {rc}) ----")
        print(srv.log())
        if rc != 0:
            failures.append(f"{srv.log_path.name}: exit status {rc}")
    assert not failures, failures


@pytest.fixture
def disk(tmp_path) -> Path:
    return tmp_path / "disk.img"


@pytest.fixture
def namespaces(disk) -> list[str]:
    return ["ram:size=64M", "ram:size=32M,lba=4096", f"file:{disk},size=64M"]


@pytest.fixture
def server(spawn, namespaces) -> ServerProcess:
    return spawn(*namespaces)


@pytest.fixture
def nvme(server):
    """An enabled controller (admin queue only) on the default three namespaces."""
    n = Host(server.path, ram_size=RAM_SIZE)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def io(nvme):
    """``nvme`` with 4 queue pairs allowed and I/O queue pair 1 (depth 64, vector 1) made."""
    nvme.set_queues(4)
    nvme.create_pair(1, 64)
    return nvme


@pytest.fixture
def inproc(tmp_path, disk):
    """Factory for an in-process server on the default namespaces; stopped at teardown."""
    from nvme_emu.controller import ControllerConfig
    from nvme_emu.function import NvmeFunction
    from nvme_emu.namespace_spec import open_namespace

    made: list[InProcessServer] = []

    def _make() -> InProcessServer:
        specs = ["ram:size=64M", "ram:size=32M,lba=4096", f"file:{disk},size=64M"]
        config = ControllerConfig(serial="NVMEEMU00000001", model="nvme-emu")
        namespaces = [open_namespace(s, i, controller_seed=config.serial) for i, s in enumerate(specs, start=1)]
        srv = InProcessServer(NvmeFunction(namespaces, config, doorbell="trap"), str(tmp_path / f"inproc{len(made)}.sock"))
        made.append(srv)
        return srv

    yield _make
    errors = [srv.error for srv in made if srv.error is not None]
    for srv in made:
        srv.close()
    assert not errors, f"server loop callback(s) raised: {errors!r}"
