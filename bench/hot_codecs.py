"""Hot-path codecs: construct against struct for what every trapped doorbell and every command
decodes (vfio-user header + region-access prefix, the 64-byte SQE, the 16-byte CQE).

This is the measurement behind "construct for the control plane, struct on the hot path".
Usage: ``./dev bench hot_codecs``.
"""

from __future__ import annotations

import timeit

from common import RESULTS, format_table, machine, write_json

from construct import Int8ul, Int16ul, Int32ul, Int64ul, Struct

from nvme_emu.queue import CQE
from nvme_emu.sqe import SQE
from vfio_user import messages as m

#: The SQE and CQE as construct would declare them, for the comparison only.
SQE_CONSTRUCT = Struct(
    "opc" / Int8ul, "flags" / Int8ul, "cid" / Int16ul, "nsid" / Int32ul, "cdw2" / Int32ul, "cdw3" / Int32ul,
    "mptr" / Int64ul, "prp1" / Int64ul, "prp2" / Int64ul,
    "cdw10" / Int32ul, "cdw11" / Int32ul, "cdw12" / Int32ul, "cdw13" / Int32ul, "cdw14" / Int32ul, "cdw15" / Int32ul,
)
CQE_CONSTRUCT = Struct("dw0" / Int32ul, "dw1" / Int32ul, "sqhd" / Int16ul, "sqid" / Int16ul, "cid" / Int16ul, "status" / Int16ul)


def per_call_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    hdr = m.HEADER.pack(1, 10, 36, 0x10, 0)
    prefix = m.REGION_ACCESS.pack(0x1008, 0, 4) + b"\x01\0\0\0"
    sqe = SQE.pack(2, 0, 7, 1, 0, 0, 0, 0x100000, 0, 8, 0, 7, 0, 0, 0)
    cqe_fields = dict(dw0=0, dw1=0, sqhd=3, sqid=1, cid=7, status=1)
    cases = [
        (
            "REGION_WRITE header+prefix parse",
            lambda: (m.Header.parse(hdr), m.RegionAccess.parse(prefix)),
            lambda: (m.HEADER.unpack_from(hdr), m.REGION_ACCESS.unpack_from(prefix)),
        ),
        ("SQE parse (64 B)", lambda: SQE_CONSTRUCT.parse(sqe), lambda: SQE.unpack_from(sqe)),
        ("CQE build (16 B)", lambda: CQE_CONSTRUCT.build(cqe_fields), lambda: CQE.pack(0, 0, 3, 1, 7, 1)),
    ]
    rows = []
    for name, slow, fast in cases:
        c = per_call_us(slow, 2000)
        s = per_call_us(fast, 200000)
        rows.append({"case": name, "construct_us": c, "struct_us": s, "ratio": c / s})
    print(format_table(rows, [("case", "codec", ""), ("construct_us", "construct us", ".2f"), ("struct_us", "struct us", ".3f"), ("ratio", "ratio", ".0f")]))
    path = write_json(RESULTS / "hot_codecs.json", {"machine": machine(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
