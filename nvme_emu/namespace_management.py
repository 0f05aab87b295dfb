"""Namespace Management (admin opcode 0Dh) and Namespace Attachment (15h), and the same
operations for the control plane (a namespace added or removed at runtime).

A namespace is *allocated* in the subsystem (``state.allocated``) and *active* for this
controller while attached (``state.namespaces``, what I/O addresses). Every change of the
active set adds the NSID to the Changed Namespace List and raises a Namespace Attribute
Changed notice where the host enabled it, so the host rescans.
"""

from __future__ import annotations

import logging

from . import structures as st
from .async_event import namespace_changed
from .command_set import command_set, namespace_attached
from .identify import IDENTIFY_SIZE, unallocated_capacity
from .namespace import LBA_FORMATS, Namespace, create_namespace, destroy_namespace
from .ns_format import NsFormat, check_ns_format
from .pi.format import DPS_PIP_SHIFT, DPS_PIT_MASK, PiLocation, ProtectionType
from .queue import SubmissionQueue
from .spec.commands import NSID_ALL, NvmeError, Status
from .spec.identify import FLBAS_EXTENDED_METADATA, Csi, flbas_decode
from .sqe import CDW10, CDW11, NSID
from .state import ControllerHooks, ControllerState
from .transfer import from_host
from .zoned.geometry import created_geometry

log = logging.getLogger(__name__)

#: CDW10 SEL (bits 3:0) of Namespace Management.
SEL_CREATE, SEL_DELETE = 0, 1
#: CDW10 SEL (bits 3:0) of Namespace Attachment.
SEL_ATTACH, SEL_DETACH = 0, 1
#: A Controller List is one 4 KiB data structure.
CONTROLLER_LIST_SIZE = 4096


def namespace_management(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """Create (DW0: the new NSID) from the host's Identify Namespace fields, in the command
    set CDW11's CSI names, or delete."""
    sel = e[CDW10] & 0xF
    if sel == SEL_CREATE:
        cs = command_set(e[CDW11] >> 24, Status.IO_COMMAND_SET_NOT_SUPPORTED)
        fields = st.IdentifyNamespace.parse(from_host(state, e, IDENTIFY_SIZE))
        return create(state, fields.nsze, fields.ncap, fields.flbas, cs.csi, dps=fields.dps)
    if sel == SEL_DELETE:
        nsid = e[NSID]
        targets = sorted(state.allocated) if nsid == NSID_ALL else [nsid]
        if nsid not in state.allocated and nsid != NSID_ALL:
            raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid} is not allocated")
        for victim in targets:
            delete(state, hooks, victim)
        return 0
    raise NvmeError(Status.INVALID_FIELD, f"namespace management SEL {sel}")


def namespace_attachment(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """Attach or detach an allocated namespace; the list must name this controller only."""
    sel, nsid = e[CDW10] & 0xF, e[NSID]
    if sel not in (SEL_ATTACH, SEL_DETACH) or nsid in (0, NSID_ALL):
        raise NvmeError(Status.INVALID_FIELD, f"namespace attachment SEL {sel} NSID {nsid:#x}")
    if nsid not in state.allocated:
        raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid} is not allocated")
    ids = st.parse_controller_list(from_host(state, e, CONTROLLER_LIST_SIZE))
    cntlid = state.config.controller_id
    if ids != [cntlid]:
        raise NvmeError(Status.CONTROLLER_LIST_INVALID, f"controller list {ids} (this subsystem has controller {cntlid})")
    if sel == SEL_ATTACH:
        attach(state, hooks, nsid)
    else:
        detach(state, hooks, nsid)
    return 0


def free_nsid(state: ControllerState) -> int:
    """The lowest NSID not allocated, or Namespace Identifier Unavailable."""
    for nsid in range(1, state.config.max_namespaces + 1):
        if nsid not in state.allocated:
            return nsid
    raise NvmeError(Status.NAMESPACE_ID_UNAVAILABLE, f"all {state.config.max_namespaces} NSIDs are allocated")


def create(state: ControllerState, nsze: int, ncap: int, flbas: int, csi: Csi = Csi.NVM, *, dps: int = 0) -> int:
    """Allocate a zeroed namespace of ``nsze`` blocks in format ``flbas`` (with MSET, bit 4),
    protection ``dps`` and command set ``csi`` (not attached). A zoned one gets QEMU's
    default zone geometry (:func:`nvme_emu.zoned.geometry.created_geometry`): the Create data
    has no zone fields. Its guard is 16b: the Create data chooses none."""
    index = flbas_decode(flbas)
    if dps & DPS_PIT_MASK > ProtectionType.TYPE3:
        raise NvmeError(Status.INVALID_FIELD, f"DPS {dps:#x}: reserved protection information type")
    fmt = check_ns_format(NsFormat(index, bool(flbas & FLBAS_EXTENDED_METADATA), ProtectionType(dps & DPS_PIT_MASK),
                                   PiLocation((dps >> DPS_PIP_SHIFT) & 1)), zoned=csi == Csi.ZONED)
    if nsze == 0:
        raise NvmeError(Status.INVALID_FIELD, "namespace size 0")
    if ncap != nsze:
        raise NvmeError(Status.THIN_PROVISIONING_NOT_SUPPORTED, f"NCAP {ncap} != NSZE {nsze}")
    size = nsze << LBA_FORMATS[index].lbads
    if size > unallocated_capacity(state):
        raise NvmeError(Status.NAMESPACE_INSUFFICIENT_CAPACITY, f"{size} bytes wanted, {unallocated_capacity(state)} free")
    nsid = free_nsid(state)
    c = state.config
    lba_size = LBA_FORMATS[index].size
    zoned = created_geometry(size, lba_size) if csi == Csi.ZONED else None
    ns = create_namespace(nsid, size, lba_size, directory=c.ns_dir, csi=csi, zoned=zoned, fmt=fmt)
    state.allocated[nsid] = ns
    state.created.add(nsid)
    log.info("namespace %d created: %r", nsid, ns)
    return nsid


def add(state: ControllerState, hooks: ControllerHooks, ns: Namespace) -> None:
    """The control plane's runtime namespace: allocated and attached in one step."""
    if ns.nsid in state.allocated:
        raise ValueError(f"NSID {ns.nsid} is already allocated")
    if not 0 < ns.nsid <= state.config.max_namespaces:
        raise ValueError(f"NSID {ns.nsid} is outside 1..{state.config.max_namespaces} (NN)")
    state.allocated[ns.nsid] = ns
    attach(state, hooks, ns.nsid)


def attach(state: ControllerState, hooks: ControllerHooks, nsid: int) -> None:
    """Make an allocated namespace active here; the host hears of it."""
    if nsid in state.namespaces:
        raise NvmeError(Status.NAMESPACE_ALREADY_ATTACHED, f"namespace {nsid} is attached")
    state.namespaces[nsid] = ns = state.allocated[nsid]
    namespace_attached(state, hooks, ns)
    log.info("namespace %d attached", nsid)
    namespace_changed(state, hooks, nsid)


def detach(state: ControllerState, hooks: ControllerHooks, nsid: int) -> None:
    """Make a namespace inactive here (it stays allocated, data kept)."""
    if nsid not in state.namespaces:
        raise NvmeError(Status.NAMESPACE_NOT_ATTACHED, f"namespace {nsid} is not attached")
    del state.namespaces[nsid]
    log.info("namespace %d detached", nsid)
    namespace_changed(state, hooks, nsid)


def delete(state: ControllerState, hooks: ControllerHooks, nsid: int) -> None:
    """Detach (if attached) and free a namespace. Its backend closes once no worker call
    can still be using it: at once for RAM, after the I/O pool went idle for files."""
    if nsid in state.namespaces:
        detach(state, hooks, nsid)
    ns = state.allocated.pop(nsid)
    state.created.discard(nsid)
    directory = state.config.ns_dir
    pool = hooks.io_pool() if ns.blocking else None
    if pool is None:
        destroy_namespace(ns, directory=directory)
    else:
        pool.when_idle(lambda: destroy_namespace(ns, directory=directory))
    log.info("namespace %d deleted", nsid)
