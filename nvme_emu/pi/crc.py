"""The guard CRCs of protection information: CRC-16/T10-DIF and CRC-64/NVME.

A PI tuple's guard field protects its logical block's data (NVM Command Set, "End-to-end Data
Protection"): the 16b Guard format uses the T10 DIF CRC-16, the 64b Guard format of the
enhanced PI the NVM Express 64b CRC. The guard covers the block's data and, when the PI sits
in the last bytes of the metadata, the metadata bytes in front of it.

The models (:data:`CRC16_T10DIF`, :data:`CRC64_NVME`) are defined here once, in the Rocksoft
parameters the specification's figure uses; ``crc.c`` gets its polynomials from them at load.
The work is C (``crc.c``, table-driven, 8 bytes per step), built on first use as a cffi
API-mode module like :mod:`nvme_emu.atomics` (cached under
``${NVME_EMU_CACHE:-~/.cache/nvme-emu}/pi_crc/<key>/``) and, for the same reasons, with no
fallback: one code path, the one the tests run. :func:`reference` is the bit-by-bit definition,
for tests and the bench only (750-3300x slower: milliseconds per 4 KiB, bench/README.md "pi_crc").

For the PI engine's hot path use the bulk forms, :func:`crc16_t10dif_blocks` and
:func:`crc64_nvme_blocks`: one C call computes the guards of every block of an I/O into a
numpy array the caller owns (and may reuse across I/Os), for both layouts: separate metadata
(data blocks back to back, ``stride == block_len``, the metadata bytes before the PI through
``meta``) and extended LBAs (data and metadata interleaved: ``stride = lba size + ms``, and the
guard's span ``block_len`` reaching into the metadata when the PI is last). bench/pi_crc.py
measured eight 512 B guards through one bulk call 2.7-2.9x cheaper than eight single calls
from Python (about 2 us against 6 us per 4 KiB I/O).

Guards come out as native integers; a PI tuple stores them big-endian, so a caller compares
with a ``>u2`` / ``>u8`` view of the metadata (numpy converts) or byteswaps on store.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from vfio_user.native import CModule, NativeBuildError


@dataclass(frozen=True)
class CrcModel:
    """A CRC in the Rocksoft model's parameters (as the NVM Command Set's figure gives them).

    ``poly`` is in normal (most significant bit first) notation whatever ``reflected`` says.
    ``init == xorout`` for both guard CRCs, which is what lets 0 mean "no bytes before" when a
    computation is continued (``crc=`` below): the register is the CRC XOR ``xorout``."""

    name: str
    width: int
    poly: int
    init: int
    reflected: bool  # reflected in and reflected out (both guard CRCs reflect both or neither)
    xorout: int
    check: int  # the CRC of b"123456789"

    def __post_init__(self) -> None:
        if self.init != self.xorout:
            raise ValueError(f"{self.name}: chaining from 0 needs init == xorout")

    @property
    def mask(self) -> int:
        return (1 << self.width) - 1

    @property
    def poly_reflected(self) -> int:
        """``poly`` with its ``width`` bits in reverse order (what an LSB-first register uses)."""
        return int(f"{self.poly:0{self.width}b}"[::-1], 2)


#: 16b Guard: the T10 DIF CRC (Linux crc_t10dif, QEMU crc16_t10dif).
CRC16_T10DIF = CrcModel("CRC-16/T10-DIF", 16, 0x8BB7, 0x0000, False, 0x0000, 0xD0DB)
#: 64b Guard: the NVM Express 64b CRC (Linux crc64_nvme, formerly crc64_rocksoft).
CRC64_NVME = CrcModel("CRC-64/NVME", 64, 0xAD93D23594C93659, 0xFFFF_FFFF_FFFF_FFFF, True, 0xFFFF_FFFF_FFFF_FFFF,
                      0xAE8B14860A799888)


def reference(model: CrcModel, data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC of ``data`` bit by bit, straight from the model: the definition the C is tested
    against, and the bench's "pure Python" row. ``crc``: the CRC of the bytes before ``data``."""
    reg = (crc ^ model.xorout) & model.mask
    if model.reflected:
        poly = model.poly_reflected
        for byte in bytes(data):
            reg ^= byte
            for _ in range(8):
                reg = (reg >> 1) ^ poly if reg & 1 else reg >> 1
    else:
        top, shift = 1 << (model.width - 1), model.width - 8
        for byte in bytes(data):
            reg ^= byte << shift
            for _ in range(8):
                reg = ((reg << 1) ^ model.poly) & model.mask if reg & top else (reg << 1) & model.mask
    return reg ^ model.xorout


# --------------------------------------------------------------------------------------------
# the native module
# --------------------------------------------------------------------------------------------

SOURCE = Path(__file__).resolve().with_name("crc.c")
MODULE = "_nvme_emu_pi_crc"

CDEF = """
void nvme_emu_crc_init(uint16_t poly16, uint64_t poly64_reflected);
uint16_t nvme_emu_crc16_t10dif(uint16_t crc, const uint8_t *p, size_t n);
uint64_t nvme_emu_crc64_nvme(uint64_t crc, const uint8_t *p, size_t n);
int nvme_emu_crc16_t10dif_blocks(const uint8_t *buf, size_t buf_size, size_t block_len, size_t stride,
                                 const uint8_t *meta, size_t meta_size, size_t meta_len, size_t meta_stride,
                                 uint16_t *out, size_t n);
int nvme_emu_crc64_nvme_blocks(const uint8_t *buf, size_t buf_size, size_t block_len, size_t stride,
                               const uint8_t *meta, size_t meta_size, size_t meta_len, size_t meta_stride,
                               uint64_t *out, size_t n);
"""
_MODULE = CModule(MODULE, SOURCE, CDEF, "pi_crc")


class CrcUnavailable(RuntimeError):
    """The native CRCs could not be built or loaded (no compiler, no Python headers...)."""


class BlocksError(IntEnum):
    """Why ``crc.c``'s bulk functions refused their arguments (their return codes; crc.c
    writes the same numbers, and tests/pi/test_crc.py reaches every one)."""

    STRIDE = 1  # stride < block_len: the blocks would overlap
    DATA_SHORT = 2  # the data buffer ends before the last block
    META_MISSING = 3  # meta_len > 0 without a metadata buffer
    META_STRIDE = 4  # meta_stride < meta_len
    META_SHORT = 5  # the metadata buffer ends before the last block's metadata bytes


_ffi: Any = None
_lib: Any = None


def load() -> Any:
    """The loaded module's ``lib``, its tables filled (build on first use). For start-up too:
    call it before a guest attaches so a missing compiler is reported then, not at an I/O."""
    global _ffi, _lib
    if _lib is None:
        try:
            module = _MODULE.load()
        except NativeBuildError as e:
            raise CrcUnavailable(f"{e} (nvme-emu needs it for protection information guards)") from None
        module.lib.nvme_emu_crc_init(CRC16_T10DIF.poly, CRC64_NVME.poly_reflected)
        _ffi, _lib = module.ffi, module.lib
    return _lib


# --------------------------------------------------------------------------------------------
# single buffers
# --------------------------------------------------------------------------------------------


def crc16_t10dif(buf: Any, crc: int = 0) -> int:
    """CRC-16/T10-DIF of ``buf`` (any buffer); ``crc`` is the CRC of the bytes before it, so
    ``crc16_t10dif(b, crc16_t10dif(a)) == crc16_t10dif(a + b)``."""
    lib = _lib or load()
    try:
        ptr = _ffi.from_buffer("uint8_t[]", buf)  # len(ptr) is in bytes, whatever the buffer's format
        return lib.nvme_emu_crc16_t10dif(crc, ptr, len(ptr))
    except OverflowError:
        raise ValueError(f"crc {crc!r} is not a 16-bit CRC") from None


def crc64_nvme(buf: Any, crc: int = 0) -> int:
    """CRC-64/NVME of ``buf`` (any buffer); ``crc`` is the CRC of the bytes before it (0 for
    none: the all-ones init and final inversion are applied inside, as Linux's crc64_nvme)."""
    lib = _lib or load()
    try:
        ptr = _ffi.from_buffer("uint8_t[]", buf)  # len(ptr) is in bytes, whatever the buffer's format
        return lib.nvme_emu_crc64_nvme(crc, ptr, len(ptr))
    except OverflowError:
        raise ValueError(f"crc {crc!r} is not a 64-bit CRC") from None


# --------------------------------------------------------------------------------------------
# the guards of many blocks in one call
# --------------------------------------------------------------------------------------------

_U16 = np.dtype(np.uint16)
_U64 = np.dtype(np.uint64)


class _OutCache:
    """The last ``out`` array accepted for one guard width, with its C pointer.

    Taking a numpy array's pointer (``ffi.from_buffer``) measured 375 ns, more than a third of
    the C work for a 4 KiB I/O's eight 512 B guards (about 1.1 us), and the bulk call's
    argument checks another 170 ns; an engine reuses one array, so both are paid once. Holding
    the pointer holds the array's buffer export, so numpy cannot resize or free it meanwhile;
    ``writeable`` is looked at on every call, since it can be switched off after caching."""

    __slots__ = ("ctype", "dtype", "array", "ptr", "size")

    def __init__(self, ctype: str, dtype: np.dtype) -> None:
        self.ctype, self.dtype = ctype, dtype
        self.array: Any = None  # np.ndarray once one is accepted
        self.ptr: Any = None
        self.size = 0

    def pointer(self, out: Any, count: int) -> Any:
        if out is not self.array or not out.flags.writeable:
            if not (isinstance(out, np.ndarray) and out.dtype == self.dtype and out.ndim == 1 and out.flags.c_contiguous
                    and out.flags.writeable):
                raise ValueError(f"out must be a writable 1-D C-contiguous {self.dtype} array, not {_describe(out)}")
            self.ptr = _ffi.from_buffer(self.ctype, out, require_writable=True)
            self.array, self.size = out, out.shape[0]
        if self.size < count:
            raise ValueError(f"out holds {self.size} guards, {count} blocks asked")
        return self.ptr


_OUT16 = _OutCache("uint16_t[]", _U16)
_OUT64 = _OutCache("uint64_t[]", _U64)


def crc16_t10dif_blocks(data: Any, count: int, block_len: int, out: np.ndarray, *, stride: int | None = None,
                        meta: Any = None, meta_len: int = 0, meta_stride: int | None = None) -> None:
    """The 16b guards of ``count`` blocks into ``out[:count]`` (native-endian uint16).

    Block ``i``'s guard is the CRC of ``block_len`` bytes of ``data`` at ``i * stride``
    (``stride`` defaults to ``block_len``: blocks back to back), continued over ``meta_len``
    bytes of ``meta`` at ``i * meta_stride`` when ``meta_len`` > 0 (``meta_stride`` defaults
    to ``meta_len``). ``out`` is a 1-D, C-contiguous, writable uint16 array of at least
    ``count`` elements, so one array sized for the largest I/O serves every I/O (and reusing
    it is cheaper: the last one is remembered, see :class:`_OutCache`).
    Raises ValueError for any argument that does not fit (nothing is read or written then).
    """
    lib = _lib or load()
    _blocks(lib.nvme_emu_crc16_t10dif_blocks, _OUT16.pointer(out, count), data, count, block_len, stride, meta, meta_len, meta_stride)


def crc64_nvme_blocks(data: Any, count: int, block_len: int, out: np.ndarray, *, stride: int | None = None,
                      meta: Any = None, meta_len: int = 0, meta_stride: int | None = None) -> None:
    """The 64b guards of ``count`` blocks into ``out[:count]`` (native-endian uint64); the
    arguments are :func:`crc16_t10dif_blocks`'s."""
    lib = _lib or load()
    _blocks(lib.nvme_emu_crc64_nvme_blocks, _OUT64.pointer(out, count), data, count, block_len, stride, meta, meta_len, meta_stride)


def _blocks(fn: Any, out_ptr: Any, data: Any, count: int, block_len: int, stride: int | None, meta: Any, meta_len: int,
            meta_stride: int | None) -> None:
    ffi = _ffi
    data_ptr = ffi.from_buffer("uint8_t[]", data)
    if meta is None:
        meta_ptr, meta_size = ffi.NULL, 0
    else:
        meta_ptr = ffi.from_buffer("uint8_t[]", meta)
        meta_size = len(meta_ptr)
    try:
        rc = fn(data_ptr, len(data_ptr), block_len, block_len if stride is None else stride,
                meta_ptr, meta_size, meta_len, meta_len if meta_stride is None else meta_stride, out_ptr, count)
    except OverflowError:
        raise ValueError(f"negative or oversized argument among count={count}, block_len={block_len}, stride={stride}, "
                         f"meta_len={meta_len}, meta_stride={meta_stride}") from None
    if rc:
        raise ValueError(_refusal(BlocksError(rc), len(data_ptr), count, block_len, stride, meta_size, meta_len, meta_stride))


def _describe(out: Any) -> str:
    if isinstance(out, np.ndarray):
        return f"{out.dtype} array of shape {out.shape}{'' if out.flags.writeable else ', read-only'}"
    return type(out).__name__


def _refusal(why: BlocksError, data_size: int, count: int, block_len: int, stride: int | None, meta_size: int,
             meta_len: int, meta_stride: int | None) -> str:
    stride = block_len if stride is None else stride
    meta_stride = meta_len if meta_stride is None else meta_stride
    match why:
        case BlocksError.STRIDE:
            return f"stride {stride} < block_len {block_len}: blocks would overlap"
        case BlocksError.DATA_SHORT:
            return f"{count} blocks of {block_len} bytes at stride {stride} need more than the data's {data_size} bytes"
        case BlocksError.META_MISSING:
            return f"meta_len {meta_len} without a metadata buffer"
        case BlocksError.META_STRIDE:
            return f"meta_stride {meta_stride} < meta_len {meta_len}"
        case BlocksError.META_SHORT:
            return f"{count} blocks' {meta_len} metadata bytes at stride {meta_stride} need more than the metadata's {meta_size} bytes"
