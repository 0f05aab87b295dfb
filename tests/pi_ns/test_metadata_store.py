"""The metadata door (read_meta/write_meta/zero_meta) and where metadata lives: RAM, and a
file namespace's sidecar that keeps metadata and the format across close/reopen."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from nvme_emu import metadata_store as mstore
from nvme_emu.backends.ram import RamBackend
from nvme_emu.namespace import Namespace, create_namespace, destroy_namespace
from nvme_emu.namespace_spec import open_namespace
from nvme_emu.ns_format import NsFormat
from nvme_emu.pi.engine import PiEngine
from nvme_emu.pi.format import GuardKind, PiCommand, PiLocation, Prinfo, ProtectionType
from nvme_emu.pi.guards import native_guards
from nvme_emu.spec.commands import NvmeError, Status

T1 = ProtectionType.TYPE1


def ram(**kw) -> Namespace:
    return Namespace(1, RamBackend(1 << 20), **kw)  # 2048 blocks of 512


@pytest.mark.parametrize("ms", [8, 16, 64])
def test_write_read_and_zero_metadata(ms: int):
    with ram(ms=ms) as ns:
        assert bytes(ns.read_meta(0, 3)) == bytes(3 * ms)  # no PI: deallocated metadata reads 0h
        data = bytes(range(256))[: 2 * ms] if ms < 128 else b""
        ns.write_meta(10, data)
        got = ns.read_meta(9, 4)
        assert bytes(got) == bytes(ms) + data + bytes(ms)
        got[0] = 0xAA  # a copy: the caller's to change
        assert bytes(ns.read_meta(9, 1)) == bytes(ms)
        ns.zero_meta(10, 1)
        assert bytes(ns.read_meta(10, 2)) == bytes(ms) + data[ms:]


@pytest.mark.parametrize("slba, nlb", [(2048, 1), (2047, 2), (-1, 1), (0, 2049), (1 << 64, 1)])
def test_ranges_are_checked(slba: int, nlb: int):
    with ram(ms=8, pi_type=T1) as ns:
        for call in (lambda: ns.read_meta(slba, nlb), lambda: ns.zero_meta(slba, nlb),
                     lambda: ns.write_meta(slba, bytes(8 * max(nlb, 0)))):
            with pytest.raises(NvmeError) as ei:
                call()
            assert ei.value.status == Status.LBA_OUT_OF_RANGE
        assert ns.read_meta(2047, 1).nbytes == 8  # the last block is in range


def test_partial_blocks_of_metadata_are_a_bug():
    with ram(ms=16) as ns, pytest.raises(ValueError, match="whole blocks"):
        ns.write_meta(0, bytes(20))
    with ram() as ns, pytest.raises(ValueError, match="whole blocks"):
        ns.write_meta(0, bytes(8))  # no metadata at all


@pytest.mark.parametrize("guard, ms, pil", [(GuardKind.GUARD_16, 8, PiLocation.LAST), (GuardKind.GUARD_16, 64, PiLocation.FIRST),
                                            (GuardKind.GUARD_64, 16, PiLocation.LAST), (GuardKind.GUARD_64, 64, PiLocation.LAST)])
def test_deallocated_pi_is_what_the_engine_says_and_passes_every_check(guard: GuardKind, ms: int, pil: PiLocation):
    """Unwritten and zeroed blocks read as PiEngine.fill_deallocated under the namespace's
    DLFEAT (escape tags), so a host checking everything reads them without an error."""
    with ram(ms=ms, pi_type=T1, pil=pil, guard=guard) as ns:
        assert ns.pi is not None and ns.pi_engine is not None
        expect_data, expect_meta = np.zeros(512 * 4, np.uint8), np.zeros(ms * 4, np.uint8)
        PiEngine(ns.pi, native_guards(guard)).fill_deallocated(ns.dlfeat, expect_data, expect_meta)
        assert bytes(ns.read_meta(100, 4)) == expect_meta.tobytes()
        cmd = PiCommand(slba=100, prinfo=Prinfo.PRCHK_ALL, ilbrt=100)
        assert ns.pi_engine.check(cmd, bytearray(512 * 4), ns.read_meta(100, 4)) is None
        # written PI reads back as written, and a Write Zeroes/Deallocate brings the escape back
        data, meta = bytearray(b"\x5a" * 512 * 4), bytearray(ms * 4)
        assert ns.pi_engine.insert(PiCommand(slba=100, ilbrt=100), data, meta) is None
        ns.write_meta(100, meta)
        assert bytes(ns.read_meta(100, 4)) == bytes(meta)
        assert ns.pi_engine.check(cmd, data, ns.read_meta(100, 4)) is None
        ns.zero_meta(101, 2)
        assert bytes(ns.read_meta(101, 2)) == expect_meta.tobytes()[: 2 * ms]


def test_a_namespace_without_metadata_keeps_plain_rw():
    with ram() as ns:
        assert ns.plain_rw and ns.rw_is_plain()
    with ram(ms=8) as ns:
        assert not ns.plain_rw
        ns.format(1)
        assert ns.plain_rw  # formatted back to no metadata


# -- file namespaces: the sidecar --------------------------------------------------------------


def test_metadata_and_format_survive_close_and_reopen(tmp_path, caplog):
    img = tmp_path / "disk.img"
    spec = f"file:{img},size=1M,ms=8,pi=1"
    with open_namespace(spec, 1) as ns:
        assert ns.describe_storage()["meta_path"] == str(img) + ".meta"
        ns.write_meta(5, b"\x01\x02\x03\x04\x05\x06\x07\x08", fua=True)
        ns.format(7, pi_type=ProtectionType.TYPE3, pil=PiLocation.FIRST, mset=True)  # 4096+64
        ns.write_meta(3, bytes(range(64)))
        ns.flush()
    with caplog.at_level(logging.WARNING, logger="nvme_emu.namespace"), open_namespace(spec, 1) as ns:
        # the sidecar's format wins over the command line's ms=8,pi=1, and says so
        assert (ns.lbaf_index, ns.extended, ns.ms, ns.lba_size) == (7, True, 64, 4096)
        assert ns.pi is not None and ns.pi.pi_type is ProtectionType.TYPE3 and ns.pi.location is PiLocation.FIRST
        assert "wins over" in caplog.text
        assert bytes(ns.read_meta(3, 1)) == bytes(range(64))
        assert bytes(ns.read_meta(4, 1)) == b"\xff" * 8 + bytes(56)  # never written: PI first, escaped
        ns.format(0)  # back to plain: the sidecar stays, recording it
    assert (tmp_path / "disk.img.meta").stat().st_size == mstore.HEADER_SIZE
    with open_namespace(spec, 1) as ns:
        assert ns.lbaf_index == 0 and ns.plain_rw and ns.pi is None


def test_plain_file_namespace_makes_a_sidecar_only_when_formatted_to_metadata(tmp_path):
    img = tmp_path / "plain.img"
    with open_namespace(f"file:{img},size=1M", 1) as ns:
        assert not os.path.exists(f"{img}.meta")
        ns.format(2, pi_type=T1)
        ns.write_meta(0, b"\x11" * 8)
    with open_namespace(f"file:{img},size=1M", 1) as ns:
        assert ns.lbaf_index == 2 and ns.pi is not None
        assert bytes(ns.read_meta(0, 1)) == b"\x11" * 8


def test_untrusted_sidecars_are_refused(tmp_path):
    img = tmp_path / "d.img"
    with open_namespace(f"file:{img},size=1M,ms=16", 1):
        with pytest.raises(ValueError, match="in use by another process"):
            open_namespace(f"file:{img},size=1M,ms=16", 2)
    meta = f"{img}.meta"
    with open(meta, "r+b") as f:  # a torn header
        f.seek(20)
        f.write(b"\x99")
    with pytest.raises(ValueError, match="checksum"):
        open_namespace(f"file:{img},size=1M,ms=16", 1)
    os.unlink(meta)
    with open_namespace(f"file:{img},size=1M,ms=16", 1):
        pass
    os.truncate(img, 2 << 20)  # the image grew: the sidecar describes another block count
    with pytest.raises(ValueError, match="resized"):
        open_namespace(f"file:{img},ms=16", 1)
    with pytest.raises(ValueError, match="zoned namespace"):
        open_namespace(f"file:{img},zoned,zone_size=1M", 1)


def test_header_round_trip():
    stored = mstore.StoredFormat(NsFormat(6, True, ProtectionType.TYPE2, PiLocation.FIRST, GuardKind.GUARD_64), 12, 16, 99)
    head = mstore.encode_header(stored)
    assert len(head) == mstore.HEADER_SIZE and head[:8] == b"NVMEMETA"
    assert mstore.decode_header(head, mstore.HEADER_SIZE + 99 * 16, "x") == stored
    with pytest.raises(ValueError, match="need"):
        mstore.decode_header(head, mstore.HEADER_SIZE + 98 * 16, "x")


def test_block_device_sidecars_live_in_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NVME_EMU_STATE_DIR", str(tmp_path))
    path = mstore.meta_path("blk", "/dev/disk/by-id/nvme-x")
    assert path is not None and path.startswith(f"{tmp_path}/meta/blk-nvme-x-") and path.endswith(".meta")
    assert mstore.meta_path("ram", None) is None
    assert mstore.meta_path("file", str(tmp_path / "a.img")) == str(tmp_path / "a.img") + ".meta"


def test_created_namespaces_keep_and_drop_their_sidecar(tmp_path):
    fmt = NsFormat(2, pi_type=T1)
    ns = create_namespace(3, 1 << 20, 512, directory=str(tmp_path), fmt=fmt)
    assert ns.pi is not None and os.path.exists(tmp_path / "ns3.img.meta")
    destroy_namespace(ns, directory=str(tmp_path))
    assert not os.path.exists(tmp_path / "ns3.img") and not os.path.exists(tmp_path / "ns3.img.meta")


def test_acknowledged_metadata_survives_sigkill(tmp_path):
    """A store into the mapped sidecar is in the page cache when write_meta returns (before
    the command completes): a killed serve loses none of it, with no Flush or close."""
    img = tmp_path / "k.img"
    spec = f"file:{img},size=1M,ms=8,pi=1"
    ready_r, ready_w = os.pipe()  # child -> parent: written
    hold_r, hold_w = os.pipe()  # never written: the child waits on it until killed
    pid = os.fork()
    if pid == 0:  # the "server": write, say so, then wait to be killed
        try:
            ns = open_namespace(spec, 1)
            ns.write_meta(7, b"\xab" * 16)
            os.write(ready_w, b"k")
            os.read(hold_r, 1)
        finally:
            os._exit(1)
    try:
        assert os.read(ready_r, 1) == b"k"
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, hold_r, hold_w):
            os.close(fd)
    with open_namespace(spec, 1) as ns:
        assert bytes(ns.read_meta(7, 2)) == b"\xab" * 16
        assert bytes(ns.read_meta(6, 1)) == b"\xff" * 8
