"""Helpers for the vfio_user tests: the sample server as a separate process, eventfd utilities.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from vfio_user.vmm.client import VfioUserClient
from vfio_user.constants import FLAG_NO_REPLY, HEADER_SIZE
from vfio_user.messages import HEADER

REPO = Path(__file__).resolve().parents[2]
#: Upper bound for anything we wait for; a test that hits it fails, it never asserts on speed.
DEADLINE = 10.0


class ServerProcess:
    """A running ``python -m vfio_user.sample`` with its socket path and stderr log."""

    def __init__(self, path: str, log_path: Path) -> None:
        self.path = path
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vfio_user.sample", "--socket", path],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        deadline = time.monotonic() + DEADLINE
        assert self.proc.stdout is not None
        line = b""
        while b"\n" not in line:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, remaining))
            if not ready:
                self.kill()
                raise RuntimeError(f"server did not start:\n{self.stderr()}")
            ch = os.read(self.proc.stdout.fileno(), 4096)
            if not ch:
                self.kill()
                raise RuntimeError(f"server exited at start-up:\n{self.stderr()}")
            line += ch
        assert b"serving on" in line and os.path.exists(path), line
        # One probe client first: the event loop allocates some fds lazily on its first
        # accept; the baseline is taken once the probe's session is gone (logged by the server).
        probe = VfioUserClient(path, timeout=DEADLINE)
        probe.negotiate()
        probe.close()
        self.wait_log("client gone", 1)
        self.baseline_fds = self.fd_count()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> list[str]:
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

    def wait_fd_count(self, expected: int | None = None) -> int:
        """Wait (bounded) until the server holds ``expected`` fds (default: its baseline)."""
        expected = self.baseline_fds if expected is None else expected
        deadline = time.monotonic() + DEADLINE
        while True:
            n = self.fd_count()
            if n == expected or time.monotonic() > deadline:
                return n
            time.sleep(0.005)

    def connect(self, *, negotiate: bool = True, **kw) -> VfioUserClient:
        client = VfioUserClient(self.path, timeout=DEADLINE, **kw)
        if negotiate:
            client.negotiate()
        return client

    def wait_log(self, text: str, count: int) -> None:
        """Wait (bounded) until ``text`` appeared ``count`` times in the server's log."""
        deadline = time.monotonic() + DEADLINE
        while self.stderr().count(text) < count:
            if time.monotonic() > deadline or not self.alive():
                raise AssertionError(f"server never logged {text!r} x{count}:\n{self.stderr()}")
            time.sleep(0.005)

    def stderr(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def eventfd_count(fd: int) -> int:
    """Non-blocking read of an eventfd: 0 when it has not fired."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait_eventfd(fd: int, timeout: float = DEADLINE) -> int:
    """Select on an eventfd and read its counter; 0 if it did not fire in ``timeout``."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return 0
    return eventfd_count(fd)


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def ticker_ring(client: VfioUserClient, value: int, *, posted: bool = False) -> None:
    """Write the sample device's DOORBELL register (raises vector ``value & 1``)."""
    client.region_write(0, 0x8, value.to_bytes(4, "little"), posted=posted)


def u32(data: bytes) -> int:
    return int.from_bytes(data, "little")


def read32(client: VfioUserClient, region: int, offset: int) -> int:
    return u32(client.region_read(region, offset, 4))


def write32(client: VfioUserClient, region: int, offset: int, value: int, *, posted: bool = False) -> None:
    client.region_write(region, offset, value.to_bytes(4, "little"), posted=posted)


def exchange(client: VfioUserClient, command: int, payload: bytes = b"", fds=(), *, flags: int = 0, size: int | None = None):
    """Send one hand-made request and return its reply Message, error replies included.

    ``size`` overrides the header's size field (for malformed messages).
    """
    msg_id = client.conn.request(command)[0]  # allocate an id the client will expect a reply to
    hdr = HEADER.pack(msg_id, command, HEADER_SIZE + len(payload) if size is None else size, flags, 0)
    send_bytes(client, hdr + payload, fds)
    return client.wait_reply(msg_id)


def send_bytes(client: VfioUserClient, data: bytes, fds=()) -> None:
    """Raw bytes on the client's socket; fds (if any) ride on the first byte."""
    fds = list(fds)
    if fds:
        client.send_raw(data, fds)
    else:
        client.sock.sendall(data)


def send_posted(client: VfioUserClient, command: int, payload: bytes = b"", fds=(), *, size: int | None = None) -> int:
    """Send a NO_REPLY request by hand; returns its id (no reply is expected for it)."""
    msg_id = client.conn.request(command, no_reply=True)[0]
    send_bytes(client, HEADER.pack(msg_id, command, HEADER_SIZE + len(payload) if size is None else size, FLAG_NO_REPLY, 0) + payload, fds)
    return msg_id


def assert_error(reply, err: int) -> None:
    assert reply.is_reply and reply.is_error, f"expected error {errno.errorcode[err]}, got a success reply"
    assert reply.error_no == err, f"expected {errno.errorcode[err]}, got {errno.errorcode.get(reply.error_no, reply.error_no)}"
    assert reply.payload == b"" and reply.fds == []
