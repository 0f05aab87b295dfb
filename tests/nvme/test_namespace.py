"""Namespaces over RAM, file and block-device backends; spec-string parsing."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import struct

import pytest

from ..nbd.nbd_servers import nbdkit, need_libnbd
from ..support.ceph import ceph_cluster  # noqa: F401 - the rbd: kind's cluster, started when asked

from nvme_emu import structures
from nvme_emu.backends import BACKENDS, BackendKind, backend_class
from nvme_emu.backends import file as file_backend, iov
from nvme_emu.backends.block import BlockBackend
from nvme_emu.backends.errors import MediumError, NoSpaceError, ReadOnlyError
from nvme_emu.backends.file import FileBackend
from nvme_emu.backends.ram import DEFAULT_RAM_SIZE, RamBackend
from nvme_emu.namespace import Namespace, derive_ids
from nvme_emu.outcome import finish_here
from nvme_emu.namespace_spec import open_namespace, parse_namespace_spec, parse_size
from nvme_emu.prp import prp_views, release_views
from nvme_emu.spec.commands import NvmeError, Status
from nvme_emu.spec.identify import DLFEAT_READ_ZEROES, NsIdType
from vfio_user.constants import DMA_FLAG_READ, DMA_FLAG_WRITE
from vfio_user.dma import DmaTable, GuestMemory
from vfio_user.memfd import sealed_memfd

MiB = 1 << 20


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


def bufs(data: bytes, *sizes: int) -> list[memoryview]:
    """Split ``data`` into separate writable buffers (a scattered guest buffer)."""
    out, pos = [], 0
    for n in sizes:
        out.append(memoryview(bytearray(data[pos : pos + n])))
        pos += n
    assert pos == len(data)
    return out


@pytest.fixture
def ram_ns():
    ns = Namespace(1, RamBackend(4 * MiB), id_seed="S1")
    yield ns
    ns.close()


@pytest.fixture(params=["ram", "file"])
def any_ns(request, tmp_path):
    if request.param == "ram":
        backend = RamBackend(4 * MiB)
    else:
        backend = FileBackend(str(tmp_path / "disk.img"), 4 * MiB)
    ns = Namespace(1, backend, id_seed="S1")
    yield ns
    ns.close()


# --------------------------------------------------------------------------- data path ----


def test_write_read_round_trip(any_ns):
    data = pattern(8 * 512, 1)
    finish_here(any_ns.write(10, 8, bufs(data, 100, 3000, 996)))
    out = bufs(bytes(len(data)), 512, 3584)
    finish_here(any_ns.read(10, 8, out))
    assert b"".join(out) == data
    # untouched blocks read as zeros
    z = [memoryview(bytearray(512))]
    finish_here(any_ns.read(9, 1, z))
    assert bytes(z[0]) == bytes(512)
    assert any_ns.stats.read_commands == 2 and any_ns.stats.bytes_read == 9 * 512
    assert any_ns.stats.write_commands == 1 and any_ns.stats.bytes_written == 8 * 512


def test_read_write_through_guest_memory(any_ns):
    """Real guest memory: PRP views over a memfd, data checked through our own mmap."""
    fd = sealed_memfd("guest", MiB)  # as QEMU's guest RAM: the DMA table wants it sealed
    table = DmaTable()
    mm = None
    try:
        table.add(0x100000, MiB, DMA_FLAG_READ | DMA_FLAG_WRITE, fd, 0)
        mem = GuestMemory(table)
        mm = mmap.mmap(fd, MiB)
        mm[0x2000:0x3000] = pattern(4096, 2)
        views = prp_views(mem, 0x102000, 0, 4096, 4096, write=False)
        finish_here(any_ns.write(0, 8, views))
        release_views(views)
        views = prp_views(mem, 0x105000, 0x108000, 4096 + 512, 4096, write=True)
        finish_here(any_ns.read(0, 9, views))
        release_views(views)
        assert mm[0x5000:0x6000] == pattern(4096, 2)
        assert mm[0x8000:0x8200] == bytes(512)
    finally:
        table.remove_all()
        if mm is not None:
            mm.close()
        os.close(fd)


@pytest.mark.parametrize("slba,nlb", [(8191, 2), (8192, 1), (1 << 64, 1), ((1 << 64) - 1, 2), (-1, 1)])
def test_lba_out_of_range(ram_ns, slba, nlb):
    assert ram_ns.nsze == 8192
    with pytest.raises(NvmeError) as ei:
        finish_here(ram_ns.read(slba, nlb, [memoryview(bytearray(nlb * 512))] if nlb * 512 < MiB else []))
    assert ei.value.status == Status.LBA_OUT_OF_RANGE and ei.value.dnr
    with pytest.raises(NvmeError):
        finish_here(ram_ns.write_zeroes(slba, nlb))
    with pytest.raises(NvmeError):
        finish_here(ram_ns.verify(slba, nlb))


def test_last_block_is_in_range(ram_ns):
    finish_here(ram_ns.write(8191, 1, [memoryview(b"\x01" * 512)]))


def test_buffer_length_mismatch_is_a_bug(ram_ns):
    with pytest.raises(ValueError):
        finish_here(ram_ns.read(0, 2, [memoryview(bytearray(512))]))


def test_write_zeroes_and_deallocate(any_ns):
    data = pattern(64 * 512, 3)
    finish_here(any_ns.write(0, 64, [memoryview(data)]))
    finish_here(any_ns.write_zeroes(3, 5))
    finish_here(any_ns.deallocate([(20, 10), (40, 0), (50, 1)]))
    out = memoryview(bytearray(len(data)))
    finish_here(any_ns.read(0, 64, [out]))
    expect = bytearray(data)
    for s, n in [(3, 5), (20, 10), (50, 1)]:
        expect[s * 512 : (s + n) * 512] = bytes(n * 512)
    assert out == expect
    with pytest.raises(NvmeError) as ei:
        finish_here(any_ns.deallocate([(0, 1), (8192, 1)]))
    assert ei.value.status == Status.LBA_OUT_OF_RANGE
    out2 = memoryview(bytearray(512))
    finish_here(any_ns.read(0, 1, [out2]))
    assert out2 == data[:512]  # the valid first range was not touched either


def test_deallocate_returns_memory(any_ns):
    finish_here(any_ns.write(0, 2048, [memoryview(b"\xaa" * MiB)]))
    before = any_ns.backend.allocated_bytes()
    assert before >= MiB
    assert any_ns.nuse >= 2048
    finish_here(any_ns.deallocate([(0, 2048)]))
    assert any_ns.backend.allocated_bytes() <= before - MiB // 2


def test_compare_and_verify(ram_ns):
    data = pattern(4 * 512, 4)
    finish_here(ram_ns.write(100, 4, [memoryview(data)]))
    finish_here(ram_ns.compare(100, 4, bufs(data, 700, 1348)))
    bad = bytearray(data)
    bad[-1] ^= 1
    with pytest.raises(NvmeError) as ei:
        finish_here(ram_ns.compare(100, 4, [memoryview(bad)]))
    assert ei.value.status == Status.COMPARE_FAILURE
    finish_here(ram_ns.verify(0, 8192))
    assert ram_ns.stats.read_commands == 2


def test_copy(ram_ns):
    a, b = pattern(2 * 512, 5), pattern(3 * 512, 6)
    finish_here(ram_ns.write(0, 2, [memoryview(a)]))
    finish_here(ram_ns.write(10, 3, [memoryview(b)]))
    finish_here(ram_ns.copy([(10, 3), (0, 2)], 1))  # overlaps source range (0, 2)
    out = memoryview(bytearray(5 * 512))
    finish_here(ram_ns.read(1, 5, [out]))
    assert out == b + a
    with pytest.raises(NvmeError) as ei:
        finish_here(ram_ns.copy([(0, 2)], 8191))
    assert ei.value.status == Status.LBA_OUT_OF_RANGE


def test_fua_and_flush(any_ns):
    finish_here(any_ns.write(0, 1, [memoryview(b"x" * 512)], fua=True))
    finish_here(any_ns.write_zeroes(0, 1, fua=True))
    any_ns.flush()


def test_format_changes_lba_size_and_zeroes(any_ns):
    finish_here(any_ns.write(0, 8, [memoryview(b"\x55" * 4096)]))
    any_ns.format(1)
    assert (any_ns.lba_size, any_ns.nsze, any_ns.lbaf_index) == (4096, 1024, 1)
    out = memoryview(bytearray(4096))
    finish_here(any_ns.read(0, 1, [out]))
    assert out == bytes(4096)
    with pytest.raises(NvmeError) as ei:
        finish_here(any_ns.read(1024, 1, [out]))
    assert ei.value.status == Status.LBA_OUT_OF_RANGE
    with pytest.raises(NvmeError) as ei:
        any_ns.format(8)  # one past the last LBA format
    assert ei.value.status == Status.INVALID_FORMAT
    any_ns.format(0, secure_erase=1)
    assert any_ns.nsze == 8192


def test_identify_pages(ram_ns):
    b = ram_ns.identify_namespace()
    assert struct.unpack_from("<QQ", b, 0) == (8192, 8192)
    assert b[25] == 7 and b[26] == 0  # eight formats, using index 0
    assert b[128:136] == bytes([0, 0, 9, 0, 0, 0, 12, 0])  # 512 and 4096 without metadata first
    assert b[33] & 0x7 == DLFEAT_READ_ZEROES
    assert b[104:120] == ram_ns.nguid and b[120:128] == ram_ns.eui64
    descs = dict(structures.parse_ns_id_descriptors(ram_ns.identify_ns_descriptors()))
    assert descs[NsIdType.NGUID] == ram_ns.nguid
    assert descs[NsIdType.UUID] == ram_ns.uuid.bytes
    assert descs[NsIdType.CSI] == b"\0"
    assert ram_ns.identify_namespace_independent()[14] == 1
    assert len(ram_ns.identify_namespace_nvm()) == 4096


def test_ids_stable_and_unique():
    a = derive_ids("SER", 1)
    assert a == derive_ids("SER", 1)
    assert a[0] != derive_ids("SER", 2)[0] and a[0] != derive_ids("SER2", 1)[0]
    assert a[1][0] & 0x03 == 0x02  # locally administered, unicast EUI-64


# ----------------------------------------------------------------------------- file backend ----


def test_file_created_sparse_and_existing_keeps_size(tmp_path):
    path = str(tmp_path / "d.img")
    with FileBackend(path, 64 * MiB) as b:
        assert b.size == 64 * MiB
        assert os.stat(path).st_blocks * 512 < MiB  # sparse
    with FileBackend(path) as b:
        assert b.size == 64 * MiB
    with FileBackend(path, 8 * MiB) as b:  # existing file: size= ignored
        assert b.size == 64 * MiB
    with pytest.raises(ValueError, match="does not exist"):
        FileBackend(str(tmp_path / "missing.img"))


def test_file_punch_fallback_writes_zeros(tmp_path, monkeypatch):
    def no_punch(fd, mode, off, length):
        raise OSError(errno.EOPNOTSUPP, "nope")

    monkeypatch.setattr(file_backend, "_fallocate", no_punch)
    with Namespace(1, FileBackend(str(tmp_path / "d.img"), MiB)) as ns:
        finish_here(ns.write(0, 4, [memoryview(b"\xff" * 2048)]))
        finish_here(ns.write_zeroes(1, 2))
        out = memoryview(bytearray(2048))
        finish_here(ns.read(0, 4, [out]))
        assert out == b"\xff" * 512 + bytes(1024) + b"\xff" * 512


def test_file_errors_map_to_statuses(tmp_path, monkeypatch):
    path = str(tmp_path / "d.img")
    with Namespace(1, FileBackend(path, MiB)) as ns:
        def fail(err):
            def pwritev(fd, bufs, off):
                raise OSError(err, os.strerror(err))
            return pwritev

        for err, cls, status in [
            (errno.ENOSPC, NoSpaceError, Status.CAPACITY_EXCEEDED),
            (errno.EROFS, ReadOnlyError, Status.NAMESPACE_WRITE_PROTECTED),
            (errno.EACCES, ReadOnlyError, Status.ACCESS_DENIED),
            (errno.EIO, MediumError, Status.WRITE_FAULT),
        ]:
            monkeypatch.setattr(os, "pwritev", fail(err))
            with pytest.raises(cls) as ei:
                finish_here(ns.write(0, 1, [memoryview(bytes(512))]))
            assert ei.value.status == status and ei.value.errno == err
            assert isinstance(ei.value, NvmeError)
        monkeypatch.undo()

        def bad_read(fd, bufs, off, *flags):  # the no-wait try first, then the read
            raise OSError(errno.EIO, "io")

        monkeypatch.setattr(os, "preadv", bad_read)
        with pytest.raises(MediumError) as ei:
            finish_here(ns.read(0, 1, [memoryview(bytearray(512))]))
        assert ei.value.status == Status.UNRECOVERED_READ_ERROR


NOWAIT_READS = {  # the general no-wait read, and the one-page fast path's
    "read_into_nowait": lambda b, off, view: b.read_into_nowait(off, [view]),
    "read_page_nowait": lambda b, off, view: b.read_page_nowait(off, view),
}


@pytest.mark.parametrize("how", NOWAIT_READS)
def test_file_nowait_reads_serve_the_page_cache_and_refuse_the_rest(tmp_path, monkeypatch, how):
    """A cached page is read at once; one the kernel would have to fetch is refused (the
    pool reads it); a file that cannot do RWF_NOWAIT at all is asked once; a real error
    is the command's."""
    read = NOWAIT_READS[how]
    with FileBackend(str(tmp_path / "d.img"), MiB) as b:
        b.write_from(0, [memoryview(bytes(range(256)) * 16)])
        out = memoryview(bytearray(4096))
        assert read(b, 0, out) is True and out == bytes(range(256)) * 16
        os.fdatasync(b._fd)  # clean, then out of the page cache: a read would wait for the disk
        os.posix_fadvise(b._fd, 0, MiB, os.POSIX_FADV_DONTNEED)
        out[:] = bytes(4096)
        assert read(b, 0, out) is False
        b.read_into(0, [out])  # what the pool then does
        assert out == bytes(range(256)) * 16

        calls = []

        def preadv(fd, bufs, off, flags=0):
            calls.append(flags)
            raise OSError(errno.EIO, "io")

        monkeypatch.setattr(os, "preadv", preadv)
        with pytest.raises(MediumError) as ei:
            read(b, 0, out)
        assert ei.value.status == Status.UNRECOVERED_READ_ERROR

        def unsupported(fd, bufs, off, flags=0):
            calls.append(flags)
            raise OSError(errno.EOPNOTSUPP, "no RWF_NOWAIT here")

        monkeypatch.setattr(os, "preadv", unsupported)
        assert read(b, 0, out) is False and read(b, 0, out) is False
        assert calls == [os.RWF_NOWAIT] * 2  # the EIO one, then one refusal: not asked again


def test_file_read_only(tmp_path):
    path = str(tmp_path / "d.img")
    with open(path, "wb") as f:
        f.write(b"\x07" * 4096)
    with Namespace(1, FileBackend(path, readonly=True)) as ns:
        out = memoryview(bytearray(512))
        finish_here(ns.read(7, 1, [out]))
        assert out == b"\x07" * 512
        with pytest.raises(ReadOnlyError) as ei:
            finish_here(ns.write(0, 1, [memoryview(bytes(512))]))
        assert ei.value.status == Status.NAMESPACE_WRITE_PROTECTED


def test_file_many_small_buffers_exceed_iov_max(tmp_path):
    n = iov.IOV_MAX + 10
    with Namespace(1, FileBackend(str(tmp_path / "d.img"), 4 * MiB)) as ns:
        data = pattern(n * 512, 7)
        finish_here(ns.write(0, n, bufs(data, *([512] * n))))
        out = bufs(bytes(len(data)), *([512] * n))
        finish_here(ns.read(0, n, out))
        assert b"".join(out) == data


def test_fd_closed_on_every_path(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(ValueError):
            FileBackend("/dev/null")  # opened, refused (not a regular file), closed
        with pytest.raises(ValueError):
            BlockBackend("/dev/null")
        ns = open_namespace(f"file:{tmp_path / 'x.img'},size=1M", 1)
        ns.close()
        ns.close()  # idempotent
        with pytest.raises(ValueError):
            open_namespace(f"file:{tmp_path / 'tiny.img'},size=512,lba=4096", 1)
        RamBackend(MiB).close()
    assert len(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------------------- block device ----


@pytest.fixture
def loop_device(tmp_path):
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("loop device test needs root and losetup")
    img = tmp_path / "loop.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    r = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"losetup failed here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device(loop_device):
    with open_namespace(f"blk:{loop_device},lba=4096", 3) as ns:
        assert isinstance(ns.backend, BlockBackend)
        assert ns.backend.size == 8 * MiB and ns.nsze == 2048
        data = pattern(8192, 8)
        finish_here(ns.write(5, 2, [memoryview(data)], fua=True))
        out = memoryview(bytearray(8192))
        finish_here(ns.read(5, 2, [out]))
        assert out == data
        finish_here(ns.write_zeroes(6, 1))
        finish_here(ns.deallocate([(5, 1)]))
        finish_here(ns.read(5, 2, [out]))
        assert out == bytes(8192)
        ns.flush()


def test_block_backend_refuses_regular_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a block device"):
        BlockBackend(str(p))


# ------------------------------------------------------------------------------- spec strings ----


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("512K") == 512 << 10
    assert parse_size("1G") == 1 << 30 and parse_size("1GiB") == 1 << 30 and parse_size("2t") == 2 << 40
    for bad in ("", "G", "1.5G", "-1", "1X"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_parse_namespace_spec():
    s = parse_namespace_spec("ram:size=1G,lba=512")
    assert (s.kind, s.size, s.lba_size, s.nsid, s.path) == ("ram", 1 << 30, 512, None, None)
    s = parse_namespace_spec("file:/path/disk.img,size=8G,lba=4096,nsid=3")
    assert (s.kind, s.path, s.size, s.lba_size, s.nsid) == ("file", "/path/disk.img", 8 << 30, 4096, 3)
    s = parse_namespace_spec("file:/existing.img")
    assert s.size is None
    s = parse_namespace_spec("blk:/dev/loop0,ro")
    assert (s.kind, s.path, s.readonly) == ("blk", "/dev/loop0", True)
    assert parse_namespace_spec("ram").size == DEFAULT_RAM_SIZE


@pytest.mark.parametrize(
    "text,msg",
    [
        ("nvme:size=1G", "kind"),
        ("file:size=1G", "path"),
        ("file:", "path"),
        ("ram:size=1Q", "size"),
        ("ram:lba=1024", "LBA size"),
        ("ram:size=1000", "multiple"),
        ("ram:nsid=0", "nsid"),
        ("ram:nsid=x", "nsid"),
        ("ram:color=blue", "unknown key"),
        ("ram:size", "key=value"),
        ("blk:/dev/loop0,size=1G", "block device"),
        ("ram:ro", "read-only"),
    ],
)
def test_parse_namespace_spec_errors(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_namespace_spec(text)


def test_open_namespace(tmp_path):
    with open_namespace("ram:size=2M,lba=4096", 2, controller_seed="X") as ns:
        assert (ns.nsid, ns.lba_size, ns.nsze) == (2, 4096, 512)
    with open_namespace(f"file:{tmp_path / 'a.img'},size=1M,nsid=7", 2) as ns:
        assert ns.nsid == 7 and ns.nsze == 2048
    with pytest.raises(ValueError):
        open_namespace("ram:size=1M")  # no NSID anywhere


# ---------------------------------------------------------------------------- backend registry ----

#: What the seeds and IDs were before the backend registry (identity.namespace_seed's string
#: chain, at 7e5a568), for a controller seeded by the default socket.
CONTROLLER_SEED = "socket:/tmp/nvme-emu.sock"


def test_the_registry_holds_every_kind_under_its_own_name():
    assert set(BACKENDS) == set(BackendKind)
    for kind, cls in BACKENDS.items():
        assert cls.kind is kind and backend_class(kind.value) is cls
    assert [k.value for k in BackendKind] == ["ram", "file", "blk", "nbd", "rbd"]


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_every_kind_opens_from_a_spec_string(kind, tmp_path, request):
    text = {
        BackendKind.RAM: "ram:size=1M",
        BackendKind.FILE: f"file:{tmp_path / 'k.img'},size=1M",
        BackendKind.BLOCK: "blk:{loop}",
        BackendKind.NBD: "nbd:{uri}",
        BackendKind.RBD: "{spec}",
    }[kind]
    if kind is BackendKind.BLOCK:
        text = text.format(loop=request.getfixturevalue("loop_device"))
    if kind is BackendKind.NBD:  # a real server: nbdkit's memory plugin (tests/nbd has the rest)
        need_libnbd()
        server = nbdkit(tmp_path, "memory", "1M").start()
        request.addfinalizer(server.kill)
        text = text.format(uri=server.uri)
    if kind is BackendKind.RBD:  # a real cluster: tests/support/ceph.py's (tests/rbd has the rest)
        text = text.format(spec=request.getfixturevalue("ceph_cluster").spec)
    assert parse_namespace_spec(text).kind is kind
    with open_namespace(text, 1, controller_seed=CONTROLLER_SEED) as ns:
        assert type(ns.backend) is BACKENDS[kind]
        data = pattern(512, 3)
        finish_here(ns.write(1, 1, [memoryview(data)]))
        out = memoryview(bytearray(512))
        finish_here(ns.read(1, 1, [out]))
        assert out == data


def test_an_unknown_kind_is_refused_by_name():
    for call in (lambda: parse_namespace_spec("tape:/dev/st0"), lambda: open_namespace("tape:/dev/st0", 1)):
        with pytest.raises(ValueError, match=r"namespace spec 'tape:/dev/st0': unknown kind 'tape' \(one of ram, file, blk, nbd, rbd\)"):
            call()
    with pytest.raises(ValueError, match="unknown kind 'nvme'"):
        backend_class("nvme")


def test_identity_seeds_are_what_they_were(tmp_path, monkeypatch):
    def seed(text: str) -> str:
        s = parse_namespace_spec(text)
        return BACKENDS[s.kind].identity_seed(s, CONTROLLER_SEED)

    assert seed("ram:size=1M") == "ram:socket:/tmp/nvme-emu.sock"
    assert seed("blk:/dev/disk/by-id/nvme-disk0") == "blk:/dev/disk/by-id/nvme-disk0"
    assert seed("blk:/dev/../dev/loop0,ro") == "blk:/dev/loop0"
    monkeypatch.chdir("/tmp")
    assert seed("blk:loop0") == "blk:/tmp/loop0"
    # an NBD export's: its URI, normalised (tests/nbd/test_nbd_backend.py: test_uri_normalised)
    assert seed("nbd:nbd://Storage.Example/vol1") == "nbd:nbd://storage.example:10809/vol1"
    assert seed("nbd:nbd+unix:///vol1?socket=nbd.sock") == "nbd:nbd+unix:///vol1?socket=/tmp/nbd.sock"
    nguid, eui64, uuid = derive_ids(seed("blk:/dev/disk/by-id/nvme-disk0"), 2)
    assert (nguid.hex(), eui64.hex(), str(uuid)) == (
        "a2a18b4a124fde85186e50981c6f4baa", "3647aa6d02972d1b", "933573ed-90c0-5731-98b1-50fd900315a0")
    for text, ids in [
        ("ram:size=1M", ("9bd80ecbf259ba247f473ca531a63a89", "5a8a71782af94c9a", "4fe64a7f-db4d-51e9-82e2-ea97a57d4232")),
        ("ram:size=1M,nsid=5", ("36c86b37f6d8127b7b32b57c25d060dc", "1ec46639b8d4a013", "6ace9415-88cb-5fbd-8d00-a18291ff6120")),
    ]:
        with open_namespace(text, 1, controller_seed=CONTROLLER_SEED) as ns:
            assert (ns.nguid.hex(), ns.eui64.hex(), str(ns.uuid)) == ids
    # a file's: its real path and inode (the inode is the file system's to choose)
    real = tmp_path / "disk.img"
    (tmp_path / "link.img").symlink_to(real)
    with open_namespace(f"file:{tmp_path / 'link.img'},size=1M", 3, controller_seed=CONTROLLER_SEED) as ns:
        expected = f"file:{os.path.realpath(real)}:{os.stat(real).st_ino}"
        assert seed(f"file:{tmp_path / 'link.img'}") == expected
        assert (ns.nguid, ns.eui64, ns.uuid) == derive_ids(expected, 3)
