"""Fixtures for the doorbell-path tests: servers (separate process or in-process) and hosts.

``serve(mode, ...)`` starts ``python -m nvme_emu serve --doorbell MODE`` and kills it at
teardown, printing its log (pytest shows it for failing tests); ``inproc(mode, ...)`` runs the
same server on a loop in a thread; ``session(path)`` is a host driver attached to it.
"""

from __future__ import annotations

import pytest

from db_helpers import HostSession, InProcServer, ServeProcess


@pytest.fixture
def serve(tmp_path):
    started: list[ServeProcess] = []

    def start(mode: str, **kw) -> ServeProcess:
        kw.setdefault("name", f"nvme{len(started)}")
        srv = ServeProcess(tmp_path, mode, **kw)
        started.append(srv)
        return srv

    try:
        yield start
    finally:
        died = [s for s in started if s.proc.poll() not in (None, 0)]
        for srv in started:
            srv.kill()
            print(f"---- server {srv.mode} ({srv.path}) stdout ----\n{srv.stdout()}")
            print(f"---- server {srv.mode} log ----\n{srv.stderr()}")
        assert not died, f"server process(es) died: {[(s.mode, s.proc.returncode) for s in died]}"


@pytest.fixture
def inproc(tmp_path):
    started: list[InProcServer] = []

    def start(mode: str, **kw) -> InProcServer:
        srv = InProcServer(str(tmp_path / f"inproc{len(started)}.sock"), mode, **kw)
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
