"""``nvme-emu ctl``: the control plane's client, as a Python class and a command line.

:class:`ControlClient` has one method per RPC method of :data:`nvme_emu.control.METHODS`
(keyword arguments are the RPC's params); tests use it directly. ``nvme-emu ctl COMMAND``
maps each sub-command onto the same methods and prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from .control import METHODS
from .pi_faults import PI_FIELDS
from .faults import DISTRIBUTIONS, OPS, FaultKind
from .jsonrpc import RpcError
from .latency import format_table
from .rpc_socket import RpcClient


def default_control_socket(vfio_socket: str) -> str:
    """Where ``serve`` puts the control socket unless told otherwise: next to the device's."""
    return f"{vfio_socket}.ctl"


class ControlClient:
    """``ControlClient(path).ns_add(spec="ram:size=64M")`` and so on, one per RPC method."""

    def __init__(self, path: str, *, timeout: float | None = None) -> None:
        self.rpc = RpcClient(path) if timeout is None else RpcClient(path, timeout=timeout)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in METHODS:
            raise AttributeError(name)
        return lambda **params: self.rpc.call(name, **params)

    def close(self) -> None:
        self.rpc.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fault_parser(sub: argparse._SubParsersAction) -> None:
    kinds = [k.value for k in FaultKind]
    f = sub.add_parser("fault", help=f"inject a fault: {' | '.join(kinds)}")
    f.add_argument("kind", choices=kinds)
    f.add_argument("--nsid", type=int, help="only this namespace (default: all)")
    f.add_argument("--slba", type=int, help="first LBA of the range (default 0)")
    f.add_argument("--nlb", type=int, help="blocks in the range (default: to the end)")
    f.add_argument("--op", choices=list(OPS), help="commands hit: read, write or rw (default)")
    f.add_argument("--count", type=int, dest="remaining", help="hit this many commands, then stop (delay: 1)")
    f.add_argument("--dist", choices=DISTRIBUTIONS, help="latency: fixed (default), uniform, exponential, normal")
    f.add_argument("--us", type=float, help="latency: fixed value, or the mean (exponential, normal)")
    f.add_argument("--min-us", type=float, help="uniform latency: lower bound")
    f.add_argument("--max-us", type=float, help="uniform latency: upper bound")
    f.add_argument("--stddev-us", type=float, help="normal latency: standard deviation")
    f.add_argument("--ms", type=float, dest="delay_ms", help="delay: hold the completion this long")


#: argparse attributes that are not RPC parameters.
_NOT_PARAMS = {"socket", "ctl_command", "verbose", "command", "json", "reset"}


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in _NOT_PARAMS and v is not None}


def build_parser(default_socket: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nvme-emu ctl", description="Control a running nvme-emu serve (JSON-RPC over its control socket).")
    p.add_argument("--socket", default=default_socket, help=f"the control socket (default {default_socket})")
    sub = p.add_subparsers(dest="ctl_command", required=True)
    sub.add_parser("list", help="controllers, namespaces and faults with their counters")
    for name in ("namespaces", "queues", "stats", "fault-list"):
        sub.add_parser(name)
    lat = sub.add_parser("latency", help="per-stage latency (p50/p99/max) per queue and doorbell path")
    lat.add_argument("--json", action="store_true", help="the snapshot as JSON instead of a table")
    lat.add_argument("--reset", action="store_true", help="then empty the histograms")
    a = sub.add_parser("ns-add", help="add a namespace at runtime (the guest rescans)")
    a.add_argument("spec", help="ram:size=1G | file:PATH[,size=8G][,lba=4096] | blk:/dev/X")
    a.add_argument("--nsid", type=int)
    for name in ("ns-remove", "ns-attach", "ns-detach"):
        sub.add_parser(name).add_argument("nsid", type=int)
    _fault_parser(sub)
    sub.add_parser("fault-clear", help="remove one fault, or all").add_argument("id", type=int, nargs="?")
    z = sub.add_parser("zone", help="make a zone of a zoned namespace Read Only or Offline (the host is told)")
    z.add_argument("--nsid", type=int, required=True)
    z.add_argument("--zone", type=int, required=True, help="the zone's index, from 0 (its first LBA / the zone size)")
    fault = z.add_mutually_exclusive_group(required=True)
    fault.add_argument("--read-only", dest="state", action="store_const", const="read_only")
    fault.add_argument("--offline", dest="state", action="store_const", const="offline")
    c = sub.add_parser("pi-corrupt", help="damage the stored PI of an LBA range: the host's check of that field fails there")
    c.add_argument("--nsid", type=int, required=True)
    c.add_argument("--slba", type=int, required=True)
    c.add_argument("--nlb", type=int, default=1, help="how many blocks (default 1)")
    c.add_argument("--field", choices=tuple(PI_FIELDS), default="guard")
    sub.add_parser("fatal", help="set CSTS.CFS: the host must reset the controller").add_argument("reason", nargs="?")
    return p


def run(args: argparse.Namespace, client: ControlClient) -> Any:
    """One sub-command through the client."""
    command = args.ctl_command
    params = _params(args)
    if command == "list":
        return {"controllers": client.controllers(), "namespaces": client.namespaces(), **client.fault_list()}
    if command == "fault":
        return client.fault_add(**params)
    if command == "zone":
        return client.zone_fault(**params)
    if command == "latency":
        return client.latency_reset() if args.reset else client.latency()
    return getattr(client, command.replace("-", "_"))(**params)


def main(argv: list[str], default_socket: str) -> int:
    args = build_parser(default_socket).parse_args(argv)
    try:
        with ControlClient(args.socket) as client:
            result = run(args, client)
    except (OSError, RpcError) as e:
        print(f"nvme-emu ctl: {e}", file=sys.stderr)
        return 1
    if args.ctl_command == "latency" and not args.json:
        print(format_table(result))
    else:
        print(json.dumps(result, indent=2))
    return 0
