"""The suite's fixtures are defined in libvfio_helpers.py and made visible to its tests here."""

from .libvfio_helpers import client, nvme_server, ticker  # noqa: F401
