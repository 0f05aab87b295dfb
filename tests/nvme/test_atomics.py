"""nvme_emu.atomics: the ordered accesses write exactly what they should, refuse what they
must, and start-up refuses architectures we have not reasoned about."""

from __future__ import annotations

import mmap
import os

import pytest

from nvme_emu import atomics, cli
from nvme_emu.queue import CQE, CompletionQueue, Ring
from vfio_user.dma import DMA_FLAG_READ, DMA_FLAG_WRITE, DmaTable, GuestMemory
from vfio_user.memfd import sealed_memfd

SIZE = 4096
FILL = 0xA5


@pytest.fixture
def page():
    """A page of anonymous shared memory (like a guest RAM mmap), filled with a pattern."""
    mm = mmap.mmap(-1, SIZE)
    mm.write(bytes([FILL]) * SIZE)
    view = memoryview(mm)
    yield view
    view.release()
    try:
        mm.close()
    except BufferError:  # a test's AtomicBuffer may still be alive; the GC unmaps it
        pass


def changed(view: memoryview) -> list[int]:
    return [i for i, b in enumerate(view) if b != FILL]


def test_fence_is_callable():
    atomics.fence()
    atomics.load().lib.nvme_emu_fence()


def test_release_store_writes_exactly_four_bytes(page):
    buf = atomics.AtomicBuffer(page)
    buf.store_release_u32(8, 0x01020304)
    assert changed(page) == [8, 9, 10, 11]
    assert bytes(page[8:12]) == (0x01020304).to_bytes(4, "little")
    assert buf.load_acquire_u32(8) == 0x01020304
    assert buf.load_acquire_u32(12) == int.from_bytes(bytes([FILL]) * 4, "little")


def test_cqe_store_matches_the_struct_layout(page):
    buf = atomics.AtomicBuffer(page)
    fields = (0xDEADBEEF, 0x12345678, 31, 7, 0xBEEF, (0x2 << 1) | 1)
    buf.store_cqe(32, *fields)
    assert changed(page) == list(range(32, 48))
    assert bytes(page[32:48]) == CQE.pack(*fields)
    assert CQE.unpack_from(page, 32) == fields


@pytest.mark.parametrize("off", [SIZE - 2, SIZE, SIZE + 4, 2, 1 << 40])
def test_out_of_range_or_unaligned_word_is_refused(page, off):
    buf = atomics.AtomicBuffer(page)
    with pytest.raises(IndexError):
        buf.store_release_u32(off, 0)
    with pytest.raises(IndexError):
        buf.load_acquire_u32(off)
    assert changed(page) == []


@pytest.mark.parametrize("off", [SIZE - 12, SIZE - 16 + 4, SIZE, 6])
def test_out_of_range_or_unaligned_cqe_is_refused(page, off):
    with pytest.raises(IndexError):
        atomics.AtomicBuffer(page).store_cqe(off, 1, 2, 3, 4, 5, 1)
    assert changed(page) == []


def test_negative_or_huge_offsets_raise_before_any_write(page):
    buf = atomics.AtomicBuffer(page)
    for off in (-4, 1 << 70):
        with pytest.raises(OverflowError):
            buf.store_release_u32(off, 0)
        with pytest.raises(OverflowError):
            buf.store_cqe(off, 1, 2, 3, 4, 5, 1)
    assert changed(page) == []


def test_released_buffer_refuses_every_access(page):
    buf = atomics.AtomicBuffer(page)
    buf.release()
    with pytest.raises(IndexError):
        buf.store_release_u32(0, 1)
    with pytest.raises(IndexError):
        buf.store_cqe(0, 1, 2, 3, 4, 5, 1)
    assert changed(page) == []


def test_read_only_buffer_is_refused_for_stores(page):
    with pytest.raises(BufferError):
        atomics.AtomicBuffer(b"\0" * 16)
    assert atomics.AtomicBuffer(b"\1\0\0\0", writable=False).load_acquire_u32(0) == 1
    loads_only = atomics.AtomicBuffer(page, writable=False)
    with pytest.raises(IndexError):
        loads_only.store_release_u32(0, 1)
    with pytest.raises(IndexError):
        loads_only.store_cqe(0, 1, 2, 3, 4, 5, 1)
    assert changed(page) == []


def test_ring_drop_lets_the_dma_mapping_go():
    """The cached pointer must not keep a DMA-unmapped ring's mmap alive (or block drop)."""
    fd = sealed_memfd("atomics-test", 2 * SIZE)  # as QEMU's guest RAM: the DMA table wants it sealed
    try:
        table = DmaTable()
        table.add(0x10000, 2 * SIZE, DMA_FLAG_READ | DMA_FLAG_WRITE, fd)
        memory = GuestMemory(table)
        cq = CompletionQueue(1, 0x10000, 4, vector=0, irq_enabled=False)
        cq.post(memory, 9, 0, 1, 1, 42, 0)
        assert CQE.unpack_from(memory.view(0x10000, 16), 0) == (9, 0, 1, 1, 42, 1)
        cq.ring.drop()
        table.remove(0x10000, 2 * SIZE)
        assert table.open_count() == 0
    finally:
        os.close(fd)


def test_ring_atomic_is_cached_per_view(page):
    class Memory:
        def view(self, iova, length, *, write):
            return page[iova : iova + length]

    ring = Ring(0, 4, 16)
    first = ring.atomic(Memory())
    assert ring.atomic(Memory()) is first
    ring.drop()
    assert ring.atomic(Memory()) is not first


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_supported_architectures(monkeypatch, machine):
    monkeypatch.setattr(atomics.platform, "machine", lambda: machine)
    assert atomics.check_architecture() == atomics.SUPPORTED_MACHINES[machine]


@pytest.mark.parametrize("machine", ["riscv64", "ppc64le", "s390x", "armv7l", "i686", ""])
def test_other_architectures_are_refused(monkeypatch, machine):
    monkeypatch.setattr(atomics.platform, "machine", lambda: machine)
    with pytest.raises(atomics.UnsupportedArchitecture, match="unsupported architecture.*x86-64, aarch64"):
        atomics.check_architecture()


def test_serve_refuses_an_unsupported_architecture_at_start_up(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(atomics.platform, "machine", lambda: "riscv64")
    sock = tmp_path / "nvme.sock"
    assert cli.main(["serve", "--socket", str(sock)]) == 1
    assert "unsupported architecture 'riscv64'" in capsys.readouterr().err
    assert not sock.exists()


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("NVME_EMU_CACHE", str(tmp_path))
    with pytest.raises(atomics.AtomicsUnavailable, match="apt-get install gcc"):
        atomics.build()


def test_build_is_cached_by_key(monkeypatch, tmp_path):
    monkeypatch.setenv("NVME_EMU_CACHE", str(tmp_path))
    so = atomics.build()
    assert so.is_file() and so.parent.parent == tmp_path / "atomics"
    mtime = so.stat().st_mtime_ns
    assert atomics.build() == so and so.stat().st_mtime_ns == mtime


def test_one_shot_accesses_keep_no_pointer(page):
    """The host side's helpers give the buffer back: its owner can close the mmap at once."""
    atomics.store_release_u32(page, 16, 7)
    assert atomics.load_acquire_u32(page, 16) == 7
    assert changed(page) == [16, 17, 18, 19]
    with pytest.raises(IndexError):
        atomics.store_release_u32(page, SIZE, 1)
    with pytest.raises(IndexError):
        atomics.load_acquire_u32(page, 3)
    mm = page.obj
    page.release()
    mm.close()  # would raise BufferError if a pointer were still exported
