"""JSON-RPC 2.0 messages, one per line, without I/O: the control plane's wire format.

Generic (it knows nothing of NVMe) and sans-IO: :class:`LineBuffer` cuts a byte stream into
messages, :class:`Dispatcher` turns a request line into a response line by calling a method
from its table, and :func:`encode_request` / :func:`decode_response` are the client's half.
The socket transport is :mod:`nvme_emu.rpc_socket`.

A method is called with the request's ``params`` object as keyword arguments; a
``ValueError`` or ``KeyError`` it raises becomes an Invalid Params error, so a bad command
line reads as a message, not a traceback. A method may declare its parameters (a
:data:`Schema`: name -> :class:`Param`); the dispatcher then checks the request against it
before the method runs, so a wrong JSON type (``null``, a bool or a list where a string or
an integer belongs), a number that is not finite (Python's ``json`` reads ``NaN`` and
``Infinity``) or out of range is Invalid Params in one place, not an exception somewhere in
the method, or worse, a value it takes.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

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


class ParamType(enum.Enum):
    """A parameter's JSON type. A bool is neither an integer nor a number (JSON tells them
    apart, Python's ``isinstance(True, int)`` does not)."""

    INTEGER = "an integer"
    NUMBER = "a finite number"
    STRING = "a string"


@dataclass(frozen=True)
class Param:
    """One declared parameter: its type, whether it must be given, whether ``null`` stands
    for "not given", the range of a number and the values a string may take."""

    type: ParamType
    required: bool = False
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`ValueError` naming ``name`` unless ``value`` fits."""
        if value is None and self.nullable:
            return
        if not _is_type(self.type, value):
            raise ValueError(f"{name} must be {self.type.value}, not {json.dumps(value)}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{name} must be one of {', '.join(self.choices)}")
        if self.type is ParamType.STRING:
            return
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise ValueError(f"{name} must be in {_g(self.minimum)}..{_g(self.maximum)}, not {_g(value)}")


#: A method's parameters by name; any name not in it is refused.
Schema = Mapping[str, Param]


def _is_type(kind: ParamType, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if kind is ParamType.STRING:
        return isinstance(value, str)
    if kind is ParamType.INTEGER:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _g(x: float | None) -> str:
    return "" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def check_params(schema: Schema, params: Mapping[str, Any]) -> None:
    """Raise :class:`ValueError` (Invalid Params) unless ``params`` fits ``schema``."""
    unknown = sorted(set(params) - set(schema))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} (known: {', '.join(schema) or 'none'})")
    for name, param in schema.items():
        if name in params:
            param.check(name, params[name])
        elif param.required:
            raise ValueError(f"{name} is required")


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
    """Request lines to response lines through a table of methods (name -> callable); a
    method with an entry in ``schemas`` gets only parameters that fit it."""

    def __init__(self, methods: dict[str, Callable[..., Any]], schemas: Mapping[str, Schema] | None = None) -> None:
        self.methods = methods
        self.schemas: Mapping[str, Schema] = schemas or {}

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
            schema = self.schemas.get(name)
            if schema is not None:
                check_params(schema, params)
            result = method(**params)
        except RpcError as e:
            return _error(request_id, e.code, e.message)
        except (TypeError, ValueError, KeyError) as e:
            return _error(request_id, INVALID_PARAMS, str(e))
        except Exception as e:  # a bug in one method must not take the control socket down
            log.exception("control method %s failed", name)
            return _error(request_id, INTERNAL_ERROR, f"{type(e).__name__}: {e}")
        return _line({"jsonrpc": VERSION, "id": request_id, "result": result})
