"""The control plane's wire format without a socket, then over a real one on a loop."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import stat
import threading
import time

import pytest

from nvme_emu.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Dispatcher,
    LineBuffer,
    Param,
    ParamType,
    RpcError,
    decode_response,
    encode_request,
)
from nvme_emu.rpc_socket import RpcClient, RpcServer


def add(a: int, b: int = 0) -> int:
    return a + b


def broken() -> None:
    raise RuntimeError("a bug")


def refuse() -> None:
    raise ValueError("no such thing")


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher({"add": add, "broken": broken, "refuse": refuse})


def call(d: Dispatcher, method: str, params) -> dict:
    response = d.handle(json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).encode())
    assert response is not None and response.endswith(b"\n")
    return json.loads(response)


def test_result_round_trip(dispatcher):
    line = dispatcher.handle(encode_request(3, "add", {"a": 2, "b": 5}).rstrip(b"\n"))
    assert decode_response(line, 3) == 7


@pytest.mark.parametrize(
    "method, params, code",
    [
        ("nope", {}, METHOD_NOT_FOUND),
        ("add", {"c": 1}, INVALID_PARAMS),
        ("add", [1, 2], INVALID_PARAMS),
        ("refuse", {}, INVALID_PARAMS),
        ("broken", {}, INTERNAL_ERROR),
    ],
)
def test_errors(dispatcher, method, params, code):
    answer = call(dispatcher, method, params)
    assert answer["id"] == 7 and answer["error"]["code"] == code


@pytest.mark.parametrize(
    "params, ok",
    [
        ({"a": 2}, True),
        ({"a": 2, "b": 3.5, "name": "x"}, True),
        ({"a": 2, "name": None}, True),  # nullable: null is "not given"
        ({}, False),  # a is required
        ({"a": True}, False),  # a bool is not an integer
        ({"a": 2.0}, False),
        ({"a": "2"}, False),
        ({"a": 11}, False),  # above the maximum
        ({"a": 2, "b": float("nan")}, False),
        ({"a": 2, "b": float("inf")}, False),
        ({"a": 2, "b": False}, False),
        ({"a": 2, "name": "y"}, False),  # not a choice
        ({"a": 2, "name": ["x"]}, False),
        ({"a": 2, "other": 1}, False),  # not declared
    ],
)
def test_declared_params_are_checked_before_the_method_runs(params, ok):
    ran: list[dict] = []
    schema = {
        "a": Param(ParamType.INTEGER, required=True, minimum=0, maximum=10),
        "b": Param(ParamType.NUMBER),
        "name": Param(ParamType.STRING, nullable=True, choices=("x",)),
    }
    d = Dispatcher({"m": lambda **kw: ran.append(kw) or len(ran)}, {"m": schema})
    line = d.handle(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "m", "params": params}).encode())
    answer = json.loads(line)
    if ok:
        assert answer["result"] == 1 and ran == [params]
    else:
        assert answer["error"]["code"] == INVALID_PARAMS and not ran, answer


def test_malformed_requests(dispatcher):
    assert json.loads(dispatcher.handle(b"{not json"))["error"]["code"] == PARSE_ERROR
    assert json.loads(dispatcher.handle(b'{"id": 1, "method": "add"}'))["error"]["code"] == INVALID_REQUEST
    assert json.loads(dispatcher.handle(b"[1, 2]"))["error"]["code"] == INVALID_REQUEST


def test_notification_has_no_response(dispatcher):
    assert dispatcher.handle(b'{"jsonrpc": "2.0", "method": "add", "params": {"a": 1}}') is None


def test_line_buffer_splits_and_limits():
    buf = LineBuffer(limit=16)
    assert buf.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert buf.feed(b":2}\n") == [b'{"b":2}']
    with pytest.raises(RpcError):
        buf.feed(b"x" * 17)


def test_error_response_raises_on_the_client():
    line = json.dumps({"jsonrpc": "2.0", "id": 4, "error": {"code": -1, "message": "nope"}}).encode()
    with pytest.raises(RpcError, match="nope"):
        decode_response(line, 4)
    with pytest.raises(RpcError):
        decode_response(line, 5)  # answers another request


def test_server_and_client_over_a_socket(tmp_path, dispatcher):
    path = str(tmp_path / "ctl.sock")
    loop = asyncio.new_event_loop()
    server = RpcServer(dispatcher, path, mode=0o600)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with RpcClient(path) as client:
            assert [client.call("add", a=i, b=1) for i in range(3)] == [1, 2, 3]
            with pytest.raises(RpcError) as err:
                client.call("refuse")
            assert err.value.code == INVALID_PARAMS
            assert client.call("add", a=1) == 1  # the connection survives errors
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        server.close()
        loop.close()
    assert not os.path.exists(path)


def _serving(tmp_path, dispatcher: Dispatcher, **kw):
    """An RpcServer on a loop in a thread; returns (path, stop)."""
    path = str(tmp_path / "ctl.sock")
    loop = asyncio.new_event_loop()
    server = RpcServer(dispatcher, path, **kw)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        server.close()
        loop.close()

    return path, stop


def _big(i: int) -> str:
    return f"{i:08d}" + "x" * 16384


def test_replies_a_client_reads_late_all_come_in_order(tmp_path):
    """Flow control loses nothing: requests whose replies back up wait, then are answered."""
    path, stop = _serving(tmp_path, Dispatcher({"big": _big}))
    try:
        count = 200  # 3.2 MiB of replies: well past the high-water mark
        with RpcClient(path) as client:
            client.sock.sendall(b"".join(encode_request(i, "big", {"i": i}) for i in range(count)))
            time.sleep(0.3)  # the server stops when the replies back up
            for i in range(count):
                assert decode_response(client._next_line(), i) == _big(i)
            assert client.call("big", i=1) == _big(1)
    finally:
        stop()


def _kib(i: int) -> str:
    return "y" * 1024


def test_a_client_that_does_not_drain_its_replies_is_dropped(tmp_path):
    """It stops being read, and after ``drain_timeout`` it is dropped (the socket hangs up
    without the client reading a byte); other clients are served."""
    path, stop = _serving(tmp_path, Dispatcher({"kib": _kib}), drain_timeout=0.5)
    try:
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flood.connect(path)
        flood.setblocking(False)
        request = encode_request(1, "kib", {"i": 1})
        sent = 0
        while sent < 20_000:  # 20 MiB of replies: the old server buffered them all
            try:
                flood.send(request * 100)
                sent += 100
            except BlockingIOError:
                break  # the server no longer reads us
        assert sent < 20_000, "the server read every request of a client that reads nothing"
        poller = select.poll()
        poller.register(flood, select.POLLHUP)
        started = time.monotonic()
        assert poller.poll(5000), "not dropped"
        assert 0.3 < time.monotonic() - started < 5
        flood.close()
        with RpcClient(path) as client:  # the server goes on
            assert client.call("kib", i=2) == _kib(2)
    finally:
        stop()
