"""nvme_emu.pi.crc: the guard CRCs give the published answers, chain, agree between the C
(single and bulk forms) and the bit-by-bit definition on every length and layout the PI engine
will use, and refuse bad arguments with ValueError before touching memory."""

from __future__ import annotations

import array
import mmap

import numpy as np
import pytest

from nvme_emu.pi import crc
from nvme_emu.pi.crc import CRC16_T10DIF, CRC64_NVME, BlocksError, CrcModel

CHECK = b"123456789"
RNG_SEED = 26  # issue 26

# --------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------

#: The T10 "Simplified End-to-End Data Protection" codewords (32 data bytes each), which the
#: NVM Command Set repeats as its 16b CRC test cases.
T10DIF_VECTORS = [
    (bytes(32), 0x0000),
    (b"\xff" * 32, 0xA293),
    (bytes(range(32)), 0x0224),
    (b"\xff\xff" + bytes(30), 0x21B8),
    (bytes(range(0xFF, 0xDF, -1)), 0xA0B7),
]

#: The NVM Command Set's 64b CRC test cases: 4 KiB each.
NVME64_VECTORS = [
    (bytes(4096), 0x6482D367EB22B64E),
    (b"\xff" * 4096, 0xC0DDBA7302ECA3AC),
    (bytes(i & 0xFF for i in range(4096)), 0x3E729F5F6750449C),
    (bytes(0xFF - (i & 0xFF) for i in range(4096)), 0x9A2DF64B8E9E517E),
]


def test_check_values():
    assert crc.crc16_t10dif(CHECK) == 0xD0DB
    assert crc.crc64_nvme(CHECK) == 0xAE8B14860A799888
    # the models carry the same numbers, and the bit-by-bit definition reproduces them
    assert CRC16_T10DIF.check == 0xD0DB and crc.reference(CRC16_T10DIF, CHECK) == 0xD0DB
    assert CRC64_NVME.check == 0xAE8B14860A799888 and crc.reference(CRC64_NVME, CHECK) == 0xAE8B14860A799888


@pytest.mark.parametrize(("data", "expected"), T10DIF_VECTORS, ids=["zeros", "ones", "inc", "ffff-zeros", "dec"])
def test_t10dif_vectors(data, expected):
    assert crc.crc16_t10dif(data) == expected
    assert crc.reference(CRC16_T10DIF, data) == expected


@pytest.mark.parametrize(("data", "expected"), NVME64_VECTORS, ids=["zeros", "ones", "inc", "dec"])
def test_nvme64_vectors(data, expected):
    assert crc.crc64_nvme(data) == expected
    assert crc.reference(CRC64_NVME, data) == expected


def test_reflected_polynomial():
    # the LSB-first form the C tables are built from (as Go's crc64nvme package states it)
    assert CRC64_NVME.poly_reflected == 0x9A6C9329AC4BC9B5
    assert CRC16_T10DIF.poly_reflected == 0xEDD1


def test_residues():
    """A block followed by its own CRC checks to the model's constant: 0 for T10-DIF (CRC
    appended big-endian), the complemented residue for CRC-64/NVME (appended little-endian)."""
    data = np.random.default_rng(RNG_SEED).bytes(512)
    assert crc.crc16_t10dif(data + crc.crc16_t10dif(data).to_bytes(2, "big")) == 0
    residue = crc.crc64_nvme(data + crc.crc64_nvme(data).to_bytes(8, "little"))
    assert residue == 0xF310303B2B6F6E42 ^ CRC64_NVME.xorout
    assert crc.crc64_nvme(CHECK + CRC64_NVME.check.to_bytes(8, "little")) == residue


def test_model_refuses_init_other_than_xorout():
    with pytest.raises(ValueError, match="init == xorout"):
        CrcModel("CRC-16/IBM-3740", 16, 0x1021, 0xFFFF, False, 0x0000, 0x29B1)


# --------------------------------------------------------------------------------------------
# single buffers: empty input, chaining, every length, every buffer type
# --------------------------------------------------------------------------------------------


def test_empty_input():
    assert crc.crc16_t10dif(b"") == 0
    assert crc.crc64_nvme(b"") == 0
    # nothing more to add: the seed comes back unchanged
    assert crc.crc16_t10dif(b"", 0x1234) == 0x1234
    assert crc.crc64_nvme(b"", 0x0123456789ABCDEF) == 0x0123456789ABCDEF
    assert crc.reference(CRC16_T10DIF, b"") == 0 and crc.reference(CRC64_NVME, b"") == 0


@pytest.mark.parametrize(("fn", "model"), [(crc.crc16_t10dif, CRC16_T10DIF), (crc.crc64_nvme, CRC64_NVME)], ids=["crc16", "crc64"])
def test_every_length_and_split(fn, model):
    """Lengths 0..40 cross the 8-byte steps and the byte-wise tail; every split point of each
    must chain to the whole: crc(a + b) == crc(b, seeded with crc(a))."""
    data = np.random.default_rng(RNG_SEED).bytes(40)
    for n in range(len(data) + 1):
        whole = fn(data[:n])
        assert whole == crc.reference(model, data[:n]), n
        for cut in range(n + 1):
            assert fn(data[cut:n], fn(data[:cut])) == whole, (n, cut)
            assert crc.reference(model, data[cut:n], crc.reference(model, data[:cut])) == whole


@pytest.mark.parametrize("fn", [crc.crc16_t10dif, crc.crc64_nvme], ids=["crc16", "crc64"])
def test_unaligned_start(fn):
    """Guest buffers start anywhere: the same bytes at every offset of a larger buffer."""
    data = np.random.default_rng(RNG_SEED).bytes(600)
    view = memoryview(bytearray(8) + data)
    expected = fn(data[:512])
    for off in range(8):
        view[off:off + 512] = data[:512]
        assert fn(view[off:off + 512]) == expected, off


@pytest.mark.parametrize("fn", [crc.crc16_t10dif, crc.crc64_nvme], ids=["crc16", "crc64"])
def test_buffer_types(fn):
    data = np.random.default_rng(RNG_SEED).bytes(4096)
    expected = fn(data)
    mm = mmap.mmap(-1, 4096)
    mm.write(data)
    try:
        for buf in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8), mm,
                    array.array("H", data), np.frombuffer(data, np.uint64)):
            # a buffer of 2- or 8-byte items still counts in bytes
            assert fn(buf) == expected, type(buf)
    finally:
        mm.close()


@pytest.mark.parametrize(("fn", "bits"), [(crc.crc16_t10dif, 16), (crc.crc64_nvme, 64)], ids=["crc16", "crc64"])
def test_seed_out_of_range_is_value_error(fn, bits):
    for bad in (-1, 1 << bits):
        with pytest.raises(ValueError, match=f"{bits}-bit CRC"):
            fn(CHECK, bad)
    assert fn(CHECK, (1 << bits) - 1) == fn(CHECK, (1 << bits) - 1)  # the largest seed is fine


# --------------------------------------------------------------------------------------------
# bulk forms: both layouts, the formats the issue names
# --------------------------------------------------------------------------------------------

GUARDS = {
    # name: (bulk, single, out dtype, PI tuple size)
    "crc16": (crc.crc16_t10dif_blocks, crc.crc16_t10dif, np.uint16, 8),
    "crc64": (crc.crc64_nvme_blocks, crc.crc64_nvme, np.uint64, 16),
}
FORMATS = [(512, 8), (512, 16), (4096, 8), (4096, 64)]
COUNT = 9  # more than one 4 KiB I/O's 512 B blocks, and odd


def _pil_cases(ms: int, pi_size: int) -> list[int]:
    """Metadata bytes the guard covers: 0 (PI first), and ms - pi_size (PI last) when the PI
    fits and leaves bytes in front of it."""
    return [0] + ([ms - pi_size] if ms > pi_size else [])


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize(("lba", "ms"), FORMATS, ids=[f"{b}+{m}" for b, m in FORMATS])
def test_blocks_separate_metadata(guard, lba, ms):
    bulk, single, dtype, pi_size = GUARDS[guard]
    rng = np.random.default_rng(RNG_SEED)
    data, meta = rng.bytes(COUNT * lba), rng.bytes(COUNT * ms)
    for pil in _pil_cases(ms, pi_size):
        out = np.full(COUNT + 3, 0x5A5A, dtype)
        if pil:
            bulk(data, COUNT, lba, out, meta=meta, meta_len=pil, meta_stride=ms)
        else:
            bulk(data, COUNT, lba, out)
        expected = [single(data[i * lba:(i + 1) * lba] + meta[i * ms:i * ms + pil]) for i in range(COUNT)]
        assert out[:COUNT].tolist() == expected, pil
        assert out[COUNT:].tolist() == [0x5A5A] * 3  # nothing past count is written


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize(("lba", "ms"), FORMATS, ids=[f"{b}+{m}" for b, m in FORMATS])
def test_blocks_extended_lba(guard, lba, ms):
    bulk, single, dtype, pi_size = GUARDS[guard]
    stride = lba + ms
    buf = np.random.default_rng(RNG_SEED).bytes(COUNT * stride)
    for pil in _pil_cases(ms, pi_size):
        out = np.zeros(COUNT, dtype)
        bulk(buf, COUNT, lba + pil, out, stride=stride)
        expected = [single(buf[i * stride:i * stride + lba + pil]) for i in range(COUNT)]
        assert out.tolist() == expected, pil
    # the same guards whether the metadata bytes come in the span or through meta=
    mv = memoryview(buf)
    meta = b"".join(mv[i * stride + lba:(i + 1) * stride] for i in range(COUNT))
    data = b"".join(mv[i * stride:i * stride + lba] for i in range(COUNT))
    for pil in _pil_cases(ms, pi_size):
        a, b = np.zeros(COUNT, dtype), np.zeros(COUNT, dtype)
        bulk(buf, COUNT, lba + pil, a, stride=stride)
        bulk(data, COUNT, lba, b, meta=meta, meta_len=pil, meta_stride=ms)
        assert a.tolist() == b.tolist()


@pytest.mark.parametrize("guard", GUARDS)
def test_blocks_detect_a_flipped_bit_in_their_block_only(guard):
    bulk, _single, dtype, _pi = GUARDS[guard]
    lba, ms = 512, 8
    stride = lba + ms
    buf = bytearray(np.random.default_rng(RNG_SEED).bytes(8 * stride))
    before, after = np.zeros(8, dtype), np.zeros(8, dtype)
    bulk(buf, 8, lba, before, stride=stride)
    buf[3 * stride + 100] ^= 0x10  # block 3's data
    buf[5 * stride + lba] ^= 0xFF  # block 5's metadata: outside every guard's span (PI first)
    bulk(buf, 8, lba, after, stride=stride)
    assert [i for i in range(8) if before[i] != after[i]] == [3]


@pytest.mark.parametrize("guard", GUARDS)
def test_blocks_zero_count_and_empty_blocks(guard):
    bulk, single, dtype, _pi = GUARDS[guard]
    out = np.full(4, 7, dtype)
    bulk(b"", 0, 512, out)  # nothing asked, nothing read, nothing written
    assert out.tolist() == [7] * 4
    bulk(b"", 4, 0, out, stride=0)  # empty blocks: the CRC of no bytes
    assert out.tolist() == [single(b"")] * 4


@pytest.mark.parametrize("guard", GUARDS)
def test_blocks_exact_fit_is_accepted(guard):
    bulk, single, dtype, _pi = GUARDS[guard]
    # 3 blocks at stride 520 end at 2 * 520 + 512: the trailing 8 bytes of the last stride
    # are not needed, nor the last stride's metadata beyond meta_len
    buf = np.random.default_rng(RNG_SEED).bytes(2 * 520 + 512)
    meta = bytes(range(2 * 16 + 4))
    out = np.zeros(3, dtype)
    bulk(buf, 3, 512, out, stride=520, meta=meta, meta_len=4, meta_stride=16)
    assert out.tolist() == [single(buf[i * 520:i * 520 + 512] + meta[i * 16:i * 16 + 4]) for i in range(3)]


# --------------------------------------------------------------------------------------------
# bulk forms: refusals
# --------------------------------------------------------------------------------------------

REFUSALS = [
    # (what, kwargs over a 4-block, 512 B, separate-metadata call, message, BlocksError or None)
    ("data one byte short", dict(data=bytes(4 * 512 - 1)), "need more than the data's 2047 bytes", BlocksError.DATA_SHORT),
    ("strided data short", dict(data=bytes(3 * 520 + 511), stride=520), "at stride 520 need more", BlocksError.DATA_SHORT),
    ("block longer than data", dict(data=bytes(100)), "need more than the data's 100", BlocksError.DATA_SHORT),
    ("count beyond out", dict(count=1 << 62), "holds 8 guards, 4611686018427387904 blocks asked", None),
    ("overlapping blocks", dict(stride=256), "stride 256 < block_len 512", BlocksError.STRIDE),
    ("meta_len without meta", dict(meta_len=8), "meta_len 8 without a metadata buffer", BlocksError.META_MISSING),
    ("meta stride too small", dict(meta=bytes(64), meta_len=8, meta_stride=4), "meta_stride 4 < meta_len 8", BlocksError.META_STRIDE),
    ("meta one byte short", dict(meta=bytes(3 * 16 + 7), meta_len=8, meta_stride=16), "metadata's 55 bytes", BlocksError.META_SHORT),
    ("meta shorter than one", dict(meta=bytes(4), meta_len=8), "metadata's 4 bytes", BlocksError.META_SHORT),
    ("negative count", dict(count=-1), "negative or oversized", None),
    ("negative block_len", dict(block_len=-512), "negative or oversized", None),
    ("negative stride", dict(stride=-1), "negative or oversized", None),
]


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize(("what", "kwargs", "message", "code"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_blocks_refusals(guard, what, kwargs, message, code):
    bulk, _single, dtype, _pi = GUARDS[guard]
    out = np.full(8, 3, dtype)
    args = dict(data=bytes(4 * 512), count=4, block_len=512, out=out) | kwargs
    with pytest.raises(ValueError, match=message):
        bulk(args.pop("data"), args.pop("count"), args.pop("block_len"), args.pop("out"), **args)
    assert out.tolist() == [3] * 8  # refused before anything was written


def test_every_blocks_error_is_reached():
    """The codes crc.c returns and BlocksError names are the same set (the table above)."""
    assert {r[3] for r in REFUSALS if r[3] is not None} == set(BlocksError)


def test_huge_count_against_a_big_enough_out_is_refused_by_c():
    """(count - 1) * stride would overflow 64 bits: C's check divides instead of multiplying.
    No `out` that large can exist, so Python's out check always comes first: call C itself."""
    lib, ffi = crc.load(), crc._ffi
    guards = np.zeros(1, np.uint16)
    out_ptr = ffi.from_buffer("uint16_t[]", guards, require_writable=True)
    data = ffi.from_buffer("uint8_t[]", bytes(1024))
    for count in (1 << 62, (1 << 64) - 1):
        rc = lib.nvme_emu_crc16_t10dif_blocks(data, 1024, 512, 1 << 40, ffi.NULL, 0, 0, 0, out_ptr, count)
        assert rc == BlocksError.DATA_SHORT
        # empty data blocks pass; the metadata's (count - 1) * meta_stride is what overflows
        rc = lib.nvme_emu_crc64_nvme_blocks(data, 1024, 0, 0, data, 1024, 8, 1 << 63, ffi.cast("uint64_t *", 0), count)
        assert rc == BlocksError.META_SHORT
    assert guards.tolist() == [0]


BAD_OUTS = {
    "wrong width": lambda dtype: np.zeros(8, np.uint32),
    "signed": lambda dtype: np.zeros(8, np.dtype(dtype).str.replace("u", "i")),
    "big-endian": lambda dtype: np.zeros(8, np.dtype(dtype).newbyteorder(">")),
    "float": lambda dtype: np.zeros(8, np.float64),
    "2-D": lambda dtype: np.zeros((2, 4), dtype),
    "not contiguous": lambda dtype: np.zeros(16, dtype)[::2],
    "read-only": lambda dtype: np.frombuffer(bytes(8 * np.dtype(dtype).itemsize), dtype),
    "a list": lambda dtype: [0] * 8,
    "bytes": lambda dtype: bytearray(8 * np.dtype(dtype).itemsize),
    "too small": lambda dtype: np.zeros(3, dtype),
}


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("bad", BAD_OUTS)
def test_blocks_refuse_bad_out(guard, bad):
    bulk, _single, dtype, _pi = GUARDS[guard]
    out = BAD_OUTS[bad](dtype)
    with pytest.raises(ValueError, match="out "):
        bulk(bytes(4 * 512), 4, 512, out)


@pytest.mark.parametrize("guard", GUARDS)
def test_blocks_remembered_out_is_still_checked(guard):
    """The last out array's pointer is reused (bench: 375 ns saved per call), but a reused
    array switched to read-only, or asked for more guards than it holds, is still refused,
    and switching between arrays writes each one."""
    bulk, single, dtype, _pi = GUARDS[guard]
    data = np.random.default_rng(RNG_SEED).bytes(4 * 512)
    expected = [single(data[i * 512:(i + 1) * 512]) for i in range(4)]
    a, b = np.zeros(4, dtype), np.zeros(8, dtype)
    bulk(data, 4, 512, a)
    bulk(data, 4, 512, b)
    a[:] = 0
    bulk(data, 4, 512, a)  # back to the first array: written, not the second
    assert a.tolist() == expected and b[:4].tolist() == expected
    with pytest.raises(ValueError, match="holds 4 guards, 5 blocks asked"):
        bulk(data + bytes(512), 5, 512, a)
    a.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        bulk(data, 4, 512, a)
