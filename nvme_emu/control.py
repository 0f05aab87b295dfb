"""The control plane's operations on a running device, as plain methods.

Listing controllers, namespaces, queues and counters; adding and removing namespaces at
runtime (the host hears of it by a Namespace Attribute Changed notice and the Changed
Namespace List, as with Namespace Management); faults (:mod:`nvme_emu.faults`), zone faults
of zoned namespaces (a zone made Read Only or Offline) and controller fatal status. The methods run on the device's event loop thread, between
commands, so they see and change the controller like a command handler would.

No socket here: ``nvme-emu serve`` exposes :meth:`ControlPlane.methods` through
:mod:`nvme_emu.rpc_socket`, and :mod:`nvme_emu.ctl` is the client.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

from . import namespace_management as nsm
from .faults import FAULT_PARAMS, U64_MAX
from .function import NvmeFunction
from .jsonrpc import Param, ParamType, Schema
from .namespace import Namespace
from .namespace_spec import open_namespace
from .pi_faults import PI_FIELDS, corrupt_pi
from .spec.commands import NSID_ALL, NvmeError
from .zoned.zone_set import ZoneSet

log = logging.getLogger(__name__)

#: A namespace that exists or may: 1..FFFFFFFEh (0 is none, FFFFFFFFh the broadcast value).
_NSID = Param(ParamType.INTEGER, required=True, minimum=1, maximum=NSID_ALL - 1)

#: What ``zone_fault`` may make of a zone: the states only the controller enters on its own.
ZONE_FAULTS: dict[str, Callable[[ZoneSet, int], bool]] = {
    "read_only": ZoneSet.make_read_only,
    "offline": ZoneSet.make_offline,
}

#: The RPC methods by name, each with its parameters: the server's table (the dispatcher
#: refuses whatever does not fit, before the method runs) and the client's vocabulary.
PARAMS: dict[str, Schema] = {
    "controllers": {},
    "namespaces": {},
    "queues": {},
    "stats": {},
    "latency": {},
    "latency_reset": {},
    "ns_add": {"spec": Param(ParamType.STRING, required=True), "nsid": replace(_NSID, required=False, nullable=True)},
    "ns_remove": {"nsid": _NSID},
    "ns_attach": {"nsid": _NSID},
    "ns_detach": {"nsid": _NSID},
    "fault_add": FAULT_PARAMS,
    "fault_list": {},
    "fault_clear": {"id": Param(ParamType.INTEGER, nullable=True, minimum=1, maximum=U64_MAX)},
    "zone_fault": {
        "nsid": _NSID,
        "zone": Param(ParamType.INTEGER, required=True, minimum=0, maximum=U64_MAX),
        "state": Param(ParamType.STRING, required=True, choices=tuple(ZONE_FAULTS)),
    },
    "pi_corrupt": {
        "nsid": _NSID,
        "slba": Param(ParamType.INTEGER, required=True, minimum=0, maximum=U64_MAX),
        "nlb": Param(ParamType.INTEGER, required=True, minimum=1, maximum=U64_MAX),
        "field": Param(ParamType.STRING, required=True, choices=tuple(PI_FIELDS)),
    },
    "fatal": {"reason": Param(ParamType.STRING)},
}
METHODS = tuple(PARAMS)


def describe_namespace(ns: Namespace, attached: bool) -> dict[str, Any]:
    return {
        "nsid": ns.nsid,
        "attached": attached,
        "csi": int(ns.csi),
        **ns.describe_storage(),
        "size_bytes": ns.size_bytes,
        "lba_size": ns.lba_size,
        "stats": dict(ns.stats.__dict__),
        **({"inline": inline} if (inline := ns.inline_stats()) is not None else {}),
        **({"zones": describe_zones(ns)} if ns.zones is not None else {}),
    }


def describe_zones(ns: Namespace) -> dict[str, Any]:
    """A zoned namespace's geometry (bytes, as the spec string gives it) and its zones'
    counters: per state, open and active, writes, appends, resets, finishes, auto-closes."""
    zones = ns.zones
    assert zones is not None
    shift = ns.lba_shift
    return {
        "zone_size_bytes": zones.zone_size << shift,
        "zone_capacity_bytes": zones.zone_capacity << shift,
        "cross_read": zones.cross_zone_read,
        **zones.stats(),
    }


class ControlPlane:
    """Control operations on one NVMe function; see the module docstring."""

    def __init__(self, function: NvmeFunction) -> None:
        self.function = function
        self.controller = function.controller
        self.state = function.controller.state

    def methods(self) -> dict[str, Callable[..., Any]]:
        return {name: getattr(self, name) for name in METHODS}

    # -- listing -------------------------------------------------------------------------

    def controllers(self) -> list[dict[str, Any]]:
        """The controller(s) this process serves, with registers and health counters."""
        s = self.state
        return [{
            "cntlid": s.config.controller_id,
            "serial": s.config.serial,
            "model": s.config.model,
            "enabled": s.enabled,
            "ready": s.ready,
            "fatal": s.fatal,
            "csts": s.csts,
            "active_namespaces": sorted(s.namespaces),
            "allocated_namespaces": sorted(s.allocated),
            "io_queues": len([q for q in s.sqs if q]),
            "media_errors": s.health.media_errors,
            "error_log_entries": s.error_log.count,
            "faults": self.controller.faults.describe()["counters"],
        }]

    def namespaces(self) -> list[dict[str, Any]]:
        """Every allocated namespace, attached or not."""
        s = self.state
        return [describe_namespace(ns, nsid in s.namespaces) for nsid, ns in sorted(s.allocated.items())]

    def queues(self) -> dict[str, dict[str, int]]:
        return self.controller.queue_stats()

    def stats(self) -> dict[str, Any]:
        """Everything ``--stats-json`` dumps, plus the controller and the faults."""
        return {**self.function.stats(), "controllers": self.controllers(), **self.controller.faults.describe()}

    def latency(self) -> dict[str, Any]:
        """The latency anatomy: per queue and doorbell path, each stage's p50/p99/max."""
        return self.controller.state.latency.snapshot()

    def latency_reset(self) -> dict[str, Any]:
        """The latency anatomy so far, then empty histograms (a fresh measurement)."""
        rec = self.controller.state.latency
        snapshot = rec.snapshot()
        rec.reset()
        return snapshot

    # -- namespaces ----------------------------------------------------------------------

    def ns_add(self, spec: str, nsid: int | None = None) -> dict[str, Any]:
        """Open a namespace from a ``--namespace`` spec and attach it (lowest free NSID by
        default); the host is told, and rescans."""
        chosen = nsid if nsid is not None else _nvme(lambda: nsm.free_nsid(self.state))
        ns = open_namespace(spec, chosen, controller_seed=self.state.config.identity_seed)
        try:
            nsm.add(self.state, self.controller.hooks, ns)
        except BaseException:
            ns.close()
            raise
        return describe_namespace(ns, True)

    def ns_remove(self, nsid: int) -> None:
        """Detach and close a namespace (a file or device stays where it is)."""
        if nsid not in self.state.allocated:
            raise ValueError(f"no namespace {nsid}")
        nsm.delete(self.state, self.controller.hooks, nsid)

    def ns_attach(self, nsid: int) -> None:
        _nvme(lambda: nsm.attach(self.state, self.controller.hooks, self._allocated(nsid)))

    def ns_detach(self, nsid: int) -> None:
        _nvme(lambda: nsm.detach(self.state, self.controller.hooks, self._allocated(nsid)))

    def _allocated(self, nsid: int) -> int:
        if nsid not in self.state.allocated:
            raise ValueError(f"no namespace {nsid}")
        return nsid

    # -- faults --------------------------------------------------------------------------

    def fault_add(self, **params: Any) -> dict[str, Any]:
        """Inject a fault (see :func:`nvme_emu.faults.parse_fault` for the parameters)."""
        nsid = params.get("nsid", 0)
        if nsid and nsid not in self.state.allocated:
            raise ValueError(f"no namespace {nsid}")
        return self.controller.faults.add(params).describe()

    def fault_list(self) -> dict[str, Any]:
        return self.controller.faults.describe()

    def fault_clear(self, id: int | None = None) -> int:  # noqa: A002 (the RPC parameter's name)
        """Remove fault ``id``, or all; how many were removed."""
        return self.controller.faults.remove(id)

    def zone_fault(self, nsid: int, zone: int, state: str) -> dict[str, Any]:
        """Make zone ``zone`` (its index, from 0) of zoned namespace ``nsid`` Read Only or
        Offline, as a failing medium would: the zone set frees its resources, stores the new
        state (a sidecar keeps it across restarts), lists the zone in the Changed Zone List
        and calls its descriptor-changed hook, which raises the Zone Descriptor Changed notice.
        ``changed`` is False if the zone already was in that state; an Offline zone cannot be
        made Read Only (no transition leaves Offline)."""
        ns = self.state.allocated.get(nsid)
        if ns is None:
            raise ValueError(f"no namespace {nsid}")
        # Namespace.zones: the zone set of a zoned namespace, None for any other (issue 25).
        zones = ns.zones
        if zones is None:
            raise ValueError(f"namespace {nsid} is not zoned")
        if zone >= zones.num_zones:
            raise ValueError(f"zone {zone}: namespace {nsid} has zones 0..{zones.num_zones - 1}")
        changed = ZONE_FAULTS[state](zones, zone)
        z = zones.zones[zone]
        return {"nsid": nsid, "zone": zone, "zslba": z.zslba, "state": z.state.name, "wp": z.wp, "changed": changed}

    def pi_corrupt(self, nsid: int, slba: int, nlb: int, field: str) -> dict[str, Any]:
        """Damage the stored guard, application tag or reference tag of blocks ``slba ..
        slba + nlb - 1`` of namespace ``nsid`` (:mod:`nvme_emu.pi_faults`): a host's check of
        that field fails there, and a Write of those blocks repairs them."""
        ns = self.state.allocated.get(nsid)
        if ns is None:
            raise ValueError(f"no namespace {nsid}")
        corrupt_pi(ns, PI_FIELDS[field], slba, nlb)
        return {"nsid": nsid, "slba": slba, "nlb": nlb, "field": field}

    def fatal(self, reason: str = "injected by the control plane") -> dict[str, Any]:
        """Controller Fatal Status: nothing is processed until the host resets the controller."""
        self.controller.faults.counters.fatal += 1
        self.controller.set_fatal(reason)
        return self.controllers()[0]


def _nvme(fn: Callable[[], Any]) -> Any:
    """Run a namespace operation; the status it fails with reads as a plain error."""
    try:
        return fn()
    except NvmeError as e:
        raise ValueError(f"{e.status.name}: {e}") from None
