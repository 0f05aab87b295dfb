"""What a guard CRC costs per 4 KiB I/O (issue 26): nvme_emu.pi.crc against the alternatives.

Per 4 KiB I/O, as 8 x 512 B blocks and as 1 x 4096 B block, for CRC-16/T10-DIF and CRC-64/NVME:

- ``C bulk``: :func:`nvme_emu.pi.crc.crc16_t10dif_blocks` / ``crc64_nvme_blocks``, every guard
  of the I/O in one call into a reused numpy array (what the PI engine is meant to call); also
  with extended LBAs (8 x 512 B at a stride of 520 B) to show the stride costs nothing;
- ``C per block``: the single-buffer functions called from a Python loop, one per block;
- ``python bitwise``: :func:`nvme_emu.pi.crc.reference`, the bit-by-bit definition;
- the maintained PyPI implementations that install here, per block from a Python loop (none has
  a strided bulk form): ``fastcrc`` (Rust; CRC-16/T10-DIF only, it has no CRC-64/NVME),
  ``anycrc`` (C, both) and ``crcmod-plus`` (the maintained fork of crcmod, C extension, both).
  Each is skipped, and said so, when it does not import; none is a dependency of nvme-emu.
- the yardstick: one plain 4 KiB copy (a bytearray slice), the data copy every read and write
  does anyway.

Every variant runs in every round, side by side, the order rotating between rounds; each
round's figure is the best of 3 timeit repeats (the least disturbed), the table gives the
median of rounds with min-max, and ratios to the copy and to the C bulk call.
CPU-bound and short: ``./dev bench pi_crc [--rounds 5]`` (about 10 s per round).
Writes ``results/pi_crc.json`` and ``results/pi_crc.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from common import RESULTS, describe_machine, format_table, machine, pyplot, write_json

import numpy as np

from nvme_emu.pi import crc

IO = 4096
SHAPES = {"8x512": (8, 512), "1x4096": (1, 4096)}
EXT_MS = 8  # metadata bytes per block in the extended-LBA row (512 + 8)


@dataclass
class Variant:
    crc: str  # "crc16" | "crc64" | "copy"
    shape: str
    name: str
    fn: Callable[[], Any]
    number: int = 0  # calls per timeit repeat, calibrated to ~20 ms


def third_party() -> tuple[dict[str, dict[str, Callable[[bytes], int]]], dict[str, str]]:
    """{package: {crc: single-buffer function}} for what imports, and {package: version or why not}."""
    found: dict[str, dict[str, Callable[[bytes], int]]] = {}
    notes: dict[str, str] = {}
    try:
        import fastcrc

        found["fastcrc"] = {"crc16": fastcrc.crc16.t10_dif}
        notes["fastcrc"] = _version("fastcrc") + " (no CRC-64/NVME)"
    except ImportError as e:
        notes["fastcrc"] = f"not installed: {e}"
    try:
        import anycrc

        found["anycrc"] = {"crc16": anycrc.Model("CRC16-T10-DIF").calc, "crc64": anycrc.Model("CRC64-NVME").calc}
        notes["anycrc"] = _version("anycrc")
    except ImportError as e:
        notes["anycrc"] = f"not installed: {e}"
    try:
        import crcmod
        import crcmod.crcmod

        m16, m64 = crc.CRC16_T10DIF, crc.CRC64_NVME
        # crcmod wants the polynomial with its x^width term, and the init XORed with xorout
        found["crcmod"] = {"crc16": crcmod.mkCrcFun(m16.poly | 1 << 16, initCrc=m16.init ^ m16.xorout, rev=False, xorOut=m16.xorout),
                           "crc64": crcmod.mkCrcFun(m64.poly | 1 << 64, initCrc=m64.init ^ m64.xorout, rev=True, xorOut=m64.xorout)}
        ext = getattr(crcmod.crcmod, "_usingExtension", False)
        notes["crcmod"] = f"{_version('crcmod-plus') or _version('crcmod')} ({'C extension' if ext else 'pure Python'})"
    except ImportError as e:
        notes["crcmod"] = f"not installed: {e}"
    # each must give the model's check value, or it measures something else
    for pkg, fns in found.items():
        for name, fn in fns.items():
            model = crc.CRC16_T10DIF if name == "crc16" else crc.CRC64_NVME
            if fn(b"123456789") != model.check:
                raise SystemExit(f"{pkg} {name}: wrong check value {fn(b'123456789'):#x}")
    return found, notes


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def variants(data: bytes, found: dict[str, dict[str, Callable[[bytes], int]]], *, bitwise: bool) -> list[Variant]:
    mv = memoryview(data)
    ext = np.random.default_rng(26).bytes(8 * (512 + EXT_MS))
    src, dst = bytearray(data), bytearray(IO)
    out: list[Variant] = [Variant("copy", "4096", "bytearray slice (4 KiB copy)", lambda: src[0:IO]),
                          Variant("copy", "4096", "memoryview slice store (4 KiB copy)", lambda: dst.__setitem__(slice(0, IO), mv))]
    singles = {"crc16": crc.crc16_t10dif, "crc64": crc.crc64_nvme}
    bulks = {"crc16": (crc.crc16_t10dif_blocks, np.uint16), "crc64": (crc.crc64_nvme_blocks, np.uint64)}
    models = {"crc16": crc.CRC16_T10DIF, "crc64": crc.CRC64_NVME}
    for name in ("crc16", "crc64"):
        bulk, dtype = bulks[name]
        guards = np.zeros(8, dtype)  # sized once, reused by every I/O (as the engine would)
        for shape, (n, b) in SHAPES.items():
            out.append(Variant(name, shape, "C bulk (one call)", partial(bulk, mv, n, b, guards)))
            if n > 1:
                out.append(Variant(name, shape, f"C bulk, extended LBA (stride {b + EXT_MS})",
                                   partial(bulk, ext, n, b, guards, stride=b + EXT_MS)))
            out.append(Variant(name, shape, "C per block (Python loop)", _per_block(singles[name], mv, n, b)))
            for pkg, fns in found.items():
                if name in fns:
                    out.append(Variant(name, shape, f"{pkg} per block", _per_block(fns[name], mv, n, b)))
            if bitwise:
                out.append(Variant(name, shape, "python bitwise (reference)", _per_block(partial(crc.reference, models[name]), mv, n, b)))
    return out


def _per_block(fn: Callable[[Any], int], mv: memoryview, n: int, b: int) -> Callable[[], list[int]]:
    """A guest-memory-like loop: slice the view per block (as a handler would), CRC each."""
    def run() -> list[int]:
        return [fn(mv[i * b:(i + 1) * b]) for i in range(n)]
    return run


def calibrate(v: Variant, target: float = 0.02) -> None:
    number = 1
    while True:
        t = timeit.timeit(v.fn, number=number)
        if t >= target or number >= 1 << 20:
            v.number = max(1, int(number * target / max(t, 1e-9)))
            return
        number *= 4


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = np.random.default_rng(26).bytes(IO)
    found, notes = third_party()
    vs = variants(data, found, bitwise=not args.no_bitwise)
    for v in vs:
        calibrate(v)
    per_round: dict[int, list[float]] = {i: [] for i in range(len(vs))}
    for rnd in range(args.rounds):
        order = list(range(len(vs)))
        k = rnd % len(order)
        for i in order[k:] + order[:k]:
            v = vs[i]
            per_round[i].append(min(timeit.repeat(v.fn, number=v.number, repeat=3)) / v.number * 1e6)
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    copy_us = statistics.median(per_round[0])
    rows = []
    for i, v in enumerate(vs):
        us = per_round[i]
        med = statistics.median(us)
        bulk = next((statistics.median(per_round[j]) for j, w in enumerate(vs)
                     if w.crc == v.crc and w.shape == v.shape and w.name == "C bulk (one call)"), None)
        rows.append({"crc": v.crc, "shape": v.shape, "variant": v.name, "us_per_io": med, "us_min": min(us), "us_max": max(us),
                     "spread_pct": (max(us) - min(us)) / med * 100, "mb_s": IO / med, "x_copy": med / copy_us,
                     "x_bulk": med / bulk if bulk else None, "rounds_us": us, "calls_per_repeat": v.number})
    return {"machine": machine(), "rounds": args.rounds, "io_bytes": IO, "third_party": notes, "rows": rows}


def plot(result: dict[str, Any], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = result["rows"]
    labels = [f"{r['crc']} {r['shape']}: {r['variant']}" for r in rows]
    med = [r["us_per_io"] for r in rows]
    err = [[r["us_per_io"] - r["us_min"] for r in rows], [r["us_max"] - r["us_per_io"] for r in rows]]
    colors = ["0.5" if r["crc"] == "copy" else ("tab:blue" if r["crc"] == "crc16" else "tab:orange") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, med, xerr=err, color=colors, capsize=2)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("us per 4 KiB I/O (log scale; median of rounds, min-max bars)")
    ax.axvline(rows[0]["us_per_io"], color="0.5", ls=":", lw=1)
    m = describe_machine(result["machine"]).split(", Python")
    ax.set_title(f"guard CRC per 4 KiB I/O, {result['rounds']} rounds\n{m[0]}\nPython{m[1] if len(m) > 1 else ''}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="every variant this often, order rotating; median round reported")
    ap.add_argument("--no-bitwise", action="store_true", help="leave out the bit-by-bit Python rows (the slowest)")
    ap.add_argument("--label", default="", help="results go to pi_crc[-LABEL].json/png")
    args = ap.parse_args(argv)
    result = run(args)
    print(describe_machine(result["machine"]))
    for pkg, note in result["third_party"].items():
        print(f"  {pkg}: {note}")
    print(format_table(result["rows"], [("crc", "crc", ""), ("shape", "blocks", ""), ("variant", "variant", ""),
                                        ("us_per_io", "us/IO", ".3f"), ("spread_pct", "spread %", ".0f"), ("mb_s", "MB/s", ".0f"),
                                        ("x_copy", "x copy", ".1f"), ("x_bulk", "x C bulk", ".2f")]))
    stem = "pi_crc" + (f"-{args.label}" if args.label else "")
    print(f"wrote {write_json(RESULTS / (stem + '.json'), result)}")
    plot(result, RESULTS / (stem + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
