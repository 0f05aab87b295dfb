"""Fixtures for the per-spec-area tests (helpers in area_helpers.py: a conftest module name
is shared by every test directory, so tests import helpers from a module of their own)."""

from __future__ import annotations

from typing import Iterator

import pytest
from .area_helpers import Area, Guest, make_area


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def area(guest: Guest) -> Iterator[Area]:
    a = make_area(guest)
    yield a
    for ns in a.state.namespaces.values():
        ns.close()
