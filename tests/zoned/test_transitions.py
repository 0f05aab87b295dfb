"""Every zone state transition of ZNS 1.1's zone state machine, as a table: each action, write
or fault from each of the seven states, and what it must do: the state it leaves the zone in,
or the exact status it refuses with (and then nothing changes)."""

from __future__ import annotations

import pytest

from nvme_emu.spec.commands import NvmeError, Status
from nvme_emu.spec.zns import ZoneSendAction, ZoneState

from .helpers import check_invariants, put_in_state, zone_set

E = ZoneState.EMPTY
IO = ZoneState.IMPLICITLY_OPENED
EO = ZoneState.EXPLICITLY_OPENED
C = ZoneState.CLOSED
F = ZoneState.FULL
RO = ZoneState.READ_ONLY
O = ZoneState.OFFLINE  # noqa: E741
STATES = (E, IO, EO, C, F, RO, O)

INV = Status.INVALID_ZONE_STATE_TRANSITION
NOT_ALLOWED = ValueError  # the control plane's refusal: no transition leaves Offline

#: action -> the outcome from (E, IO, EO, C, F, RO, O): a state, a Status, or ValueError.
TABLE: dict[str, tuple[object, ...]] = {
    # Zone Management Send on one zone
    "open": (EO, EO, EO, EO, INV, INV, INV),
    "close": (INV, C, C, C, INV, INV, INV),
    "finish": (F, F, F, F, F, INV, INV),
    "reset": (E, E, E, E, E, INV, INV),
    "offline": (INV, INV, INV, INV, INV, O, O),
    # Select All: only zones in the action's states move; the others are left as they are
    "open_all": (E, IO, EO, EO, F, RO, O),
    "close_all": (E, C, C, C, F, RO, O),
    "finish_all": (E, F, F, F, F, RO, O),
    "reset_all": (E, E, E, E, E, RO, O),
    "offline_all": (E, IO, EO, C, F, O, O),
    # I/O at the write pointer
    "write": (IO, IO, EO, IO, Status.ZONE_IS_FULL, Status.ZONE_IS_READ_ONLY, Status.ZONE_IS_OFFLINE),
    "append": (IO, IO, EO, IO, Status.ZONE_IS_FULL, Status.ZONE_IS_READ_ONLY, Status.ZONE_IS_OFFLINE),
    # the controller's own changes (fault injection from the control plane)
    "make_read_only": (RO, RO, RO, RO, RO, RO, NOT_ALLOWED),
    "make_offline": (O, O, O, O, O, O, O),
}

SEND = {
    "open": ZoneSendAction.OPEN, "close": ZoneSendAction.CLOSE, "finish": ZoneSendAction.FINISH,
    "reset": ZoneSendAction.RESET, "offline": ZoneSendAction.OFFLINE,
}


def run(zs, action: str, index: int) -> None:
    zone = zs.zones[index]
    if action in SEND:
        zs.send(SEND[action], zone.zslba)
    elif action.endswith("_all"):
        zs.send(SEND[action.removesuffix("_all")], 12345, select_all=True)  # SLBA ignored
    elif action == "write":
        zs.write(zone.wp, 1)
    elif action == "append":
        zs.append(zone.zslba, 1)
    else:
        getattr(zs, action)(index)


ROWS = [(action, before, after) for action, outcomes in TABLE.items() for before, after in zip(STATES, outcomes, strict=True)]


@pytest.mark.parametrize(
    ("action", "before", "after"), ROWS, ids=[f"{a}-{b.name}" for a, b, _ in ROWS]
)
def test_transition(action, before, after):
    zs = zone_set(4)
    put_in_state(zs, 1, before)
    zone = zs.zones[1]
    snapshot = (zone.state, zone.wp, zs.open_count, zs.active_count)
    if isinstance(after, Status):
        with pytest.raises(NvmeError) as e:
            run(zs, action, 1)
        assert e.value.status == after
        assert (zone.state, zone.wp, zs.open_count, zs.active_count) == snapshot
    elif after is NOT_ALLOWED:
        with pytest.raises(ValueError):
            run(zs, action, 1)
        assert zone.state == before
    else:
        run(zs, action, 1)
        assert zone.state == after
    check_invariants(zs)
    # the other zones are untouched by any single-zone action
    assert all(z.state == E for z in zs.zones if z.index != 1)


def test_table_is_complete():
    """Every Zone Send Action except Set Zone Descriptor Extension has rows, alone and with
    Select All, and every row lists all seven states."""
    sent = {a for a in SEND.values()}
    assert sent == set(ZoneSendAction) - {ZoneSendAction.SET_ZONE_DESCRIPTOR_EXTENSION}
    assert {f"{name}_all" for name in SEND} <= set(TABLE)
    assert all(len(v) == len(ZoneState) for v in TABLE.values())


@pytest.mark.parametrize(
    ("before", "written_after"),
    [(IO, 1), (EO, 0), (C, 1)],
)
def test_write_keeps_the_write_pointer_moving(before, written_after):
    """A write at the write pointer moves it by the LBAs written, in every writable state."""
    zs = zone_set(2)
    put_in_state(zs, 0, before)
    zone = zs.zones[0]
    assert zone.written == written_after
    zs.write(zone.wp, 2)
    assert zone.written == written_after + 2


def test_writing_to_capacity_makes_the_zone_full_and_frees_its_resources():
    zs = zone_set(2, max_open=1, max_active=1)
    zs.write(0, 5)
    assert (zs.open_count, zs.active_count) == (1, 1)
    zs.write(5, 7)  # reaches the capacity, 12
    assert zs.zones[0].state == F
    assert (zs.open_count, zs.active_count) == (0, 0)
    zs.write(16, 1)  # the resources are free for the next zone
    check_invariants(zs)


@pytest.mark.parametrize("action", [0x00, 0x06, 0x11, 0xFF])
def test_unknown_send_action_is_invalid_field(action):
    with pytest.raises(NvmeError) as e:
        zone_set().send(action, 0)
    assert e.value.status == Status.INVALID_FIELD


def test_set_zone_descriptor_extension_is_invalid_without_extensions():
    with pytest.raises(NvmeError) as e:
        zone_set().send(ZoneSendAction.SET_ZONE_DESCRIPTOR_EXTENSION, 0)
    assert e.value.status == Status.INVALID_FIELD


@pytest.mark.parametrize(("slba", "status"), [(1, Status.INVALID_FIELD), (15, Status.INVALID_FIELD), (64, Status.LBA_OUT_OF_RANGE)])
def test_send_to_a_zone_needs_its_start_lba(slba, status):
    zs = zone_set(4)
    with pytest.raises(NvmeError) as e:
        zs.send(ZoneSendAction.OPEN, slba)
    assert e.value.status == status
    assert all(z.state == E for z in zs.zones)


def test_select_all_ignores_slba_and_acts_on_every_zone():
    zs = zone_set(4)
    for i in range(4):
        put_in_state(zs, i, (IO, EO, C, F)[i])
    zs.send(ZoneSendAction.CLOSE, 999_999, select_all=True)
    assert [z.state for z in zs.zones] == [C, C, C, F]
    zs.send(ZoneSendAction.FINISH, 0, select_all=True)
    assert [z.state for z in zs.zones] == [F, F, F, F]
    check_invariants(zs)


def test_finish_moves_the_write_pointer_to_the_capacity_end():
    zs = zone_set(2)
    zs.write(0, 3)
    zs.send(ZoneSendAction.FINISH, 0)
    assert zs.zones[0].wp == 12
    assert zs.zones[0].reported_wp == 0xFFFF_FFFF_FFFF_FFFF
