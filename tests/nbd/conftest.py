"""Fixtures of the nbd: backend's tests (servers in nbd_servers.py: a conftest module name is
shared by every test directory, so tests import helpers from a module of their own)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from .nbd_servers import NbdServer, nbdkit, need_libnbd, qemu_nbd


@pytest.fixture
def memory_server(tmp_path: Path) -> Iterator[NbdServer]:
    """nbdkit's memory plugin, 64 MiB: every flag offered, multi-conn included."""
    need_libnbd()
    server = nbdkit(tmp_path, "memory", "64M").start()
    yield server
    server.kill()


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[NbdServer]:
    """qemu-nbd serving a 16 MiB sparse file (no multi-conn)."""
    need_libnbd()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    server = qemu_nbd(tmp_path, image).start()
    yield server
    server.kill()
