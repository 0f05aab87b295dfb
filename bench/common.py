"""Helpers shared by the benchmarks: machine description, tables, JSON and PNG output, and the
nvme-emu server as a separate process (:class:`tests.support.server.ServerProcess`: counters,
CPU time, context switches).

Benchmarks are not tests: nothing here asserts on speed. Machines are shared and noisy, so a
benchmark compares its variants side by side within one run and reports ratios.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

if str(REPO) not in sys.path:  # `python bench/NAME.py` from anywhere: nvme_emu, tests.support
    sys.path.insert(0, str(REPO))

from tests.support.server import ServerProcess, read_file  # noqa: E402  (after REPO is importable)


# --------------------------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on (stored next to every result)."""
    cpuinfo = read_file("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    mem_kib = next((int(line.split()[1]) for line in read_file("/proc/meminfo").splitlines() if line.startswith("MemTotal:")), 0)
    versions = {}
    for mod in ("numpy", "uvloop", "construct", "matplotlib"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    kvm_modules = [line.split()[0] for line in read_file("/proc/modules").splitlines() if line.startswith("kvm")]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "os": (read_file("/etc/os-release").split('PRETTY_NAME="', 1)[-1].split('"', 1)[0] or platform.platform()),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "virtualization_flags": [f for f in flags if f in ("vmx", "svm", "hypervisor")],
        "kvm_modules": kvm_modules,
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "loadavg_at_start": read_file("/proc/loadavg").split()[:3],
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "packages": versions,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def describe_machine(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu_model']}, {m['cpus']} CPUs, {m['mem_gib']} GiB, {m['os']}, kernel {m['kernel']}, "
        f"Python {m['python']}, git {m['git_commit']}{'+dirty' if m['git_dirty'] else ''}, load {' '.join(m['loadavg_at_start'])}"
    )


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (key, heading, format spec); a markdown table (reads fine in a terminal)."""
    cells = [[h for _k, h, _f in columns]]
    for r in rows:
        line = []
        for k, _h, f in columns:
            v = r.get(k)
            line.append("-" if v is None else (format(v, f) if f else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for n, c in enumerate(cells):
        out.append("| " + " | ".join(s.rjust(w) if n and i else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths, strict=True))) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed); None when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (./dev bench installs it)", file=sys.stderr)
        return None
    return plt


def percentile(values: Iterable[float], q: float) -> float | None:
    import numpy as np

    arr = np.asarray(list(values) if not hasattr(values, "__len__") else values, dtype=float)
    return float(np.percentile(arr, q)) if arr.size else None


# --------------------------------------------------------------------------------------------
# the server as a process
# --------------------------------------------------------------------------------------------


def serve(sock: str, args: Sequence[str], log_path: Path, *, python: str | None = None, prefix: Sequence[str] = (),
          tree: Path | str | None = None) -> ServerProcess:
    """``nvme-emu serve --socket SOCK ARGS`` with its counters on SIGUSR1; ``tree``: serve
    another checkout's code (e.g. the code before an optimisation)."""
    return ServerProcess.nvme_emu(sock, log_path, args, python=python, prefix=prefix, root=tree or REPO)


def _cpu_busy_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    v = [int(x) for x in read_file("/proc/stat").splitlines()[0].split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def machine_busy(window: float = 1.0) -> float:
    """Fraction of all CPUs busy during ``window`` seconds (other people's jobs included)."""
    b0, t0 = _cpu_busy_times()
    time.sleep(window)
    b1, t1 = _cpu_busy_times()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_quiet(max_wait: float, busy_max: float = 0.25, window: float = 2.0) -> float:
    """Wait (at most ``max_wait`` s) for a ``window`` in which the machine is at most
    ``busy_max`` busy; returns the busy fraction of the last window (recorded with results)."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = machine_busy(window)
        if busy <= busy_max or time.monotonic() >= deadline:
            return busy
        print(f"  machine {busy:.0%} busy with other work; waiting for a quieter moment...", flush=True)
