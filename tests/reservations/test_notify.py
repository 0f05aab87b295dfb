"""Reservation Notification log page queue and mask (features 82h), and the command data layouts."""

from __future__ import annotations

import struct

from nvme_emu.reservations.model import NotificationType as N
from nvme_emu.reservations.notify import MAX_QUEUED, NotificationQueue
from nvme_emu.reservations.report import ACQUIRE_DATA, REGISTER_DATA, RELEASE_DATA


def _page(data: bytes) -> tuple[int, int, int, int]:
    count, ntype, available, nsid = struct.unpack_from("<QBBxxI", data)
    return count, ntype, available, nsid


def test_queue_in_order_and_then_empty() -> None:
    q = NotificationQueue()
    assert q.post(N.REGISTRATION_PREEMPTED, 1, 0)
    assert q.post(N.RESERVATION_RELEASED, 2, 0)
    assert _page(q.read()) == (1, 1, 1, 1)
    assert _page(q.read()) == (2, 2, 0, 2)
    assert q.read() == bytes(64)


def test_masked_notice_is_not_queued() -> None:
    q = NotificationQueue()
    assert not q.post(N.RESERVATION_PREEMPTED, 1, 1 << 3)
    assert q.post(N.RESERVATION_PREEMPTED, 1, 1 << 1 | 1 << 2)  # other types masked only
    assert _page(q.read()) == (1, 3, 0, 1)


def test_queue_keeps_newest_and_count_skips_zero() -> None:
    q = NotificationQueue(count=0xFFFF_FFFF_FFFF_FFFF)
    q.post(N.RESERVATION_RELEASED, 1, 0)
    assert _page(q.read())[0] == 1
    for nsid in range(MAX_QUEUED + 5):
        q.post(N.RESERVATION_RELEASED, nsid, 0)
    assert _page(q.read()) == (7, 2, MAX_QUEUED - 1, 5)


def test_command_data_layouts() -> None:
    raw = (0x1122).to_bytes(8, "little") + (0x3344).to_bytes(8, "little")
    assert REGISTER_DATA.parse(raw).nrkey == 0x3344
    assert ACQUIRE_DATA.parse(raw).prkey == 0x3344
    assert RELEASE_DATA.parse(raw).crkey == 0x1122
    assert REGISTER_DATA.sizeof() == ACQUIRE_DATA.sizeof() == 16 and RELEASE_DATA.sizeof() == 8
