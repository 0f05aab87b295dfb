"""The zone sidecar: every change of a zone reaches the file at once, a restart restores every
state (no zone open), and a sidecar that cannot be trusted (another geometry, a torn or
damaged header, a record no transition leaves, one in use) is refused, changing nothing."""

from __future__ import annotations

import os
import re
import struct
import zlib

import pytest

from nvme_emu.backends.base import BackendKind
from nvme_emu.spec.commands import NvmeError
from nvme_emu.spec.zns import ZoneAttribute, ZoneSendAction, ZoneState
from nvme_emu.zoned import sidecar as sc
from nvme_emu.zoned.sidecar import HEADER_SIZE, ZoneSidecar, sidecar_path
from nvme_emu.zoned.zone_set import ZoneSet

from .helpers import ZONE_CAP, ZONE_SIZE, check_invariants, put_in_state, zone_set
from .test_persist import LAYOUT, snapshot

KW = dict(max_open=3, max_active=4)


def fresh() -> ZoneSet:
    return zone_set(len(LAYOUT), **KW)


def on_disk(path) -> list[tuple[ZoneState, ZoneAttribute, int]]:
    """The records as another process would read them (through the page cache)."""
    with open(path, "rb") as f:
        return list(sc.decode(f.read(), str(path)).zones)


def in_memory(zs: ZoneSet) -> list[tuple[ZoneState, ZoneAttribute, int]]:
    return [(z.state, z.attrs, z.wp - z.zslba) for z in zs.zones]


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "disk.img.zones")


def test_a_missing_sidecar_is_made_with_every_zone_empty(path):
    zs = fresh()
    with ZoneSidecar.open(path, zs) as side:
        assert side.created and zs.store is side
        assert os.path.getsize(path) == HEADER_SIZE + 8 * len(LAYOUT)
        assert on_disk(path) == [(ZoneState.EMPTY, ZoneAttribute(0), 0)] * len(LAYOUT)
    assert zs.store is None
    assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp" in n]
    with ZoneSidecar.open(path, fresh()) as side:
        assert not side.created


def populate(zs: ZoneSet) -> None:
    for i, state in enumerate(LAYOUT):
        put_in_state(zs, i, state)
    zs.write(zs.zones[1].wp, 4)
    zs.finish_by_controller(3)  # Full with Zone Finished by Controller


def test_every_change_is_in_the_file_at_once(path):
    """No close, no sync: after each operation, another reader of the file sees the zones."""
    zs = fresh()
    with ZoneSidecar.open(path, zs):
        steps = [
            lambda: zs.write(0, 2),
            lambda: zs.append(ZONE_SIZE, 3),
            lambda: zs.send(ZoneSendAction.OPEN, 2 * ZONE_SIZE),
            lambda: zs.write(3 * ZONE_SIZE, 1),  # auto-closes zone 0 (max_open 3)
            lambda: zs.send(ZoneSendAction.CLOSE, ZONE_SIZE),
            lambda: zs.send(ZoneSendAction.FINISH, ZONE_SIZE),
            lambda: zs.write(3 * ZONE_SIZE + 1, ZONE_CAP - 1),  # to Full
            lambda: zs.send(ZoneSendAction.RESET, 3 * ZONE_SIZE),
            lambda: zs.make_read_only(4),
            lambda: zs.send(ZoneSendAction.OFFLINE, 4 * ZONE_SIZE),
            lambda: zs.make_offline(5),
            lambda: zs.finish_by_controller(2),
            lambda: zs.send(ZoneSendAction.RESET, 0, select_all=True),
            lambda: zs.shutdown(),
        ]
        for step in steps:
            step()
            assert on_disk(path) == in_memory(zs)
        assert zs.counters.auto_closes == 1


def test_a_restart_restores_every_state_and_leaves_no_zone_open(path):
    zs = fresh()
    with ZoneSidecar.open(path, zs):
        populate(zs)
        zs.write(7 * ZONE_SIZE, 2)
        zs.send(ZoneSendAction.OPEN, 7 * ZONE_SIZE)
    again = fresh()
    with ZoneSidecar.open(path, again):
        assert [z.state for z in again.zones] == [
            ZoneState.EMPTY,
            ZoneState.CLOSED,  # implicitly opened, written: Closed
            ZoneState.EMPTY,  # explicitly opened, nothing written: Empty
            ZoneState.FULL,
            ZoneState.FULL,
            ZoneState.READ_ONLY,
            ZoneState.OFFLINE,
            ZoneState.CLOSED,  # explicitly opened, written
        ]
        assert [z.wp - z.zslba for z in again.zones] == [0, 5, 0, ZONE_CAP, ZONE_CAP, 2, 0, 2]
        assert again.zones[3].attrs == ZoneAttribute.ZFC
        assert (again.open_count, again.active_count) == (0, 2)
        check_invariants(again)
        assert on_disk(path) == in_memory(again)  # the file says Closed too
        again.write(ZONE_SIZE + 5, 1)  # writing goes on at the write pointer
        assert again.zones[1].state == ZoneState.IMPLICITLY_OPENED
    assert on_disk(path)[1] == (ZoneState.IMPLICITLY_OPENED, ZoneAttribute(0), 6)


@pytest.mark.parametrize(
    "other",
    [
        lambda: ZoneSet(len(LAYOUT) * ZONE_SIZE, ZONE_SIZE),  # another capacity
        lambda: zone_set(len(LAYOUT) + 1),  # more zones
        lambda: zone_set(len(LAYOUT) - 1),  # fewer
        lambda: ZoneSet(len(LAYOUT) * 32, 32, ZONE_CAP),  # another zone size
    ],
)
def test_another_geometry_is_refused_and_nothing_changes(path, other):
    zs = fresh()
    with ZoneSidecar.open(path, zs):
        populate(zs)
    before = open(path, "rb").read()
    target = other()
    empty = snapshot(target)
    with pytest.raises(ValueError, match=re.escape(f"{path}: zone state for {len(LAYOUT)} zones of {ZONE_SIZE} LBAs")):
        ZoneSidecar.open(path, target)
    assert snapshot(target) == empty and target.store is None
    assert open(path, "rb").read() == before
    with ZoneSidecar.open(path, fresh()):  # and the right geometry still opens it
        pass


def made(path) -> bytes:
    zs = fresh()
    with ZoneSidecar.open(path, zs):
        populate(zs)
    return open(path, "rb").read()


def refused(path, data: bytes, match: str) -> None:
    with open(path, "wb") as f:
        f.write(data)
    zs = fresh()
    with pytest.raises(ValueError, match=match):
        ZoneSidecar.open(path, zs)
    assert all(z.state == ZoneState.EMPTY for z in zs.zones) and zs.store is None
    assert open(path, "rb").read() == data  # left for the operator to look at


@pytest.mark.parametrize("offset", range(0, 40))
def test_any_damaged_header_byte_is_refused(path, offset):
    data = bytearray(made(path))
    data[offset] ^= 0x10
    refused(path, bytes(data), "magic|checksum")


@pytest.mark.parametrize("cut", [0, 1, 39, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 7, -1])
def test_a_torn_file_is_refused(path, cut):
    refused(path, made(path)[:cut], "torn|truncated")


def test_extra_bytes_are_refused(path):
    refused(path, made(path) + b"\0" * 8, "truncated or damaged")


def reseal(header: bytes) -> bytes:
    head = header[:36]
    return (head + struct.pack("<I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")


def test_another_version_is_refused(path):
    data = made(path)
    head = data[:8] + struct.pack("<H", 2) + data[10:36]
    refused(path, reseal(head) + data[HEADER_SIZE:], "version 2")


def record_at(data: bytes, index: int, word: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<Q", out, HEADER_SIZE + 8 * index, word)
    return bytes(out)


@pytest.mark.parametrize(
    "word, match",
    [
        (0, "holds no zone state"),  # a zeroed record
        (0x7 << 48, "holds no zone state"),
        (ZoneState.CLOSED << 48 | (ZONE_CAP + 1), "past its capacity"),
        (ZoneState.EMPTY << 48 | 3, "EMPTY with write pointer offset 3"),
        (ZoneState.FULL << 48 | 3, "FULL with write pointer offset 3"),
    ],
)
def test_a_record_no_transition_leaves_is_refused(path, word, match):
    refused(path, record_at(made(path), 2, word), match)


def test_a_sidecar_in_use_is_refused(path):
    with ZoneSidecar.open(path, fresh()):
        with pytest.raises(ValueError, match="in use by another process"):
            ZoneSidecar.open(path, fresh())
    with ZoneSidecar.open(path, fresh()):  # the lock went with the close
        pass


def test_a_zone_set_takes_one_store(path, tmp_path):
    zs = fresh()
    with ZoneSidecar.open(path, zs):
        with pytest.raises(ValueError, match="already has a store"):
            ZoneSidecar.open(str(tmp_path / "other.zones"), zs)


def test_after_close_the_zone_set_goes_on_without_a_store(path):
    zs = fresh()
    side = ZoneSidecar.open(path, zs)
    zs.write(0, 1)
    side.sync()
    side.close()
    side.close()
    zs.write(1, 1)  # no store: nothing stored, nothing raised
    assert on_disk(path)[0][2] == 1


def test_sidecar_paths(tmp_path, monkeypatch):
    image = tmp_path / "disk.img"
    image.touch()
    link = tmp_path / "link.img"
    link.symlink_to(image)
    assert sidecar_path(BackendKind.FILE, str(image)) == f"{image}.zones"
    assert sidecar_path("file", str(link)) == f"{image}.zones"  # the real path: one sidecar
    assert sidecar_path(BackendKind.RAM, None) is None
    monkeypatch.setenv("NVME_EMU_STATE_DIR", str(tmp_path / "state"))
    blk = sidecar_path(BackendKind.BLOCK, "/dev/disk/by-id/nvme-Disk_1")
    assert blk is not None and blk.startswith(f"{tmp_path}/state/zones/blk-nvme-Disk_1-") and blk.endswith(".zones")
    assert sidecar_path("blk", "/dev/sdb") != blk
    monkeypatch.delenv("NVME_EMU_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert sidecar_path("blk", "/dev/sdb").startswith(f"{tmp_path}/xdg/nvme-emu/zones/blk-sdb-")


def test_a_blk_sidecar_directory_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv("NVME_EMU_STATE_DIR", str(tmp_path / "state"))
    path = sidecar_path("blk", "/dev/nvme-emu-test")
    with ZoneSidecar.open(path, fresh()) as side:
        assert side.created and os.path.exists(path)


def test_the_file_is_little_endian_words(path):
    zs = fresh()
    with ZoneSidecar.open(path, zs):
        zs.write(0, 5)
        zs.finish_by_controller(0)
    word = struct.unpack_from("<Q", open(path, "rb").read(), HEADER_SIZE)[0]
    assert word == ZONE_CAP | ZoneState.FULL << 48 | ZoneAttribute.ZFC << 56
    assert open(path, "rb").read()[:8] == b"NVMEZONE"


class Recorder:
    """A ZoneStore that remembers which zones it was told of."""

    def __init__(self) -> None:
        self.changed: list[int] = []

    def zone_changed(self, zone) -> None:
        self.changed.append(zone.index)

    def sync(self) -> None:
        pass


def test_one_store_per_zone_changed_and_none_for_a_refused_command():
    rec = Recorder()
    zs = zone_set(4, max_open=1, store=rec)
    zs.write(0, 1)
    assert rec.changed == [0]  # open and move: one record
    zs.write(ZONE_SIZE, 1)
    assert rec.changed == [0, 0, 1]  # zone 0 auto-closed first, then zone 1
    rec.changed.clear()
    zs.write(ZONE_SIZE + 1, ZONE_CAP - 1)
    assert rec.changed == [1]  # to Full in the same record
    rec.changed.clear()
    for refused in (
        lambda: zs.write(ZONE_SIZE, 1),  # Zone Is Full
        lambda: zs.write(5, 1),  # Zone Invalid Write
        lambda: zs.send(ZoneSendAction.OFFLINE, 0),  # Invalid Zone State Transition
        lambda: zs.append(3, 1),  # not a zone start
    ):
        with pytest.raises(NvmeError):
            refused()
    zs.send(ZoneSendAction.CLOSE, 0)  # already Closed: nothing changes
    zs.send(ZoneSendAction.RESET, 2 * ZONE_SIZE)  # already Empty
    assert rec.changed == []


def test_making_a_sidecar_another_process_made_first_keeps_theirs(path):
    theirs = fresh()
    theirs.write(0, 3)
    assert sc._create(path, theirs) is True
    before = open(path, "rb").read()
    assert sc._create(path, fresh()) is False  # lost the race: theirs stays, no temporary left
    assert open(path, "rb").read() == before
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
