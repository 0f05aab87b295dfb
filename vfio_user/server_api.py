"""What callers use of a vfio-user server, whichever backend serves the device.

Two backends serve the same :class:`~vfio_user.device.Device`: the pure-Python server
(:class:`vfio_user.server.Server`) and nutanix/libvfio-user through cffi
(:class:`vfio_user.libvfio.server.LibvfioUserServer`). :func:`vfio_user.backends.make_server`
picks one by :class:`ServerBackend`; callers (the CLI, the tests' harness, the benchmarks)
see only :class:`VfioUserServer`, so a device and its callers run unchanged on either.
"""

from __future__ import annotations

import enum
from typing import Protocol


class ServerBackend(enum.StrEnum):
    """A server backend, by the name a command line takes (``--backend``)."""

    PYTHON = "python"
    LIBVFIO_USER = "libvfio-user"
    #: libvfio-user when the library can be loaded, else python (resolved by make_server;
    #: a server's own ``backend`` is never AUTO)
    AUTO = "auto"


class VfioUserServer(Protocol):
    """A server of one device on a Unix socket path, one client at a time, then the next."""

    @property
    def backend(self) -> ServerBackend:
        """Which backend this is (never :attr:`ServerBackend.AUTO`)."""
        ...

    @property
    def path(self) -> str:
        """The socket path a client (QEMU) connects to."""
        ...

    @property
    def clients_served(self) -> int:
        """Clients attached so far (refused second clients not counted)."""
        ...

    async def start(self) -> None:
        """Bind and listen; the socket exists when this returns (QEMU never retries)."""
        ...

    async def serve_forever(self) -> None:
        """Start if not started, then serve until :meth:`close`."""
        ...

    def close(self) -> None:
        """Stop listening, drop the client, remove the socket path; the device stays open."""
        ...
