"""Fixtures of the Zoned set's area tests (defined in area.py) and the server factory of the
controller suite (tests/nvme_ctrl), made visible to the tests here."""

from ..nvme_ctrl.ctrl_helpers import spawn  # noqa: F401
from .area import guest, zoned  # noqa: F401
