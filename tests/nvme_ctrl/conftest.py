"""The suite's fixtures are defined in ctrl_helpers.py and made visible to its tests here."""

from .ctrl_helpers import disk, inproc, io, namespaces, nvme, server, spawn  # noqa: F401
