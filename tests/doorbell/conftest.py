"""Fixtures for the doorbell-path tests: servers (separate process or in-process) and hosts.

``serve(mode, ...)`` starts ``python -m nvme_emu serve --doorbell MODE`` and kills it at
teardown, printing its log (pytest shows it for failing tests); ``inproc(mode, ...)`` runs the
same server on a loop in a thread; ``session(path)`` is a host driver attached to it.
"""

from __future__ import annotations

import pytest

from ..support.server import ServerProcess
from .db_helpers import HostSession, NvmeInProcess
from .db_helpers import serve as serve_process


@pytest.fixture
def serve(tmp_path):
    started: list[tuple[str, ServerProcess]] = []

    def start(mode: str, **kw) -> ServerProcess:
        kw.setdefault("name", f"nvme{len(started)}")
        srv = serve_process(tmp_path, mode, **kw)
        started.append((mode, srv))
        return srv

    try:
        yield start
    finally:
        died = [(mode, s.proc.returncode) for mode, s in started if s.proc.poll() not in (None, 0)]
        for mode, srv in started:
            srv.kill()
            print(f"---- server {mode} ({srv.path}) log ----\n{srv.log()}")
        assert not died, f"server process(es) died: {died}"


@pytest.fixture
def inproc(tmp_path):
    started: list[NvmeInProcess] = []

    def start(mode: str, **kw) -> NvmeInProcess:
        srv = NvmeInProcess(str(tmp_path / f"inproc{len(started)}.sock"), mode, **kw)
        started.append(srv)
        return srv

    try:
        yield start
    finally:
        errors = [s.error for s in started if s.error is not None]
        for srv in started:
            srv.close()
        assert not errors, f"server loop callback(s) raised: {errors!r}"


@pytest.fixture
def session():
    opened: list[HostSession] = []

    def open_(path: str, **kw) -> HostSession:
        s = HostSession(path, **kw)
        opened.append(s)
        return s

    try:
        yield open_
    finally:
        for s in reversed(opened):
            s.close()
