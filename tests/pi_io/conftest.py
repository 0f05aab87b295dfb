"""The metadata commands' in-process rig: an Area (tests/nvme_areas) with two namespaces in
real guest memory, for the tests that drive NvmCommands.execute."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.nvme_areas.area_helpers import Area, Guest, make_area


@pytest.fixture
def area() -> Iterator[Area]:
    guest = Guest()
    try:
        yield make_area(guest, namespaces=2)
    finally:
        guest.close()
