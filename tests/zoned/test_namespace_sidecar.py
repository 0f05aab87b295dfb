"""A zoned file namespace keeps its zones across a restart: opened from a spec (the way
``serve`` opens it), written, closed, opened again, on a real file image and sidecar."""

from __future__ import annotations

import os

import pytest

from nvme_emu.namespace_spec import open_namespace
from nvme_emu.outcome import finish_here
from nvme_emu.spec.zns import ZoneState
from nvme_emu.zoned.sidecar import SUFFIX

ZONE = 1 << 20  # 1 MiB zones of 512-byte blocks: 2048 LBAs each
LBAS = ZONE // 512


def spec(path: str) -> str:
    return f"file:{path},size=4M,zoned,zone_size=1M"


def write(ns, slba: int, data: bytes) -> None:
    ns.zones.write(slba, len(data) // 512)  # what the zoned Write handler does first
    finish_here(ns.write(slba, len(data) // 512, [memoryview(bytearray(data))]))


def read(ns, slba: int, nlb: int) -> bytes:
    buf = bytearray(nlb * 512)
    finish_here(ns.read(slba, nlb, [memoryview(buf)]))
    return bytes(buf)


def test_zones_and_data_survive_a_restart(tmp_path):
    image = str(tmp_path / "zns.img")
    ns = open_namespace(spec(image), 1)
    try:
        write(ns, 0, b"a" * 4096)  # zone 0: implicitly opened, WP 8
        write(ns, LBAS, b"b" * ZONE)  # zone 1: Full
        ns.flush()
    finally:
        ns.close()
    assert os.path.exists(image + SUFFIX)
    ns = open_namespace(spec(image), 1)
    try:
        z0, z1, z2 = ns.zones.zones[:3]
        assert (z0.state, z0.wp) == (ZoneState.CLOSED, 8)  # open at the stop: Closed, as QEMU
        assert z1.state == ZoneState.FULL
        assert z2.state == ZoneState.EMPTY
        assert read(ns, 0, 8) == b"a" * 4096
        assert ns.zones.write(8, 8) == 8  # the write pointer continues where it was
    finally:
        ns.close()


def test_a_new_sidecar_empties_the_image_it_describes(tmp_path):
    image = tmp_path / "old.img"
    image.write_bytes(b"x" * (4 << 20))  # data from before the namespace was zoned
    ns = open_namespace(spec(str(image)), 1)
    try:
        assert all(z.state == ZoneState.EMPTY for z in ns.zones.zones)
        assert read(ns, 0, 8) == bytes(4096)  # an Empty zone reads zeros
    finally:
        ns.close()


def test_a_sidecar_of_another_geometry_is_refused_and_changes_nothing(tmp_path):
    image = str(tmp_path / "zns.img")
    ns = open_namespace(spec(image), 1)
    write(ns, 0, b"c" * 512)
    ns.close()
    before = open(image + SUFFIX, "rb").read()
    with pytest.raises(ValueError, match="zone"):
        open_namespace(f"file:{image},size=4M,zoned,zone_size=2M", 1)
    assert open(image + SUFFIX, "rb").read() == before
