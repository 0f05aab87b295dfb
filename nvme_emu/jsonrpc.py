"""JSON-RPC 2.0 messages, one per line, without I/O: the control plane's wire format.

Generic (it knows nothing of NVMe) and sans-IO: :class:`LineBuffer` cuts a byte stream into
messages, :class:`Dispatcher` turns a request line into a response line by calling a method
from its table, and :func:`encode_request` / :func:`decode_response` are the client's half.
The socket transport is :mod:`nvme_emu.rpc_socket`.

A method is called with the request's ``params`` object as keyword arguments; a
``ValueError`` or ``KeyError`` it raises becomes an Invalid Params error, so a bad command
line reads as a message, not a traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

VERSION = "2.0"
#: Longest request or response line accepted (a status dump of many queues fits).
MAX_LINE = 1 << 20

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


class RpcError(Exception):
    """An error response (on the client), or one a method raises on purpose (on the server)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (JSON-RPC error {code})")
        self.code = code
        self.message = message


class LineBuffer:
    """Bytes in, complete lines out; a line longer than ``limit`` is an error."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._data = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._data += data
        lines = []
        while (end := self._data.find(b"\n")) >= 0:
            lines.append(bytes(self._data[:end]))
            del self._data[: end + 1]
        if len(self._data) > self.limit:
            raise RpcError(INVALID_REQUEST, f"message longer than {self.limit} bytes")
        return lines


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def encode_request(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    return _line({"jsonrpc": VERSION, "id": request_id, "method": method, "params": params})


def decode_response(line: bytes, request_id: int) -> Any:
    """The result of the response to ``request_id``, or the RpcError it carries."""
    try:
        message = json.loads(line)
    except ValueError as e:
        raise RpcError(PARSE_ERROR, f"bad response: {e}") from None
    if not isinstance(message, dict) or message.get("id") != request_id:
        raise RpcError(INVALID_REQUEST, f"response {message!r} does not answer request {request_id}")
    if "error" in message:
        err = message["error"]
        raise RpcError(err.get("code", INTERNAL_ERROR), err.get("message", "error"))
    return message.get("result")


def _error(request_id: Any, code: int, message: str) -> bytes:
    return _line({"jsonrpc": VERSION, "id": request_id, "error": {"code": code, "message": message}})


class Dispatcher:
    """Request lines to response lines through a table of methods (name -> callable)."""

    def __init__(self, methods: dict[str, Callable[..., Any]]) -> None:
        self.methods = methods

    def handle(self, line: bytes) -> bytes | None:
        """The response to one request line; None for a notification (no ``id``)."""
        try:
            request = json.loads(line)
        except ValueError as e:
            return _error(None, PARSE_ERROR, f"not JSON: {e}")
        if not isinstance(request, dict) or request.get("jsonrpc") != VERSION or not isinstance(request.get("method"), str):
            return _error(request.get("id") if isinstance(request, dict) else None, INVALID_REQUEST, "not a JSON-RPC 2.0 request")
        request_id = request.get("id")
        params = request.get("params", {})
        response = self._call(request_id, request["method"], params)
        return response if "id" in request else None

    def _call(self, request_id: Any, name: str, params: Any) -> bytes:
        method = self.methods.get(name)
        if method is None:
            return _error(request_id, METHOD_NOT_FOUND, f"no method {name!r} (methods: {', '.join(sorted(self.methods))})")
        if not isinstance(params, dict):
            return _error(request_id, INVALID_PARAMS, "params must be an object")
        try:
            result = method(**params)
        except RpcError as e:
            return _error(request_id, e.code, e.message)
        except (TypeError, ValueError, KeyError) as e:
            return _error(request_id, INVALID_PARAMS, str(e))
        except Exception as e:  # a bug in one method must not take the control socket down
            log.exception("control method %s failed", name)
            return _error(request_id, INTERNAL_ERROR, f"{type(e).__name__}: {e}")
        return _line({"jsonrpc": VERSION, "id": request_id, "result": result})
