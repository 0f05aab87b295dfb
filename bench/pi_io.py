"""4 KiB I/O with and without protection information: server CPU per I/O (issue 26).

The in-process rig of ``hot_path`` (a real :class:`NvmeFunction` on a prefilled 256 MiB RAM
namespace, memfd guest RAM, the shadow doorbell path, the server's calls timed by this
thread's CPU clock), once per namespace format, each in its own interpreter, the formats
interleaved round by round so that a noisy moment hits them alike:

``plain``        512-byte blocks, no metadata: the baseline (and what the issue says must not
                 get slower: ``hot_path --compare-tree`` measures that against the old tree)
``pi16-pract``   512 + 8, Type 1, 16b Guard (CRC-16/T10-DIF); PRACT = 1: the controller
                 strips the PI on reads and inserts it on writes, the host moves no metadata
``pi16-pract0``  the same format, PRACT = 0 on reads: the host gets the metadata through
                 MPTR (writes are left out: they would need the host to compute PI per LBA)
``pi64-pract``   512 + 16, Type 1, 64b Guard (CRC-64/NVME), PRACT = 1

Every command sets every PRCHK bit, and the stored PI is real (generated over the prefilled
data), so each read computes and compares eight guards; every completion's status is checked
(a failing check cannot look fast). Reported: server microseconds per 4 KiB I/O at QD1 and
QD32 (the best of ``--repeat`` runs in a round, the median of rounds, min-max), and each
format's ratio to ``plain`` taken within each round.

    ./dev bench pi_io [--rounds 5] [--ios 20000] [--label NAME]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import common
from common import RESULTS, format_table, machine, write_json
from hot_path import FORMATS, _measure_tree

QDS = [1, 32]
#: (format, rw) points; pi16-pract0 writes would need host-computed PI per command (see above).
POINTS = [(f, rw) for f in FORMATS for rw in ("read", "write") if (f, rw) != ("pi16-pract0", "write")]


def measure(rounds: int, ios: int, repeat: int, path: str) -> dict[tuple[str, str, int], list[float]]:
    """us per I/O for every (format, rw, QD), one value per round; the points' order rotates
    from round to round."""
    out: dict[tuple[str, str, int], list[float]] = {}
    for r in range(rounds):
        order = POINTS[r % len(POINTS):] + POINTS[: r % len(POINTS)]
        for fmt, rw in order:
            for row in _measure_tree(str(common.REPO), [path], QDS, ios, repeat, "ram", fmt, rw):
                out.setdefault((fmt, rw, row["qd"]), []).append(row["server_us_per_io"])
        print(f"round {r + 1}/{rounds} done", flush=True)
    return out


def summarize(per_round: dict[tuple[str, str, int], list[float]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for (fmt, rw, qd), values in per_round.items():
        base = per_round[("plain", rw, qd)]
        ratios = sorted(v / b for v, b in zip(values, base, strict=True))
        rows.append({"format": fmt, "rw": rw, "qd": qd, "us_per_io": statistics.median(values), "us_min": min(values),
                     "us_max": max(values), "vs_plain": statistics.median(ratios), "vs_plain_min": ratios[0],
                     "vs_plain_max": ratios[-1], "rounds_us_per_io": values})
    rows.sort(key=lambda r: (r["rw"], r["qd"], list(FORMATS).index(r["format"])))
    return rows


def plot(rows: list[dict], result: dict, path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    labels = [f"{r['rw']} QD{r['qd']} {r['format']}" for r in rows]
    med = [r["us_per_io"] for r in rows]
    err = [[r["us_per_io"] - r["us_min"] for r in rows], [r["us_max"] - r["us_per_io"] for r in rows]]
    colors = ["0.5" if r["format"] == "plain" else ("tab:blue" if "pi16" in r["format"] else "tab:orange") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, med, xerr=err, color=colors, capsize=2)
    ax.set_yticks(y, labels, fontsize=7)
    for yi, r in zip(y, rows, strict=True):
        ax.text(r["us_max"], yi, f"  {r['vs_plain']:.1f}x", va="center", fontsize=7)
    ax.set_xlabel("server us per 4 KiB I/O (thread CPU; median of rounds, min-max bars; label: x plain, same round)")
    m = common.describe_machine(result["machine"])
    ax.set_title(f"4 KiB I/O with and without PI, shadow doorbell, {result['config']['rounds']} rounds\n{m}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ios", type=int, default=20_000, help="I/Os per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per point and round; the best counts")
    ap.add_argument("--path", default="shadow", help="the doorbell path (hot_path's)")
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    import hot_path

    hot_path._CLOCK[0] = "thread"  # the children time by CPU: a loaded machine inflates wall time
    rows = summarize(measure(args.rounds, args.ios, args.repeat, args.path))
    print(format_table(rows, [("rw", "rw", ""), ("qd", "QD", "d"), ("format", "format", ""), ("us_per_io", "server us/IO", ".2f"),
                              ("us_min", "min", ".2f"), ("us_max", "max", ".2f"), ("vs_plain", "x plain", ".2f"),
                              ("vs_plain_min", "min", ".2f"), ("vs_plain_max", "max", ".2f")]))
    name = "pi_io" + (f"-{args.label}" if args.label else "")
    result = {"benchmark": "pi_io", "machine": machine(), "config": vars(args), "results": rows}
    write_json(RESULTS / f"{name}.json", result)
    plot(rows, result, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
