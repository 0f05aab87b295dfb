"""The Zoned command set as the admin spec areas see it, in-process: Identify (CNS 00h, 03h, 05h
and 06h with CSI 02h, 1Ch, OAES), the Commands Supported and Effects log for CSI 02h, the
Changed Zone List log and the Zone Descriptor Changed notice, Namespace Management creating
a zoned namespace, Format NVM, and the control plane's view of a zoned namespace."""

from __future__ import annotations

import dataclasses
import struct

from nvme_emu import structures as st
from nvme_emu.command_set import IO_COMMAND_SET_COMBINATIONS
from nvme_emu.control import ControlPlane, describe_namespace
from nvme_emu.controller import ControllerConfig
from nvme_emu.format_nvm import format_nvm
from nvme_emu.namespace import LBA_FORMATS
from nvme_emu.function import NvmeFunction
from nvme_emu.namespace_spec import open_namespace
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.events import AsyncEventConfig, AsyncEventNotice, AsyncEventType
from nvme_emu.spec.identify import Cns, Csi, IoCommandSetVector, NsIdType, Oaes
from nvme_emu.spec.log_pages import CommandEffects, EffectsScope, LogPageId
from nvme_emu.spec.zns import CHANGED_ZONE_LIST_OVERFLOW, RESOURCES_NO_LIMIT, Ozcs, ZnsOpcode, ZoneState
from nvme_emu.zoned.geometry import DEFAULT_ZONE_SIZE
from nvme_emu.zoned.structures import IdentifyControllerZns, IdentifyNamespaceZns

from ..nvme_areas.area_helpers import status_of
from ..nvme_areas.test_area_identify import run_identify
from ..nvme_areas.test_area_log_page import read_log
from ..nvme_areas.test_area_namespace_management import ATTACH, attachment, create
from .area import GEOMETRY, ZNSID, ZONE_LBAS, ZONES, Zoned, make_zoned

# -- Identify ------------------------------------------------------------------------------------


def test_identify_namespace_zns(zoned: Zoned):
    page = IdentifyNamespaceZns.parse(run_identify(zoned.area, Cns.IOCS_NAMESPACE, nsid=ZNSID, csi=Csi.ZONED))
    assert (page.zoc, page.ozcs) == (0, 0)
    assert page.mar == page.mor == RESOURCES_NO_LIMIT
    n = len(LBA_FORMATS)  # one extension per LBA format the namespace lists
    assert [f.zsze for f in page.lbafe[:n]] == [ZONE_LBAS] * n and page.lbafe[n].zsze == 0
    assert all(f.zdes == 0 for f in page.lbafe)
    # the NVM page too (CSI 00h): the set is built on NVM
    assert run_identify(zoned.area, Cns.IOCS_NAMESPACE, nsid=ZNSID, csi=Csi.NVM) == st.build_identify_namespace_nvm()
    # an NVM namespace has no zoned page
    assert status_of(lambda: run_identify(zoned.area, Cns.IOCS_NAMESPACE, nsid=1, csi=Csi.ZONED)) == Status.INVALID_FIELD


def test_identify_namespace_zns_limits_and_razb(guest):
    z = make_zoned(guest, dataclasses.replace(GEOMETRY, max_open=3, max_active=5, cross_read=True))
    page = IdentifyNamespaceZns.parse(run_identify(z.area, Cns.IOCS_NAMESPACE, nsid=ZNSID, csi=Csi.ZONED))
    assert (page.mor, page.mar, page.ozcs) == (2, 4, Ozcs.RAZB)  # 0's based


def test_identify_controller_zns_and_the_common_pages(zoned: Zoned):
    assert IdentifyControllerZns.parse(run_identify(zoned.area, Cns.IOCS_CONTROLLER, csi=Csi.ZONED)).zasl == 0
    ns = st.IdentifyNamespace.parse(run_identify(zoned.area, Cns.NAMESPACE, nsid=ZNSID))
    assert ns.nsze == ns.ncap == ZONES * ZONE_LBAS  # whole zones
    descs = dict(st.parse_ns_id_descriptors(run_identify(zoned.area, Cns.NS_ID_DESCRIPTOR_LIST, nsid=ZNSID)))
    assert descs[NsIdType.CSI] == bytes([Csi.ZONED])
    vectors = st.IdentifyIoCommandSet.parse(run_identify(zoned.area, Cns.IO_COMMAND_SET)).vectors
    assert vectors[0] == IoCommandSetVector.NVM | IoCommandSetVector.ZONED and not any(vectors[1:])
    assert IO_COMMAND_SET_COMBINATIONS == (vectors[0],)
    assert st.IdentifyController.parse(run_identify(zoned.area, Cns.CONTROLLER)).oaes & Oaes.ZONE_DESCRIPTOR_CHANGED
    nsids = [n for n in st.NsidList.parse(run_identify(zoned.area, Cns.IOCS_ACTIVE_NSID_LIST, csi=Csi.ZONED)).nsids if n]
    assert nsids == [ZNSID]


# -- Commands Supported and Effects ------------------------------------------------------------


def test_effects_log_for_csi_02h(zoned: Zoned):
    log = st.CommandsEffectsLog.parse(read_log(zoned.area, LogPageId.COMMANDS_SUPPORTED_EFFECTS, csi=Csi.ZONED))
    supported = {op for op, v in enumerate(log.iocs) if v}
    assert supported == {NvmOpcode.FLUSH, NvmOpcode.WRITE, NvmOpcode.READ, NvmOpcode.COMPARE, NvmOpcode.WRITE_ZEROES,
                         NvmOpcode.DATASET_MANAGEMENT, NvmOpcode.VERIFY, NvmOpcode.COPY,
                         ZnsOpcode.ZONE_MANAGEMENT_SEND, ZnsOpcode.ZONE_MANAGEMENT_RECEIVE, ZnsOpcode.ZONE_APPEND}
    lbcc = CommandEffects.CSUPP | CommandEffects.LBCC | EffectsScope.NAMESPACE
    plain = CommandEffects.CSUPP | EffectsScope.NAMESPACE
    for op in (NvmOpcode.WRITE, ZnsOpcode.ZONE_APPEND, ZnsOpcode.ZONE_MANAGEMENT_SEND, NvmOpcode.COPY):
        assert log.iocs[op] == lbcc
    for op in (NvmOpcode.READ, ZnsOpcode.ZONE_MANAGEMENT_RECEIVE, NvmOpcode.FLUSH):
        assert log.iocs[op] == plain
    assert not log.iocs[NvmOpcode.WRITE_UNCORRECTABLE]
    # the table the dispatcher holds is exactly what the log names
    assert set(zoned.nvm.tables[Csi.ZONED]) | {NvmOpcode.FLUSH} == supported


# -- Changed Zone List and Zone Descriptor Changed ---------------------------------------------


def changed_zone_list(zoned: Zoned, *, nsid: int = ZNSID, rae: bool = False) -> tuple[int, list[int]]:
    data = read_log(zoned.area, LogPageId.CHANGED_ZONE_LIST, nsid=nsid, csi=Csi.ZONED, rae=rae)
    (count,) = struct.unpack_from("<H", data)
    return count, [zid for zid in struct.unpack_from("<511Q", data, 8) if zid]


def notices(zoned: Zoned) -> list[tuple]:
    return zoned.area.record.named("async_event")


def test_make_offline_raises_the_notice_and_fills_the_log(zoned: Zoned):
    """What the control plane's fault injection calls: the host hears of it."""
    state = zoned.area.state
    state.features.async_event_config = AsyncEventConfig.ZONE_DESCRIPTOR_CHANGED
    assert zoned.zones.make_offline(3)
    assert notices(zoned) == [(AsyncEventType.NOTICE, AsyncEventNotice.ZONE_DESCRIPTOR_CHANGED, LogPageId.CHANGED_ZONE_LIST)]
    assert zoned.zones.make_read_only(5)
    assert changed_zone_list(zoned) == (2, [zoned.zslba(3), zoned.zslba(5)])
    assert changed_zone_list(zoned) == (0, [])  # reading the log empties it
    assert zoned.zones.zones[3].state == ZoneState.OFFLINE


def test_notice_only_while_enabled_but_the_log_always(zoned: Zoned):
    assert zoned.area.state.features.async_event_config & AsyncEventConfig.ZONE_DESCRIPTOR_CHANGED == 0
    zoned.zones.make_offline(1)
    assert notices(zoned) == []
    assert changed_zone_list(zoned) == (1, [zoned.zslba(1)])


def test_notice_is_acknowledged_by_reading_the_log(zoned: Zoned):
    """The notice type stays masked after the event until the host reads BFh with RAE clear."""
    state = zoned.area.state
    state.features.async_event_config = AsyncEventConfig.ZONE_DESCRIPTOR_CHANGED
    state.events.masked_types.add(AsyncEventType.NOTICE)
    changed_zone_list(zoned, rae=True)
    assert AsyncEventType.NOTICE in state.events.masked_types
    changed_zone_list(zoned)
    assert AsyncEventType.NOTICE not in state.events.masked_types


def test_no_notice_for_a_detached_namespace(zoned: Zoned):
    state = zoned.area.state
    state.features.async_event_config = AsyncEventConfig.ZONE_DESCRIPTOR_CHANGED
    del state.namespaces[ZNSID]
    zoned.zones.make_offline(0)
    assert notices(zoned) == []


def test_changed_zone_list_overflow_and_refusals(zoned: Zoned):
    changed = zoned.zones.changed
    for i in range(511):  # what the log holds
        changed.add(i * ZONE_LBAS)
    count, zids = changed_zone_list(zoned, rae=True)
    assert count == 511 and zids[:2] == [ZONE_LBAS, 2 * ZONE_LBAS]  # (zone 0's ZSLBA is 0: not told apart from padding)
    for i in range(512):
        changed.add(i * ZONE_LBAS)
    assert changed_zone_list(zoned) == (CHANGED_ZONE_LIST_OVERFLOW, [])  # the host must report all zones
    # an NVM namespace has no such log; an inactive NSID is Invalid Namespace; another CSI has none
    assert status_of(lambda: changed_zone_list(zoned, nsid=1)) == Status.INVALID_FIELD
    assert status_of(lambda: changed_zone_list(zoned, nsid=9)) == Status.INVALID_NAMESPACE_OR_FORMAT
    assert status_of(lambda: read_log(zoned.area, LogPageId.CHANGED_ZONE_LIST, nsid=ZNSID, csi=Csi.NVM)) == Status.INVALID_LOG_PAGE


def test_supported_log_pages_per_csi(zoned: Zoned):
    zoned_pages = st.SupportedLogPages.parse(read_log(zoned.area, LogPageId.SUPPORTED_LOG_PAGES, csi=Csi.ZONED)).lids
    nvm_pages = st.SupportedLogPages.parse(read_log(zoned.area, LogPageId.SUPPORTED_LOG_PAGES, csi=Csi.NVM)).lids
    assert zoned_pages[LogPageId.CHANGED_ZONE_LIST] and not nvm_pages[LogPageId.CHANGED_ZONE_LIST]


# -- Namespace Management and Format NVM ---------------------------------------------------------


def test_namespace_management_creates_a_zoned_namespace(zoned: Zoned):
    area = zoned.area
    area.state.features.async_event_config = AsyncEventConfig.ZONE_DESCRIPTOR_CHANGED
    small = create(area, 64, csi=Csi.ZONED)  # 32 KiB: one zone of all of it
    ns = area.state.allocated[small]
    assert ns.csi == Csi.ZONED and ns.zones is not None
    assert (ns.zones.num_zones, ns.zones.zone_size, ns.nsze) == (1, 64, 64)
    big = create(area, (DEFAULT_ZONE_SIZE >> 9) * 2 + 100, csi=Csi.ZONED)  # two default zones and a tail
    ns = area.state.allocated[big]
    assert ns.zones is not None and (ns.zones.num_zones, ns.zones.zone_size << 9) == (2, DEFAULT_ZONE_SIZE)
    assert ns.nsze == 2 * (DEFAULT_ZONE_SIZE >> 9)
    # once attached, its zone changes reach the host
    attachment(area, big, ATTACH)
    ns.zones.make_offline(1)
    assert notices(zoned)[-1][1] == AsyncEventNotice.ZONE_DESCRIPTOR_CHANGED


def test_format_nvm_of_a_zoned_namespace_is_invalid_format(zoned: Zoned):
    assert status_of(lambda: zoned.area.run(format_nvm, opc=AdminOpcode.FORMAT_NVM, nsid=ZNSID, cdw10=0)) == Status.INVALID_FORMAT
    assert status_of(lambda: zoned.area.run(format_nvm, opc=AdminOpcode.FORMAT_NVM, nsid=1, cdw10=0)) == Status.SUCCESS


# -- the control plane ---------------------------------------------------------------------------


def test_control_plane_adds_and_describes_zoned_namespaces(tmp_path):
    config = ControllerConfig(serial="NVMEEMU00000001")
    function = NvmeFunction([open_namespace("ram:size=1M", 1)], config, doorbell="trap")
    try:
        ctl = ControlPlane(function)
        added = ctl.ns_add(f"file:{tmp_path / 'z.img'},size=1M,zoned,zone_size=256K,zone_cap=192K,max_open=2,max_active=3")
        assert (added["nsid"], added["csi"], added["size_bytes"]) == (2, Csi.ZONED, 1 << 20)
        ns = function.controller.state.namespaces[2]
        assert ns.zones is not None
        # what `nvme-emu ctl namespaces` shows
        ns.zones.write(0, 8)
        ns.zones.append(512, 4)
        ns.zones.send(4, 0)  # reset zone 0
        zones = ctl.namespaces()[1]["zones"]
        assert zones["zones"] == 4 and zones["zone_size_bytes"] == 256 << 10 and zones["zone_capacity_bytes"] == 192 << 10
        assert (zones["zones_empty"], zones["zones_implicitly_opened"], zones["open"], zones["active"]) == (3, 1, 1, 1)
        assert (zones["appends"], zones["resets"], zones["max_open"], zones["max_active"]) == (1, 1, 2, 3)
        assert "zones" not in ctl.namespaces()[0] and ctl.namespaces()[0]["csi"] == Csi.NVM
        # its zone changes reach the host (the notice, once enabled; no AER is outstanding: it waits)
        state = function.controller.state
        state.features.async_event_config = AsyncEventConfig.ZONE_DESCRIPTOR_CHANGED
        assert ns.zones.make_offline(3)
        assert (AsyncEventType.NOTICE, AsyncEventNotice.ZONE_DESCRIPTOR_CHANGED, LogPageId.CHANGED_ZONE_LIST) in state.events.queued
        assert describe_namespace(ns, True)["zones"]["zones_offline"] == 1
    finally:
        function.close()
