"""The server backends by name: :func:`make_server` builds the one a caller picked.

The only module that knows both backends; each of them knows neither this module nor the
other (what they share is in :mod:`vfio_user.client_watch` and :mod:`vfio_user.server_api`).
"""

from __future__ import annotations

from typing import Any

from .device import Device
from .libvfio.library import available
from .libvfio.server import LibvfioUserServer
from .server import Server
from .server_api import ServerBackend, VfioUserServer


def make_server(backend: ServerBackend, device: Device, path: str, **options: Any) -> VfioUserServer:
    """A server of ``device`` on the socket ``path`` (AUTO: libvfio-user when the library can
    be loaded, else python). ``options`` are the backend's keyword arguments: both take
    ``mode``, ``handshake_timeout``, ``dma_timeout``, ``dma_unsealed``, ``on_connect`` and
    ``on_disconnect``; ``library_log_level`` is libvfio-user's and dropped for python,
    ``limits`` is python's and ignored by libvfio-user."""
    if backend == ServerBackend.AUTO:
        backend = ServerBackend.LIBVFIO_USER if available() else ServerBackend.PYTHON
    if backend == ServerBackend.LIBVFIO_USER:
        return LibvfioUserServer(device, path, **options)
    if backend == ServerBackend.PYTHON:
        options.pop("library_log_level", None)
        return Server(device, path, **options)
    raise ValueError(f"unknown backend {backend!r} ({', '.join(ServerBackend)})")
