"""Fixtures of this suite live in libvfio_helpers.py (a unique module name: `conftest` is ambiguous
when several suites run in one pytest process, so tests import helpers from there)."""

from libvfio_helpers import *  # noqa: F401,F403  (re-export the fixtures)
