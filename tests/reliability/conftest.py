"""The suite's fixtures are defined in rel_helpers.py and made visible to its tests here."""

from .rel_helpers import small_tmpfs, spawn  # noqa: F401
