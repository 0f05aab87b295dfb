"""Helpers shared by the benchmarks: machine description, tables, JSON and PNG output, and the
nvme-emu server as a separate process with its counters and CPU time.

Benchmarks are not tests: nothing here asserts on speed. Machines are shared and noisy, so a
benchmark compares its variants side by side within one run and reports ratios.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

if str(REPO) not in sys.path:  # `python bench/NAME.py` from anywhere
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on (stored next to every result)."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    mem_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal:")), 0)
    versions = {}
    for mod in ("numpy", "uvloop", "construct", "matplotlib"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    kvm_modules = [line.split()[0] for line in _read("/proc/modules").splitlines() if line.startswith("kvm")]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "os": (_read("/etc/os-release").split('PRETTY_NAME="', 1)[-1].split('"', 1)[0] or platform.platform()),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "virtualization_flags": [f for f in flags if f in ("vmx", "svm", "hypervisor")],
        "kvm_modules": kvm_modules,
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "loadavg_at_start": _read("/proc/loadavg").split()[:3],
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


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (clock ticks -> seconds)."""
    fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_ctx_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches: voluntary ones are the process sleeping and
    being woken up again, i.e. OS-level wake-ups."""
    vol = invol = 0
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            invol = int(line.split()[1])
    return vol, invol


class ServeProcess:
    """``python -m nvme_emu serve ... --stats-json PATH``; counters on demand via SIGUSR1."""

    def __init__(
        self, sock: str, args: Sequence[str], log_path: Path, *, python: str | None = None, prefix: Sequence[str] = (), tree: Path | str | None = None
    ) -> None:
        self.sock = sock
        self.stats_path = sock + ".stats.json"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        for p in (sock, self.stats_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        # ``tree``: serve another checkout's code (e.g. the code before an optimisation)
        root = str(tree or REPO)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
        cmd = [*prefix, python or sys.executable, "-m", "nvme_emu", "serve", "--socket", sock, "--stats-json", self.stats_path, *args]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stats(self, timeout: float = 10.0) -> dict:
        """function.stats() of the server, as JSON written on SIGUSR1."""
        try:
            os.unlink(self.stats_path)
        except FileNotFoundError:
            pass
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.stats_path):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"server wrote no stats:\n{self.log()[-2000:]}")
            time.sleep(0.002)
        with open(self.stats_path) as f:
            return json.load(f)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def ctx_switches(self) -> tuple[int, int]:
        return proc_ctx_switches(self.pid)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        for p in (self.stats_path,):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        return self.proc.returncode


def _cpu_busy_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    v = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
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
