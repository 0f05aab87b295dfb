"""Fixtures of this suite live in ctrl_helpers.py (a unique module name: `conftest` is ambiguous
when several suites run in one pytest process, so tests import helpers from there)."""

from ctrl_helpers import *  # noqa: F401,F403  (re-export the fixtures)
