"""Get Log Page (02h) in-process: page contents from the state, offsets, RAE, failures."""

from __future__ import annotations

import struct

from .area_helpers import BUF, Area, status_of

from nvme_emu import structures as st
from nvme_emu.log_page import get_log_page
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, NvmeError, Status
from nvme_emu.spec.features import TEMP_OVER, FeatureId
from nvme_emu.spec.identify import Csi
from nvme_emu.spec.log_pages import CommandEffects, CriticalWarning, EffectsScope, LogPageId


def read_log(area: Area, lid: int, length: int = 4096, *, offset: int = 0, nsid: int = 0, rae: bool = False, csi: int = 0) -> bytes:
    numd = length // 4 - 1
    area.run(
        get_log_page,
        opc=AdminOpcode.GET_LOG_PAGE,
        nsid=nsid,
        prp1=BUF,
        prp2=BUF + 4096,
        cdw10=lid | (1 << 15 if rae else 0) | (numd & 0xFFFF) << 16,
        cdw11=numd >> 16,
        cdw12=offset & 0xFFFFFFFF,
        cdw13=offset >> 32,
        cdw14=csi << 24,
    )
    return area.guest.read(BUF, length)


def test_supported_log_pages_lists_what_is_served(area: Area):
    lids = struct.unpack("<256I", read_log(area, LogPageId.SUPPORTED_LOG_PAGES, 1024))
    served = [lid for lid, v in enumerate(lids) if v & 1]
    assert served == [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x0E, 0x12, 0x13]
    for lid in served:  # every listed page is readable
        assert status_of(lambda lid=lid: read_log(area, lid, 512)) == Status.SUCCESS


def test_error_information_newest_first(area: Area):
    area.state.record_error(0, 5, NvmeError(Status.INVALID_FIELD), nsid=1)
    area.state.record_error(1, 6, NvmeError(Status.LBA_OUT_OF_RANGE), nsid=1, lba=99)
    data = read_log(area, LogPageId.ERROR_INFORMATION, 128)
    newest, older = st.ErrorLogEntry.parse(data[:64]), st.ErrorLogEntry.parse(data[64:])
    assert (newest.error_count, newest.sqid, newest.cid, newest.lba) == (2, 1, 6, 99)
    assert newest.status >> 1 & 0x7FF == Status.LBA_OUT_OF_RANGE
    assert (older.error_count, older.cid) == (1, 5)


def test_smart_counts_io_and_media_errors(area: Area):
    ns = area.state.namespaces[1]
    ns.stats.read_commands, ns.stats.bytes_read = 3, 3 * 512_000
    area.state.record_error(1, 1, NvmeError(Status.UNRECOVERED_READ_ERROR), nsid=1)
    smart = st.SmartLog.parse(read_log(area, LogPageId.SMART_HEALTH, 512))
    assert smart.host_read_commands == 3 and smart.data_units_read == 3
    assert smart.media_errors == 1 and smart.num_error_log_entries == 1
    assert smart.composite_temperature == area.state.config.temperature_kelvin
    assert smart.critical_warning == 0


def test_smart_temperature_warning_follows_threshold(area: Area):
    area.state.features.temp_thresholds[(0, TEMP_OVER)] = area.state.config.temperature_kelvin
    smart = st.SmartLog.parse(read_log(area, LogPageId.SMART_HEALTH, 512))
    assert smart.critical_warning & CriticalWarning.TEMPERATURE


def test_smart_is_per_controller(area: Area):
    assert status_of(lambda: read_log(area, LogPageId.SMART_HEALTH, 512, nsid=1)) == Status.INVALID_FIELD


def test_changed_namespace_list_empties_when_read(area: Area):
    area.state.events.changed_nsids.update({3, 1})
    assert struct.unpack_from("<3I", read_log(area, LogPageId.CHANGED_NAMESPACE_LIST)) == (1, 3, 0)
    assert read_log(area, LogPageId.CHANGED_NAMESPACE_LIST) == bytes(4096)


def test_commands_effects(area: Area):
    log = st.CommandsEffectsLog.parse(read_log(area, LogPageId.COMMANDS_SUPPORTED_EFFECTS, csi=Csi.NVM))
    assert log.acs[AdminOpcode.IDENTIFY] == CommandEffects.CSUPP | EffectsScope.CONTROLLER
    assert log.acs[AdminOpcode.FORMAT_NVM] & CommandEffects.LBCC
    assert log.acs[AdminOpcode.NAMESPACE_MANAGEMENT] & CommandEffects.NIC
    assert log.acs[AdminOpcode.NAMESPACE_MANAGEMENT] & EffectsScope.NVM_SUBSYSTEM
    assert log.acs[AdminOpcode.VIRTUALIZATION_MANAGEMENT] == 0
    assert log.iocs[NvmOpcode.READ] == CommandEffects.CSUPP | EffectsScope.NAMESPACE
    assert log.iocs[NvmOpcode.FLUSH] == CommandEffects.CSUPP | EffectsScope.NAMESPACE
    assert log.iocs[NvmOpcode.WRITE] == CommandEffects.CSUPP | CommandEffects.LBCC | EffectsScope.NAMESPACE
    other = st.CommandsEffectsLog.parse(read_log(area, LogPageId.COMMANDS_SUPPORTED_EFFECTS, csi=1))
    assert not any(other.iocs) and other.acs[AdminOpcode.IDENTIFY]


def test_offset_and_length(area: Area):
    area.state.events.changed_nsids.update({1, 2})
    data = read_log(area, LogPageId.CHANGED_NAMESPACE_LIST, 8, offset=4)
    assert struct.unpack("<2I", data) == (2, 0)
    assert status_of(lambda: read_log(area, LogPageId.FIRMWARE_SLOT, 8, offset=2)) == Status.INVALID_FIELD
    assert status_of(lambda: read_log(area, LogPageId.FIRMWARE_SLOT, 8, offset=1 << 20)) == Status.INVALID_FIELD


def test_length_beyond_mdts_is_refused_before_allocating(area: Area):
    too_long = area.state.config.max_transfer + 4096
    assert status_of(lambda: read_log(area, LogPageId.ERROR_INFORMATION, too_long)) == Status.INVALID_FIELD


def test_unknown_log_page(area: Area):
    assert status_of(lambda: read_log(area, LogPageId.TELEMETRY_HOST)) == Status.INVALID_LOG_PAGE


def test_every_supported_command_has_exactly_one_scope(area: Area):
    log = st.CommandsEffectsLog.parse(read_log(area, LogPageId.COMMANDS_SUPPORTED_EFFECTS, csi=Csi.NVM))
    for entry in [*log.acs, *log.iocs]:
        if entry & CommandEffects.CSUPP:
            assert bin(entry >> 20).count("1") == 1, hex(entry)
    assert log.acs[AdminOpcode.FORMAT_NVM] & EffectsScope.NAMESPACE


def test_feature_ids_effects_lists_the_features_served(area: Area):
    from nvme_emu.features import SUPPORTED

    log = st.FeatureIdsEffectsLog.parse(read_log(area, LogPageId.FEATURE_IDS_EFFECTS, 1024))
    served = {fid for fid, v in enumerate(log.fis) if v & CommandEffects.CSUPP}
    assert served == set(SUPPORTED) and FeatureId.TEMPERATURE_THRESHOLD in served
    assert log.fis[FeatureId.TIMESTAMP] == CommandEffects.CSUPP | EffectsScope.CONTROLLER
    assert log.fis[FeatureId.LBA_RANGE_TYPE] == 0


def test_nvme_mi_effects_is_served_and_empty(area: Area):
    assert read_log(area, LogPageId.NVME_MI_COMMANDS_EFFECTS, 4096) == bytes(4096)
