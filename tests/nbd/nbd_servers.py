"""Real NBD servers for the nbd: backend's tests, started and stopped by the tests: nbdkit
(its memory plugin, with filters that take flags away) and qemu-nbd serving a file, each on a
Unix socket in the test's directory. A test skips, saying why, only when the binary is not
installed (``./dev test`` installs Debian's nbdkit and qemu-utils)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

#: How long a server may take to listen (nbdkit: ~20 ms here, qemu-nbd: ~60 ms).
START_TIMEOUT_S = 10.0


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: {'qemu-utils' if binary == 'qemu-nbd' else binary}; ./dev test installs it)")
    return path


def need_libnbd() -> None:
    try:
        import nbd  # noqa: F401
    except ImportError as e:
        pytest.skip(f"libnbd's Python binding is not importable ({e}); ./dev links Debian's python3-libnbd into the venv")


class NbdServer:
    """One server process on ``socket``: start, kill (SIGKILL), start again on the same socket."""

    def __init__(self, argv: list[str], socket: Path, export: str = "") -> None:
        self.argv = argv
        self.socket = socket
        self.export = export
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def start(self) -> "NbdServer":
        if self.socket.exists():
            self.socket.unlink()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited {self.proc.returncode}: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[0]} did not listen on {self.socket} in {START_TIMEOUT_S} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """SIGSTOP, and wait until it took (the signal is delivered asynchronously)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + START_TIMEOUT_S
        while Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[0]} did not stop")
            time.sleep(0.005)

    def cont(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a stopped one too: SIGKILL needs no SIGCONT (which would let it answer what waits first)
            self.proc.wait(timeout=START_TIMEOUT_S)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


def nbdkit(tmp: Path, *args: str, name: str = "nbdkit") -> NbdServer:
    """nbdkit in the foreground on a Unix socket: ``args`` are its filters, plugin and parameters."""
    sock = tmp / f"{name}.sock"
    return NbdServer([need("nbdkit"), "--foreground", "--exit-with-parent", "-U", str(sock), *args], sock)


def qemu_nbd(tmp: Path, image: Path, *, export: str = "disk", name: str = "qemu-nbd") -> NbdServer:
    """qemu-nbd serving a raw file to up to 8 clients (the tests look with a connection of their own); it offers no multi-conn for a writable export."""
    sock = tmp / f"{name}.sock"
    return NbdServer([need("qemu-nbd"), "-f", "raw", "--persistent", "--shared=8", "-x", export, "-k", str(sock), str(image)], sock, export)
