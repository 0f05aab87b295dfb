"""What the host hears of zones the controller changed on its own (ZNS 1.1): the Zone
Descriptor Changed notice (asynchronous event, notice EFh, log BFh) and the Changed Zone List
log page it points to, per namespace (the NSID of Get Log Page).

A :class:`~nvme_emu.zoned.zone_set.ZoneSet` records such zones (a zone made Read Only or
Offline by the control plane's fault injection, or finished by the controller) in its
:class:`~nvme_emu.zoned.changed.ChangedZoneList` and calls ``on_descriptor_changed``; when a
zoned namespace becomes active on a controller, :func:`attach` points that callback at
:func:`zone_descriptor_changed` with the controller's state and hooks.
"""

from __future__ import annotations

from functools import partial

from ..namespace import Namespace
from ..spec.commands import NvmeError, Status
from ..spec.events import AsyncEventConfig, AsyncEventNotice, AsyncEventType
from ..spec.log_pages import LogPageId
from ..state import ControllerHooks, ControllerState
from .structures import build_changed_zone_list


def zone_descriptor_changed(state: ControllerState, hooks: ControllerHooks, ns: Namespace) -> None:
    """A zone of ``ns`` changed by the controller's doing: the notice, if ``ns`` is active here
    and the host enabled Zone Descriptor Changed Notices (Asynchronous Event Configuration bit
    27). The zone is in the Changed Zone List either way, for the host's next read."""
    if state.namespaces.get(ns.nsid) is not ns:
        return  # detached (or replaced): nothing to tell this controller's host
    if state.features.async_event_config & AsyncEventConfig.ZONE_DESCRIPTOR_CHANGED:
        hooks.async_event(AsyncEventType.NOTICE, AsyncEventNotice.ZONE_DESCRIPTOR_CHANGED, LogPageId.CHANGED_ZONE_LIST)


def attach(state: ControllerState, hooks: ControllerHooks, ns: Namespace) -> None:
    """A zoned namespace became active on this controller: its zone changes reach its host."""
    if ns.zones is not None:
        ns.zones.on_descriptor_changed = partial(zone_descriptor_changed, state, hooks, ns)


def changed_zone_list_log(state: ControllerState, nsid: int) -> bytes:
    """Log page BFh for the namespace ``nsid`` names (reading it empties the list, as the
    Changed Namespace List's): Invalid Namespace or Format for an inactive NSID, Invalid
    Field for a namespace that is not zoned."""
    ns = state.active_namespace(nsid)
    if ns.zones is None:
        raise NvmeError(Status.INVALID_FIELD, f"namespace {nsid} is not zoned: no Changed Zone List")
    return build_changed_zone_list(*ns.zones.changed.take())
