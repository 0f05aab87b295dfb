"""A control-plane client that sends requests and never reads the replies.

An outside fuzz run (issue 22, finding 8): 22 MiB of requests in 10 s on the control socket
(``SOCKET.ctl``) took the server's anonymous memory from 29 to 434 MiB, every reply queued in
the server for a client that never reads, and the memory stayed after the client closed. The
server (a separate process; the control plane does not depend on the vfio-user backend, so
the Python one) must stop reading such a client, keep its anonymous RSS within a small bound,
serve another control client meanwhile, and be back near its baseline once the flooder goes.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from ..support.server import ServerProcess
from nvme_emu.ctl import ControlClient, default_control_socket

#: How long the flood lasts (the finding's 10 s grew the server 405 MiB; 3 s are plenty).
FLOOD_SECONDS = 3.0
#: What the server's anonymous memory may grow by while flooded, and keep once it is over.
GROWTH_BOUND_KB = 32 * 1024
AFTER_BOUND_KB = 8 * 1024


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess.serve(str(tmp_path / "s.sock"), tmp_path / "server.log", ["ram:size=16M"], backend="python",
                              extra=["--queues", "16"])
    srv.settle()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def _anon_kb(srv: ServerProcess) -> int:
    return srv.memory_kb()["RssAnon"]


def test_a_control_client_that_never_reads_is_bounded(server):
    path = default_control_socket(server.path)
    with ControlClient(path) as other:
        other.stats()  # the first stats call allocates what every later one reuses
        reply_bytes = len(json.dumps(other.stats()))
        anon0 = _anon_kb(server)
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flood.connect(path)
        flood.setblocking(False)
        burst = b"".join(b'{"jsonrpc":"2.0","id":%d,"method":"stats"}\n' % i for i in range(256))
        sent, peak, served = 0, anon0, 0
        deadline = time.monotonic() + FLOOD_SECONDS
        try:
            while time.monotonic() < deadline:
                try:
                    sent += flood.send(burst)
                except BlockingIOError:
                    time.sleep(0.01)  # the server stopped reading us: good
                except (BrokenPipeError, ConnectionResetError):
                    break  # dropped: good too
                peak = max(peak, _anon_kb(server))
                started = time.monotonic()
                assert other.controllers()[0]["cntlid"] is not None  # served meanwhile
                assert time.monotonic() - started < 1.0
                served += 1
            assert server.alive(), server.log()[-3000:]
            peak = max(peak, _anon_kb(server))
        finally:
            flood.close()
        growth = peak - anon0
        asked_kb = sent // len(b'{"jsonrpc":"2.0","id":100,"method":"stats"}\n') * reply_bytes // 1024
        assert growth < GROWTH_BOUND_KB, f"RssAnon grew {growth} kB; the flood asked for {asked_kb} kB of replies"
        assert served > 10
        # gone: its replies and requests are freed
        time.sleep(0.5)
        assert other.controllers()[0]["cntlid"] is not None
        after = _anon_kb(server)
        assert after - anon0 < AFTER_BOUND_KB, f"RssAnon {after - anon0} kB above the baseline after the flooder left"
    assert server.wait_fds() == server.baseline_fds, "\n".join(server.fds())
    print(f"flood: {sent} request bytes sent (~{asked_kb} kB of replies asked), RssAnon +{growth} kB at peak, "
          f"+{after - anon0} kB after; other client served {served} times")
