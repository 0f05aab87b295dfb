"""Per-call cost of the ordered accesses (nvme_emu/atomics.c): cffi ABI mode vs API mode,
against the plain-Python stores they replace.

ABI mode (``ffi.dlopen`` of a .so gcc built) needs only gcc and libc6-dev; API mode (a CPython
extension whose C cffi generates; nvme-emu compiles it with gcc, no setuptools) also needs the
Python headers, and its calls should be cheaper because generated C converts the arguments
instead of libffi. This bench measures by how much, per call, so the choice rests on numbers.
Usage: ``./dev bench atomics``. Writes results/atomics.json.
"""

from __future__ import annotations

import mmap
import struct
import subprocess
import sys
import tempfile
import threading
import timeit
from pathlib import Path

from common import RESULTS, format_table, machine, write_json

import cffi

from nvme_emu import atomics
from nvme_emu.queue import CQE


def per_call_ns(fn, number: int = 200_000) -> float:
    """Best of 5 runs, per call, in ns (timeit's loop overhead included: same for every row)."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def build_abi_mode(tmp: Path):
    """The same C as a plain shared object loaded with ``ffi.dlopen`` (cffi ABI mode)."""
    so = tmp / "libnvme-emu-atomics.so"
    subprocess.run(["gcc", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-o", str(so), str(atomics.SOURCE)], check=True)
    ffi = cffi.FFI()
    ffi.cdef(atomics.CDEF)
    return ffi, ffi.dlopen(str(so))


def cases(view: memoryview, abi_ffi, abi, api_ffi, api) -> list[tuple[str, str, object]]:
    """(operation, variant, zero-argument callable) for every row of the table."""
    lock = threading.Lock()
    p_abi = abi_ffi.from_buffer("uint8_t[]", view, require_writable=True)
    p_api = api_ffi.from_buffer("uint8_t[]", view, require_writable=True)
    n = len(view)
    buf = atomics.AtomicBuffer(view)
    pack, word = CQE.pack, struct.Struct("<I").pack

    def lock_fence() -> None:
        lock.acquire()
        lock.release()

    def old_cqe() -> None:
        e = pack(7, 0, 3, 1, 9, 1)
        view[64:76] = e[:12]
        view[76:80] = e[12:]

    return [
        ("full fence", "threading.Lock round trip (before)", lock_fence),
        ("full fence", "ABI lib call", abi.nvme_emu_fence),
        ("full fence", "API lib call", api.nvme_emu_fence),
        ("full fence", "atomics.fence() (API)", atomics.fence),
        ("store u32", "struct.pack + slice store (before)", lambda: view.__setitem__(slice(8, 12), word(5))),
        ("store u32", "ABI lib call, cached pointer", lambda: abi.nvme_emu_store_release_u32(p_abi, n, 8, 5)),
        ("store u32", "API lib call, cached pointer", lambda: api.nvme_emu_store_release_u32(p_api, n, 8, 5)),
        ("store u32", "AtomicBuffer method (API)", lambda: buf.store_release_u32(8, 5)),
        ("store u32", "ABI, from_buffer per call", lambda: abi.nvme_emu_store_release_u32(abi_ffi.from_buffer("uint8_t[]", view), n, 8, 5)),
        ("store u32", "API, from_buffer per call", lambda: api.nvme_emu_store_release_u32(api_ffi.from_buffer("uint8_t[]", view), n, 8, 5)),
        ("load u32", "view[i] & 1 (before)", lambda: view[14] & 1),
        ("load u32", "ABI lib call, cached pointer", lambda: abi.nvme_emu_load_acquire_u32(p_abi, n, 12)),
        ("load u32", "API lib call, cached pointer", lambda: api.nvme_emu_load_acquire_u32(p_api, n, 12)),
        ("load u32", "AtomicBuffer method (API)", lambda: buf.load_acquire_u32(12)),
        ("CQE store", "CQE.pack + 2 slice stores (before)", old_cqe),
        ("CQE store", "ABI lib call, cached pointer", lambda: abi.nvme_emu_store_cqe(p_abi, n, 64, 7, 0, 3, 1, 9, 1)),
        ("CQE store", "API lib call, cached pointer", lambda: api.nvme_emu_store_cqe(p_api, n, 64, 7, 0, 3, 1, 9, 1)),
        ("CQE store", "AtomicBuffer.store_cqe (API)", lambda: buf.store_cqe(64, 7, 0, 3, 1, 9, 1)),
    ]


def main() -> None:
    mm = mmap.mmap(-1, 1 << 16)
    view = memoryview(mm)
    native = atomics.load()  # what nvme-emu uses: API mode
    with tempfile.TemporaryDirectory() as tmp:
        abi_ffi, abi = build_abi_mode(Path(tmp))
        rows = []
        for op, variant, fn in cases(view, abi_ffi, abi, native.ffi, native.lib):
            rows.append({"operation": op, "variant": variant, "ns_per_call": per_call_ns(fn)})
    print(format_table(rows, [("operation", "operation", ""), ("variant", "variant", ""), ("ns_per_call", "ns/call", ".0f")]))
    path = write_json(RESULTS / "atomics.json", {"machine": machine(), "python": sys.version, "cffi": cffi.__version__, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
