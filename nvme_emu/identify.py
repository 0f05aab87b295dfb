"""Identify (admin opcode 06h): the controller, namespace and list data structures by CNS.

Every CNS returns one 4 KiB data structure through the command's PRPs.
"""

from __future__ import annotations

from typing import Mapping

from . import structures as st
from .command_set import IO_COMMAND_SET_COMBINATIONS, command_set
from .namespace import LBA_FORMATS, Namespace
from .queue import SubmissionQueue
from .spec.commands import CQES_LOG2, NSID_ALL, SQES_LOG2, NvmeError, Status
from .spec.identify import OCFS_FORMAT0, Cns, Ctratt, Dpc, Lpa, Mc, Oacs, Oaes, Oncs, Sgls, Vwc
from .sqe import CDW10, CDW11, NSID
from .state import ControllerHooks, ControllerState
from .transfer import to_host

IDENTIFY_SIZE = 4096


def identify(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """Build the structure CNS (and CSI) name and copy it to the host."""
    data = identify_data(state, e[CDW10] & 0xFF, e[NSID], e[CDW11] >> 24, cntid=e[CDW10] >> 16)
    to_host(state, e, data, IDENTIFY_SIZE)
    return 0


def identify_data(state: ControllerState, cns: int, nsid: int, csi: int, cntid: int = 0) -> bytes:
    """The Identify data structure for ``cns``, or the status the spec names for it."""
    if cns == Cns.CONTROLLER:
        return identify_controller(state)
    if cns == Cns.NAMESPACE:
        return _identify_namespace(state, nsid)
    if cns in (Cns.ACTIVE_NSID_LIST, Cns.IOCS_ACTIVE_NSID_LIST):
        return _nsid_list(state.namespaces, nsid, csi if cns == Cns.IOCS_ACTIVE_NSID_LIST else None)
    if cns == Cns.NS_ID_DESCRIPTOR_LIST:
        return state.active_namespace(nsid).identify_ns_descriptors()
    if cns == Cns.IOCS_NAMESPACE:
        return _iocs_namespace(state.active_namespace(nsid), csi)
    if cns == Cns.IOCS_CONTROLLER:
        return command_set(csi).controller_page(state)
    if cns == Cns.IOCS_INDEPENDENT_NAMESPACE:
        return state.active_namespace(nsid).identify_namespace_independent()
    if cns == Cns.IO_COMMAND_SET:
        return st.build_identify_io_command_set(IO_COMMAND_SET_COMBINATIONS)
    if cns in NAMESPACE_MANAGEMENT_CNS:
        return _namespace_management_data(state, cns, nsid, csi, cntid)
    raise NvmeError(Status.INVALID_FIELD, f"CNS {cns:#x} not supported")


def _nsid_list(namespaces: Mapping[int, Namespace], above: int, csi: int | None) -> bytes:
    """An active or allocated NSID list above ``above``; ``csi`` for the per-command-set
    lists: the namespaces of that set (a set this controller lacks: Invalid Field)."""
    if csi is not None:
        command_set(csi)  # one this controller lacks: Invalid Field
    if above in (NSID_ALL, NSID_ALL - 1):
        raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"nsid {above:#x} for a list")
    nsids = namespaces if csi is None else [nsid for nsid, ns in namespaces.items() if ns.csi == csi]
    return st.build_nsid_list(nsids, greater_than=above)


def _iocs_namespace(ns: Namespace, csi: int) -> bytes:
    """CNS 05h (and 1Bh): the namespace's page for command set ``csi``, which its own set
    names (Invalid Field for a set the namespace is not associated with, as QEMU's hw/nvme)."""
    command_set(csi)  # one this controller lacks: Invalid Field
    page = command_set(ns.csi).namespace_pages.get(csi)
    if page is None:
        raise NvmeError(Status.INVALID_FIELD, f"namespace {ns.nsid} has no command set {csi:#x} data")
    return page(ns)


#: The CNS values Namespace Management brings: allocated namespaces and controller lists.
NAMESPACE_MANAGEMENT_CNS = frozenset(
    {Cns.ALLOCATED_NSID_LIST, Cns.ALLOCATED_NAMESPACE, Cns.NS_ATTACHED_CONTROLLER_LIST, Cns.CONTROLLER_LIST,
     Cns.IOCS_ALLOCATED_NSID_LIST, Cns.IOCS_ALLOCATED_NAMESPACE}
)


def _namespace_management_data(state: ControllerState, cns: int, nsid: int, csi: int, cntid: int) -> bytes:
    """Allocated NSID lists and namespaces (attached or not), and controller lists."""
    if cns in (Cns.ALLOCATED_NSID_LIST, Cns.IOCS_ALLOCATED_NSID_LIST):
        return _nsid_list(state.allocated, nsid, csi if cns == Cns.IOCS_ALLOCATED_NSID_LIST else None)
    if cns in (Cns.ALLOCATED_NAMESPACE, Cns.IOCS_ALLOCATED_NAMESPACE):
        if cns == Cns.IOCS_ALLOCATED_NAMESPACE:
            command_set(csi)  # before the NSID: an unallocated one reads as zeroes
        ns = state.allocated.get(nsid)
        if ns is not None:
            return ns.identify_namespace() if cns == Cns.ALLOCATED_NAMESPACE else _iocs_namespace(ns, csi)
        if 0 < nsid <= state.config.max_namespaces:
            return bytes(IDENTIFY_SIZE)  # an unallocated ID reads as zeroes
        raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid}")
    if cns == Cns.NS_ATTACHED_CONTROLLER_LIST:
        if nsid not in state.allocated:
            raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid} is not allocated")
        cntlids = [state.config.controller_id] if nsid in state.namespaces else []
        return st.build_controller_list(cntlids, at_least=cntid)
    return st.build_controller_list([state.config.controller_id], at_least=cntid)  # CONTROLLER_LIST: the subsystem's


def _identify_namespace(state: ControllerState, nsid: int) -> bytes:
    if nsid == NSID_ALL:
        # The format common to all namespaces: what a new namespace would get.
        return st.build_identify_namespace(lbaf=[(f.ms, f.lbads, f.rp) for f in LBA_FORMATS], flbas=0,
                                           mc=Mc.EXTENDED | Mc.SEPARATE, dpc=Dpc.ALL)
    ns = state.namespaces.get(nsid)
    if ns is None:
        if 0 < nsid <= state.config.max_namespaces:
            return bytes(IDENTIFY_SIZE)  # allocated-but-inactive IDs read as zeroes
        raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid}")
    return ns.identify_namespace()


def identify_controller(state: ControllerState) -> bytes:
    """Identify Controller: what this controller supports, from its configuration."""
    c = state.config
    oacs = Oacs.FORMAT_NVM | Oacs.NAMESPACE_MANAGEMENT | Oacs.GET_LBA_STATUS | (Oacs.DOORBELL_BUFFER_CONFIG if c.shadow_doorbells else 0)
    oncs = Oncs.COMPARE | Oncs.WRITE_UNCORRECTABLE | Oncs.DATASET_MANAGEMENT | Oncs.WRITE_ZEROES | Oncs.TIMESTAMP | Oncs.VERIFY | Oncs.COPY
    return st.build_identify_controller(
        vid=c.pci_vendor,
        ssvid=c.pci_vendor,
        sn=c.serial,
        mn=c.model,
        fr=c.firmware,
        mdts=c.mdts,
        cntlid=c.controller_id,
        ver=state.vs,
        # Extended LBA Formats Supported: the host reads each namespace's ELBAF (CNS 05h), where
        # Linux learns a format's guard (nvme_init_ms: without it, it assumes 16b Guard PI)
        ctratt=Ctratt.EXTENDED_LBA_FORMATS,
        oaes=Oaes.NAMESPACE_ATTRIBUTE | Oaes.LBA_STATUS | Oaes.ZONE_DESCRIPTOR_CHANGED,
        oacs=oacs,
        acl=c.acl,
        aerl=c.aerl,
        lpa=Lpa.COMMANDS_EFFECTS | Lpa.EXTENDED_DATA | Lpa.MISC_LOG_PAGES,
        elpe=c.error_log_entries - 1,
        sqes=(SQES_LOG2 << 4) | SQES_LOG2,
        cqes=(CQES_LOG2 << 4) | CQES_LOG2,
        maxcmd=c.max_queue_entries,
        nn=c.max_namespaces,
        mnan=c.max_namespaces,
        tnvmcap=total_capacity(state),
        unvmcap=unallocated_capacity(state),
        oncs=oncs,
        ocfs=OCFS_FORMAT0,
        vwc=(Vwc.PRESENT | Vwc.FLUSH_BROADCAST_SUPPORTED) if c.volatile_write_cache else 0,
        sgls=Sgls.SUPPORTED_NO_ALIGNMENT | Sgls.BIT_BUCKET,
        subnqn=st.subsystem_nqn(c.serial),
        # CRD = 1 in a transient failure's status means this delay (features.py: ACRE)
        crdt1=c.command_retry_delay_100ms,
    )


def total_capacity(state: ControllerState) -> int:
    """TNVMCAP in bytes: the host's budget for Namespace Management plus the namespaces the
    operator gave, so that TNVMCAP - UNVMCAP is what namespaces hold, as the spec has it."""
    given = sum(ns.size_bytes for nsid, ns in state.allocated.items() if nsid not in state.created)
    return state.config.nvm_capacity + given


def unallocated_capacity(state: ControllerState) -> int:
    """UNVMCAP: what Namespace Management may still allocate, in bytes (the namespaces it
    created count against it, the operator's do not)."""
    used = sum(state.allocated[nsid].size_bytes for nsid in state.created)
    return max(0, state.config.nvm_capacity - used)
