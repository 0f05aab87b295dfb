"""A notice becomes an asynchronous event only where that controller's host enabled it."""

from __future__ import annotations

import pytest

from nvme_emu.ana.events import async_event_for
from nvme_emu.ana.subsystem import ControllerNotice
from nvme_emu.spec.events import AsyncEventConfig, AsyncEventNotice, async_event_dw0
from nvme_emu.spec.log_pages import LogPageId

ANA = ControllerNotice(1, AsyncEventNotice.ASYMMETRIC_NAMESPACE_ACCESS_CHANGE, LogPageId.ASYMMETRIC_NAMESPACE_ACCESS)
ATTR = ControllerNotice(1, AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED, LogPageId.CHANGED_NAMESPACE_LIST, 5)


@pytest.mark.parametrize(
    ("notice", "aec", "dw0"),
    [
        (ANA, AsyncEventConfig.ASYMMETRIC_NAMESPACE_ACCESS, 0x0C_03_02),  # Notice, ANA Change, log 0Ch
        (ANA, AsyncEventConfig.NAMESPACE_ATTRIBUTE, None),
        (ANA, 0, None),
        (ATTR, AsyncEventConfig.NAMESPACE_ATTRIBUTE, 0x04_00_02),  # Notice, attribute changed, log 04h
        (ATTR, AsyncEventConfig.ASYMMETRIC_NAMESPACE_ACCESS, None),
    ],
)
def test_async_event_for(notice: ControllerNotice, aec: int, dw0: int | None) -> None:
    event = async_event_for(notice, aec)
    assert (None if event is None else async_event_dw0(*event)) == dw0
