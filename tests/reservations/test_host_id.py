"""The Host Identifier feature (81h): EXHID picks the width the controller supports."""

from __future__ import annotations

import pytest

from nvme_emu.reservations.host_id import get_host_id, set_host_id
from nvme_emu.spec.commands import Status

DATA = bytes(range(1, 17))


@pytest.mark.parametrize(
    ("exhid", "support_128", "registered", "status", "stored"),
    [
        (0, False, False, Status.SUCCESS, DATA[:8]),
        (1, True, False, Status.SUCCESS, DATA),
        (1, False, False, Status.INVALID_FIELD, None),  # 128-bit not supported
        (0, True, False, Status.INVALID_FIELD, None),  # 64-bit refused where 128-bit is required
        (0, False, True, Status.COMMAND_SEQUENCE_ERROR, None),  # host still registered
    ],
)
def test_set(exhid: int, support_128: bool, registered: bool, status: Status, stored: bytes | None) -> None:
    assert set_host_id(exhid, DATA, support_128=support_128, registered=registered) == (status, stored)


def test_short_data_is_invalid() -> None:
    assert set_host_id(0, DATA[:8], support_128=False, registered=False) == (Status.INVALID_FIELD, None)


@pytest.mark.parametrize(("host", "dw0", "data"), [(DATA[:8], 0, DATA[:8] + bytes(8)), (DATA, 1, DATA)])
def test_get(host: bytes, dw0: int, data: bytes) -> None:
    assert get_host_id(host) == (dw0, data)
