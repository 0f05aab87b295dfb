"""A server under test as a separate process: start, readiness, what it holds, stats, stop.

Every suite and benchmark that runs a server (``nvme-emu serve`` on either vfio-user backend,
the sample device, ``tests/libvfio/serve_device.py``) runs it through :class:`ServerProcess`,
so that what we count is the server's own state: its fds (``/proc/PID/fd``), its guest-memory
mappings (``/proc/PID/maps``: the memfds a client maps in are named ``guest-ram`` or
``hostile``), its CPU time. The process writes stdout and stderr to one log file, which the
fixtures print at teardown (pytest shows it for failing tests).

Every wait is for a condition (a line in the log, a file, an fd count) and is bounded by
:data:`DEADLINE`: a test that hits the bound fails rather than hangs; none asserts on speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[2]
#: Upper bound for anything we wait for.
DEADLINE = 10.0
#: Start-up may import numpy and compile the atomics module on a cold cache, or run under
#: TCG in the nested rig.
START_DEADLINE = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The line ``nvme-emu serve`` prints once the vfio-user socket and the control socket listen.
NVME_EMU_READY = "serving"
#: What the sample device and serve_device.py print once they listen.
DEVICE_READY = "serving on"


def wait_until(cond: Callable[[], bool], what: str, timeout: float = DEADLINE, *, poll: float = 0.002) -> None:
    """Return once ``cond()`` holds; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def child_env(root: Path | str = REPO) -> dict[str, str]:
    """The environment of a server process: this checkout's code first, output unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def read_file(path: str) -> str:
    """A small file's text (/proc entries), empty when it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class ServerProcess:
    """One server process, its socket ``path`` and its log.

    The constructor returns once ``ready`` appears in the log (the server printed that it
    listens) or raises with the log. ``stats_path``: where the server dumps its counters as
    JSON on SIGUSR1 (``nvme-emu serve --stats-json``), for :meth:`stats`. ``root``: the
    checkout whose code runs (first on PYTHONPATH; the working directory unless ``cwd``).
    """

    def __init__(self, argv: Sequence[str], path: str, log_path: Path, *, ready: str, root: Path | str = REPO,
                 cwd: Path | str | None = None, stats_path: str | None = None, backend: str | None = None,
                 preexec_fn: Callable[[], object] | None = None) -> None:
        self.argv = list(argv)
        #: the vfio-user backend serving (python or libvfio-user), when the caller chose one
        self.backend = backend
        self.path = path
        self.log_path = log_path
        self.stats_path = stats_path
        self.returncode: int | None = None
        #: fds the server holds with no client (set by :meth:`settle`)
        self.baseline_fds: int | None = None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        start = self._log.tell()  # a reused log: readiness is this process's line, not an old one
        self.proc = subprocess.Popen(self.argv, cwd=str(cwd or root), env=child_env(root), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        try:
            wait_until(lambda: ready in self.log(since=start) or self.proc.poll() is not None, f"{ready!r} in the log", START_DEADLINE)
        except BaseException as e:
            self.kill()
            if isinstance(e, AssertionError):
                raise AssertionError(f"{e}:\n{self.log(since=start)}") from None
            raise
        if ready not in self.log(since=start):
            self.kill()
            raise RuntimeError(f"server exited with {self.proc.returncode} at start-up:\n{self.log(since=start)}")

    @classmethod
    def nvme_emu(cls, path: str, log_path: Path, args: Sequence[str] = (), *, python: str | None = None,
                 prefix: Sequence[str] = (), root: Path | str = REPO, backend: str | None = None,
                 preexec_fn: Callable[[], object] | None = None) -> "ServerProcess":
        """``nvme-emu serve --socket PATH --stats-json PATH.stats.json ARGS``; ``prefix`` goes
        before the interpreter (e.g. ``taskset``), ``root`` is the checkout whose code runs."""
        stats = path + ".stats.json"
        for p in (path, stats):
            _unlink(p)
        argv = [*prefix, python or sys.executable, "-m", "nvme_emu", "serve", "--socket", path, "--stats-json", stats, *args]
        return cls(argv, path, log_path, ready=NVME_EMU_READY, root=root, stats_path=stats, backend=backend, preexec_fn=preexec_fn)

    @classmethod
    def serve(cls, path: str, log_path: Path, namespaces: Sequence[str] = ("ram:size=16M",), *, backend: str = "python",
              doorbell: str = "trap", extra: Sequence[str] = (), preexec_fn: Callable[[], object] | None = None) -> "ServerProcess":
        """``nvme-emu serve`` on ``backend`` with these namespaces and doorbell mode;
        ``preexec_fn`` runs in the child before the exec (e.g. to lower its fd limit)."""
        args = ["--backend", backend, "--doorbell", doorbell]
        for ns in namespaces:
            args += ["--namespace", ns]
        return cls.nvme_emu(path, log_path, [*args, *extra], backend=backend, preexec_fn=preexec_fn)

    @classmethod
    def sample(cls, path: str, log_path: Path, backend: str = "python") -> "ServerProcess":
        """The Ticker sample device (``python -m vfio_user.sample``) on ``backend``."""
        srv = cls([sys.executable, "-m", "vfio_user.sample", "--socket", path, "--backend", backend], path, log_path,
                  ready=DEVICE_READY, backend=backend)
        assert f"(backend {backend})" in srv.log(), srv.log()
        return srv

    @classmethod
    def device(cls, backend: str, device: str, path: str, log_path: Path, *extra: str) -> "ServerProcess":
        """``tests/libvfio/serve_device.py``: one device (ticker or nvme) on one backend."""
        argv = [sys.executable, "-m", "tests.libvfio.serve_device", "--backend", backend, "--device", device, "--socket", path, *extra]
        srv = cls(argv, path, log_path, ready=DEVICE_READY, backend=backend)
        assert f"(backend {backend})" in srv.log(), srv.log()
        return srv

    # -- state ---------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, since: int = 0) -> str:
        """What the server wrote so far (stdout and stderr), from byte ``since`` of its log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, count: int = 1, timeout: float = DEADLINE) -> str:
        """Until ``text`` appeared ``count`` times in the log; the log then."""
        out = ""

        def seen() -> bool:
            nonlocal out
            out = self.log()
            if out.count(text) >= count:
                return True
            if not self.alive():
                raise AssertionError(f"server exited ({self.proc.returncode}) before logging {text!r} x{count}:\n{out[-4000:]}")
            return False

        try:
            wait_until(seen, f"{text!r} x{count} in the server log", timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}:\n{out[-4000:]}") from None
        return out

    def fds(self) -> list[str]:
        """The server's open fds and what they are (for leak reports)."""
        d = f"/proc/{self.pid}/fd"
        out = []
        for name in os.listdir(d):
            try:
                out.append(f"{name} -> {os.readlink(os.path.join(d, name))}")
            except OSError:
                pass
        return sorted(out)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait_fds(self, expected: int | None = None, timeout: float = DEADLINE) -> int:
        """Wait (bounded) until the server holds ``expected`` fds (default: its baseline);
        the count at the end, for the caller to compare."""
        want = self.baseline_fds if expected is None else expected
        n = self.fd_count()
        deadline = time.monotonic() + timeout
        while n != want and time.monotonic() < deadline:
            time.sleep(0.005)
            n = self.fd_count()
        return n

    def guest_mappings(self) -> int:
        """Mappings of client memfds (guest RAM) in the server's address space."""
        with open(f"/proc/{self.pid}/maps") as f:
            return sum(1 for line in f if "memfd:guest" in line or "memfd:hostile" in line)

    @property
    def mappings_per_dma_map(self) -> int:
        """``guest_mappings()`` per fd-backed DMA map: libvfio-user maps the fd, and our glue
        re-maps those pages (``mremap(old, 0, len)``) so a view outlives the library's munmap."""
        return 2 if self.backend == "libvfio-user" else 1

    def rss_kb(self) -> int:
        return self.memory_kb().get("VmRSS", 0)

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and its parts: anonymous (the Python heap: what a leak grows), shared memory
        (a RAM namespace's memfd filling up as LBAs are first written) and file pages."""
        out = {}
        for line in read_file(f"/proc/{self.pid}/status").splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssShmem", "RssFile"):
                out[key] = int(line.split()[1])
        return out

    def cpu_seconds(self) -> float:
        """utime + stime of the server (clock ticks -> seconds)."""
        fields = read_file(f"/proc/{self.pid}/stat").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def ctx_switches(self) -> tuple[int, int]:
        """(voluntary, involuntary) context switches: voluntary ones are the server sleeping
        and being woken up again, i.e. OS-level wake-ups."""
        vol = invol = 0
        for line in read_file(f"/proc/{self.pid}/status").splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol = int(line.split()[1])
        return vol, invol

    def stats(self, timeout: float = DEADLINE) -> dict[str, Any]:
        """``function.stats()`` of the server: SIGUSR1 makes it write them as JSON."""
        if self.stats_path is None:
            raise RuntimeError("this server was not started with --stats-json")
        _unlink(self.stats_path)
        self.proc.send_signal(signal.SIGUSR1)
        stats_path = self.stats_path
        wait_until(lambda: os.path.exists(stats_path) or not self.alive(), "the server's stats file", timeout)
        if not self.alive():
            raise RuntimeError(f"server exited instead of writing stats:\n{self.log()[-2000:]}")
        with open(stats_path) as f:
            return json.load(f)

    # -- clients -------------------------------------------------------------------------

    def settle(self) -> int:
        """One full client session, then the baseline fd count (the event loop allocates
        some fds lazily on its first accept): the server logs "client gone" once the
        session's fds are closed."""
        from vfio_user.vmm.client import VfioUserClient

        gone = self.log().count("client gone")
        c = VfioUserClient(self.path, timeout=DEADLINE)
        try:
            c.negotiate()
        finally:
            c.close()
        self.wait_log("client gone", gone + 1)
        self.baseline_fds = self.fd_count()
        return self.baseline_fds

    def wait_idle(self) -> None:
        """Until the previous client is gone (the server refuses a second one meanwhile)."""
        self.wait_log("client gone", self.log().count("client connected"))

    def connect(self, *, negotiate: bool = True, **kw: Any):
        """A client of this server (negotiated unless told otherwise)."""
        from vfio_user.vmm.client import VfioUserClient

        client = VfioUserClient(self.path, timeout=DEADLINE, **kw)
        if negotiate:
            try:
                client.negotiate()
            except BaseException:
                client.close()
                raise
        return client

    def answers(self) -> bool:
        """A fresh client can negotiate and read a register."""
        self.wait_idle()
        c = self.connect()
        try:
            cap = c.region_read(0, 0, 8)
            return len(cap) == 8 and cap != bytes(8)
        finally:
            c.close()

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send ``sig`` (SIGTERM: the server flushes its namespaces and exits 0) and wait;
        the exit status, None when it had to be killed."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.returncode = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            else:
                self.returncode = self.proc.returncode
        self._close()
        return self.returncode

    def stop_clean(self, bad: str = r"\b(ERROR|CRITICAL)\b|Traceback") -> str:
        """SIGTERM: the server must exit 0 with no log line matching ``bad``; its log."""
        rc = self.stop()
        text = self.log()
        assert rc == 0, f"{self.log_path.name}: exit status {rc}:\n{text[-4000:]}"
        errors = [line for line in text.splitlines() if re.search(bad, line)]
        assert not errors, f"{self.log_path.name} carries errors:\n" + "\n".join(errors)
        return text

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.returncode is None:
            self.returncode = self.proc.returncode
        self._close()

    def _close(self) -> None:
        if not self._log.closed:
            self._log.close()
        if self.stats_path is not None:
            _unlink(self.stats_path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
