"""The command-set seam in-process (nvme_emu.command_set): the registry by CSI, and what each
spec area asks of it: the effects log per CSI, Identify CNS 05h/06h/07h, Namespace
Management's CSI, the namespace's CSI descriptor, and I/O dispatch through the namespace's set.

A set is one registry entry away: ``second_set`` registers a made-up one under the Key Value
CSI (Read and Write only, its own controller page), so these tests of the seam do not depend
on the Zoned Command Set (tests/zoned has that one's)."""

from __future__ import annotations

from typing import Iterator

import pytest

from .area_helpers import BUF, Area, sqe, status_of
from .test_area_identify import run_identify
from .test_area_log_page import read_log
from .test_area_namespace_management import create

from nvme_emu import structures as st
from nvme_emu.backends.ram import RamBackend
from nvme_emu.command_set import COMMAND_SETS, IO_COMMAND_SET_COMBINATIONS, NVM, ZONED, CommandSet, command_set, io_effects
from nvme_emu.namespace import Namespace
from nvme_emu.nvm import NvmCommands
from nvme_emu.spec.commands import NSID_ALL, NvmOpcode, NvmeError, Status, status_field
from nvme_emu.spec.identify import Cns, Csi, IoCommandSetVector, NsIdType
from nvme_emu.spec.log_pages import CommandEffects, EffectsScope, LogPageId

SECOND_PAGE = b"\x5a" * 4096  #: the made-up set's CNS 06h, to tell it from NVM's


@pytest.fixture
def second_set(monkeypatch: pytest.MonkeyPatch) -> Iterator[CommandSet]:
    """A made-up command set in the registry (CSI 01h): Read and Write and Flush, LBCC on Write;
    its namespaces answer CNS 05h for NVM (as a set built on NVM does) and for itself."""
    cs = CommandSet(
        csi=Csi.KEY_VALUE,
        vector=IoCommandSetVector.KEY_VALUE,
        effects=io_effects((NvmOpcode.FLUSH, NvmOpcode.READ, NvmOpcode.WRITE), (NvmOpcode.WRITE,)),
        namespace_pages={Csi.NVM: Namespace.identify_namespace_nvm, Csi.KEY_VALUE: lambda ns: bytes([ns.nsid]) * 4096},
        controller_page=lambda state: SECOND_PAGE,
        handlers=lambda nvm: {NvmOpcode.READ: nvm.read, NvmOpcode.WRITE: nvm.write},
    )
    monkeypatch.setitem(COMMAND_SETS, Csi.KEY_VALUE, cs)
    yield cs


def add_namespace(area: Area, nsid: int, csi: Csi) -> Namespace:
    ns = Namespace(nsid, RamBackend(1 << 20), csi=csi)
    area.state.namespaces[nsid] = area.state.allocated[nsid] = ns
    return ns


def bound(area: Area) -> NvmCommands:
    """The I/O dispatcher as the Controller binds it: every registered set's table."""
    nvm = NvmCommands(area.state, area.hooks)
    for cs in COMMAND_SETS.values():
        nvm.bind(cs.csi, cs.handlers(nvm), frozenset(cs.effects), cs.lba_changing)
    return nvm


def nsids(data: bytes) -> list[int]:
    return [nsid for nsid in st.NsidList.parse(data).nsids if nsid]


def io(opc: int, nsid: int, slba: int = 0) -> tuple:
    return sqe(opc, nsid=nsid, prp1=BUF, cdw10=slba)


# -- the registry --------------------------------------------------------------------------------


def test_nvm_is_registered_and_its_effects_are_what_nvm_dispatches(area: Area):
    assert COMMAND_SETS == {Csi.NVM: NVM, Csi.ZONED: ZONED}
    assert IO_COMMAND_SET_COMBINATIONS == (IoCommandSetVector.NVM | IoCommandSetVector.ZONED,)
    assert frozenset(NVM.effects) == NvmCommands(area.state, area.hooks).opcodes
    assert NVM.lba_changing == {NvmOpcode.WRITE, NvmOpcode.WRITE_UNCORRECTABLE, NvmOpcode.WRITE_ZEROES,
                                NvmOpcode.DATASET_MANAGEMENT, NvmOpcode.COPY}
    assert command_set(Csi.NVM) is NVM
    with pytest.raises(NvmeError) as e:
        command_set(0x03, Status.IO_COMMAND_SET_NOT_SUPPORTED)
    assert e.value.status == Status.IO_COMMAND_SET_NOT_SUPPORTED


def test_bind_refuses_a_table_its_effects_do_not_name(area: Area):
    nvm = NvmCommands(area.state, area.hooks)
    with pytest.raises(ValueError, match="effects name"):
        nvm.bind(Csi.KEY_VALUE, {NvmOpcode.READ: nvm.read}, frozenset({NvmOpcode.FLUSH, NvmOpcode.WRITE}), frozenset())


# -- Commands Supported and Effects, per CSI -------------------------------------------------------


def test_effects_log_per_csi(area: Area, second_set: CommandSet):
    log = st.CommandsEffectsLog.parse(read_log(area, LogPageId.COMMANDS_SUPPORTED_EFFECTS, csi=Csi.NVM))
    assert {op for op, v in enumerate(log.iocs) if v} == set(NVM.effects)
    assert log.iocs[NvmOpcode.COPY] == CommandEffects.CSUPP | CommandEffects.LBCC | EffectsScope.NAMESPACE
    second = st.CommandsEffectsLog.parse(read_log(area, LogPageId.COMMANDS_SUPPORTED_EFFECTS, csi=Csi.KEY_VALUE))
    assert {op for op, v in enumerate(second.iocs) if v} == {NvmOpcode.FLUSH, NvmOpcode.READ, NvmOpcode.WRITE}
    assert second.iocs[NvmOpcode.WRITE] & CommandEffects.LBCC and not second.iocs[NvmOpcode.READ] & CommandEffects.LBCC
    assert second.acs == log.acs  # the admin commands do not depend on the CSI


def test_effects_log_of_an_unknown_csi_has_no_io_commands(area: Area):
    """The log is not refused for a CSI the controller lacks: its admin part stands, its I/O
    part is empty (as QEMU's hw/nvme answers)."""
    nvm = st.CommandsEffectsLog.parse(read_log(area, LogPageId.COMMANDS_SUPPORTED_EFFECTS, csi=Csi.NVM))
    for csi in (0x03, Csi.KEY_VALUE, 0xFF):
        log = st.CommandsEffectsLog.parse(read_log(area, LogPageId.COMMANDS_SUPPORTED_EFFECTS, csi=csi))
        assert not any(log.iocs) and log.acs == nvm.acs


# -- Identify --------------------------------------------------------------------------------------


def test_identify_iocs_pages_with_a_wrong_csi_are_invalid_field(area: Area):
    for csi in (0x03, Csi.KEY_VALUE, 0xFF):
        assert status_of(lambda csi=csi: run_identify(area, Cns.IOCS_NAMESPACE, nsid=1, csi=csi)) == Status.INVALID_FIELD
        assert status_of(lambda csi=csi: run_identify(area, Cns.IOCS_CONTROLLER, csi=csi)) == Status.INVALID_FIELD
        assert status_of(lambda csi=csi: run_identify(area, Cns.IOCS_ALLOCATED_NAMESPACE, nsid=1, csi=csi)) == Status.INVALID_FIELD
        assert status_of(lambda csi=csi: run_identify(area, Cns.IOCS_ALLOCATED_NSID_LIST, csi=csi)) == Status.INVALID_FIELD
    # the namespace is checked first, as before the seam
    assert status_of(lambda: run_identify(area, Cns.IOCS_NAMESPACE, nsid=9, csi=0xFF)) == Status.INVALID_NAMESPACE_OR_FORMAT


def test_identify_pages_come_from_the_namespaces_set(area: Area, second_set: CommandSet):
    add_namespace(area, 2, Csi.KEY_VALUE)
    assert run_identify(area, Cns.IOCS_CONTROLLER, csi=Csi.KEY_VALUE) == SECOND_PAGE
    assert run_identify(area, Cns.IOCS_CONTROLLER, csi=Csi.NVM) == st.build_identify_controller_nvm(dmrl=255, dmrsl=0xFFFFFFFF)
    assert run_identify(area, Cns.IOCS_NAMESPACE, nsid=2, csi=Csi.KEY_VALUE) == b"\x02" * 4096
    assert run_identify(area, Cns.IOCS_NAMESPACE, nsid=2, csi=Csi.NVM) == st.build_identify_namespace_nvm()
    assert run_identify(area, Cns.IOCS_ALLOCATED_NAMESPACE, nsid=2, csi=Csi.KEY_VALUE) == b"\x02" * 4096
    # an NVM namespace is not associated with the second set: Invalid Field
    assert status_of(lambda: run_identify(area, Cns.IOCS_NAMESPACE, nsid=1, csi=Csi.KEY_VALUE)) == Status.INVALID_FIELD
    # the per-set NSID lists hold that set's namespaces only
    assert nsids(run_identify(area, Cns.IOCS_ACTIVE_NSID_LIST, csi=Csi.KEY_VALUE)) == [2]
    assert nsids(run_identify(area, Cns.IOCS_ACTIVE_NSID_LIST, csi=Csi.NVM)) == [1]
    assert nsids(run_identify(area, Cns.ACTIVE_NSID_LIST)) == [1, 2]
    # the namespace's CSI descriptor is its set's
    descs = dict(st.parse_ns_id_descriptors(run_identify(area, Cns.NS_ID_DESCRIPTOR_LIST, nsid=2)))
    assert descs[NsIdType.CSI] == bytes([Csi.KEY_VALUE])


# -- Namespace Management ----------------------------------------------------------------------


def test_namespace_management_accepts_the_registered_csis(area: Area, second_set: CommandSet):
    for csi in (0x03, 0x04, 0xFF):
        assert status_of(lambda csi=csi: create(area, 8, csi=csi)) == Status.IO_COMMAND_SET_NOT_SUPPORTED
    assert not area.state.created  # nothing was allocated by a refusal
    nsid = create(area, 8, csi=Csi.KEY_VALUE)
    assert area.state.allocated[nsid].csi == Csi.KEY_VALUE
    assert area.state.allocated[create(area, 8)].csi == Csi.NVM


# -- dispatch ------------------------------------------------------------------------------------


def test_dispatch_goes_through_the_namespaces_set(area: Area, second_set: CommandSet):
    add_namespace(area, 2, Csi.KEY_VALUE)
    nvm = bound(area)
    sq = area.admin_sq
    for nsid in (1, 2):
        assert nvm.execute(sq, io(NvmOpcode.WRITE, nsid)) == (Status.SUCCESS, 0)
        assert nvm.execute(sq, io(NvmOpcode.READ, nsid)) == (Status.SUCCESS, 0)
        assert nvm.execute(sq, io(NvmOpcode.FLUSH, nsid)) == (Status.SUCCESS, 0)
    assert nvm.execute(sq, io(NvmOpcode.FLUSH, NSID_ALL)) == (Status.SUCCESS, 0)  # before any table
    # an NVM opcode the second set lacks, and one no set has
    for opc, nsid in ((NvmOpcode.WRITE_ZEROES, 2), (NvmOpcode.COPY, 2), (0x7D, 2), (0x7D, 1)):
        assert nvm.execute(sq, io(opc, nsid)) == (status_field(Status.INVALID_OPCODE, dnr=True), 0)
    assert nvm.execute(sq, io(NvmOpcode.WRITE_ZEROES, 1)) == (Status.SUCCESS, 0)
    # a namespace that does not exist: its set is unknown, so Invalid Namespace comes first
    assert nvm.execute(sq, io(0x7D, 9))[0] & 0x7FF == Status.INVALID_NAMESPACE_OR_FORMAT


def test_write_protection_refuses_the_sets_lba_changing_opcodes(area: Area, second_set: CommandSet):
    ns = add_namespace(area, 2, Csi.KEY_VALUE)
    ns.write_protected = True
    nvm = bound(area)
    assert nvm.execute(area.admin_sq, io(NvmOpcode.WRITE, 2))[0] & 0x7FF == Status.NAMESPACE_WRITE_PROTECTED
    assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 2)) == (Status.SUCCESS, 0)


def test_marked_lba_swap_shows_in_the_bound_nvm_table(area: Area):
    """The Write Uncorrectable swap edits the NVM table in place: the dispatcher sees it."""
    nvm = bound(area)
    assert nvm.tables[Csi.NVM] is nvm.handlers
    assert nvm.execute(area.admin_sq, sqe(NvmOpcode.WRITE_UNCORRECTABLE, nsid=1, cdw10=4)) == (Status.SUCCESS, 0)
    assert nvm.tables[Csi.NVM][NvmOpcode.READ] == nvm._read_marked
    assert nvm.execute(area.admin_sq, io(NvmOpcode.READ, 1, slba=4))[0] & 0x7FF == Status.UNRECOVERED_READ_ERROR
