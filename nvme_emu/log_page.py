"""Get Log Page (admin opcode 02h): Supported Log Pages, Error Information, SMART / Health,
Firmware Slot, Changed Namespace List, Commands Supported and Effects, Feature Identifiers and
NVMe-MI Commands Supported and Effects, and LBA Status Information; and the I/O Command Set
specific pages of the set CDW14's CSI names (:attr:`nvme_emu.command_set.CommandSet.log_pages`:
the Zoned set's Changed Zone List).

Reading a page with RAE (Retain Asynchronous Event) clear acknowledges its event type. The
SMART / Health page's content is :mod:`nvme_emu.health`'s.
"""

from __future__ import annotations

from . import structures as st
from .async_event import acknowledge
from .command_set import COMMAND_SETS
from .features import SUPPORTED as SUPPORTED_FEATURES
from .health import smart_log
from .lba_status import lba_status_log
from .queue import SubmissionQueue
from .spec.commands import NSID_ALL, AdminOpcode, NvmeError, Status
from .spec.features import FeatureId
from .spec.log_pages import CSE_SHIFT, CommandEffects, EffectsScope, LogPageId
from .sqe import CDW10, CDW11, CDW12, CDW13, CDW14, NSID
from .state import ControllerHooks, ControllerState
from .transfer import to_host

SUPPORTED_LOG_PAGES = (
    LogPageId.SUPPORTED_LOG_PAGES,
    LogPageId.ERROR_INFORMATION,
    LogPageId.SMART_HEALTH,
    LogPageId.FIRMWARE_SLOT,
    LogPageId.CHANGED_NAMESPACE_LIST,
    LogPageId.COMMANDS_SUPPORTED_EFFECTS,
    LogPageId.FEATURE_IDS_EFFECTS,
    LogPageId.NVME_MI_COMMANDS_EFFECTS,
    LogPageId.LBA_STATUS_INFORMATION,
)
#: Format NVM changes blocks, capabilities and inventory of the namespace it names, and is
#: serialised namespace-wide.
FORMAT_EFFECTS = (
    CommandEffects.CSUPP | CommandEffects.LBCC | CommandEffects.NCC | CommandEffects.NIC | 1 << CSE_SHIFT | EffectsScope.NAMESPACE
)
#: Every other admin command acts on this controller (the I/O commands' entries are their
#: command set's: nvme_emu.command_set).
ADMIN_EFFECTS = CommandEffects.CSUPP | EffectsScope.CONTROLLER
#: Features act on the controller; choosing a command set profile changes its capabilities.
FEATURE_EFFECTS = CommandEffects.CSUPP | EffectsScope.CONTROLLER
FEATURE_EFFECTS_BY_FID = {FeatureId.IO_COMMAND_SET_PROFILE: FEATURE_EFFECTS | CommandEffects.CCC}


#: Namespace Management and Attachment change the namespace inventory (a host rescans); they
#: act on the NVM subsystem's namespaces, not on one namespace or controller.
NAMESPACE_INVENTORY_EFFECTS = CommandEffects.CSUPP | CommandEffects.NCC | CommandEffects.NIC | EffectsScope.NVM_SUBSYSTEM


def get_log_page(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """Copy [offset, offset + NUMD dwords) of the page to the host, zero-padded."""
    lid, lsp, rae = e[CDW10] & 0xFF, (e[CDW10] >> 8) & 0x7F, bool(e[CDW10] & (1 << 15))
    numd = ((e[CDW11] & 0xFFFF) << 16 | (e[CDW10] >> 16)) + 1
    offset = e[CDW13] << 32 | e[CDW12]
    csi = e[CDW14] >> 24
    if offset & 3:
        raise NvmeError(Status.INVALID_FIELD, "log page offset not dword aligned")
    page = log_page(state, lid, e[NSID], lsp, csi)
    if offset > len(page):
        raise NvmeError(Status.INVALID_FIELD, f"offset {offset} beyond log page {lid:#x}")
    to_host(state, e, page[offset:], numd * 4)
    if not rae:
        acknowledge(state, hooks, lid)
    return 0


def log_page(state: ControllerState, lid: int, nsid: int, lsp: int, csi: int) -> bytes:
    """The whole log page ``lid`` (reading the Changed Namespace List empties it)."""
    command_set = COMMAND_SETS.get(csi)
    set_pages = command_set.log_pages if command_set is not None else {}
    if lid == LogPageId.SUPPORTED_LOG_PAGES:
        return st.build_supported_log_pages([*SUPPORTED_LOG_PAGES, *set_pages])
    if lid == LogPageId.ERROR_INFORMATION:
        return error_information(state)
    if lid == LogPageId.SMART_HEALTH:
        if nsid not in (0, NSID_ALL):
            raise NvmeError(Status.INVALID_FIELD, "SMART is per controller (LPA bit 0 clear)")
        return smart_log(state)
    if lid == LogPageId.FIRMWARE_SLOT:
        return st.build_firmware_slot_log(afi=1, frs=[state.config.firmware])
    if lid == LogPageId.CHANGED_NAMESPACE_LIST:
        data = st.build_changed_ns_list(state.events.changed_nsids)
        state.events.changed_nsids.clear()
        return data
    if lid == LogPageId.COMMANDS_SUPPORTED_EFFECTS:
        return commands_effects(state, csi)
    if lid == LogPageId.FEATURE_IDS_EFFECTS:
        return st.build_feature_ids_effects_log(feature_effects())
    if lid == LogPageId.NVME_MI_COMMANDS_EFFECTS:
        return st.build_nvme_mi_effects_log({})  # no NVMe-MI command is supported in-band
    if lid == LogPageId.LBA_STATUS_INFORMATION:
        return lba_status_log(state)
    page = set_pages.get(lid)
    if page is not None:
        return page(state, nsid)
    raise NvmeError(Status.INVALID_LOG_PAGE, f"log page {lid:#x} (CSI {csi:#x})")


def error_information(state: ControllerState) -> bytes:
    """Newest entry first, then zeroed entries up to ELPE + 1."""
    entries = [
        st.build_error_log_entry(error_count=x["error_count"], sqid=x["sqid"], cid=x["cid"], status=x["status_field"] << 1, nsid=x["nsid"], lba=x["lba"])
        for x in state.error_log.entries
    ]
    return b"".join(entries).ljust(64 * state.config.error_log_entries, b"\0")


def commands_effects(state: ControllerState, csi: int) -> bytes:
    """CSUPP and scope for every opcode the controller dispatches: the admin commands, and
    the I/O commands of the command set CDW14's CSI names. A set this controller lacks has
    none (as QEMU's hw/nvme answers; the log itself is not refused)."""
    admin = {op: ADMIN_EFFECTS for op in state.admin_opcodes}
    if AdminOpcode.FORMAT_NVM in admin:
        admin[AdminOpcode.FORMAT_NVM] = FORMAT_EFFECTS
    for op in (AdminOpcode.NAMESPACE_MANAGEMENT, AdminOpcode.NAMESPACE_ATTACHMENT):
        if op in admin:
            admin[op] = NAMESPACE_INVENTORY_EFFECTS
    command_set = COMMAND_SETS.get(csi)
    return st.build_commands_effects_log(admin, command_set.effects if command_set is not None else {})


def feature_effects() -> dict[int, int]:
    """FSUPP and scope for every feature Get/Set Features serves (log 12h)."""
    return {fid: FEATURE_EFFECTS_BY_FID.get(fid, FEATURE_EFFECTS) for fid in SUPPORTED_FEATURES}
